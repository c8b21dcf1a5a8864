"""How good it is: answer a benchmark's questions with a model, and score answers the way LLaVA's papers did.

    python evaluate.py run --model DIR --questions llava_pope_test.jsonl --image-folder val2014 --answers pope.jsonl
    python evaluate.py score scienceqa --questions llava_test_CQM-A.json --answers sqa.jsonl
    python evaluate.py score pope --questions llava_pope_test.jsonl --answers pope.jsonl --labels pope_labels_dir
    python evaluate.py score vqa --answers textvqa.jsonl --annotations TextVQA_0.5.1_val.json
    python evaluate.py score gqa --answers gqa.jsonl --annotations testdev_balanced_questions.json
    python evaluate.py score mme --questions llava_mme.jsonl --answers mme.jsonl --mme-root MME_Benchmark_release_version
    python evaluate.py score llava_bench --reviews eval1.jsonl eval2.jsonl eval3.jsonl
    python evaluate.py score llava_bench --questions questions.jsonl --context context.jsonl \\
        --reference answers_gpt4.jsonl --answers llava_bench.jsonl --runs 3 --reviews-dir reviews/   # asks a judge

`run` reads LLaVA's question files (JSON lines {question_id, image, text, category}, or the conversation-format
JSON list of ScienceQA) and writes LLaVA's answer schema {question_id, prompt, text, answer_id, model_id, metadata},
a line per answer, flushed as it goes: a crash loses nothing, and a re-run skips the ids already answered. Decoding
is LLaVA-1.5's benchmark setting: greedy, the model's own template (vicuna_v1), "<image>\\n" first in the question.

`score` prints a table and writes the metrics as JSON (--out). Every rule is LLaVA's (../shared/reference/
evaluation.md): ScienceQA's letter extraction and IMG split, POPE's "no/not" rule per split, the EvalAI answer
normalisation and soft accuracy for VQAv2/TextVQA, GQA's lower-casing and "."-stripping, MME's acc + acc+, and
LLaVA-Bench's relative score (ratio of means, averaged over judge runs). A question without an answer counts as
wrong and is reported; an answer to an unknown question, or a malformed line, is an error naming the file and line.
"""

import argparse
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict

from data import IMAGE_TOKEN, DataError, read_samples


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
    missing = [q for q in questions if str(q) not in answers]
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
    questions = read_jsonl(questions_path)
    answers = answers_by_id(answers_path, [q["id"] for q in questions])
    right, total, img_right, img_total = 0, 0, 0, 0
    for q in questions:
        letter = sqa_letter(answers.get(str(q["id"]), "FAILED"))
        correct = letter is not None and letter == q["conversations"][1]["value"].strip()  # the gpt turn: the key
        right, total = right + correct, total + 1
        if "image" in q:  # the reported number: questions with an image
            img_right, img_total = img_right + correct, img_total + 1
    return {"img_accuracy": 100 * img_right / img_total, "accuracy": 100 * right / total, "img_correct": img_right,
            "img_total": img_total, "correct": right, "total": total,
            "missing": missing_report([q["id"] for q in questions], answers)}


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


# ----------------------------------------------------------------------------------------------------------------------
# GQA (scripts/convert_gqa_for_eval.py + the official exact match)


def score_gqa(answers_path, annotations_path):
    with open(annotations_path) as f:
        truth = {str(k): v["answer"] for k, v in json.load(f).items()}
    answers = answers_by_id(answers_path, list(truth))
    correct = sum(answers.get(q, "").rstrip(".").lower() == a for q, a in truth.items())
    return {"accuracy": 100 * correct / len(truth), "correct": correct, "n": len(truth),
            "missing": missing_report(list(truth), answers)}


# ----------------------------------------------------------------------------------------------------------------------
# MME (the official calculation.py; LLaVA's convert_answer_to_mme.py maps questions back)

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


def mme_label(text):
    """yes / no / other: exact, a lone y or n, else "yes" or "no" within the first 4 characters."""
    text = text.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if text in ("y", "n"):
        return {"y": "yes", "n": "no"}[text]
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def read_mme_truth(root):
    """(subtask, image file stem, question) -> yes/no, from the release's `question\\tanswer` .txt files."""
    truth = {}
    for subtask in os.listdir(root):
        for folder in (os.path.join(root, subtask), os.path.join(root, subtask, "questions_answers_YN")):
            if not os.path.isdir(folder):
                continue
            for name in os.listdir(folder):
                if name.endswith(".txt"):
                    with open(os.path.join(folder, name)) as f:
                        for line in f:
                            if "\t" in line:
                                question, answer = line.rstrip("\n").split("\t")[:2]
                                truth[(subtask, name[:-4], question.strip())] = answer.strip().lower()
    return truth


