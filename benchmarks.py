"""How answers are scored: each benchmark's rule as LLaVA-1.5 applied it, and the table `evaluate.py score` reads.

    metrics = BENCHMARKS["pope"].score(args)   # what `python evaluate.py score pope --questions Q --answers A ...` does
    score_pope("llava_pope_test.jsonl", "pope.jsonl", "pope/output/coco")      # the same, called directly

One section per benchmark, each with its rule, its scorer and its flags, and the source it follows:
- ScienceQA-IMG: LLaVA's llava/eval/eval_science_qa.py (letter extraction; the number is the accuracy on questions
  with an image); the first paper's GPT-4 ensemble: llava/eval/eval_science_qa_gpt4_requery.py;
- POPE: llava/eval/eval_pope.py (the "no/not" rule; precision, recall, F1 per split; LLaVA reports the mean F1);
- VQAv2 / TextVQA: llava/eval/m4c_evaluator.py (EvalAI's answer normalisation and the 10-human soft accuracy) and
  llava/eval/eval_textvqa.py (how a TextVQA answer finds its question);
- GQA: scripts/convert_gqa_for_eval.py (lower-case, strip a trailing ".") and the official exact match;
- MME: the official eval_tool/calculation.py that ships with MME (its yes/no reading; acc + acc+ per subtask; in
  BradyFU/Awesome-Multimodal-Large-Language-Models, branch Evaluation, tools/eval_tool.zip), with
  MME/convert_answer_to_mme.py of LLaVA's eval.zip mapping LLaVA's questions back to the release's;
- LLaVA-Bench: llava/eval/summarize_gpt_review.py (the relative score, a ratio of means rounded to 3 decimals, averaged
  over judge runs); the judge that writes the reviews is judge.py (llava/eval/eval_gpt_review_bench.py).
All paths are in haotian-liu/LLaVA unless said otherwise.

The rest of LLaVA-1.5's table:
- MMBench, MMBench-CN: llava/eval/model_vqa_mmbench.py (the prompt from the TSV), open-compass/VLMEvalKit's
  CircularEval and rule-based matching (vlmeval/evaluate/multiple_choice.py, vlmeval/utils/matching_util.py), and
  scripts/convert_mmbench_for_submission.py (the server's .xlsx, written here with the standard library);
- SEED-Bench: scripts/convert_seed_for_submission.py (exact letter match; image and video accuracy);
- MM-Vet: yuweihao/MM-Vet mm-vet_evaluator.py (a GPT grader's 0-1 score, per capability; judge.py asks it) and
  scripts/convert_mmvet_for_eval.py;
- submission files for VQAv2 and VizWiz on EvalAI: scripts/convert_vqav2_for_submission.py,
  scripts/convert_vizwiz_for_submission.py.

The same rules for bad input everywhere: a question without an answer counts as wrong and is reported; an answer to a
question the question file does not have, a malformed line, a record without a field the rule reads (or with one of
another type), a file that is not UTF-8, is an error naming the file and line (read_jsonl, read_json, require). Files
written (submissions, reviews, grades) are written whole or not at all (atomic_write). A new benchmark is one more
section and one more entry in BENCHMARKS at the end.
"""

import base64
import binascii
import csv
import io
import json
import os
import re
import sys
import zipfile
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable
from xml.sax.saxutils import escape

from PIL import Image, UnidentifiedImageError

import judge
from data import DataError, read_samples
from generate import positive_int


# ----------------------------------------------------------------------------------------------------------------------
# Reading answers, and what every scorer does with them


ID = (str, int)  # a question_id: LLaVA's files use both


@contextmanager
def reading(path):
    """The errors of reading the file or folder `path` (missing, unreadable, not UTF-8, malformed JSON or TSV) as
    errors naming it."""
    try:
        yield
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); is it the file you meant?") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a readable TSV ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e}); check the path") from None


def read_jsonl(path, **fields):
    """JSON lines or a JSON list of objects (data.read_samples), each with `fields` (name=type): a malformed line, or a
    line without a field or with one of another type, is an error naming the file and line."""
    with reading(path):
        samples, places = read_samples(path)
    for sample, place in zip(samples, places):
        require(sample, fields, place)
    return samples


def read_questions(path, **fields):
    """read_jsonl for a file that must hold something: a question file, a key, labels."""
    questions = read_jsonl(path, **fields)
    if not questions:
        raise DataError(f"{path}: empty; is it the file you meant?")
    return questions


def read_json(path):
    """A JSON document (an annotation file, a key); malformed JSON is an error naming the file, line and column."""
    with reading(path), open(path, encoding="utf-8") as f:
        return json.load(f)


def list_folder(path):
    """The names in a folder, sorted; a missing folder, or a file, is an error naming it."""
    with reading(path):
        return sorted(os.listdir(path))


def require(record, fields, where):
    """`record` is a JSON object with `fields` (name=type or tuple of types), or an error naming `where`."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}; is it the file you meant?")
    for name, kind in fields.items():
        if name not in record:
            raise DataError(f"{where}: no {name!r} field (it has {sorted(record)[:8]}); is it the file you meant?")
        if not isinstance(record[name], kind):
            kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise DataError(f"{where}: {name!r} is {record[name]!r:.60}, not a {kinds}")
    return record


def entries(document, key, path, **fields):
    """document[key], a list of JSON objects with `fields`, each checked (errors name the file and the entry)."""
    require(document, {key: list}, path)
    return [require(entry, fields, f"{path}, {key}[{i}]") for i, entry in enumerate(document[key])]


def keyed(document, path, **fields):
    """The JSON object `document` as {id: entry}, each entry an object with `fields` (errors name the file and id)."""
    if not isinstance(document, dict) or not document:
        raise DataError(f"{path}: expected a non-empty JSON object of {{id: entry}}; is it the file you meant?")
    return {k: require(v, fields, f"{path}, {k!r}") for k, v in document.items()}


def read_appended(path, check, not_json):
    """The records of a JSON-lines file that a run appends to (and resumes from), each passed to check(record, where)
    first. The file is checked whole before it is touched: a line that is not JSON is an error (`not_json` says what
    the file should have been). Then a last line cut short by a crash (no newline, not JSON) is cut off the file with
    os.truncate, which removes those bytes alone: a crash during the repair cannot lose an earlier record."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")  # the last item: what follows the last newline, b"" in a whole file
    records, cut = [], None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # not JSON, or not UTF-8
            if n == len(lines):  # cut by a crash mid-line
                cut = len(line)
                break
            raise DataError(f"{path}, line {n}: {not_json}") from None
        check(record, f"{path}, line {n}")
        records.append(record)
    if cut is not None:
        print(f"warning: {path}: dropping its last line, cut short by an interrupted run", file=sys.stderr)
        os.truncate(path, os.path.getsize(path) - cut)
    elif lines[-1].strip():  # a whole last record without its newline (an edited file): give it one
        with open(path, "ab") as f:
            f.write(b"\n")
    return records


def beside(path, suffix):
    """A file written next to `path`: its extension replaced by `suffix` ("run.v1/a.jsonl" -> "run.v1/a" + suffix;
    a dot in a folder's name is not an extension)."""
    return os.path.splitext(path)[0] + suffix


def atomic_write(path, write, mode="w"):
    """write(f) to a temporary file beside `path`, flushed to disk, then renamed over it: a crash leaves the old file
    or the new one, never a part of one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def answers_by_id(path, questions):
    """question_id -> answer text; answers to questions the question file does not have are an error."""
    answers = {str(a["question_id"]): a["text"] for a in read_jsonl(path, question_id=ID, text=str)}
    unknown = sorted(set(answers) - {str(q) for q in questions})
    if unknown:
        raise DataError(f"{path}: {len(unknown)} answers to questions not in the question file, e.g. {unknown[:3]}; "
                        "is this the answers file of another benchmark?")
    return answers


def missing_report(questions, answers):
    """How many questions (ids, or the keys the answers are under) have no answer, with a warning if any."""
    missing = [q for q in questions if q not in answers and str(q) not in answers]
    if missing:
        print(f"warning: {len(missing)} of {len(questions)} questions have no answer; they count as wrong",
              file=sys.stderr)
    return len(missing)


# ----------------------------------------------------------------------------------------------------------------------
# ScienceQA-IMG (llava/eval/eval_science_qa.py)

OPTIONS = ("A", "B", "C", "D", "E")


def sqa_letter(text):
    """LLaVA's extraction: the letter alone; or "X. ..." ; or exactly one "The answer is X."; else FAILED (None)."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = re.findall(r"The answer is ([A-Z]).", text)
    return found[0] if len(found) == 1 else None


