"""InstructBLIP's instruction data: caption and VQA datasets turned into instructions with the paper's templates,
and LLaVA conversations cut into single turns as LAVIS reads them; each written as LLaVA's conversation file.

    python tools/instructblip_data.py caption --captions annotations/captions_train2017.json \\
        --image-prefix coco/train2017 --out coco_caption_instruct.json
    python tools/instructblip_data.py vqa --questions v2_OpenEnded_mscoco_train2014_questions.json \\
        --annotations v2_mscoco_train2014_annotations.json --image-prefix coco/train2014 --out vqav2_instruct.json
    python tools/instructblip_data.py vqa --data okvqa.jsonl --vqg --out okvqa_vqg.json     # question generation
    python tools/instructblip_data.py split-turns --data llava_instruct_150k.json --out llava_instruct_turns.json

InstructBLIP (Dai et al. 2023, arXiv:2305.06500, "Tasks and Datasets" and Appendix Table 5) trains on existing
captioning and VQA datasets by wrapping each example in one of 10-15 natural-language templates per task, some
asking for a "short" answer or to "briefly" describe, so that short-answer data does not teach the model to always
answer short. The
templates are kept here as data (CAPTION_TEMPLATES, VQA_TEMPLATES, VQG_TEMPLATES), each list with its source. One
template is drawn per sample from --seed and the sample's id, so a rerun writes the same file.

- caption: one sample per caption. Human turn "<image>\\n" + a caption template; the reply is the caption. Input:
  COCO's captions annotation file {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}, or
  JSON lines / a JSON list of {"image", "caption"}.
- vqa: one sample per question. Human turn "<image>\\n" + a VQA template holding the question as written (its own
  punctuation kept); the reply is the answer. Input: JSON lines / a list of {"image", "question", "answer"}, the
  answer a string or a list of answers (strings or {"answer"} objects), of which the most frequent is taken (VQAv2's
  practice: its "multiple_choice_answer"; a tie goes to the earliest); or VQAv2's official pair of files
  (--questions, --annotations), images named COCO_<subtype>_<12-digit id>.jpg as in its release (--image-name).
  With --vqg the same data gives image question generation instead, the paper's VQG task: a VQG template holding
  the answer, and the question as the reply (ids end in "-vqg", so both files can be trained together).
- split-turns: a LLaVA conversation file, one sample per (human, gpt) pair, ids "<id>-0", "<id>-1", ...; each pair
  keeps the sample's image, with "<image>\\n" opening its human turn; text-only samples are split the same way. The
  paper gives LLaVA-Instruct-150K no template (it already is instructions). The only released code that trains
  InstructBLIP-style models on it, LAVIS's X-InstructBLIP (salesforce/LAVIS
  lavis/datasets/datasets/llava150k_dataset.py), reads conversations[0] and [1] of each example, "<image>" removed:
  one question and its answer, no history. Its configs count "#394276 train examples"
  (lavis/configs/datasets/llava150k/defaults_dial.yaml), far more than the file's 157,712 conversations, which fits
  a file flattened per turn. Splitting every turn is that reading: each question is seen once with its image, never
  its history, as the instruction-aware Q-Former (one instruction per image) needs.

The paper writes "<Image>" where the image goes, at the start of every template; here "<image>\\n" opens the human
turn (where data.py puts it anyway), followed by the template. Text is kept as the dataset has it, runs of
whitespace folded to one space and the ends stripped; BLIP's caption processor (LAVIS blip_processors.py: lower
case, punctuation removed, 50 words) is not applied. A template's "." right after the placeholder is dropped when the
text put there already ends a sentence ("What is it?" makes "...: What is it? Answer:", not "What is it?. Answer:").
A record with a field missing or empty is an error naming the file and line; with --skip-bad it is left out and
counted. The output is a JSON list, written atomically; ids are unique (a clash is an error).
"""