def score_mme(questions_path, answers_path, mme_root):
    questions = read_jsonl(questions_path)
    answers = answers_by_id(answers_path, [q["question_id"] for q in questions])
    missing = missing_report([q["question_id"] for q in questions], answers)
    truth = read_mme_truth(mme_root)
    per_image = defaultdict(lambda: defaultdict(list))  # subtask -> image -> [correct, ...]
    for q in questions:
        question = q["text"].replace(SHORT_ANSWER, "").strip() + " Please answer yes or no."
        stem = os.path.splitext(os.path.basename(q["image"]))[0]
        key = (q["category"], stem, question)
        if key not in truth:
            raise DataError(f"{questions_path}: no ground truth in {mme_root} for {key}")
        said = mme_label(answers.get(str(q["question_id"]), ""))
        per_image[q["category"]][stem].append(said == truth[key])
    subtasks = {}
    for subtask, images in per_image.items():
        results = [c for image in images.values() for c in image]
        acc = 100 * sum(results) / len(results)
        acc_plus = 100 * sum(all(image) for image in images.values()) / len(images)
        subtasks[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    return {"perception": sum(subtasks[s]["score"] for s in MME_PERCEPTION if s in subtasks),
            "cognition": sum(subtasks[s]["score"] for s in MME_COGNITION if s in subtasks),
            "subtasks": subtasks, "missing": missing}


# ----------------------------------------------------------------------------------------------------------------------
# LLaVA-Bench: GPT-4-judged relative scores (llava/eval/eval_gpt_review_bench.py, summarize_gpt_review.py)

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
# LLaVA's llava/eval/table/rule.json, llava_bench_{conv,detail,complex}; --rules reads the file itself.
JUDGE_RULE = ("We would like to request your feedback on the performance of two AI assistants in response to the user "
              "question displayed above. The user asks the question on observing an image. For your reference, the "
              "visual content in the image is represented with a few sentences describing the image. \nPlease rate "
              "the helpfulness, relevance, accuracy, level of details of their responses. Each assistant receives an "
              "overall score on a scale of 1 to 10, where a higher score indicates better overall performance.\n"
              "Please first output a single line containing only two values indicating the scores for Assistant 1 "
              "and 2, respectively. The two scores are separated by a space.\nIn the subsequent line, please provide a "
              "comprehensive explanation of your evaluation, avoiding any potential bias and ensuring that the order "
              "in which the responses were presented does not affect your judgment.")


def parse_review(content):
    """LLaVA's parse_score: the first line, commas as spaces, split on single spaces; exactly two numbers, else
    [-1, -1] (which then stays in the means, as in LLaVA)."""
    parts = content.split("\n")[0].replace(",", " ").split(" ")
    try:
        return [float(parts[0]), float(parts[1])] if len(parts) == 2 else [-1.0, -1.0]
    except ValueError:
        return [-1.0, -1.0]


def relative_scores(reviews):
    """Per category and "all": 100 x mean(model) / mean(GPT-4) (a ratio of means), rounded to 0.1 at the end."""
    pairs = defaultdict(list)
    for r in reviews:
        pair = parse_review(r["content"])
        pairs[r["category"].replace("llava_bench_", "")].append(pair)
        pairs["all"].append(pair)
    out = {}
    for category, values in sorted(pairs.items()):
        reference = sum(v[0] for v in values) / len(values)
        model = sum(v[1] for v in values) / len(values)
        out[category] = {"relative": round(model / reference * 100, 1), "reference": round(reference * 10, 1),
                         "model": round(model * 10, 1)}
    return out


def score_llava_bench(review_paths):
    runs = [relative_scores(read_jsonl(p)) for p in review_paths]
    categories = runs[0].keys()
    return {"mean": {c: round(sum(r[c]["relative"] for r in runs) / len(runs), 1) for c in categories},
            "runs": {os.path.basename(p): r for p, r in zip(review_paths, runs)}}


def chat_completion(messages, endpoint, model, api_key, temperature=0.2, max_tokens=1024, retries=5, backoff=2.0,
                    timeout=120):
    """One reply from an OpenAI-compatible /chat/completions endpoint, standard library only. Retries connection
    errors, 429 and 5xx with exponential back-off. The key goes in the Authorization header and nowhere else."""
    body = json.dumps({"model": model, "messages": messages, "temperature": temperature,
                       "max_tokens": max_tokens}).encode()
    request = urllib.request.Request(endpoint.rstrip("/") + "/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.load(response)["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as e:
            if e.code != 429 and e.code < 500:
                raise RuntimeError(f"judge endpoint {endpoint} answered HTTP {e.code}: {e.read()[:300]!r}") from None
            problem = f"HTTP {e.code}"
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            problem = str(getattr(e, "reason", e))
        if attempt < retries:
            print(f"judge: {problem}; retrying in {backoff * 2 ** attempt:.0f} s", file=sys.stderr)
            time.sleep(backoff * 2 ** attempt)
    raise RuntimeError(f"judge endpoint {endpoint}: still failing after {retries} retries ({problem})")


def judge_llava_bench(args, run):
    """One judge run: a review line per question in LLaVA's format, with GPT-4's reference as Assistant 1."""
    questions = read_jsonl(args.questions)
    context = {c["image"]: c["caption"] for c in read_jsonl(args.context)}
    reference = {str(a["question_id"]): a for a in read_jsonl(args.reference)}
    answers = {str(a["question_id"]): a for a in read_jsonl(args.answers)}
    rules = json.load(open(args.rules)) if args.rules else {}
    key = os.environ.get(args.judge_key_env, "")
    if not key:
        raise SystemExit(f"the judge needs an API key in the environment variable {args.judge_key_env}")
    reviews = []
    for i, q in enumerate(questions):
        qid = str(q["question_id"])
        if qid not in reference or qid not in answers:
            raise DataError(f"question {qid}: no {'reference' if qid not in reference else 'model'} answer")
        caption = context[q["image"]]
        rule = rules.get(f"llava_bench_{q['category']}", {"prompt": JUDGE_RULE, "role": "Assistant"})
        role = rule["role"]
        content = (f"[Context]\n{chr(10).join(caption) if isinstance(caption, list) else caption}\n\n"
                   f"[Question]\n{q['text']}\n\n"
                   f"[{role} 1]\n{reference[qid]['text']}\n\n[End of {role} 1]\n\n"
                   f"[{role} 2]\n{answers[qid]['text']}\n\n[End of {role} 2]\n\n"
                   f"[System]\n{rule['prompt']}\n\n")
        reply = chat_completion([{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}],
                                args.judge_endpoint, args.judge_model, key, retries=args.judge_retries,
                                backoff=args.judge_backoff)
        reviews.append({"id": i + 1, "question_id": q["question_id"],
                        "answer1_id": reference[qid].get("answer_id", q["question_id"]),
                        "answer2_id": answers[qid].get("answer_id"), "category": f"llava_bench_{q['category']}",
                        "content": reply, "tuple": parse_review(reply)})
    os.makedirs(args.reviews_dir, exist_ok=True)
    path = os.path.join(args.reviews_dir, f"{os.path.basename(args.answers).rsplit('.', 1)[0]}-eval{run}.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in reviews)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Answering


def load_questions(path, suffix):
    """(question_id, image or None, text for the model, the answer file's "prompt") for LLaVA's question files:
    JSON lines {question_id, image, text} (model_vqa_loader), or ScienceQA's conversation list (model_vqa_science)."""
    questions = []
    for q in read_jsonl(path):
        if "conversations" in q:
            text = q["conversations"][0]["value"].replace(IMAGE_TOKEN, "").strip() + suffix
            prompt = (IMAGE_TOKEN + "\n" if "image" in q else "") + text
            questions.append((q["id"], q.get("image"), text, prompt))
        else:
            questions.append((q["question_id"], q.get("image"), q["text"] + suffix, q["text"] + suffix))
    return questions


def answered_ids(path):
    """Ids already in an answers file. A last line cut short by a crash is dropped from the file."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        with open(path, "wb") as f:
            f.write(data[:data.rfind(b"\n") + 1])
    return {str(a["question_id"]) for a in read_jsonl(path)} if data.strip() else set()


def run(args):
    import torch
    from tqdm import tqdm

    import generate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, fmt, processor = generate.load(args.model, torch.bfloat16 if device == "cuda" else torch.float32, device)
    model_id = args.model_id or os.path.basename(os.path.normpath(args.model))
    questions = load_questions(args.questions, args.suffix)
    done = answered_ids(args.answers)
    todo = [q for q in questions if str(q[0]) not in done]
    os.makedirs(os.path.dirname(os.path.abspath(args.answers)), exist_ok=True)
    bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc="answering")
    with open(args.answers, "a") as out:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            images = [os.path.join(args.image_folder, q[1]) for q in batch if q[1]]
            pixel_values = generate.prepare_images(images, processor, model.config.image_aspect_ratio)
            conversations = [[{"role": "user", "content": (IMAGE_TOKEN + "\n" if q[1] else "") + q[2]}] for q in batch]
            texts = generate.answer(model, fmt, conversations, pixel_values, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature)
            for (qid, _, _, prompt), text in zip(batch, texts):
                out.write(json.dumps({"question_id": qid, "prompt": prompt, "text": text,
                                      "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}}) + "\n")
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(batch))
    bar.close()


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def flatten(metrics, prefix=""):
    """{"splits": {"random": {"f1": 1}}} -> [("splits / random / f1", 1)]"""
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        rows += flatten(value, name + " / ") if isinstance(value, dict) else [(name, value)]
    return rows


def print_table(benchmark, metrics):
    print(benchmark)
    rows = flatten(metrics)
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value:.2f}" if isinstance(value, float) else f"  {name:<{width}}  {value}")


def score(args):
    if args.benchmark == "scienceqa":
        metrics = score_scienceqa(args.questions, args.answers)
    elif args.benchmark == "pope":
        metrics = score_pope(args.questions, args.answers, args.labels)
    elif args.benchmark == "vqa":
        metrics = score_vqa(args.answers, args.annotations)
    elif args.benchmark == "gqa":
        metrics = score_gqa(args.answers, args.annotations)
    elif args.benchmark == "mme":
        metrics = score_mme(args.questions, args.answers, args.mme_root)
    else:
        reviews = args.reviews or [judge_llava_bench(args, run + 1) for run in range(args.runs)]
        metrics = score_llava_bench(reviews)
    out = args.out or (args.answers or args.reviews[0]).rsplit(".", 1)[0] + f".{args.benchmark}-scores.json"
    with open(out, "w") as f:
        json.dump(metrics, f, indent=2)
    print_table(args.benchmark, metrics)
    return metrics


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="answer a question file with a model")
    r.add_argument("--model", required=True)
    r.add_argument("--questions", required=True)
    r.add_argument("--image-folder", default="")
    r.add_argument("--answers", required=True)
    r.add_argument("--suffix", default="", help='appended to each question, e.g. "\\nAnswer with the option\'s '
                                               'letter from the given choices directly." for ScienceQA')
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--max-new-tokens", type=int, default=128, help="LLaVA: 128 (short answers), 1024 (SQA, Bench)")
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--model-id", default=None)
    s = sub.add_parser("score", help="score an answers file")
    s.add_argument("benchmark", choices=["scienceqa", "pope", "vqa", "gqa", "mme", "llava_bench"])
    s.add_argument("--questions")
    s.add_argument("--answers")
    s.add_argument("--labels", help="pope: the folder of coco_pope_{adversarial,popular,random}.json")
    s.add_argument("--annotations", help="vqa: VQAv2 or TextVQA annotations; gqa: the questions json with answers")
    s.add_argument("--mme-root", help="mme: the MME release folder (subtask folders with question\\tanswer files)")
    s.add_argument("--reviews", nargs="+", help="llava_bench: judge review files, one per run")
    s.add_argument("--context", help="llava_bench judging: context.jsonl (image captions)")
    s.add_argument("--reference", help="llava_bench judging: GPT-4's answers (answers_gpt4.jsonl)")
    s.add_argument("--rules", help="llava_bench judging: LLaVA's rule.json (default: its prompt, built in)")
    s.add_argument("--runs", type=int, default=3)
    s.add_argument("--reviews-dir", default="reviews")
    s.add_argument("--judge-endpoint", default=os.environ.get("JUDGE_ENDPOINT", "https://api.openai.com/v1"))
    s.add_argument("--judge-model", default=os.environ.get("JUDGE_MODEL", "gpt-4-0314"))
    s.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="the environment variable holding the key")
    s.add_argument("--judge-retries", type=int, default=5)
    s.add_argument("--judge-backoff", type=float, default=2.0)
    s.add_argument("--out", help="metrics JSON (default: next to the answers)")
    args = p.parse_args(argv)
    try:
        return run(args) if args.command == "run" else score(args)
    except (DataError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