def sqa_answer_is(text):
    """The rule alone that LLaVA's GPT-4 scripts read every answer by: exactly one "The answer is X.", else None."""
    found = re.findall(r"The answer is ([A-Z]).", text)
    return found[0] if len(found) == 1 else None


def sqa_key(question, path):
    """The answer letter a question file holds in its gpt turn: the letter itself (LLaVA-1.5's llava_test_CQM-A.json)
    or a reply ending "The answer is X." (the first paper's QCM-LEA files, tools/scienceqa.py)."""
    turn = sqa_turn(question, 1, path).strip()
    key = turn if turn in OPTIONS else sqa_answer_is(turn)
    if key is None:
        raise DataError(f"{path}, question {question['id']!r}: its gpt turn is neither an option letter nor an answer "
                        "saying \"The answer is X.\" once; is it a ScienceQA question file with its answers?")
    return key


def sqa_turn(question, i, path):
    """Turn i of a ScienceQA question's conversation (0: the question, 1: the answer key), or an error naming it."""
    turns = question["conversations"]
    if len(turns) <= i or not isinstance(turns[i], dict) or not isinstance(turns[i].get("value"), str):
        raise DataError(f"{path}, question {question['id']!r}: conversations[{i}] has no 'value' text; is it "
                        "LLaVA's ScienceQA question file (llava_test_CQM-A.json)?")
    return turns[i]["value"]


def score_scienceqa(questions_path, answers_path):
    """The published number is img_accuracy: the questions with an image (2,017 of the 4,241). The key is in the
    question file, the gpt turn of each conversation."""
    questions = read_questions(questions_path, id=ID, conversations=list)
    answers = answers_by_id(answers_path, [q["id"] for q in questions])
    right, total, img_right, img_total = 0, 0, 0, 0
    for q in questions:
        key, letter = sqa_key(q, questions_path), sqa_letter(answers.get(str(q["id"]), "FAILED"))
        correct = letter is not None and letter == key
        right, total = right + correct, total + 1
        if "image" in q:
            img_right, img_total = img_right + correct, img_total + 1
    img_accuracy = 100 * img_right / img_total if img_total else None  # None: a question file without images
    return {"img_accuracy": img_accuracy, "accuracy": 100 * right / total, "img_correct": img_right,
            "img_total": img_total, "correct": right, "total": total,
            "missing": missing_report([q["id"] for q in questions], answers)}


def scienceqa_flags(p):
    p.add_argument("--questions", required=True, help="LLaVA's llava_test_CQM-A.json, or a test file of "
                                                      "tools/scienceqa.py (the answer key is in it)")
    p.add_argument("--answers", required=True, help="the answers file of `evaluate.py run`")


# ScienceQA with GPT-4 as the judge (the first LLaVA paper, section 5.2: 92.53%): where the model's answer and
# text-only GPT-4's differ, GPT-4 is asked again, shown the question and both answers, for its own final answer
# (judge.requery_scienceqa; LLaVA released the scorer, llava/eval/eval_science_qa_gpt4_requery.py, not the prompt).
# The ensemble answer is the requery's where there is one that names a letter, else the model's. Every answer is read
# by the scripts' one rule, "The answer is X." exactly once (sqa_answer_is); one that does not name a letter counts as
# wrong, where the scripts draw a random option (random.choice, unseeded), so their numbers vary from run to run.