import argparse
import collections
import json
import os
import posixpath
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import atomic_write, read_json  # noqa: E402
from data import (IMAGE_TOKEN, DataError, UserError, image_paths, is_id, iter_data_file, json_type,  # noqa: E402
                  parse_conversation, read_text, sample_place)
from generate import USER_ERRORS, exit_with  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------------
# The templates. "{}" is where the question (VQA) or the answer (VQG) goes; the paper's leading "<Image>" is dropped.

# Image captioning: the paper's 13 (Appendix Table 5), word for word. The same 13 are the captioning prompts of several
# public reproductions (e.g. Vision-CAIR/MiniGPT-4 minigpt4/datasets/datasets/caption_datasets.py, instruction_pool
# items 5-17). LAVIS never released InstructBLIP's training code; its nearest list, X-InstructBLIP's
# TEMPLATES["image"]["caption"] (lavis/processors/instruction_text_processors.py), is a 53-string superset that
# lacks three of these ("Write a short description for the image.", "Please provide a short depiction of the
# picture.", and "Write a description for the photo.", which a missing comma there glues to the string before it).
CAPTION_TEMPLATES = [
    "A short image caption:",
    "A short image description:",
    "A photo of",
    "An image that shows",
    "Write a short description for the image.",
    "Write a description for the photo.",
    "Provide a description of what is presented in the photo.",
    "Briefly describe the content of the image.",
    "Can you briefly explain what you see in the image?",
    "Could you use a few words to describe what you perceive in the photo?",
    "Please provide a short depiction of the picture.",
    "Using language, provide a short account of the image.",
    "Use a few words to illustrate what is happening in the picture.",
]

# VQA: the paper's 10 (Appendix Table 5). MiniGPT-4 keeps them, commented out, in COCOVQAEvalDataset
# (minigpt4/datasets/datasets/coco_vqa_datasets.py, commit 0e5d34a) with two small differences: "...a short answer: {}."
# without " Answer:", and "...as short as possible." with a full stop for the colon.
VQA_TEMPLATES = [
    "{}",
    "Question: {}",
    "{} A short answer to the question is",
    "Q: {} A:",
    "Question: {} Short answer:",
    "Given the image, answer the following question with no more than three words. {}",
    "Based on the image, respond to this question with a short answer: {}. Answer:",
    "Use the provided image to answer the question: {} Provide your answer as short as possible:",
    'What is the answer to the following question? "{}"',
    'The question "{}" can be answered using the image. A short answer is',
]

# Image question generation (VQG): the paper's 6 (Appendix Table 5), with their endings (". Question:" on four).
# MiniGPT-4's AOKVQGDataset and COCOVQGDataset (minigpt4/datasets/datasets/aok_vqa_datasets.py, coco_vqa_datasets.py)
# carry the same six sentences cut after the answer ("...whose answer is: {}"). "generate an question" is the paper's.
VQG_TEMPLATES = [
    "Given the image, generate a question whose answer is: {}. Question:",
    "Based on the image, provide a question with the answer: {}. Question:",
    'Given the visual representation, create a question for which the answer is "{}".',
    "From the image provided, craft a question that leads to the reply: {}. Question:",
    "Considering the picture, come up with a question where the answer is: {}.",
    "Taking the image into account, generate an question that has the answer: {}. Question:",
]

VQAV2_FILES = {"questions": "v2_OpenEnded_mscoco_train2014_questions.json",
               "annotations": "v2_mscoco_train2014_annotations.json"}
DEFAULT_IMAGE_NAME = "COCO_{data_subtype}_{image_id:012d}.jpg"  # VQAv2's images: COCO_train2014_000000000009.jpg


def clean(text):
    """Runs of whitespace folded to one space, the ends stripped (COCO's captions carry stray spaces and newlines)."""
    return " ".join(text.split())


def fill(template, text):
    """The template with `text` where its {} is. The text goes in as it is written; only a "." that the template puts
    right after it is dropped when the text already ends a sentence."""
    if text[-1:] in (".", "?", "!"):
        template = template.replace("{}.", "{}")
    return template.replace("{}", text)


