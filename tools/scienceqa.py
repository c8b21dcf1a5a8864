"""ScienceQA as LLaVA fine-tuned and tested on it: the release's problems into LLaVA's conversation files.

    python tools/scienceqa.py --base-dir ScienceQA/data/scienceqa --split train     # -> llava_train_QCM-LEA.json
    python tools/scienceqa.py --base-dir ScienceQA/data/scienceqa --split test      # -> llava_test_QCM-LEA.json
    python tools/scienceqa.py --base-dir ... --split test --prompt-format QCM-LEPA --out sqa_test.json

This is haotian-liu/LLaVA's scripts/convert_sqa_to_llava.py (convert_to_llava) with the prompt builder it imports,
scripts/convert_sqa_to_llava_base_prompt.py (build_prompt_chatbot, create_one_example_chatbot), byte for byte: the
same text, the same JSON (indent 2, non-ASCII escaped). It reads ScienceQA's release (lupantech/ScienceQA,
data/scienceqa): problems.json ({pid: {question, choices, answer (an index), hint, image (a file name or null),
lecture, solution, ...}}) and pid_splits.json ({split: [pid, ...]}); images stay where the release has them,
images/<split>/<pid>/<image>, and a sample's "image" is "<pid>/<image>", so --image-folder is images/<split>.

A prompt format is INPUT-OUTPUT. Input: Q(uestion), C(ontext: the hint, "N/A" when empty), M(ultiple choice options
"(A) x (B) y"), and for upper-bound runs L(ecture) and E(xplanation, the solution) in the question. Output: A(nswer,
"The answer is X."), L, E in the order named; LEPA is the first paper's
"LECTURE: ...\\nSOLUTION: ...\\n###\\nANSWER: X.".
LLaVA's recipe is QCM-LEA (scripts/finetune_sqa.sh: 12 epochs on llava_train_QCM-LEA.json): the model writes the
lecture, the explanation, then "The answer is X.", which is what the ScienceQA scorer reads. Every split is built
with its answers (LLaVA's converter has no test-only variant): the test file's gpt turn is the key the scorer uses.

The original's quirks are kept, since its files are what LLaVA trained and tested on: "AL" appends the solution and
"AE" the lecture (the names are swapped); one pass of "  " -> " "; a literal "\\n" (backslash, n) in a lecture or
solution becomes a newline; every "Question: " in the input and "Answer: " in the output is removed when the text
starts with one; a text ending with "BECAUSE:" loses every "BECAUSE:". A problem the format cannot be built from (a
missing field, an answer outside its choices, more than five choices) is an error naming it, where the original
crashes or writes a wrong letter.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import OPTIONS, atomic_write, read_json  # noqa: E402
from data import DataError, UserError  # noqa: E402
from generate import USER_ERRORS, exit_with  # noqa: E402

INPUTS = {  # what the question turn holds: (question, context, options, lecture, solution) -> text
    "CQM": lambda q, c, m, l, s: f"Context: {c}\nQuestion: {q}\nOptions: {m}\n",
    "QCM": lambda q, c, m, l, s: f"Question: {q}\nContext: {c}\nOptions: {m}\n",
    "QCML": lambda q, c, m, l, s: f"Question: {q}\nContext: {c}\nOptions: {m}\nBECAUSE: {l}\n",
    "QCME": lambda q, c, m, l, s: f"Question: {q}\nContext: {c}\nOptions: {m}\nBECAUSE: {s}\n",
    "QCMLE": lambda q, c, m, l, s: f"Question: {q}\nContext: {c}\nOptions: {m}\nBECAUSE: {l} {s}\n",
    "QCLM": lambda q, c, m, l, s: f"Question: {q}\nContext: {c}\nBECAUSE: {l}\nOptions: {m}\n",
    "QCEM": lambda q, c, m, l, s: f"Question: {q}\nContext: {c}\nBECAUSE: {s}\nOptions: {m}\n",
    "QCLEM": lambda q, c, m, l, s: f"Question: {q}\nContext: {c}\nBECAUSE: {l} {s}\nOptions: {m}\n",
}
OUTPUTS = {  # what the reply holds: (answer letter, lecture, solution) -> text
    "A": lambda a, l, s: f"Answer: The answer is {a}.",
    "AL": lambda a, l, s: f"Answer: The answer is {a}. BECAUSE: {s}",  # sic: the solution
    "AE": lambda a, l, s: f"Answer: The answer is {a}. BECAUSE: {l}",  # sic: the lecture
    "ALE": lambda a, l, s: f"Answer: The answer is {a}. BECAUSE: {l} {s}",
    "AEL": lambda a, l, s: f"Answer: The answer is {a}. BECAUSE: {s} {l}",
    "LA": lambda a, l, s: f"Answer: {l} The answer is {a}.",
    "EA": lambda a, l, s: f"Answer: {s} The answer is {a}.",
    "LEA": lambda a, l, s: f"Answer: {l} {s} The answer is {a}.",
    "ELA": lambda a, l, s: f"Answer: {s} {l} The answer is {a}.",
    "LEPA": lambda a, l, s: ((f"LECTURE: {l}\n" if l.strip() else "") + (f"SOLUTION: {s}\n" if s.strip() else "")
                             + f"###\nANSWER: {a}."),
}
FIELDS = {"question": str, "choices": list, "answer": int, "hint": str, "lecture": str, "solution": str}


def prompt_format(text):
    """--prompt-format's argparse type: INPUT-OUTPUT, each one the original knows."""
    given, _, wanted = text.partition("-")
    if given not in INPUTS or wanted not in OUTPUTS:
        raise argparse.ArgumentTypeError(f"{text!r}: choose INPUT-OUTPUT with INPUT one of {', '.join(INPUTS)} and "
                                         f"OUTPUT one of {', '.join(OUTPUTS)} (LLaVA's: QCM-LEA)")
    return text