def read_gpt4_outputs(path):
    """GPT-4's answers as ScienceQA's scripts write their results file: {"outputs": {pid: text}, ...}."""
    document = read_json(path)
    require(document, {"outputs": dict}, path)
    outputs = document["outputs"]
    bad = next((k for k, v in outputs.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise DataError(f"{path}, outputs[{bad!r}]: not a text; is it a ScienceQA results file with 'outputs'?")
    return outputs


def read_requery(path):
    """question_id -> the judge's reply, from a requery file (JSON lines {question_id, prompt, text}), if it exists."""
    return {str(r["question_id"]): r for r in read_jsonl(path, question_id=ID, text=str)} if os.path.exists(path) \
        else {}


def sqa_ensemble(questions, path, ours, gpt4, requery):
    """The requery script's counts over the question file, in percent of all questions (its numbers are overall
    accuracies, the paper's too): the model alone, GPT-4 alone, GPT-4 falling back on the model where it names no
    letter, the ensemble (the judge's answer, else the model's), and the upper bound (either is right)."""
    counts = Counter()
    for q in questions:
        qid, key = str(q["id"]), sqa_key(q, path)
        our, theirs = sqa_answer_is(ours.get(qid, "")), sqa_answer_is(gpt4[qid])
        judged = sqa_answer_is(requery[qid]["text"]) if qid in requery else None
        counts["ours"] += our == key
        counts["gpt4"] += theirs == key
        counts["gpt4_failed"] += theirs is None
        counts["gpt4_or_ours"] += (theirs or our) == key
        counts["ensemble"] += (judged or our) == key
        counts["img_ensemble"] += (judged or our) == key and "image" in q
        counts["upper_bound"] += key in (our, theirs)
        counts["requeried"] += qid in requery
        counts["ours_unparsed"] += our is None
    n, n_img = len(questions), sum("image" in q for q in questions)
    return {"accuracy": 100 * counts["ensemble"] / n, "correct": counts["ensemble"], "total": n,
            "img_accuracy": 100 * counts["img_ensemble"] / n_img if n_img else None,
            "ours_accuracy": 100 * counts["ours"] / n, "gpt4_accuracy": 100 * counts["gpt4"] / n,
            "gpt4_or_ours_accuracy": 100 * counts["gpt4_or_ours"] / n,
            "upper_bound": 100 * counts["upper_bound"] / n, "requeried": counts["requeried"],
            "gpt4_unparsed": counts["gpt4_failed"], "ours_unparsed": counts["ours_unparsed"]}


def sqa_disagreements(questions, ours, gpt4):
    """The questions where the model's letter and GPT-4's differ (one naming none counts as differing)."""
    return [q for q in questions if sqa_answer_is(ours.get(str(q["id"]), "")) != sqa_answer_is(gpt4[str(q["id"])])]


def score_scienceqa_gpt4(args):
    """Asks the judge about every disagreement the requery file lacks (the API is called only then; each reply is
    saved as it comes, so a stopped run resumes), then scores the three answer files."""
    questions = read_questions(args.questions, id=ID, conversations=list)
    ours = answers_by_id(args.answers, [q["id"] for q in questions])
    gpt4 = read_gpt4_outputs(args.gpt_answers)
    lacking = [str(q["id"]) for q in questions if str(q["id"]) not in gpt4]
    if lacking:
        raise DataError(f"{args.gpt_answers}: no GPT-4 answer to {len(lacking)} of the {len(questions)} questions, "
                        f"e.g. {lacking[:3]}; the ensemble needs GPT-4's answer to every question")
    missing = missing_report([q["id"] for q in questions], ours)
    requery_path = args.requery or beside(args.answers, ".gpt4-requery.jsonl")
    requery = read_requery(requery_path)
    todo = [q for q in sqa_disagreements(questions, ours, gpt4) if str(q["id"]) not in requery]

    def save(qid, record):
        requery[qid] = record
        atomic_write(requery_path, lambda f: f.writelines(json.dumps(r) + "\n" for r in requery.values()))

    if todo:
        judge.requery_scienceqa([(str(q["id"]), sqa_turn(q, 0, args.questions).replace("<image>", "").strip(),
                                  gpt4[str(q["id"])], ours.get(str(q["id"]), "")) for q in todo], args, save)
    return {**sqa_ensemble(questions, args.questions, ours, gpt4, requery), "requery": requery_path,
            "missing": missing}


def scienceqa_gpt4_flags(p):
    p.add_argument("--questions", required=True, help="the question file `run` answered, with its key "
                                                      "(tools/scienceqa.py's llava_test_QCM-LEA.json)")
    p.add_argument("--answers", required=True, help="the model's answers file (`evaluate.py run`)")
    p.add_argument("--gpt-answers", required=True, help="GPT-4's answers, as ScienceQA's results files hold them: "
                                                        "{\"outputs\": {pid: text}}")
    p.add_argument("--requery", help="the judge's replies, read and extended (default: next to the answers)")
    judge.add_endpoint_flags(p, "gpt-4-0314", "the judge (asked only about disagreements the requery file lacks)")


# ----------------------------------------------------------------------------------------------------------------------
# POPE (llava/eval/eval_pope.py)


def pope_says_yes(text):
    """LLaVA's rule: the first sentence, commas dropped, split on spaces; "No", "no" or "not" among the words -> no."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return not any(w in ("No", "no", "not") for w in words)


def score_pope(questions_path, answers_path, labels_dir):
    """Per split (coco_pope_{adversarial,popular,random}.json): each label is paired with the answer to the same
    question (image and question text; LLaVA pairs them by file order, which agrees when both files are in order)."""
    questions = read_questions(questions_path, question_id=ID, category=str, image=str, text=str)
    answers = answers_by_id(answers_path, [q["question_id"] for q in questions])
    missing = missing_report([q["question_id"] for q in questions], answers)
    by_key = defaultdict(list)
    for q in questions:
        by_key[(q["category"], q["image"], q["text"].split("\n")[0].strip())].append(q)
    results = {}
    for name in list_folder(labels_dir):
        if not (name.startswith("coco_pope_") and name.endswith(".json")):
            continue
        split = name[len("coco_pope_"):-len(".json")]
        tp = fp = tn = fn = yes = 0
        for label in read_questions(os.path.join(labels_dir, name), image=str, text=str, label=str):
            candidates = by_key.get((split, label["image"], label["text"].strip()))
            if not candidates:
                raise DataError(f"{labels_dir}/{name}: no question in {questions_path} for {label['image']} "
                                f"{label['text']!r} in split {split!r}")
            q = candidates.pop(0)
            truth = label["label"] == "yes"
            text = answers.get(str(q["question_id"]))
            said_yes = (not truth) if text is None else pope_says_yes(text)  # a missing answer is wrong
            yes += said_yes
            tp, fp = tp + (said_yes and truth), fp + (said_yes and not truth)
            tn, fn = tn + (not said_yes and not truth), fn + (not said_yes and truth)
        n = tp + fp + tn + fn
        precision, recall = tp / max(1, tp + fp), tp / max(1, tp + fn)
        results[split] = {"accuracy": 100 * (tp + tn) / n, "precision": 100 * precision, "recall": 100 * recall,
                          "f1": 100 * 2 * precision * recall / max(1e-12, precision + recall),
                          "yes_ratio": 100 * yes / n, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n}
    if not results:
        raise DataError(f"{labels_dir}: no coco_pope_*.json label files")
    return {"mean_f1": sum(r["f1"] for r in results.values()) / len(results), "splits": results, "missing": missing}


def pope_flags(p):
    p.add_argument("--questions", required=True, help="LLaVA's llava_pope_test.jsonl")
    p.add_argument("--answers", required=True, help="the answers file of `evaluate.py run`")
    p.add_argument("--labels", required=True, help="the folder of POPE's coco_pope_{adversarial,popular,random}.json")


# ----------------------------------------------------------------------------------------------------------------------
# VQAv2 / TextVQA soft accuracy with the EvalAI answer normalisation (llava/eval/m4c_evaluator.py)

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've"}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is a lookahead, as in the original
DIGIT_COMMA = re.compile(r"(?<=\d)(\,)+(?=\d)")


def normalize_answer(text):
    """EvalAI's answer processor, rule for rule."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in PUNCTUATION:  # deleted next to a space or when the text has a digit,digit comma; else a space
        out = out.replace(p, "") if (p + " " in text or " " + p in text or DIGIT_COMMA.search(text)) else \
            out.replace(p, " ")
    out = PERIOD.sub("", out, count=re.UNICODE)  # the original passes re.UNICODE (32) as the count
    words = [NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def soft_accuracy(prediction, human_answers):
    """VQA accuracy: the mean over the 10 humans of min(1, matches among the other 9 / 3), after normalisation.
    With k of 10 agreeing: 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4+ -> 1."""
    prediction = normalize_answer(prediction)
    humans = [normalize_answer(a) for a in human_answers]
    return sum(min(1.0, sum(h == prediction for j, h in enumerate(humans) if j != i) / 3)
               for i in range(len(humans))) / len(humans)


def textvqa_question(prompt, where="a TextVQA answer"):
    """LLaVA's eval_textvqa prompt_processor: the question line of a TextVQA prompt, lower-cased."""
    lines = prompt.split("\n")
    found = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
    if prompt.startswith("OCR tokens: ") and found:
        return found.group(1).lower()
    if "Reference OCR token: " in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith("Reference OCR token:") else lines[0]).lower()
    if len(lines) == 2:
        return lines[0].lower()
    raise DataError(f"{where}: cannot find the question in the TextVQA prompt {prompt[:80]!r}; is it the answers "
                    "file of TextVQA's llava_textvqa_val_v051_ocr.jsonl?")


def score_vqa(answers_path, annotations_path):
    """VQAv2 annotations ({"annotations": [{question_id, answers: [{answer}]}]}) matched by question_id, or TextVQA's
    ({"data": [{image_id, question, answers}]}) matched as LLaVA does: (question_id = image_id, question in prompt)."""
    gt = read_json(annotations_path)
    results = read_jsonl(answers_path, question_id=ID, text=str)
    scores = []
    if isinstance(gt, dict) and "annotations" in gt:
        truth = {str(a["question_id"]): human_answers(a, annotations_path)
                 for a in entries(gt, "annotations", annotations_path, question_id=ID, answers=list)}
        for r in results:
            if str(r["question_id"]) not in truth:
                raise DataError(f"{answers_path}: question {r['question_id']} is not in {annotations_path}")
        answers = {str(r["question_id"]): r["text"] for r in results}
        scores = [soft_accuracy(answers[q], truth[q]) if q in answers else 0.0 for q in truth]
        missing = missing_report(list(truth), answers)
    else:
        truth = {(str(a["image_id"]), a["question"].lower()): human_answers(a, annotations_path)
                 for a in entries(gt, "data", annotations_path, image_id=ID, question=str, answers=list)}
        seen = set()
        for n, r in enumerate(results, 1):
            where = f"{answers_path}, answer #{n}"
            key = (str(r["question_id"]), textvqa_question(require(r, {"prompt": str}, where)["prompt"], where))
            if key not in truth:
                raise DataError(f"{answers_path}: question {key} is not in {annotations_path}")
            seen.add(key)
            scores.append(soft_accuracy(r["text"], truth[key]))
        missing = len(truth) - len(seen)
        if missing:
            print(f"warning: {missing} of {len(truth)} questions have no answer; they count as wrong", file=sys.stderr)
        scores += [0.0] * missing
    if not truth:
        raise DataError(f"{annotations_path}: no annotations; is it the file you meant?")
    return {"accuracy": 100 * sum(scores) / len(scores), "n": len(scores), "missing": missing}


def human_answers(annotation, path):
    """The human answers of a VQAv2 annotation ([{"answer": str}]) or a TextVQA one ([str])."""
    answers = [a.get("answer") if isinstance(a, dict) else a for a in annotation["answers"]]
    if not answers or not all(isinstance(a, str) for a in answers):
        qid = annotation.get("question_id", annotation.get("image_id"))
        raise DataError(f"{path}, question {qid!r}: 'answers' must be a non-empty list of the human answers")
    return answers


def vqa_flags(p):
    p.add_argument("--answers", required=True, help="the answers file of `evaluate.py run`")
    p.add_argument("--annotations", required=True, help="VQAv2 annotations, or TextVQA's TextVQA_0.5.1_val.json")


# ----------------------------------------------------------------------------------------------------------------------
# GQA (scripts/convert_gqa_for_eval.py + the official exact match)


def score_gqa(answers_path, annotations_path):
    """Exact match with GQA's one answer per question, after LLaVA's rstrip(".").lower() of the prediction."""
    truth = {str(k): v["answer"] for k, v in keyed(read_json(annotations_path), annotations_path, answer=str).items()}
    answers = answers_by_id(answers_path, list(truth))
    correct = sum(answers.get(q, "").rstrip(".").lower() == a for q, a in truth.items())
    return {"accuracy": 100 * correct / len(truth), "correct": correct, "n": len(truth),
            "missing": missing_report(list(truth), answers)}


def gqa_flags(p):
    p.add_argument("--answers", required=True, help="the answers file of `evaluate.py run`")
    p.add_argument("--annotations", required=True, help="GQA's testdev_balanced_questions.json (it holds the answers)")


# ----------------------------------------------------------------------------------------------------------------------
# MME (MME's official eval_tool/calculation.py; LLaVA's convert_answer_to_mme.py maps its questions back)
#
# LLaVA's llava_mme.jsonl asks each image's two questions under one question_id, "subtask/image file", so a question
# is the pair (question_id, its text), and an answer finds its question by its own "prompt", as LLaVA's converter
# (playground/data/eval/MME/convert_answer_to_mme.py in eval.zip) finds the ground truth from the answers file alone.

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_SHORT_ANSWER = "Answer the question using a single word or phrase."
MME_YES_NO = " Please answer yes or no."


def mme_label(text):
    """yes / no / other, as calculation.py's parse_pred_ans reads a response: lower-cased, nothing stripped; exactly
    "yes" or "no", else "yes" if it is in the first 4 characters, else "no" if that is, else "other" (always wrong)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def mme_question(prompt):
    """The release's wording of a LLaVA MME prompt, as the converter puts it back: the short-answer instruction
    dropped, the text stripped, " Please answer yes or no." added unless it is there."""
    question = prompt.replace(MME_SHORT_ANSWER, "").strip()
    return question if MME_YES_NO.strip() in question else question + MME_YES_NO


def mme_image(question_id):
    """(subtask, image file stem) of a question_id "subtask/file.ext", split as the converter does."""
    return question_id.split("/")[0], question_id.split("/")[-1].split(".")[0]


def read_mme_truth(root):
    """(subtask, image file stem, question) -> "yes" / "no". root is either the MME release
    (MME_Benchmark_release_version: a folder per subtask, a `question<TAB>answer` .txt per image, in its
    questions_answers_YN/ where it has one, the subtasks whose images are in images/) or a folder of calculation.py's
    per-subtask files (eval_tool/Your_Results: `image<TAB>question<TAB>answer` lines in SUBTASK.txt). Lines are read
    as the converter reads them, `line.strip().split("\t")`: a question keeps its inner spacing."""
    truth = {}

    def add(path, subtask, stem):
        with reading(path), open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                fields = line.strip().split("\t")
                if fields == [""]:
                    continue
                if len(fields) == 2 and stem is not None:
                    key, answer = (subtask, stem, fields[0]), fields[1]
                elif len(fields) in (3, 4) and stem is None:  # a results file may hold a 4th column, a response
                    key, answer = (subtask, os.path.splitext(fields[0])[0], fields[1]), fields[2]
                else:
                    raise DataError(f"{path}, line {n}: expected " + ("question<TAB>answer" if stem is not None
                                                                      else "image<TAB>question<TAB>answer"))
                truth[key] = answer.strip().lower()

    for entry in list_folder(root):
        path = os.path.join(root, entry)
        if os.path.isdir(path):
            if os.path.isdir(os.path.join(path, "questions_answers_YN")):
                path = os.path.join(path, "questions_answers_YN")
            for name in list_folder(path):
                if name.endswith(".txt"):
                    add(os.path.join(path, name), entry, name[:-4])
        elif entry[:-4] in MME_PERCEPTION + MME_COGNITION and entry.endswith(".txt"):
            add(path, entry[:-4], None)
    if not truth:
        raise DataError(f"{root}: no MME ground truth (subtask folders of question<TAB>answer .txt files, or "
                        "calculation.py's SUBTASK.txt files)")
    return truth


def mme_truth(truth, subtask, stem, question):
    """The ground truth of a question; like the converter, tried again with two spaces before "Please answer yes or
    no.", which is how the release words a few questions (e.g. count/000000195918: "...in the image?  Please...")."""
    for wording in (question, question.replace(MME_YES_NO, " " + MME_YES_NO)):
        if (subtask, stem, wording) in truth:
            return truth[subtask, stem, wording]
    return None


def score_mme(questions_path, answers_path, mme_root):
    """Per subtask acc (questions) + acc+ (images with both questions right); LLaVA reports the perception sum.
    calculation.py takes a results file's lines two by two as an image's questions; here they are grouped by image,
    which is the same for LLaVA's files, where an image's two questions are next to each other."""
    keys = [(str(q["question_id"]), mme_question(q["text"]))
            for q in read_questions(questions_path, question_id=ID, text=str)]
    answers = {}
    for n, a in enumerate(read_jsonl(answers_path, question_id=ID, text=str), 1):
        if not isinstance(a.get("prompt"), str):
            raise DataError(f"{answers_path}: answer #{n} has no \"prompt\"; MME's two questions of an image share "
                            "a question_id, so an answer is matched to its question by its prompt")
        answers[str(a["question_id"]), mme_question(a["prompt"])] = a["text"]
    unknown = sorted(set(answers) - set(keys))
    if unknown:
        raise DataError(f"{answers_path}: {len(unknown)} answers to questions not in the question file, e.g. "
                        f"{unknown[:3]}; is this the answers file of another benchmark?")
    missing = missing_report(keys, answers)
    truth = read_mme_truth(mme_root)
    per_image = defaultdict(lambda: defaultdict(list))  # subtask -> image -> [correct, ...]
    for question_id, question in keys:
        subtask, stem = mme_image(question_id)
        right = mme_truth(truth, subtask, stem, question)
        if right is None:
            raise DataError(f"{questions_path}: no ground truth in {mme_root} for {(subtask, stem, question)}")
        per_image[subtask][stem].append(mme_label(answers.get((question_id, question), "")) == right)
    subtasks = {}
    for subtask, images in per_image.items():
        results = [c for image in images.values() for c in image]
        acc = 100 * sum(results) / len(results)
        acc_plus = 100 * sum(all(image) for image in images.values()) / len(images)
        subtasks[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    return {"perception": sum(subtasks[s]["score"] for s in MME_PERCEPTION if s in subtasks),
            "cognition": sum(subtasks[s]["score"] for s in MME_COGNITION if s in subtasks),
            "subtasks": subtasks, "missing": missing}


def mme_flags(p):
    p.add_argument("--questions", required=True, help="LLaVA's llava_mme.jsonl")
    p.add_argument("--answers", required=True, help="the answers file of `evaluate.py run` (or LLaVA's)")
    p.add_argument("--mme-root", required=True, help="the ground truth: MME_Benchmark_release_version (subtask "
                                                     "folders of question<TAB>answer .txt files), or the folder of "
                                                     "eval_tool's image<TAB>question<TAB>answer SUBTASK.txt files")


# ----------------------------------------------------------------------------------------------------------------------
# LLaVA-Bench: GPT-4-judged relative scores (llava/eval/summarize_gpt_review.py; the judge is judge.py)


def relative_scores(reviews, path="reviews"):
    """Per category and "all": 100 x mean(model) / mean(GPT-4), a ratio of means, each mean first rounded to 3
    decimals as summarize_gpt_review.py does (`stats = [round(x, 3) for x in stats]`), the ratio then to 0.1. The
    inner rounding moves LLaVA-1.5-7B's first released run from 64.8 to the 64.7 LLaVA computed."""
    pairs = defaultdict(list)
    for r in reviews:
        pair = judge.parse_review(r["content"])
        pairs[r["category"].replace("llava_bench_", "")].append(pair)
        pairs["all"].append(pair)
    out = {}
    for category, values in sorted(pairs.items()):
        reference = round(sum(v[0] for v in values) / len(values), 3)
        model = round(sum(v[1] for v in values) / len(values), 3)
        if not reference:
            raise DataError(f"{path}: the reference's mean score in {category!r} is 0; are these a judge's reviews?")
        out[category] = {"relative": round(model / reference * 100, 1), "reference": round(reference * 10, 1),
                         "model": round(model * 10, 1)}
    return out


def score_llava_bench(review_paths):
    runs = [relative_scores(read_questions(p, content=str, category=str), p) for p in review_paths]
    categories = runs[0].keys()
    for p, r in zip(review_paths, runs):
        if r.keys() != categories:
            raise DataError(f"{p}: reviews of the categories {sorted(r)}, {review_paths[0]}: {sorted(categories)}; "
                            "are these runs of one judge over one question file?")
    return {"mean": {c: round(sum(r[c]["relative"] for r in runs) / len(runs), 1) for c in categories},
            "runs": {os.path.basename(p): r for p, r in zip(review_paths, runs)}}


def judge_and_score(args):
    """Scores --reviews, or first has the judge write one review file per run (which costs API calls):
    --reviews-dir/<answers file>-eval<run>.jsonl, each written whole once its run is done."""
    if not args.reviews:
        missing = [f"--{name}" for name in ("questions", "context", "reference", "answers") if not getattr(args, name)]
        if missing:
            raise DataError("score llava_bench scores --reviews, or has a judge write them from --questions, "
                            f"--context, --reference and --answers; missing: {', '.join(missing)}")
        inputs = read_judge_inputs(args)
        os.makedirs(args.reviews_dir, exist_ok=True)  # a file in its way is said now, not after a run of API calls
        args.reviews = []
        for run in range(1, args.runs + 1):
            reviews = judge.judge_llava_bench(*inputs, args)
            name = f"{os.path.splitext(os.path.basename(args.answers))[0]}-eval{run}.jsonl"
            args.reviews.append(os.path.join(args.reviews_dir, name))
            atomic_write(args.reviews[-1], lambda f: f.writelines(json.dumps(r) + "\n" for r in reviews))
    return score_llava_bench(args.reviews)


def read_judge_inputs(args):
    """What judge.judge_llava_bench reads, all checked before the first API call: the questions, image -> caption,
    the reference's and the model's answers by question_id, and LLaVA's rule.json ({} without --rules)."""
    questions = read_questions(args.questions, question_id=ID, image=str, text=str, category=str)
    captions = {c["image"]: c["caption"] for c in read_jsonl(args.context, image=str, caption=(str, list))}
    reference = {str(a["question_id"]): a for a in read_jsonl(args.reference, question_id=ID, text=str)}
    answers = {str(a["question_id"]): a for a in read_jsonl(args.answers, question_id=ID, text=str)}
    rules = keyed(read_json(args.rules), args.rules, prompt=str, role=str) if args.rules else {}
    for q in questions:
        for flag, table, key in (("--reference", reference, str(q["question_id"])),
                                 ("--answers", answers, str(q["question_id"])), ("--context", captions, q["image"])):
            if key not in table:
                raise DataError(f"{args.questions}, question {q['question_id']!r}: {flag} has no "
                                f"{'caption of its image' if flag == '--context' else 'answer to it'}; is "
                                f"{getattr(args, flag[2:])} the file of these questions?")
    for image, caption in captions.items():
        if isinstance(caption, list) and not all(isinstance(line, str) for line in caption):
            raise DataError(f"{args.context}, image {image!r}: 'caption' must be a string or a list of strings")
    return questions, captions, reference, answers, rules


def llava_bench_flags(p):
    p.add_argument("--reviews", nargs="+", help="judge review files, one per run (LLaVA's reviews/*-eval{1,2,3}.jsonl)")
    judge.add_flags(p)


# ----------------------------------------------------------------------------------------------------------------------
# MMBench, MMBench-CN dev: LLaVA's prompt (llava/eval/model_vqa_mmbench.py), the official CircularEval
# (open-compass/VLMEvalKit vlmeval/evaluate/multiple_choice.py), and the xlsx the server takes
# (scripts/convert_mmbench_for_submission.py). The dev TSV already holds the rotated copies (4,377 rows, 1,176
# questions), so LLaVA's v1.5 scripts ask each row once. Checked on LLaVA-1.5-13B's released dev answers and upload
# (haotian-liu/LLaVA at 32cebc3; the TSV rebuilt from the upload's columns, no images needed): 796 / 1,176 = 67.69
# here, the published 67.7; the .xlsx written here reads back (pandas.read_excel, openpyxl) cell for cell as LLaVA's.

MMBENCH_LETTERS = ("A", "B", "C", "D")
MMBENCH_COLUMNS = ("index", "question", "A", "B")  # what every TSV has; hint, C, D, answer, image... may be absent
# What pandas.read_table reads as NaN by default: the cells LLaVA's pandas saw as missing
PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
             "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
CIRCULAR = 1_000_000  # the TSV's rotated copies of question i are rows i + k * 1e6; the official tool groups by % 1e6
MMBENCH_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                    "I'm sorry, but without the image provided", "Cannot determine the answer")


def mmbench_missing(value):
    """LLaVA's is_none over what pandas read: an empty or absent cell, one of pandas' NaN strings, "nan" or "none"."""
    return value is None or value in PANDAS_NA or value.lower() in ("nan", "none")


def read_mmbench(path):
    """(column names, rows as dicts of strings, "index" an int) of an MMBench TSV, read with csv as pandas reads it
    (tab-separated, '"'-quoted). The base64 images make fields far longer than csv's default limit."""
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))
    with reading(path), open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter="\t")
        columns = reader.fieldnames or []
        if not set(MMBENCH_COLUMNS) <= set(columns):
            raise DataError(f"{path}: not an MMBench TSV (columns {columns[:8]}; it needs index, question, A, B, ...)")
        rows = list(reader)
    for n, row in enumerate(rows, 1):
        missing = [c for c in MMBENCH_COLUMNS if row[c] is None]
        if missing:  # csv's None: the row has fewer cells than the header
            raise DataError(f"{path}: row {n} has no {missing[0]!r} cell (fewer cells than the header); is the TSV "
                            "complete?")
        row.update({c: "" for c in columns if row[c] is None})  # an absent optional cell: empty, as pandas' NaN
        try:
            row["index"] = int(row["index"])
        except ValueError:
            raise DataError(f"{path}: row {n} has the index {row['index']!r}, not an integer") from None
    if not rows:
        raise DataError(f"{path}: no rows; is it the file you meant?")
    return columns, rows


