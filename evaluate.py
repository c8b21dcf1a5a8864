"""How good it is: answer a benchmark's questions with a model, and score the answers the way LLaVA's papers did.

    python evaluate.py run --model DIR --questions llava_pope_test.jsonl --image-folder val2014 --answers pope.jsonl
    python evaluate.py score scienceqa --questions llava_test_CQM-A.json --answers sqa.jsonl
    python evaluate.py score scienceqa_gpt4 --questions llava_test_QCM-LEA.json --answers sqa.jsonl \\
        --gpt-answers gpt4_test.json     # the first paper's ensemble: GPT-4 asked again where the two disagree
    python evaluate.py score pope --questions llava_pope_test.jsonl --answers pope.jsonl --labels pope_labels_dir
    python evaluate.py score vqa --answers textvqa.jsonl --annotations TextVQA_0.5.1_val.json
    python evaluate.py score gqa --answers gqa.jsonl --annotations testdev_balanced_questions.json
    python evaluate.py score mme --questions llava_mme.jsonl --answers mme.jsonl \\
        --mme-root MME_Benchmark_release_version
    python evaluate.py score llava_bench --reviews eval1.jsonl eval2.jsonl eval3.jsonl
    python evaluate.py score llava_bench --questions questions.jsonl --context context.jsonl \\
        --reference answers_gpt4.jsonl --answers llava_bench.jsonl --runs 3 --reviews-dir reviews/   # asks a judge
    python evaluate.py score pope --help                                  # each benchmark's flags, and only those
    python evaluate.py run --model DIR --questions mmbench_dev_20230712.tsv --answers mmbench.jsonl \\
        --suffix "\\nAnswer with the option's letter from the given choices directly." --max-new-tokens 1024
    python evaluate.py score mmbench --questions mmbench_dev_20230712.tsv --answers mmbench.jsonl
    python evaluate.py score vqav2_submit --questions llava_vqav2_mscoco_test-dev2015.jsonl \\
        --answers 2_0.jsonl 2_1.jsonl --test-questions llava_vqav2_mscoco_test2015.jsonl   # a file for EvalAI

`run` reads LLaVA's question files (JSON lines {question_id, image, text, category}, the conversation-format
JSON list of ScienceQA, or MMBench's TSV with its images inside) and writes LLaVA's answer schema {question_id,
prompt, text, answer_id, model_id, metadata} (MMBench's adds round_id, options, option_char), a line per answer,
flushed as it goes: a crash loses nothing, and a re-run skips the questions already answered (another model's
answers file is refused). The question file, its images and the answers file are checked before the model loads.
Decoding is LLaVA-1.5's benchmark setting (its scripts/v1_5/eval/*.sh): greedy, the model's own template (vicuna_v1),
"<image>\\n" first in the question. --compile decodes with generate.StaticDecoder, built once for the run: the same
answers (greedy), a compiled step.

`score NAME` prints a table and writes the metrics as JSON (--out). The rules are in benchmarks.py, one section per
benchmark, each LLaVA's own (haotian-liu/LLaVA llava/eval/eval_science_qa.py, eval_pope.py, m4c_evaluator.py,
summarize_gpt_review.py, scripts/convert_gqa_for_eval.py; MME's eval_tool/calculation.py; ...); the table BENCHMARKS
there gives each one its sub-command and its flags. The *_submit ones write the file a benchmark's server scores. The
GPT judge of LLaVA-Bench and MM-Vet's grader, an HTTP client, is judge.py.
"""

import argparse
import fcntl
import io
import json
import os
import uuid

import generate
from benchmarks import BENCHMARKS, ID, atomic_write, beside, mmbench_questions, read_appended, read_questions, \
    require, sqa_turn
from data import IMAGE_TOKEN, DataError, UserError, load_image, process_image


# ----------------------------------------------------------------------------------------------------------------------
# Answering


def load_questions(path, suffix, all_rounds=False):
    """(question_id, image, text for the model, the answer file's "prompt", more answer fields) for LLaVA's question
    files: JSON lines {question_id, image, text} (model_vqa_loader), ScienceQA's conversation list
    (model_vqa_science), or an MMBench TSV (model_vqa_mmbench: the image is bytes, one question per round, see
    benchmarks.mmbench_questions). A "\\n" typed in the suffix is a newline."""
    suffix = suffix.replace("\\n", "\n")
    if os.path.splitext(path)[1].lower() == ".tsv":
        return mmbench_questions(path, suffix, all_rounds)
    questions = []
    for n, q in enumerate(read_questions(path), 1):
        if "conversations" in q:
            require(q, {"id": ID, "conversations": list}, f"{path}, question #{n}")
            text = sqa_turn(q, 0, path).replace(IMAGE_TOKEN, "").strip() + suffix
            prompt = (IMAGE_TOKEN + "\n" if "image" in q else "") + text
            question = (q["id"], q.get("image"), text, prompt, {})
        else:
            require(q, {"question_id": ID, "text": str}, f"{path}, question #{n}")
            question = (q["question_id"], q.get("image"), q["text"] + suffix, q["text"] + suffix, {})
        if not isinstance(question[1], (str, type(None))):
            raise DataError(f"{path}, question {question[0]!r}: 'image' is {question[1]!r:.60}, not a file name")
        questions.append(question)
    return questions