def choose(templates, seed, sample_id):
    """The sample's template: the same for the same --seed and id in every run, whatever else is in the file."""
    return random.Random(f"{seed}:{sample_id}").choice(templates)


def image_sample(sample_id, image, instruction, reply):
    return {"id": sample_id, "image": image, "conversations": [
        {"from": "human", "value": f"{IMAGE_TOKEN}\n{instruction}"}, {"from": "gpt", "value": reply}]}


def with_prefix(prefix, name):
    """The image's path as the samples give it: under --image-prefix (a folder inside --image-folder) when given."""
    return posixpath.join(prefix, name) if prefix else name


def stem(path):
    return posixpath.splitext(path)[0]


# ----------------------------------------------------------------------------------------------------------------------
# Reading: records with their places, bad ones an error or counted


class Records:
    """Collects samples; a bad record raises, or with skip_bad is counted (the first reason kept for the summary).
    Ids must be unique: the second holder of an id is a bad record."""

    def __init__(self, skip_bad):
        self.skip_bad, self.samples, self.bad, self.first_bad, self.ids = skip_bad, [], 0, None, {}

    def reject(self, error):
        if not self.skip_bad:
            raise error
        self.bad += 1
        self.first_bad = self.first_bad or str(error)

    def add(self, samples, where):
        """A record's samples, all or (an id already taken) none."""
        for sample in samples:
            if sample["id"] in self.ids:
                raise DataError(f"{where}: id {sample['id']!r} is already the id of {self.ids[sample['id']]}; ids "
                                "must be unique: fix the record's id, or skip bad samples")
        for sample in samples:
            self.ids[sample["id"]] = where
            self.samples.append(sample)


def text_field(record, name, where):
    """record[name], a non-empty string (cleaned), or an error naming the field."""
    value = record.get(name)
    if isinstance(value, str) and value.strip():
        return clean(value)
    if name not in record:
        problem = f"no {name!r} field (it has {sorted(record)[:8]})"
    else:
        problem = f"{name!r} is empty" if isinstance(value, str) else f"{name!r} is {json_type(value)}, not text"
    raise DataError(f"{where}: {problem}; fix the record, or skip bad samples (--skip-bad)")


def record_id(record, where):
    """The record's own id ("id", else VQA's "question_id") as a string, or None when it has none."""
    for name in ("id", "question_id"):
        if record.get(name) is not None:
            if not is_id(record[name]):
                raise DataError(f"{where}: {name!r} must be a string or a number, got {json_type(record[name])}")
            return str(record[name])
    return None


def lines(path, records):
    """(record, where) for each JSON object of a JSON-lines file or JSON list; a line that is not an object is bad."""
    for position, _, record in iter_data_file(path):
        where = sample_place(path, position, record)
        if isinstance(record, dict):
            yield record, where
        else:
            records.reject(DataError(f"{where}: expected a JSON object, got {json_type(record)}"))


def annotation_document(path):
    """The JSON object in `path` when it is one (COCO's annotation file), None for JSON lines or a JSON list."""
    text = read_text(path)
    if not text.lstrip().startswith("{"):
        return None
    try:
        document = json.loads(text)
    except ValueError:  # JSON lines: one object per line
        return None
    return document if isinstance(document, dict) else None


def numbered(counts, base):
    """base-0, base-1, ...: the k-th record without an id of the same image."""
    k = counts[base]
    counts[base] += 1
    return f"{base}-{k}"


# ----------------------------------------------------------------------------------------------------------------------
# The tasks