def mmbench_answers(path, questions_path, rows):
    """(index, round_id, text) per line of an MMBench answers file, in its order; an answer to a row the TSV does not
    have is an error."""
    indices, out = {row["index"] for row in rows}, []
    for n, a in enumerate(read_jsonl(path, question_id=ID, text=str), 1):
        try:
            index, round_id = int(a["question_id"]), int(a.get("round_id", 0))
        except (TypeError, ValueError):
            raise DataError(f"{path}, answer #{n}: question_id {a['question_id']!r} and round_id "
                            f"{a.get('round_id')!r} must be integers (the TSV's index, the round)") from None
        if index not in indices:
            raise DataError(f"{path}: question {a['question_id']} is not in {questions_path}; is this the answers "
                            "file of another benchmark?")
        out.append((index, round_id, a["text"]))
    return out


def mmbench_rounds(row, all_rounds=False):
    """(round_id, options as shown A, B, ..., their letters in the TSV) per round: the options are A-D up to the first
    missing one (get_options); with --all-rounds there is one round per option, each rotated one further."""
    options = []
    for letter in MMBENCH_LETTERS:
        if mmbench_missing(row.get(letter)):
            break
        options.append(row[letter])
    letters = list(MMBENCH_LETTERS[:len(options)])
    return [(r, options[r:] + options[:r], letters[r:] + letters[:r]) for r in range(len(options) if all_rounds else 1)]


