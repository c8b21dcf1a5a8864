"""How answers are scored: each benchmark's rule as LLaVA-1.5 applied it, and the table `evaluate.py score` reads.

    metrics = BENCHMARKS["pope"].score(args)   # what `python evaluate.py score pope --questions Q --answers A ...` does
    score_pope("llava_pope_test.jsonl", "pope.jsonl", "pope/output/coco")      # the same, called directly

One section per benchmark, each with its rule, its scorer and its flags, and the source it follows:
- ScienceQA-IMG: LLaVA's llava/eval/eval_science_qa.py (letter extraction; the number is the accuracy on questions
  with an image);
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

The same rules for bad input everywhere: a question without an answer counts as wrong and is reported; an answer to a
question the question file does not have, or a malformed line, is an error naming the file and line. A new benchmark is
one more section and one more entry in BENCHMARKS at the end.
"""

import json
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import judge
from data import DataError, read_samples


# ----------------------------------------------------------------------------------------------------------------------
# Reading answers, and what every scorer does with them


def read_jsonl(path):
    """JSON lines or a JSON list of objects; a malformed line is an error naming it (data.read_samples)."""
    return read_samples(path)[0]


def answers_by_id(path, questions):
    """question_id -> answer text; answers to questions the question file does not have are an error."""
    answers = {str(a["question_id"]): a["text"] for a in read_jsonl(path)}
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


def score_scienceqa(questions_path, answers_path):
    """The published number is img_accuracy: the questions with an image (2,017 of the 4,241). The key is in the
    question file, the gpt turn of each conversation."""
    questions = read_jsonl(questions_path)
    answers = answers_by_id(answers_path, [q["id"] for q in questions])
    right, total, img_right, img_total = 0, 0, 0, 0
    for q in questions:
        letter = sqa_letter(answers.get(str(q["id"]), "FAILED"))
        correct = letter is not None and letter == q["conversations"][1]["value"].strip()
        right, total = right + correct, total + 1
        if "image" in q:
            img_right, img_total = img_right + correct, img_total + 1
    return {"img_accuracy": 100 * img_right / img_total, "accuracy": 100 * right / total, "img_correct": img_right,
            "img_total": img_total, "correct": right, "total": total,
            "missing": missing_report([q["id"] for q in questions], answers)}


def scienceqa_flags(p):
    p.add_argument("--questions", required=True, help="LLaVA's llava_test_CQM-A.json (the answer key is in it)")
    p.add_argument("--answers", required=True, help="the answers file of `evaluate.py run`")


# ----------------------------------------------------------------------------------------------------------------------
# POPE (llava/eval/eval_pope.py)


def pope_says_yes(text):
    """LLaVA's rule: the first sentence, commas dropped, split on spaces; "No", "no" or "not" among the words -> no."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return not any(w in ("No", "no", "not") for w in words)


def score_pope(questions_path, answers_path, labels_dir):
    """Per split (coco_pope_{adversarial,popular,random}.json): each label is paired with the answer to the same
    question (image and question text; LLaVA pairs them by file order, which agrees when both files are in order)."""
    questions = read_jsonl(questions_path)
    answers = answers_by_id(answers_path, [q["question_id"] for q in questions])
    missing = missing_report([q["question_id"] for q in questions], answers)
    by_key = defaultdict(list)
    for q in questions:
        by_key[(q["category"], q["image"], q["text"].split("\n")[0].strip())].append(q)
    results = {}
    for name in sorted(os.listdir(labels_dir)):
        if not (name.startswith("coco_pope_") and name.endswith(".json")):
            continue
        split = name[len("coco_pope_"):-len(".json")]
        tp = fp = tn = fn = yes = 0
        for label in read_jsonl(os.path.join(labels_dir, name)):
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


def textvqa_question(prompt):
    """LLaVA's eval_textvqa prompt_processor: the question line of a TextVQA prompt, lower-cased."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        return re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL).group(1).lower()
    if "Reference OCR token: " in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith("Reference OCR token:") else lines[0]).lower()
    if len(lines) == 2:
        return lines[0].lower()
    raise DataError(f"cannot find the question in the TextVQA prompt {prompt[:80]!r}")