def check_problem(pid, problem, path):
    """The fields the format reads, of the right types, or an error naming the problem."""
    where = f"{path}, problem {pid!r}"
    if not isinstance(problem, dict):
        raise DataError(f"{where}: expected an object {{question, choices, answer, hint, image, ...}}")
    for name, kind in FIELDS.items():
        if not isinstance(problem.get(name), kind) or isinstance(problem.get(name), bool):
            raise DataError(f"{where}: {name!r} must be a {kind.__name__}, got {problem.get(name)!r:.40}; is it "
                            "ScienceQA's problems.json?")
    if not problem["choices"] or len(problem["choices"]) > len(OPTIONS) or \
            not all(isinstance(c, str) for c in problem["choices"]):
        raise DataError(f"{where}: 'choices' must be 1 to {len(OPTIONS)} strings (the options A-E)")
    if not 0 <= problem["answer"] < len(problem["choices"]):
        raise DataError(f"{where}: 'answer' {problem['answer']} is not the index of one of its "
                        f"{len(problem['choices'])} choices")
    if not isinstance(problem.get("image"), (str, type(None))):
        raise DataError(f"{where}: 'image' must be a file name or null")


def example(problem, fmt):
    """create_one_example_chatbot(fmt, ..., test_example=False) on a problem, as build_prompt_chatbot calls it:
    (input, output), whitespace as the original leaves it."""
    given, wanted = fmt.split("-")
    context = problem["hint"].strip() or "N/A"  # get_context_text without captions: " ".join([hint, ""]).strip()
    choices = " ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(problem["choices"]))
    # get_lecture_text escapes newlines and build_prompt_chatbot unescapes them: a literal "\n" becomes a newline
    lecture = problem["lecture"].replace("\n", "\\n").replace("\\n", "\n")
    solution = problem["solution"].replace("\n", "\\n").replace("\\n", "\n")
    text_in = INPUTS[given](problem["question"], context, choices, lecture, solution).replace("  ", " ").strip()
    text_out = OUTPUTS[wanted](OPTIONS[problem["answer"]], lecture, solution).replace("  ", " ").strip()
    if text_in.endswith("BECAUSE:"):
        text_in = text_in.replace("BECAUSE:", "").strip()
    if text_out.endswith("BECAUSE:"):
        text_out = text_out.replace("BECAUSE:", "").strip()
    return text_in, text_out


def convert(problems, pids, fmt, path="problems.json"):
    """convert_to_llava: one LLaVA sample per problem of the split, in the split's order."""
    samples = []
    for pid in pids:
        if pid not in problems:
            raise DataError(f"pid_splits.json: problem {pid!r} is not in {path}; are both files of one release?")
        problem = problems[pid]
        check_problem(pid, problem, path)
        text_in, text_out = example(problem, fmt)
        if text_in.startswith("Question: "):
            text_in = text_in.replace("Question: ", "")
        if text_out.startswith("Answer: "):
            text_out = text_out.replace("Answer: ", "")
        if problem["image"] is None:
            samples.append({"id": pid, "conversations": [{"from": "human", "value": text_in},
                                                         {"from": "gpt", "value": text_out}]})
        else:
            samples.append({"id": pid, "image": os.path.join(pid, problem["image"]),
                            "conversations": [{"from": "human", "value": f"{text_in}\n<image>"},
                                              {"from": "gpt", "value": text_out}]})
    return samples


def build(base_dir, split, fmt, out=None):
    """Reads the release in base_dir, writes the split's file (default: LLaVA's name, in base_dir); returns its
    path and the number of samples."""
    splits_path, problems_path = os.path.join(base_dir, "pid_splits.json"), os.path.join(base_dir, "problems.json")
    splits, problems = read_json(splits_path), read_json(problems_path)
    if not isinstance(splits, dict) or not isinstance(problems, dict):
        raise DataError(f"{base_dir}: pid_splits.json and problems.json must each be a JSON object; is --base-dir "
                        "ScienceQA's data/scienceqa?")
    if split not in splits or not isinstance(splits[split], list):
        raise UserError(f"--split {split}: {splits_path} has no such split; it has {', '.join(sorted(splits))}")
    samples = convert(problems, splits[split], fmt, problems_path)
    out = out or os.path.join(base_dir, f"llava_{split}_{fmt}.json")
    atomic_write(out, lambda f: json.dump(samples, f, indent=2))
    return out, len(samples)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-dir", required=True, help="ScienceQA's data/scienceqa (problems.json, pid_splits.json)")
    p.add_argument("--split", required=True, help="train, val, test, minival, minitest, ... (pid_splits.json)")
    p.add_argument("--prompt-format", type=prompt_format, default="QCM-LEA")
    p.add_argument("--out", help="default: <base-dir>/llava_<split>_<format>.json, LLaVA's name")
    args = p.parse_args(argv)
    try:
        out, n = build(args.base_dir, args.split, args.prompt_format, args.out)
    except USER_ERRORS as e:
        exit_with(e)
    print(f"Number of samples: {n}; written to {out}")


if __name__ == "__main__":
    main()