def mmbench_prompt(row, options):
    """LLaVA's cur_prompt: "{hint}\\n" when there is a hint, the question, then a line "A. {option}" per option."""
    question = row["question"] if mmbench_missing(row.get("hint")) else row["hint"] + "\n" + row["question"]
    return question + "".join(f"\n{letter}. {option}" for letter, option in zip(MMBENCH_LETTERS, options))


def mmbench_questions(path, suffix, all_rounds=False):
    """`evaluate.py run`'s questions from a TSV: (index, image bytes, prompt + suffix, prompt, the answer's round_id,
    options and option_char) per round. The answer's "prompt" has no suffix, as LLaVA's."""
    questions = []
    for row in read_mmbench(path)[1]:
        try:
            image = None if mmbench_missing(row.get("image")) else base64.b64decode(row["image"], validate=True)
            if image is not None:
                Image.open(io.BytesIO(image))  # its header: a cell that is no image is found now, not mid-run
        except binascii.Error:
            raise DataError(f"{path}: question {row['index']}: the image is not base64") from None
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{path}: question {row['index']}: the image cell is not an image ({e})") from None
        for r, options, letters in mmbench_rounds(row, all_rounds):
            prompt = mmbench_prompt(row, options)
            questions.append((row["index"], image, prompt + suffix, prompt,
                              {"round_id": r, "options": options, "option_char": letters}))
    return questions