def score_vqa(answers_path, annotations_path):
    """VQAv2 annotations ({"annotations": [{question_id, answers: [{answer}]}]}) matched by question_id, or TextVQA's
    ({"data": [{image_id, question, answers}]}) matched as LLaVA does: (question_id = image_id, question in prompt)."""
    with open(annotations_path) as f:
        gt = json.load(f)
    results = read_jsonl(answers_path)
    scores = []
    if "annotations" in gt:
        truth = {str(a["question_id"]): [x["answer"] for x in a["answers"]] for a in gt["annotations"]}
        for r in results:
            if str(r["question_id"]) not in truth:
                raise DataError(f"{answers_path}: question {r['question_id']} is not in {annotations_path}")
        answers = {str(r["question_id"]): r["text"] for r in results}
        scores = [soft_accuracy(answers[q], truth[q]) if q in answers else 0.0 for q in truth]
        missing = missing_report(list(truth), answers)
    else:
        truth = {(str(a["image_id"]), a["question"].lower()): a["answers"] for a in gt["data"]}
        seen = set()
        for r in results:
            key = (str(r["question_id"]), textvqa_question(r["prompt"]))
            if key not in truth:
                raise DataError(f"{answers_path}: question {key} is not in {annotations_path}")
            seen.add(key)
            scores.append(soft_accuracy(r["text"], truth[key]))
        missing = len(truth) - len(seen)
        if missing:
            print(f"warning: {missing} of {len(truth)} questions have no answer; they count as wrong", file=sys.stderr)
        scores += [0.0] * missing
    return {"accuracy": 100 * sum(scores) / len(scores), "n": len(scores), "missing": missing}


def vqa_flags(p):
    p.add_argument("--answers", required=True, help="the answers file of `evaluate.py run`")
    p.add_argument("--annotations", required=True, help="VQAv2 annotations, or TextVQA's TextVQA_0.5.1_val.json")


# ----------------------------------------------------------------------------------------------------------------------
# GQA (scripts/convert_gqa_for_eval.py + the official exact match)


def score_gqa(answers_path, annotations_path):
    """Exact match with GQA's one answer per question, after LLaVA's rstrip(".").lower() of the prediction."""
    with open(annotations_path) as f:
        truth = {str(k): v["answer"] for k, v in json.load(f).items()}
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
        with open(path, encoding="utf-8") as f:
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

    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if os.path.isdir(path):
            if os.path.isdir(os.path.join(path, "questions_answers_YN")):
                path = os.path.join(path, "questions_answers_YN")
            for name in sorted(os.listdir(path)):
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
    keys = [(str(q["question_id"]), mme_question(q["text"])) for q in read_jsonl(questions_path)]
    answers = {}
    for n, a in enumerate(read_jsonl(answers_path), 1):
        if "prompt" not in a:
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


def relative_scores(reviews):
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
        out[category] = {"relative": round(model / reference * 100, 1), "reference": round(reference * 10, 1),
                         "model": round(model * 10, 1)}
    return out


def score_llava_bench(review_paths):
    runs = [relative_scores(read_jsonl(p)) for p in review_paths]
    categories = runs[0].keys()
    return {"mean": {c: round(sum(r[c]["relative"] for r in runs) / len(runs), 1) for c in categories},
            "runs": {os.path.basename(p): r for p, r in zip(review_paths, runs)}}


def judge_and_score(args):
    """Scores --reviews, or first has the judge write one review file per run (which costs API calls)."""
    if not args.reviews:
        missing = [f"--{name}" for name in ("questions", "context", "reference", "answers") if not getattr(args, name)]
        if missing:
            raise SystemExit("error: score llava_bench scores --reviews, or has a judge write them from --questions, "
                             f"--context, --reference and --answers; missing: {', '.join(missing)}")
        args.reviews = [judge.judge_llava_bench(args, run + 1) for run in range(args.runs)]
    return score_llava_bench(args.reviews)


def llava_bench_flags(p):
    p.add_argument("--reviews", nargs="+", help="judge review files, one per run (LLaVA's reviews/*-eval{1,2,3}.jsonl)")
    judge.add_flags(p)


# ----------------------------------------------------------------------------------------------------------------------
# The table: `evaluate.py score NAME` adds NAME's flags to its own sub-command and calls NAME's score with them


@dataclass
class Benchmark:
    help: str  # one line for `evaluate.py score --help`
    add_flags: Callable  # (argparse parser) -> None: this benchmark's flags, and no other's
    score: Callable  # (parsed flags) -> metrics dict


BENCHMARKS = {
    "scienceqa": Benchmark("ScienceQA-IMG accuracy (LLaVA's SQA number)", scienceqa_flags,
                           lambda a: score_scienceqa(a.questions, a.answers)),
    "pope": Benchmark("POPE precision, recall, F1 per split and their mean F1", pope_flags,
                      lambda a: score_pope(a.questions, a.answers, a.labels)),
    "vqa": Benchmark("VQAv2 / TextVQA soft accuracy", vqa_flags, lambda a: score_vqa(a.answers, a.annotations)),
    "gqa": Benchmark("GQA exact-match accuracy", gqa_flags, lambda a: score_gqa(a.answers, a.annotations)),
    "mme": Benchmark("MME perception and cognition scores", mme_flags,
                     lambda a: score_mme(a.questions, a.answers, a.mme_root)),
    "llava_bench": Benchmark("LLaVA-Bench relative score from judge reviews, or judging first", llava_bench_flags,
                             judge_and_score),
}