def image_source(question, folder, path):
    """What load_image opens for a question: MMBench's bytes, or the file under --image-folder. A file name that
    leaves the folder (an absolute path, "..") is refused: a question file says which image, not where on disk."""
    qid, image = question[0], question[1]
    if isinstance(image, bytes):
        return io.BytesIO(image)
    if os.path.isabs(image) or os.path.normpath(image).split(os.sep)[0] == os.pardir:
        raise DataError(f"{path}, question {qid!r}: the image {image!r} is outside --image-folder; image names are "
                        "relative to it")
    file = os.path.join(folder, image)
    if not os.path.isfile(file):
        raise DataError(f"{path}, question {qid!r}: image file {file} does not exist; check --image-folder")
    return file


def chunk(questions, n, k):
    """LLaVA's --num-chunks N --chunk-idx K: the K-th of N consecutive slices of ceil(len / N) questions."""
    size = -(-len(questions) // n)
    return questions[k * size:(k + 1) * size]


def answer_key(question_id, round_id, prompt):
    """What makes an answer line the answer to one question: its id is not enough (TextVQA's question_id is the image
    id, shared by the questions on one image; MMBench's rounds share theirs)."""
    return str(question_id), round_id, prompt


def answered(path):
    """{answer key: model_id} of the answers already in an answers file, which run appends to: every line checked
    before a line cut by a crash is dropped (benchmarks.read_appended)."""
    def check(a, where):
        require(a, {"question_id": ID}, where)
        if not isinstance(a.get("prompt", ""), str) or not isinstance(a.get("round_id", 0), int):
            raise DataError(f"{where}: 'prompt' must be a string, 'round_id' an integer")

    answers = read_appended(path, check, "not a JSON answer line; is --answers an answers file of `evaluate.py run`?")
    return {answer_key(a["question_id"], a.get("round_id"), a.get("prompt")): a.get("model_id") for a in answers}


def in_format(prompt, text):
    """A question put into --prompt's format ("Question: {} Short answer:", InstructBLIP's for short answers)."""
    return prompt.replace("{}", text)


def run(args):
    """Answer --questions into --answers. Everything a user can get wrong is checked before the model loads: the
    question file, each question's image (it exists, under --image-folder), the answers file it appends to."""
    model_id = args.model_id or os.path.basename(os.path.normpath(args.model))
    questions = chunk(load_questions(args.questions, args.suffix, args.all_rounds), args.num_chunks, args.chunk_idx)
    questions = [(qid, image, in_format(args.prompt, text), prompt.replace(text, in_format(args.prompt, text)), extra)
                 for qid, image, text, prompt, extra in questions]
    images = [image_source(q, args.image_folder, args.questions) if q[1] else None for q in questions]
    os.makedirs(os.path.dirname(os.path.abspath(args.answers)), exist_ok=True)
    created = not os.path.exists(args.answers)
    try:
        with open(args.answers, "a") as out:  # locked for the whole run: two runs would write each answer twice
            try:
                fcntl.flock(out, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise UserError(f"--answers {args.answers}: another evaluate.py run is writing it; wait for that run "
                                "to end, or name another answers file (one per --chunk-idx)") from None
            answer_all(args, questions, images, model_id, out)
    except BaseException:
        if created and os.path.getsize(args.answers) == 0:  # a run that answered nothing leaves no file
            os.remove(args.answers)
        raise


def answer_all(args, questions, images, model_id, out):
    """The questions not yet in the answers file (open as `out`), answered in batches and appended as they come."""
    import torch
    from tqdm import tqdm

    done = answered(args.answers)
    others = sorted({str(m) for m in done.values() if m is not None} - {model_id})
    if others:
        raise UserError(f"--answers {args.answers}: it holds answers of the model {others[0]!r}, this run is "
                        f"{model_id!r}; name another answers file (or pass --model-id {others[0]} if it is this model)")
    todo = [(q, image) for q, image in zip(questions, images)
            if answer_key(q[0], q[4].get("round_id"), q[3]) not in done]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, fmt, processor = generate.load(args.model, torch.bfloat16 if device == "cuda" else torch.float32, device)
    # --compile: one static cache of --batch-size rows and one compiled step for the whole run (the last, smaller
    # batch runs in the first rows)
    decoder = generate.StaticDecoder(model, batch=args.batch_size) if args.compile else None
    bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc="answering")
    for start in range(0, len(todo), args.batch_size):
        batch, batch_images = zip(*todo[start:start + args.batch_size])
        pixel_values = [process_image(load_image(image, f"{args.questions}, question {q[0]!r}"), processor,
                                      model.config.image_aspect_ratio)
                        for q, image in zip(batch, batch_images) if image is not None]
        pixel_values = torch.stack(pixel_values) if pixel_values else None
        conversations = [[{"role": "user", "content": (IMAGE_TOKEN + "\n" if q[1] else "") + q[2]}] for q in batch]
        texts = generate.answer(model, fmt, conversations, pixel_values, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, decoder=decoder)
        for (qid, _, _, prompt, extra), text in zip(batch, texts):
            out.write(json.dumps({"question_id": qid, "prompt": prompt, "text": text, **extra,
                                  "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}}) + "\n")
        out.flush()
        os.fsync(out.fileno())
        bar.update(len(batch))
    bar.close()


# ----------------------------------------------------------------------------------------------------------------------
# Scoring


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
    metrics = BENCHMARKS[args.benchmark].score(args)
    first = args.answers or args.reviews[0]
    first = first[0] if isinstance(first, list) else first  # vqav2_submit merges several answer files
    out = args.out or beside(first, f".{args.benchmark}-scores.json")
    atomic_write(out, lambda f: json.dump(metrics, f, indent=2))
    print_table(args.benchmark, metrics)
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# Command line


# The flags naming what is read, and whether each is a file or a folder: checked before anything runs
INPUTS = {"questions": "file", "image_folder": "folder", "annotations": "file", "labels": "folder",
          "mme_root": "folder", "reviews": "file", "context": "file", "reference": "file", "rules": "file",
          "mmvet_json": "file", "test_questions": "file", "gpt_answers": "file"}
OUTPUTS = ("out", "submission", "grades", "requery")  # score's files written (--answers is run's)


def check_paths(args):
    """Each file or folder a flag names exists and is one; no output is an input it would overwrite (`--out` the
    answers, `run --answers` the questions)."""
    kinds = {**INPUTS, "answers": "file"} if args.command == "score" else INPUTS
    named = []
    for name, kind in kinds.items():
        value = getattr(args, name, None)
        for path in value if isinstance(value, list) else [value] if value else []:
            flag = "--" + name.replace("_", "-")
            if not (os.path.isdir(path) if kind == "folder" else os.path.isfile(path)):
                problem = f"no such {kind}" if not os.path.exists(path) else f"not a {kind}"
                raise UserError(f"{flag} {path}: {problem}; check the path")
            named.append((flag, path))
    outputs = [(n, getattr(args, n, None)) for n in OUTPUTS] if args.command == "score" else [("answers", args.answers)]
    for name, out in outputs:
        for flag, path in named:
            if out and os.path.exists(out) and os.path.samefile(out, path):
                raise UserError(f"--{name} {out}: it is {flag}, which it would overwrite; name another file")


def prompt_format(text):
    if text.count("{}") != 1:
        raise argparse.ArgumentTypeError(f"{text!r} must hold {{}} once, where the question goes")
    return text.replace("\\n", "\n")


def main(argv=None):
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="answer a question file with a model")
    r.add_argument("--model", required=True)
    r.add_argument("--questions", required=True)
    r.add_argument("--image-folder", default="")
    r.add_argument("--answers", required=True)
    r.add_argument("--suffix", default="", help='appended to each question, e.g. "\\nAnswer with the option\'s '
                                               'letter from the given choices directly." for ScienceQA and MMBench '
                                               '("\\n" is a newline)')
    r.add_argument("--prompt", type=prompt_format, default="{}",
                   help='each question (with --suffix) put into this format, {} where it goes: InstructBLIP asks '
                   '"Question: {} Short answer:" (its zero-shot VQA prompt); default: the question as it is')
    r.add_argument("--all-rounds", action="store_true", help="MMBench TSV: ask each question once per rotation of its "
                                                              "options (LLaVA's --all-rounds; its v1.5 scripts don't)")
    r.add_argument("--num-chunks", type=generate.positive_int, default=1,
                   help="answer only chunk --chunk-idx of this many (one per GPU)")
    r.add_argument("--chunk-idx", type=generate.non_negative_int, default=0)
    r.add_argument("--batch-size", type=generate.positive_int, default=8)
    r.add_argument("--max-new-tokens", type=generate.positive_int, default=128,
                   help="LLaVA: 128 (short answers), 1024 (SQA, Bench)")
    r.add_argument("--temperature", type=generate.non_negative_float, default=0.0)
    r.add_argument("--model-id", default=None)
    r.add_argument("--compile", action="store_true",
                   help="static KV cache + torch.compile of the decoding step (CUDA graphs on a GPU), as generate.py's "
                        "--compile: compiles once at the start, then faster per token")
    s = sub.add_parser("score", help="score an answers file", description="Score an answers file the way LLaVA did. "
                       "`evaluate.py score NAME --help` lists NAME's flags.")
    names = s.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, benchmark in BENCHMARKS.items():
        b = names.add_parser(name, help=benchmark.help, description=benchmark.help)
        benchmark.add_flags(b)
        b.add_argument("--out", help="metrics JSON (default: next to the answers)")
    args = p.parse_args(argv)
    if args.command == "run" and args.chunk_idx >= args.num_chunks:
        r.error(f"argument --chunk-idx: must be below --num-chunks ({args.num_chunks}), got {args.chunk_idx}")
    try:
        check_paths(args)
        return run(args) if args.command == "run" else score(args)
    except generate.USER_ERRORS as e:
        generate.exit_with(e)


if __name__ == "__main__":
    main()