def mmbench_letter(text, choices):
    """The official tool's rule-based match (VLMEvalKit's can_infer; its exact-matching mode, no GPT): the one option
    letter that stands as a word once .()[],:;!*#{} are spaces; else the one option whose text is in the answer
    (case-insensitive); else None, as for a refusal or a lone "Z" (none of them): wrong."""
    if any(refusal in text for refusal in MMBENCH_REFUSALS):
        return None
    words = re.sub(r"[.()\[\],:;!*#{}]", " ", text).split()
    found = [letter for letter in choices if letter in words]
    if len(found) == 1:
        return found[0]
    if not found and "Z" in words:
        return None
    found = [letter for letter, option in choices.items() if option.lower() in text.lower()]
    return found[0] if len(found) == 1 else None


def score_mmbench(questions_path, answers_path):
    """CircularEval: a question is right only if every row of its group (the question and its rotated copies, rows
    index % 1e6; with --all-rounds answers, every round of each) has the answer's letter. Overall, per category and
    per l2-category over the questions (rows below 1e6); vanilla_accuracy counts each question's own row alone."""
    _, rows = read_mmbench(questions_path)
    if any(mmbench_missing(row.get("answer")) for row in rows):
        raise DataError(f"{questions_path}: rows without an answer (a test split?); score a dev split, submit a test "
                        "split with `score mmbench_submit`")
    answers = {(index, r): text for index, r, text in mmbench_answers(answers_path, questions_path, rows)}
    all_rounds = any(r > 0 for _, r in answers)
    group, vanilla, missing = defaultdict(list), {}, 0
    for row in rows:
        for r, options, letters in mmbench_rounds(row, all_rounds):
            text = answers.get((row["index"], r))
            missing += text is None
            letter = None if text is None else mmbench_letter(text, dict(zip(MMBENCH_LETTERS, options)))
            right = letter is not None and letters[MMBENCH_LETTERS.index(letter)] == row["answer"].strip()
            group[row["index"] % CIRCULAR].append(right)
            vanilla.setdefault(row["index"], right)
    if missing:
        print(f"warning: {missing} rows or rounds have no answer; their questions count as wrong", file=sys.stderr)
    main = [row for row in rows if row["index"] < CIRCULAR]
    if not main:
        raise DataError(f"{questions_path}: no question rows (index < {CIRCULAR}), only rotated copies")
    hits = {row["index"]: all(group[row["index"]]) for row in main}

    def accuracy(subset):
        return 100 * sum(hits[row["index"]] for row in subset) / len(subset)

    metrics = {"accuracy": accuracy(main), "correct": sum(hits.values()), "questions": len(main),
               "vanilla_accuracy": 100 * sum(vanilla[row["index"]] for row in main) / len(main),
               "rows": len(rows), "rounds": "all" if all_rounds else 1, "missing": missing}
    for column in ("l2-category", "category"):
        if column in rows[0]:
            names = sorted({row[column] for row in main})
            metrics[column] = {n: accuracy([row for row in main if row[column] == n]) for n in names}
    return metrics


def mmbench_flags(p):
    p.add_argument("--questions", required=True, help="the dev TSV (mmbench_dev_20230712.tsv, "
                                                      "mmbench_dev_cn_20231003.tsv), the answer key in it")
    p.add_argument("--answers", required=True, help="the answers file of `evaluate.py run --questions TSV`")


XLSX_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")  # not allowed in XML 1.0 (openpyxl refuses them too)
XLSX_MAIN = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
XLSX_RELS = "http://schemas.openxmlformats.org/package/2006/relationships"
XLSX_DOC = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
XLSX_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml"
XLSX_PARTS = {
    "[Content_Types].xml": '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="xml" ContentType="application/xml"/>'
    f'<Override PartName="/xl/workbook.xml" ContentType="{XLSX_TYPE}.sheet.main+xml"/>'
    f'<Override PartName="/xl/worksheets/sheet1.xml" ContentType="{XLSX_TYPE}.worksheet+xml"/>'
    f'<Override PartName="/xl/styles.xml" ContentType="{XLSX_TYPE}.styles+xml"/></Types>',
    "_rels/.rels": f'<Relationships xmlns="{XLSX_RELS}"><Relationship Id="rId1" Type="{XLSX_DOC}/officeDocument" '
    'Target="xl/workbook.xml"/></Relationships>',
    "xl/workbook.xml": f'<workbook xmlns="{XLSX_MAIN}" xmlns:r="{XLSX_DOC}"><sheets>'
    '<sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>',
    "xl/_rels/workbook.xml.rels": f'<Relationships xmlns="{XLSX_RELS}">'
    f'<Relationship Id="rId1" Type="{XLSX_DOC}/worksheet" Target="worksheets/sheet1.xml"/>'
    f'<Relationship Id="rId2" Type="{XLSX_DOC}/styles" Target="styles.xml"/></Relationships>',
    "xl/styles.xml": f'<styleSheet xmlns="{XLSX_MAIN}"><fonts count="1"><font><sz val="11"/><name val="Calibri"/>'
    '</font></fonts><fills count="2"><fill><patternFill patternType="none"/></fill><fill><patternFill '
    'patternType="gray125"/></fill></fills><borders count="1"><border><left/><right/><top/><bottom/><diagonal/>'
    '</border></borders><cellStyleXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0"/></cellStyleXfs>'
    '<cellXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0" xfId="0"/></cellXfs>'
    '<cellStyles count="1"><cellStyle name="Normal" xfId="0" builtinId="0"/></cellStyles></styleSheet>',
}