def caption_samples(path, prefix, seed, skip_bad):
    """One sample per caption. Ids: the record's own id, else "<image path without extension>-<k>", the image's k-th
    caption in file order (COCO: "000000391895-0" ... "-4")."""
    records, counts = Records(skip_bad), collections.Counter()

    def add(image, caption, sample_id, where):
        instruction = choose(CAPTION_TEMPLATES, seed, sample_id)
        records.add([image_sample(sample_id, with_prefix(prefix, image), instruction, caption)], where)

    document = annotation_document(path)
    if document is not None:
        if not isinstance(document.get("images"), list) or not isinstance(document.get("annotations"), list):
            raise DataError(f"{path}: a JSON object without COCO's 'images' and 'annotations' lists; give COCO's "
                            "captions file (captions_train2017.json) or JSON lines of {\"image\", \"caption\"}")
        names = {}
        for i, entry in enumerate(document["images"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or \
                    not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
                raise DataError(f"{path}, images[{i}]: expected {{'id': a number, 'file_name': text}}, got "
                                f"{entry!r:.80}; is it COCO's captions file?")
            names[entry["id"]] = entry["file_name"]
        for i, entry in enumerate(document["annotations"]):
            where = f"{path}, annotations[{i}]"
            try:
                if not isinstance(entry, dict):
                    raise DataError(f"{where}: expected an object {{'image_id', 'caption'}}, got {json_type(entry)}")
                if entry.get("image_id") not in names:
                    raise DataError(f"{where}: 'image_id' {entry.get('image_id')!r:.40} is not in the file's images")
                caption = text_field(entry, "caption", where)
                image = names[entry["image_id"]]
                add(image, caption, numbered(counts, stem(image)), where)
            except DataError as e:
                records.reject(e)
        source = f"{len(document['annotations'])} COCO captions of {len(names)} images in {path}"
    else:
        seen = 0
        for record, where in lines(path, records):
            seen += 1
            try:
                image, caption = text_field(record, "image", where), text_field(record, "caption", where)
                add(image, caption, record_id(record, where) or numbered(counts, stem(image)), where)
            except DataError as e:
                records.reject(e)
        source = f"{seen} captions in {path}"
    return records, source


def most_frequent(answers, where):
    """The answer most annotators gave (a tie: the earliest); answers are strings or VQAv2's {"answer"} objects."""
    texts = []
    for a in answers:
        text = a.get("answer") if isinstance(a, dict) else a
        if not isinstance(text, str):
            raise DataError(f"{where}: each answer must be text or {{'answer': text}}, got {a!r:.60}")
        if text.strip():
            texts.append(clean(text))
    if not texts:
        raise DataError(f"{where}: 'answer' holds no non-empty answer; fix the record, or skip bad samples")
    return collections.Counter(texts).most_common(1)[0][0]  # Counter keeps first-seen order among equal counts


def answer_of(record, where):
    """A record's answer: its text, or the most frequent of its list of answers ("answer", else VQA's "answers")."""
    name = "answer" if "answer" in record or "answers" not in record else "answers"
    if isinstance(record.get(name), list):
        return most_frequent(record[name], where)
    return text_field(record, name, where)


def vqa_sample(records, sample_id, image, question, answer, vqg, seed, where):
    if vqg:
        sample_id = f"{sample_id}-vqg"
        sample = image_sample(sample_id, image, fill(choose(VQG_TEMPLATES, seed, sample_id), answer), question)
    else:
        sample = image_sample(sample_id, image, fill(choose(VQA_TEMPLATES, seed, sample_id), question), answer)
    records.add([sample], where)


def vqa_samples(path, prefix, vqg, seed, skip_bad):
    """One sample per record of {"image", "question", "answer"}. Ids: the record's "id" or "question_id", else
    "<image path without extension>-<k>", the image's k-th question in file order."""
    records, counts, seen = Records(skip_bad), collections.Counter(), 0
    for record, where in lines(path, records):
        seen += 1
        try:
            image = text_field(record, "image", where)
            question, answer = text_field(record, "question", where), answer_of(record, where)
            sample_id = record_id(record, where) or numbered(counts, stem(image))
            vqa_sample(records, sample_id, with_prefix(prefix, image), question, answer, vqg, seed, where)
        except DataError as e:
            records.reject(e)
    return records, f"{seen} questions in {path}"


def vqav2_samples(questions_path, annotations_path, prefix, image_name, vqg, seed, skip_bad):
    """VQAv2's release: the questions file {"data_subtype", "questions": [{"question_id", "image_id", "question"}]} and
    the annotations file {"annotations": [{"question_id", "multiple_choice_answer", "answers": [{"answer"}]}]}, joined
    on question_id, in the questions file's order. Ids are the question ids."""
    questions, annotations = read_json(questions_path), read_json(annotations_path)
    for document, key, path in [(questions, "questions", questions_path),
                                (annotations, "annotations", annotations_path)]:
        if not isinstance(document, dict) or not isinstance(document.get(key), list):
            raise DataError(f"{path}: expected a JSON object with a {key!r} list; is it VQAv2's {key} file "
                            f"(e.g. {VQAV2_FILES[key]})?")
    subtype = questions.get("data_subtype")
    if "{data_subtype" in image_name and not (isinstance(subtype, str) and subtype):
        raise DataError(f"{questions_path}: no 'data_subtype' (e.g. \"train2014\") for the images' names "
                        f"{image_name!r}; give --image-name without {{data_subtype}}, e.g. '{{image_id:012d}}.jpg'")
    answers = {}
    for i, a in enumerate(annotations["annotations"]):
        if isinstance(a, dict) and is_id(a.get("question_id")):
            answers[a["question_id"]] = (a, f"{annotations_path}, annotations[{i}]")
    records = Records(skip_bad)
    for i, q in enumerate(questions["questions"]):
        where = f"{questions_path}, questions[{i}]"
        try:
            if not isinstance(q, dict) or not is_id(q.get("question_id")) or not isinstance(q.get("image_id"), int):
                raise DataError(f"{where}: expected {{'question_id', 'image_id': a number, 'question'}}, got "
                                f"{q!r:.80}")
            question = text_field(q, "question", where)
            if q["question_id"] not in answers:
                raise DataError(f"{where}: question {q['question_id']} has no annotation in {annotations_path}; "
                                "are both files of one split?")
            a, a_where = answers[q["question_id"]]
            mc = a.get("multiple_choice_answer")
            answer = clean(mc) if isinstance(mc, str) and mc.strip() else answer_of(a, a_where)
            image = with_prefix(prefix, image_name.format(image_id=q["image_id"], data_subtype=subtype))
            vqa_sample(records, str(q["question_id"]), image, question, answer, vqg, seed, where)
        except DataError as e:
            records.reject(e)
    return records, f"{len(questions['questions'])} VQAv2 questions in {questions_path}"


def split_turns(path, skip_bad):
    """One sample per (human, gpt) pair of each conversation, as LAVIS's LLaVA-150K loader reads a pair: the human
    text with `<image>` removed and stripped, then "<image>\\n" in front again when the sample has its image."""
    records, seen, pairs = Records(skip_bad), 0, 0
    for record, where in lines(path, records):
        seen += 1
        try:
            if not is_id(record.get("id")):
                raise DataError(f"{where}: 'id' is {json_type(record.get('id'))}, not a string or a number; the "
                                "split samples' ids are built from it")
            images = image_paths(record, where)
            if len(images) > 1:
                raise DataError(f"{where}: {len(images)} images; one turn can hold one image, so a sample with "
                                "several cannot be split; skip bad samples or leave it out")
            parse_conversation(record.get("conversations"), len(images), where)  # alternating, replies non-empty
            turns, samples = record["conversations"], []
            for k in range(0, len(turns), 2):
                question = turns[k]["value"].replace(IMAGE_TOKEN, "").strip()
                sample = {"id": f"{record['id']}-{k // 2}"}
                if images:
                    sample["image"] = record["image"]
                    question = f"{IMAGE_TOKEN}\n{question}"
                sample["conversations"] = [{"from": "human", "value": question},
                                           {"from": "gpt", "value": turns[k + 1]["value"]}]
                samples.append(sample)
            records.add(samples, where)
            pairs += len(samples)
        except DataError as e:
            records.reject(e)
    return records, f"{pairs} turns of {seen} conversations in {path}"


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def image_name_type(text):
    """--image-name's argparse type: a format of {image_id} (a number) and {data_subtype} that names a file."""
    try:
        name = text.format(image_id=9, data_subtype="train2014")
    except (KeyError, IndexError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: not a format of {{image_id}} and {{data_subtype}} ({e}); e.g. "
                                         f"{DEFAULT_IMAGE_NAME!r} or '{{image_id:012d}}.jpg' (COCO 2017's names)")
    if not name or "{" in name:
        raise argparse.ArgumentTypeError(f"{text!r}: gives {name!r}, not a file name")
    return text


def build(args):
    """The command's samples, written to --out; returns the summary line."""
    if args.command == "caption":
        records, source = caption_samples(args.captions, args.image_prefix, args.seed, args.skip_bad)
        made = "caption"
    elif args.command == "vqa":
        if bool(args.data) == bool(args.questions):
            raise UserError("vqa: give --data (JSON lines of {\"image\", \"question\", \"answer\"}) or --questions "
                            "with --annotations (VQAv2's files), not both")
        if args.questions and not args.annotations:
            raise UserError("--questions: give VQAv2's annotations file too (--annotations), where the answers are")
        if args.data:
            records, source = vqa_samples(args.data, args.image_prefix, args.vqg, args.seed, args.skip_bad)
        else:
            records, source = vqav2_samples(args.questions, args.annotations, args.image_prefix, args.image_name,
                                            args.vqg, args.seed, args.skip_bad)
        made = "question-generation" if args.vqg else "VQA"
    else:
        records, source = split_turns(args.data, args.skip_bad)
        made = "single-turn"
    if not records.samples:
        raise DataError(f"no samples made from {source}" + (f": all are bad ({records.first_bad})" if records.bad
                                                            else ""))
    atomic_write(args.out, lambda f: json.dump(records.samples, f, ensure_ascii=False, indent=1))
    skipped = f"; {records.bad} bad records skipped, the first: {records.first_bad}" if records.bad else ""
    return f"{len(records.samples)} {made} samples from {source}, written to {args.out}{skipped}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(s, prefix=True):
        s.add_argument("--out", required=True, help="the LLaVA-format JSON list to write")
        s.add_argument("--skip-bad", action="store_true", help="leave out bad records and count them (default: the "
                       "first is an error)")
        if prefix:
            s.add_argument("--seed", type=int, default=0, help="which template each sample gets (default 0)")
            s.add_argument("--image-prefix", default="", help="a folder put before each image name, e.g. "
                           "coco/train2017 (the images' place inside --image-folder)")

    s = sub.add_parser("caption", help="captions -> caption instructions")
    s.add_argument("--captions", required=True, help="COCO's captions file, or JSON lines of {image, caption}")
    common(s)
    s = sub.add_parser("vqa", help="questions and answers -> VQA (or, with --vqg, question-generation) instructions")
    s.add_argument("--data", help="JSON lines / a JSON list of {image, question, answer}")
    s.add_argument("--questions", help="VQAv2's questions file (with --annotations)")
    s.add_argument("--annotations", help="VQAv2's annotations file")
    s.add_argument("--image-name", type=image_name_type, default=DEFAULT_IMAGE_NAME,
                   help=f"VQAv2's image file names (default {DEFAULT_IMAGE_NAME!r}; '{{image_id:012d}}.jpg' for "
                   "COCO 2017's folders)")
    s.add_argument("--vqg", action="store_true", help="question generation: the answer in the instruction, the "
                   "question as the reply")
    common(s)
    s = sub.add_parser("split-turns", help="LLaVA conversations -> one sample per turn (LAVIS's reading)")
    s.add_argument("--data", required=True, help="LLaVA's conversation file (.json list or .jsonl)")
    common(s, prefix=False)
    args = p.parse_args(argv)
    try:
        print(build(args))
    except USER_ERRORS as e:
        exit_with(e)


if __name__ == "__main__":
    main()