def write_xlsx(path, header, rows):
    """A one-sheet .xlsx from the standard library, laid out as pandas' to_excel (openpyxl) wrote LLaVA's upload:
    the header row, then a row per entry; ints as numbers, strings as inline strings, None as no cell."""
    def column(i):
        return column(i // 26 - 1) + chr(65 + i % 26) if i >= 26 else chr(65 + i)

    def cell(ref, value):
        if value is None:
            return ""
        if isinstance(value, int):
            return f'<c r="{ref}" t="n"><v>{value}</v></c>'
        text = XLSX_ILLEGAL.sub("", str(value))
        space = ' xml:space="preserve"' if text != text.strip() else ""
        return f'<c r="{ref}" t="inlineStr"><is><t{space}>{escape(text, {chr(13): "&#13;"})}</t></is></c>'

    lines = [f'<row r="{n}">' + "".join(cell(f"{column(i)}{n}", v) for i, v in enumerate(values)) + "</row>"
             for n, values in enumerate([header, *rows], 1)]
    sheet = f'<worksheet xmlns="{XLSX_MAIN}"><sheetData>{"".join(lines)}</sheetData></worksheet>'
    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            for name, xml in [*XLSX_PARTS.items(), ("xl/worksheets/sheet1.xml", sheet)]:
                z.writestr(name, '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n' + xml)

    atomic_write(path, write, "wb")


def mmbench_submission(questions_path, answers_path, out_path):
    """convert_mmbench_for_submission.py: the TSV without hint, category, source, image, comment, l2-category, a
    "prediction" column inserted at position 6 (after index, question, A-D) holding each row's answer text (the last
    round's, as LLaVA's loop leaves it), pandas' NaN cells empty, as an .xlsx."""
    columns, rows = read_mmbench(questions_path)
    predictions = {index: text for index, _, text in mmbench_answers(answers_path, questions_path, rows)}
    header = [c for c in columns if c not in ("hint", "category", "source", "image", "comment", "l2-category")]
    header.insert(6, "prediction")
    table = [[row["index"] if c == "index" else predictions.get(row["index"]) if c == "prediction" else
              None if row.get(c) is None or row[c] in PANDAS_NA else row[c] for c in header] for row in rows]
    write_xlsx(out_path, header, table)
    missing = sum(row["index"] not in predictions for row in rows)
    if missing:
        print(f"warning: {missing} of {len(rows)} rows have no answer; their prediction cells are empty",
              file=sys.stderr)
    return {"submission": out_path, "rows": len(rows), "missing": missing}


def submission_flag(p, ext="json"):
    p.add_argument("--submission", help=f"the file to upload (default: next to the answers, .submission.{ext})")


def submission_path(args, ext="json"):
    answers = args.answers[0] if isinstance(args.answers, list) else args.answers
    return args.submission or beside(answers, f".submission.{ext}")


def mmbench_submit_flags(p):
    p.add_argument("--questions", required=True, help="the TSV `run` answered (dev or test, EN or CN)")
    p.add_argument("--answers", required=True, help="the answers file of `evaluate.py run --questions TSV`")
    submission_flag(p, "xlsx")


# ----------------------------------------------------------------------------------------------------------------------
# SEED-Bench (scripts/convert_seed_for_submission.py)


def score_seed(annotations_path, answers_path):
    """LLaVA's rule: right only if the answer is exactly the key's letter (no extraction: "A." is wrong); accuracy per
    question type and over the image and the video questions of SEED-Bench.json. LLaVA reports image_accuracy."""
    seed = require(read_json(annotations_path), {"question_type": dict, "questions": list}, annotations_path)
    require(seed["question_type"], dict.fromkeys(seed["question_type"], int), f"{annotations_path}, question_type")
    names = {number: name for name, number in seed["question_type"].items()}
    questions = entries(seed, "questions", annotations_path, question_id=ID, answer=str, question_type_id=int,
                        data_type=str)
    for q in questions:
        if q["question_type_id"] not in names:
            raise DataError(f"{annotations_path}, question {q['question_id']!r}: question_type_id "
                            f"{q['question_type_id']} is not one of its question_type ids {sorted(names)[:12]}")
    if not questions:
        raise DataError(f"{annotations_path}: no questions; is it SEED-Bench.json?")
    answers = answers_by_id(answers_path, [q["question_id"] for q in questions])
    counts = defaultdict(lambda: [0, 0])  # type or data type -> [right, total]
    for q in questions:
        right = answers.get(str(q["question_id"])) == q["answer"]
        for key in (names[q["question_type_id"]], q["data_type"], "all"):
            counts[key][0] += right
            counts[key][1] += 1
    metrics = {f"{k}_accuracy": 100 * counts[k][0] / counts[k][1] for k in ("image", "video") if k in counts}
    metrics.update(accuracy=100 * counts["all"][0] / counts["all"][1],
                   types={names[n]: 100 * counts[names[n]][0] / counts[names[n]][1] for n in sorted(names)
                          if names[n] in counts},
                   image=counts["image"][1], video=counts["video"][1],
                   missing=missing_report([q["question_id"] for q in questions], answers))
    return metrics


def seed_flags(p):
    p.add_argument("--annotations", required=True, help="SEED-Bench's SEED-Bench.json (questions, types, the key)")
    p.add_argument("--answers", required=True, help="the answers file of `evaluate.py run` on llava-seed-bench.jsonl")


# ----------------------------------------------------------------------------------------------------------------------
# MM-Vet: a GPT grader scores each answer 0-1 against the key (yuweihao/MM-Vet mm-vet_evaluator.py; judge.py asks it).
# Checked on LLaVA-1.5-13B's released files (32cebc3; tests/data/llava_eval/mm-vet): its grade files total 36.1 (1 run)
# and 36.3, std 0.2, runs 36.1 / 36.5 / 36.3 (3 runs), as its CSVs; the results file from its answers is LLaVA's, byte
# for byte. Its per-capability numbers need mm-vet.json (the key), which is not public there.


def mmvet_results(answers_path, metadata):
    """scripts/convert_mmvet_for_eval.py: {"v1_{question_id}": answer text}, the results file MM-Vet's grader reads."""
    results = {f"v1_{a['question_id']}": a["text"] for a in read_jsonl(answers_path, question_id=ID, text=str)}
    unknown = sorted(set(results) - set(metadata)) if metadata is not None else []
    if unknown:
        raise DataError(f"{answers_path}: {len(unknown)} answers to questions MM-Vet does not have, e.g. {unknown[:3]}")
    return results


def mmvet_scores(metadata, grades, runs):
    """MM-Vet's export_result: per run, 100 x the mean score of all samples (total), of those with a capability (a
    sample counts for each of its own), and of those with exactly one combination of capabilities; each the mean over
    runs rounded to 1 decimal as numpy rounds, and the spread (numpy's std) of the run totals. A sample without a grade
    (no answer) scores 0."""
    def score(sample_id, run):
        scores = grades.get(sample_id, {}).get("score", [])
        if scores and len(scores) <= run:
            raise DataError(f"{sample_id} has {len(scores)} grades, fewer than the {runs} runs asked for")
        return scores[run] if scores else 0.0

    def per_run(ids):
        return [100 * sum(score(i, run) for i in ids) / len(ids) for run in range(runs)]

    def round1(x):  # numpy's round (rint of x * 10), which the official's np.float64 values get
        return round(x * 10) / 10

    def combination(sample):
        return "_".join(sorted(set(sample["capability"])))

    capabilities = Counter(c for sample in metadata.values() for c in set(sample["capability"]))
    combinations = Counter(combination(sample) for sample in metadata.values())
    totals = per_run(list(metadata))
    mean = sum(totals) / runs
    return {"total": round1(mean), "std": round1((sum((t - mean) ** 2 for t in totals) / runs) ** 0.5),
            "runs": [round1(t) for t in totals],
            "capabilities": {c: round1(sum(per_run([i for i, s in metadata.items() if c in s["capability"]])) / runs)
                             for c, _ in capabilities.most_common()},
            "combinations": {k: round1(sum(per_run([i for i, s in metadata.items() if combination(s) == k])) / runs)
                             for k, _ in combinations.most_common()}}


def score_mmvet(args):
    """Grades what the grade file lacks (the API is asked only then), then scores the grades."""
    metadata = keyed(read_json(args.mmvet_json), args.mmvet_json, question=str, capability=list)
    for sample_id, sample in metadata.items():  # its "answer", the key, is read only if it is to be graded
        if not all(isinstance(c, str) for c in sample["capability"]) or not isinstance(sample.get("answer", ""), str):
            raise DataError(f"{args.mmvet_json}, {sample_id!r}: 'capability' must be a list of names, 'answer' a "
                            "string")
    results = mmvet_results(args.answers, metadata)
    missing = missing_report(list(metadata), results)
    grades_path = args.grades or beside(args.answers, ".mmvet-grades.json")
    grades = read_mmvet_grades(grades_path) if os.path.exists(grades_path) else {}
    grades = judge.grade_mmvet(metadata, results, grades, args.runs, args,
                               lambda grades: atomic_write(grades_path, lambda f: json.dump(grades, f, indent=4)))
    return {**mmvet_scores(metadata, grades, args.runs), "grades": grades_path, "missing": missing}


def read_mmvet_grades(path):
    """MM-Vet's grade file, {id: {"model", "content", "score"}: a list each, an entry per run}, checked."""
    document = read_json(path)
    if not isinstance(document, dict):
        raise DataError(f"{path}: expected MM-Vet's grade file, a JSON object {{id: grades}}; is it the file you "
                        "meant?")
    grades = {k: require(v, {"model": list, "content": list, "score": list}, f"{path}, {k!r}")
              for k, v in document.items()}
    for sample_id, grade in grades.items():
        if not all(isinstance(s, (int, float)) and 0 <= s <= 1 for s in grade["score"]):
            raise DataError(f"{path}, {sample_id!r}: 'score' must be a list of numbers from 0 to 1")
    return grades


def mmvet_flags(p):
    p.add_argument("--answers", required=True, help="the answers file of `evaluate.py run` on llava-mm-vet.jsonl")
    p.add_argument("--mmvet-json", required=True, help="MM-Vet's mm-vet.json: each sample's question, key, "
                                                       "capabilities")
    p.add_argument("--grades", help="MM-Vet's grade file, read and extended (default: next to the answers)")
    p.add_argument("--runs", type=positive_int, default=1, help="grading runs (MM-Vet's paper: 5; LLaVA's files: 1 "
                                                              "and 3)")
    judge.add_endpoint_flags(p, "gpt-4-0613")


def mmvet_submission(answers_path, out_path):
    """The results file for MM-Vet's own grader (its notebook or online evaluator), as convert_mmvet_for_eval.py."""
    results = mmvet_results(answers_path, None)
    atomic_write(out_path, lambda f: json.dump(results, f, indent=2))
    return {"submission": out_path, "answers": len(results)}


def mmvet_submit_flags(p):
    p.add_argument("--answers", required=True, help="the answers file of `evaluate.py run` on llava-mm-vet.jsonl")
    submission_flag(p)


# ----------------------------------------------------------------------------------------------------------------------
# VQAv2 test-dev and VizWiz test: answer files for EvalAI, which keeps the keys
# (scripts/convert_vqav2_for_submission.py, scripts/convert_vizwiz_for_submission.py). Checked: from LLaVA-1.5-13B's
# released VizWiz answers, the file written here is its released upload, byte for byte.


def vqav2_submission(answer_paths, questions_path, test_path, out_path):
    """The answer files (per chunk, merged in order, a later line winning, as LLaVA's cat into merge.jsonl and dict
    do) normalised by EvalAI's answer processor, one {question_id, answer} for every question of the full test2015
    file, "" where test-dev has no answer (LLaVA's converter fills the rest of test2015 the same way)."""
    test_dev = [q["question_id"] for q in read_questions(questions_path, question_id=ID)]
    answers = {}
    for path in answer_paths:
        answers.update(answers_by_id(path, test_dev))
    test = [q["question_id"] for q in read_questions(test_path, question_id=ID)]
    outside = len(set(map(str, test_dev)) - set(map(str, test)))
    if outside:
        raise DataError(f"{questions_path}: {outside} questions are not in {test_path}; is that the full test2015 "
                        "file (llava_vqav2_mscoco_test2015.jsonl)?")
    rows = [{"question_id": q, "answer": normalize_answer(answers[str(q)]) if str(q) in answers else ""} for q in test]
    atomic_write(out_path, lambda f: json.dump(rows, f))
    return {"submission": out_path, "rows": len(rows), "test_dev": len(test_dev), "answered": len(answers),
            "missing": missing_report(test_dev, answers)}


def vqav2_submit_flags(p):
    p.add_argument("--questions", required=True, help="the test-dev questions `run` answered "
                                                      "(llava_vqav2_mscoco_test-dev2015.jsonl)")
    p.add_argument("--answers", required=True, nargs="+", help="the answers files of `evaluate.py run`, one per "
                                                               "chunk, merged in this order")
    p.add_argument("--test-questions", required=True, help="the full test2015 list, every id of which the server "
                                                           "wants (llava_vqav2_mscoco_test2015.jsonl)")
    submission_flag(p)


def vizwiz_submission(questions_path, answers_path, out_path):
    """{image, answer} per question of llava_test.jsonl, in its order, the answer normalised by EvalAI's answer
    processor; "" for a question without an answer (LLaVA's converter stops there instead)."""
    questions = read_questions(questions_path, question_id=ID, image=str)
    answers = answers_by_id(answers_path, [q["question_id"] for q in questions])
    rows = [{"image": q["image"], "answer": normalize_answer(answers[str(q["question_id"])])
             if str(q["question_id"]) in answers else ""} for q in questions]
    atomic_write(out_path, lambda f: json.dump(rows, f))
    return {"submission": out_path, "rows": len(rows),
            "missing": missing_report([q["question_id"] for q in questions], answers)}


def vizwiz_submit_flags(p):
    p.add_argument("--questions", required=True, help="VizWiz's test questions `run` answered (llava_test.jsonl)")
    p.add_argument("--answers", required=True, help="the answers file of `evaluate.py run`")
    submission_flag(p)


# ----------------------------------------------------------------------------------------------------------------------
# The table: `evaluate.py score NAME` adds NAME's flags to its own sub-command and calls NAME's score with them


@dataclass
class Benchmark:
    help: str  # one line for `evaluate.py score --help`
    add_flags: Callable  # (argparse parser) -> None: this benchmark's flags, and no other's
    score: Callable  # (parsed flags) -> metrics dict


# The *_submit entries write the file for a server that keeps its answer key; their "metrics" say what was written.
BENCHMARKS = {
    "scienceqa": Benchmark("ScienceQA-IMG accuracy (LLaVA's SQA number)", scienceqa_flags,
                           lambda a: score_scienceqa(a.questions, a.answers)),
    "scienceqa_gpt4": Benchmark("ScienceQA with GPT-4 judging disagreements (the first paper's ensemble)",
                                scienceqa_gpt4_flags, score_scienceqa_gpt4),
    "pope": Benchmark("POPE precision, recall, F1 per split and their mean F1", pope_flags,
                      lambda a: score_pope(a.questions, a.answers, a.labels)),
    "vqa": Benchmark("VQAv2 / TextVQA soft accuracy", vqa_flags, lambda a: score_vqa(a.answers, a.annotations)),
    "gqa": Benchmark("GQA exact-match accuracy", gqa_flags, lambda a: score_gqa(a.answers, a.annotations)),
    "mme": Benchmark("MME perception and cognition scores", mme_flags,
                     lambda a: score_mme(a.questions, a.answers, a.mme_root)),
    "llava_bench": Benchmark("LLaVA-Bench relative score from judge reviews, or judging first", llava_bench_flags,
                             judge_and_score),
    "mmbench": Benchmark("MMBench / MMBench-CN dev CircularEval accuracy, rule-based letter matching", mmbench_flags,
                         lambda a: score_mmbench(a.questions, a.answers)),
    "seed": Benchmark("SEED-Bench accuracy, image (LLaVA's number) and video", seed_flags,
                      lambda a: score_seed(a.annotations, a.answers)),
    "mmvet": Benchmark("MM-Vet GPT-graded score, total and per capability (grades what the grade file lacks)",
                       mmvet_flags, score_mmvet),
    "mmbench_submit": Benchmark("MMBench / MMBench-CN .xlsx for the OpenCompass server", mmbench_submit_flags,
                                lambda a: mmbench_submission(a.questions, a.answers, submission_path(a, "xlsx"))),
    "mmvet_submit": Benchmark("MM-Vet results JSON for MM-Vet's own grader", mmvet_submit_flags,
                              lambda a: mmvet_submission(a.answers, submission_path(a))),
    "vqav2_submit": Benchmark("VQAv2 test-dev answers JSON for EvalAI (chunks merged, test2015 ids filled)",
                              vqav2_submit_flags, lambda a: vqav2_submission(a.answers, a.questions, a.test_questions,
                                                                             submission_path(a))),
    "vizwiz_submit": Benchmark("VizWiz test answers JSON for EvalAI", vizwiz_submit_flags,
                               lambda a: vizwiz_submission(a.questions, a.answers, submission_path(a))),
}
