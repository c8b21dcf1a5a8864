"""LLaVA's GPT-assisted visual instruction data: a text-only GPT turns each image's captions and object boxes into
conversations, detailed descriptions and complex reasoning, the three kinds of LLaVA-Instruct-158K.

    python tools/instruct_data.py --prompts LLaVA/playground/data/prompts \\
        --captions annotations/captions_train2017.json --instances annotations/instances_train2017.json \\
        --out instruct/ --limit 1000 --gpt-model gpt-4-0314 --workers 8 --usd-per-1m-input 30 --usd-per-1m-output 60
    python tools/instruct_data.py --prompts ... --context caps_boxes.jsonl --out instruct/   # LLaVA's own layout

The method (Liu et al. 2023, "Visual Instruction Tuning", section 3 and its appendix; haotian-liu/LLaVA
docs/Data.md): the model never sees pixels. An image is written as its captions, one per line, then (for the detail
and reasoning kinds) a blank line and one line per object, `category: [x1, y1, x2, y2]`, the box's top-left and
bottom-right corners as fractions of the image's width and height, rounded to 3 decimals (LLaVA's released
playground/data/prompts/*/NNN_caps.txt show exactly this). For each kind, the messages are the folder's
system_message.txt, then every few-shot pair as a user turn (NNN_caps.txt) and an assistant turn (NNN_conv.txt), in
file order, then the image as the last user turn (the paper's appendix, the listing of the prompt's construction).
The model's reply is parsed as the few-shot replies are written: `Question:` / `===` / `Answer:` blocks (several for a
conversation, exactly one for complex reasoning), the whole text for a detailed description, whose question is drawn
from the paper's list of detail instructions (DETAIL_INSTRUCTIONS). LLaVA released the prompts, never this script.

Output, in --out: `conversation.json`, `detail.json`, `complex_reasoning.json` and `llava_instruct.json` (all kinds),
LLaVA-Instruct's schema {"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt",
...}]}, the file data.py trains on. While it runs, each sample is appended to `<kind>.jsonl` as one line, flushed to
disk, so a run stopped at any point resumes where it was (samples done are not asked again; a line cut by a crash is
dropped). A reply that does not parse, or was cut at --max-tokens, is asked again --parse-retries times, then counted,
listed in `failed.json` and left for the next run; it is never written in part. Tokens (the server's usage counts) add
up over runs in `usage.json`; with --usd-per-1m-input / -output the cost is printed too.

The client is judge.chat_completion, LLaVA-Bench's: the key from the environment variable --gpt-key-env names, sent
to --gpt-endpoint only (no redirects followed), never printed; 429, 5xx and dropped connections are retried with
back-off; --workers requests are in flight at once.
"""

import argparse
import concurrent.futures
import json
import math
import os
import random
import re
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import judge  # noqa: E402
from benchmarks import (atomic_write, entries, read_appended, read_json, read_jsonl, reading,  # noqa: E402
                        require)
from data import IMAGE_TOKEN, DataError, UserError  # noqa: E402
from generate import USER_ERRORS, exit_with, flag_type, non_negative_float, non_negative_int, positive_int  # noqa: E402

positive_float = flag_type(float, lambda v: math.isfinite(v) and v > 0, "a number > 0")

# kind -> (its folder in LLaVA's playground/data/prompts/, whether the model is shown the boxes). LLaVA's
# conversation prompts show the captions alone (prompts/conversation/000_caps.txt), the other two captions and boxes.
KINDS = {"conversation": ("conversation", False), "detail": ("detail_description", True),
         "complex_reasoning": ("complex_reasoning", True)}
MERGED = "llava_instruct.json"

# The paper's list of instructions for a detailed image description (Liu et al. 2023, "Visual Instruction Tuning",
# appendix), word for word. One is drawn per image, by --seed and the image's id.
DETAIL_INSTRUCTIONS = [
    "Describe the following image in detail.",
    "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.",
    "Share a comprehensive rundown of the presented image.",
    "Offer a thorough analysis of the image.",
    "Explain the various aspects of the image before you.",
    "Clarify the contents of the displayed image with great detail.",
    "Characterize the image using a well-detailed description.",
    "Break down the elements of the image in a detailed manner.",
    "Walk through the important details of the image.",
    "Portray the image with a rich, descriptive narrative.",
    "Narrate the contents of the image with precision.",
    "Analyze the image in a comprehensive and detailed manner.",
    "Illustrate the image through a descriptive explanation.",
    "Examine the image closely and share its details.",
    "Write an exhaustive depiction of the given image.",
]


# ----------------------------------------------------------------------------------------------------------------------
# Images as text: captions and boxes


def check_box(box, where):
    """A box as LLaVA's prompts give it: [x1, y1, x2, y2] in [0, 1], corners in order. COCO's own [x, y, width,
    height] in pixels fails here, so a box in the wrong convention is an error, never a prompt that lies."""
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                            for v in box)):
        raise DataError(f"{where}: 'bbox' must be [x1, y1, x2, y2], got {box!r:.80}")
    x1, y1, x2, y2 = box
    if not (0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1):
        raise DataError(f"{where}: 'bbox' {box!r:.80} is not [x1, y1, x2, y2] as fractions of the image (0 <= x1 <= "
                        "x2 <= 1, the same for y); COCO's pixel [x, y, w, h] boxes go in with --instances instead")
    return [float(v) for v in box]


def read_context(path):
    """LLaVA's caption/box records (llava/eval/table/caps_boxes_coco2014_val_80.jsonl): JSON lines or a list of
    {"id", "image", "captions": [str], "instances": [{"category", "bbox": [x1, y1, x2, y2] in [0, 1]}]}."""
    records = read_jsonl(path, id=(str, int), image=str, captions=list)
    for n, r in enumerate(records):
        where = f"{path}, record {n} (id {r['id']!r})"
        if not r["captions"] or not all(isinstance(c, str) and c.strip() for c in r["captions"]):
            raise DataError(f"{where}: 'captions' must be a non-empty list of sentences")
        instances = r.get("instances", [])
        if not isinstance(instances, list):
            raise DataError(f"{where}: 'instances' must be a list of {{'category', 'bbox'}}")
        r["instances"] = [{"category": require(i, {"category": str}, where)["category"],
                           "bbox": check_box(i.get("bbox"), f"{where}, instance {k}")} for k, i in enumerate(instances)]
        r["id"] = str(r["id"])
    return records


def read_coco(captions_path, instances_path=None):
    """COCO's annotation files as caption/box records, images in the captions file's order; an image's id is its file
    name without the extension (LLaVA-Instruct's "000000033471" for "000000033471.jpg"); each caption's runs of
    whitespace folded to one space (COCO's captions carry stray spaces and newlines). Boxes: COCO's [x, y, width,
    height] in pixels become [x1, y1, x2, y2] divided by the image's width and height, clipped to [0, 1]; every
    instance of the image, crowds too, in the file's order."""
    document = read_json(captions_path)
    images = entries(document, "images", captions_path, id=int, file_name=str)
    captions = {}
    for a in entries(document, "annotations", captions_path, image_id=int, caption=str):
        captions.setdefault(a["image_id"], []).append(" ".join(a["caption"].split()))
    boxes = {}
    if instances_path:
        document = read_json(instances_path)
        names = {c["id"]: c["name"] for c in entries(document, "categories", instances_path, id=int, name=str)}
        sizes = {i["id"]: (i["width"], i["height"])
                 for i in entries(document, "images", instances_path, id=int, width=int, height=int)}
        for n, a in enumerate(entries(document, "annotations", instances_path, image_id=int, category_id=int,
                                      bbox=list)):
            where = f"{instances_path}, annotations[{n}]"
            if a["image_id"] not in sizes or a["category_id"] not in names:
                raise DataError(f"{where}: image {a['image_id']} or category {a['category_id']} is not in the file")
            (w, h), box = sizes[a["image_id"]], a["bbox"]
            if len(box) != 4 or not all(isinstance(v, (int, float)) for v in box) or w <= 0 or h <= 0:
                raise DataError(f"{where}: 'bbox' must be COCO's [x, y, width, height] in pixels, got {box!r:.80}")
            x, y, bw, bh = box
            corners = [x / w, y / h, (x + bw) / w, (y + bh) / h]
            boxes.setdefault(a["image_id"], []).append(
                {"category": names[a["category_id"]], "bbox": [min(1.0, max(0.0, v)) for v in corners]})
    return [{"id": os.path.splitext(i["file_name"])[0], "image": i["file_name"], "captions": captions[i["id"]],
             "instances": boxes.get(i["id"], [])} for i in images if i["id"] in captions]


def box_text(box):
    """[x1, y1, x2, y2] as LLaVA's prompts print it: each rounded to 3 decimals, printed as Python prints a float
    (0.63, 1.0, 0.0)."""
    return "[" + ", ".join(str(round(v, 3)) for v in box) + "]"


def context_text(record, with_boxes):
    """What the model is told of an image: its captions, a line each; then a blank line and a line per object."""
    text = "\n".join(c.strip() for c in record["captions"])
    if with_boxes and record["instances"]:
        text += "\n\n" + "\n".join(f"{i['category']}: {box_text(i['bbox'])}" for i in record["instances"])
    return text


# ----------------------------------------------------------------------------------------------------------------------
# Prompts and replies


def read_text(path):
    with reading(path), open(path, encoding="utf-8") as f:
        return f.read().strip()


def read_prompts(folder, kind):
    """(system message, [(user, assistant) few-shot pairs]) of one kind, from LLaVA's layout:
    <folder>/<kind's folder>/system_message.txt and NNN_caps.txt / NNN_conv.txt pairs, in NNN order."""
    where = os.path.join(folder, KINDS[kind][0])
    if not os.path.isdir(where):
        raise UserError(f"--prompts {folder}: no {KINDS[kind][0]}/ folder for --kinds {kind}; give LLaVA's "
                        "playground/data/prompts (or a folder laid out like it)")
    names = os.listdir(where)
    caps = {n[:-len("_caps.txt")] for n in names if n.endswith("_caps.txt")}
    convs = {n[:-len("_conv.txt")] for n in names if n.endswith("_conv.txt")}
    if caps ^ convs:
        odd = sorted(caps ^ convs)[0]
        raise UserError(f"--prompts: {where}: example {odd!r} has only one of {odd}_caps.txt and {odd}_conv.txt; "
                        "each few-shot example is a pair")
    order = sorted(caps, key=lambda n: (int(n) if n.isdigit() else float("inf"), n))
    return (read_text(os.path.join(where, "system_message.txt")),
            [(read_text(os.path.join(where, f"{n}_caps.txt")), read_text(os.path.join(where, f"{n}_conv.txt")))
             for n in order])


def build_messages(system, shots, query):
    """The chat: the system message, each few-shot pair as a user and an assistant turn, then the query."""
    messages = [{"role": "system", "content": system}]
    for user, assistant in shots:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages + [{"role": "user", "content": query}]


def parse_qa(text):
    """[(question, answer), ...] from blocks "Question:\\n...", "Answer:\\n..." separated by lines "===", as in
    LLaVA's NNN_conv.txt; None unless the blocks alternate question, answer and every one has text."""
    blocks = [b.strip() for b in re.split(r"^[ \t]*===[ \t]*$", text.strip(), flags=re.M)]
    if not blocks or len(blocks) % 2:
        return None
    pairs = []
    for question, answer in zip(blocks[::2], blocks[1::2]):
        if not (question.startswith("Question:") and answer.startswith("Answer:")):
            return None
        question, answer = question[len("Question:"):].strip(), answer[len("Answer:"):].strip()
        if not question or not answer:
            return None
        pairs.append((question, answer))
    return pairs


def parse_reply(kind, text):
    """The (question, answer) turns of a reply, or a str saying why it is not one of `kind`."""
    if kind == "detail":
        text = text.strip()
        if not text or re.search(r"^[ \t]*===[ \t]*$", text, flags=re.M) or text.startswith(("Question:", "Answer:")):
            return "not a description (empty, or Question/Answer blocks)"
        return [(None, text)]
    pairs = parse_qa(text)
    if pairs is None:
        return "not Question: / === / Answer: blocks"
    if kind == "complex_reasoning" and len(pairs) != 1:
        return f"{len(pairs)} question/answer pairs where complex reasoning has one"
    return pairs


def to_sample(record, pairs, instruction):
    """LLaVA-Instruct's sample: <image> opens the first human turn; a description's question is `instruction`."""
    turns = []
    for k, (question, answer) in enumerate(pairs):
        question = instruction if question is None else question
        turns += [{"from": "human", "value": (IMAGE_TOKEN + "\n" if k == 0 else "") + question},
                  {"from": "gpt", "value": answer}]
    return {"id": record["id"], "image": record["image"], "conversations": turns}


def detail_instruction(seed, image_id, instructions=DETAIL_INSTRUCTIONS):
    """The same image gets the same instruction in every run of one --seed (a resumed run writes what one run would)."""
    return random.Random(f"{seed}:{image_id}").choice(instructions)


# ----------------------------------------------------------------------------------------------------------------------
# The run: resumable work files, bounded concurrency, counts


def done_samples(path):
    """The samples already in a work file (<kind>.jsonl), by id. A last line cut short by a crash (no newline, not
    JSON) is cut off the file; any other bad line is an error naming it (is --out another folder?)."""
    def check(sample, where):
        require(sample, {"id": str, "image": str, "conversations": list}, where)

    samples = read_appended(path, check, "not a JSON sample; is --out a folder of this tool's?")
    return {sample["id"]: sample for sample in samples}


def append_line(fd, sample):
    """One sample as one write to a file opened O_APPEND, then flushed to disk: it is there whole, or (a crash in the
    write) as a cut last line that done_samples drops."""
    os.write(fd, (json.dumps(sample, ensure_ascii=False) + "\n").encode())
    os.fsync(fd)


def write_json(path, value):
    atomic_write(path, lambda f: json.dump(value, f, ensure_ascii=False, indent=2))


def ask_for(kind, messages, ask, parse_retries):
    """Ask until a reply parses (at most 1 + parse_retries times): (pairs or None, why it failed, tokens used)."""
    tokens = [0, 0]
    for _ in range(parse_retries + 1):
        info = {}
        text = ask(messages, info)
        tokens[0] += info.get("prompt_tokens", 0)
        tokens[1] += info.get("completion_tokens", 0)
        if info.get("finish_reason") == "length":
            why = "cut at --max-tokens (finish_reason 'length')"
            continue
        pairs = parse_reply(kind, text)
        if not isinstance(pairs, str):
            return pairs, None, tokens
        why = pairs
    return None, why, tokens


def generate(args, ask=None):
    """Every (image, kind) not yet in --out, asked with --workers requests in flight, each sample appended as it
    comes; then the JSON files written from the work files. Returns the counts the run prints."""
    from tqdm import tqdm

    records = read_context(args.context) if args.context else read_coco(args.captions, args.instances)
    records = records[:args.limit] if args.limit else records
    kinds = list(dict.fromkeys(args.kinds))  # each kind once, however often it is named
    if len({r["id"] for r in records}) != len(records):
        raise DataError(f"{args.context or args.captions}: two images share an id; each image needs its own")
    instructions = DETAIL_INSTRUCTIONS
    if args.detail_instructions:
        with reading(args.detail_instructions), open(args.detail_instructions, encoding="utf-8") as f:
            instructions = [line.strip() for line in f if line.strip()]
        if not instructions:
            raise UserError(f"--detail-instructions {args.detail_instructions}: no instructions (one per line)")
    prompts = {kind: read_prompts(args.prompts, kind) for kind in kinds}
    os.makedirs(args.out, exist_ok=True)
    work = {kind: os.path.join(args.out, f"{kind}.jsonl") for kind in KINDS}
    done = {kind: done_samples(work[kind]) for kind in KINDS}
    todo = [(kind, r) for r in records for kind in kinds if r["id"] not in done[kind]]
    usage_path = os.path.join(args.out, "usage.json")
    usage = {"replies": 0, "prompt_tokens": 0, "completion_tokens": 0}
    if os.path.exists(usage_path):
        usage = require(read_json(usage_path), dict.fromkeys(usage, int), usage_path)
    failed, run_tokens = [], [0, 0]
    if todo:
        if ask is None:
            key = judge.api_key(args, "gpt")

            def ask(messages, info):
                return judge.chat_completion(messages, args.gpt_endpoint, args.gpt_model, key,
                                             temperature=args.temperature, max_tokens=args.max_tokens,
                                             retries=args.gpt_retries, backoff=args.gpt_backoff,
                                             timeout=args.gpt_timeout, info=info, prefix="gpt")
        lock = threading.Lock()

        def counted(messages, info):
            reply = ask(messages, info)
            with lock:
                usage["replies"] += 1
            return reply

        def job(kind, record):
            system, shots = prompts[kind]
            messages = build_messages(system, shots, context_text(record, KINDS[kind][1]))
            return ask_for(kind, messages, counted, args.parse_retries)

        files = {kind: os.open(work[kind], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) for kind in kinds}
        bar = tqdm(total=len(records) * len(kinds), initial=len(records) * len(kinds) - len(todo),
                   desc="generating", unit="sample")
        pending, queue = {}, iter(todo)
        try:
            with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
                while True:
                    while len(pending) < 2 * args.workers and (item := next(queue, None)):
                        pending[pool.submit(job, *item)] = item
                    if not pending:
                        break
                    finished, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in finished:
                        kind, record = pending.pop(future)
                        try:
                            pairs, why, tokens = future.result()
                        except BaseException:
                            for other in pending:
                                other.cancel()
                            raise
                        run_tokens = [run_tokens[0] + tokens[0], run_tokens[1] + tokens[1]]
                        if pairs is None:
                            failed.append({"kind": kind, "id": record["id"], "why": why})
                        else:
                            instruction = detail_instruction(args.seed, record["id"], instructions)
                            sample = to_sample(record, pairs, instruction if kind == "detail" else None)
                            append_line(files[kind], sample)
                            done[kind][record["id"]] = sample
                        bar.update(1)
                        bar.set_postfix(tokens=usage["prompt_tokens"] + run_tokens[0] + usage["completion_tokens"]
                                        + run_tokens[1], failed=len(failed))
        finally:
            bar.close()
            for fd in files.values():
                os.close(fd)
            usage["prompt_tokens"] += run_tokens[0]
            usage["completion_tokens"] += run_tokens[1]
            write_json(usage_path, usage)
            write_outputs(args.out, records, done, failed)
    else:
        write_outputs(args.out, records, done, failed)
    return {"samples": {kind: len(done[kind]) for kind in kinds}, "failed": failed, "run_tokens": run_tokens,
            "usage": usage}


def write_outputs(out, records, done, failed):
    """Each kind's JSON file and the merged one (image by image, kinds in KINDS' order), samples in the input's order;
    failed.json lists what is still missing and why (removed when nothing is)."""
    order = {r["id"]: n for n, r in enumerate(records)}
    merged = []
    for k, kind in enumerate(KINDS):
        samples = sorted(done[kind].values(), key=lambda s: order.get(s["id"], len(order)))
        if samples or os.path.exists(os.path.join(out, f"{kind}.json")):
            write_json(os.path.join(out, f"{kind}.json"), samples)
        merged += [(order.get(s["id"], len(order)), k, s) for s in samples]
    write_json(os.path.join(out, MERGED), [s for *_, s in sorted(merged, key=lambda m: m[:2])])
    path = os.path.join(out, "failed.json")
    if failed:
        write_json(path, failed)
    elif os.path.exists(path):
        os.remove(path)


def add_flags(p):
    g = p.add_argument_group("input: COCO's annotation files, or LLaVA's caption/box records")
    g.add_argument("--captions", help="COCO's captions_*.json")
    g.add_argument("--instances", help="COCO's instances_*.json: the boxes (without it, captions alone)")
    g.add_argument("--context", help="LLaVA's caption/box records (caps_boxes_coco2014_val_80.jsonl's layout)")
    g.add_argument("--limit", type=non_negative_int, default=0, help="the first N images only (0: all)")
    g = p.add_argument_group("prompts and output")
    g.add_argument("--prompts", required=True, help="LLaVA's playground/data/prompts, or a folder laid out like it")
    g.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    g.add_argument("--detail-instructions", help="a file of detail instructions, one per line (default: the paper's)")
    g.add_argument("--out", required=True, help="the output folder (a rerun resumes in it)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="draws each image's detail instruction")
    g = p.add_argument_group("the model")
    judge.endpoint_flags(g, "gpt-4-0314", prefix="gpt", model_help="the paper's text-only GPT-4 (2023); another "
                         "model gives other data")
    g.add_argument("--gpt-timeout", type=positive_float, default=120, help="seconds to wait for one reply")
    g.add_argument("--workers", type=positive_int, default=4, help="requests in flight at once")
    g.add_argument("--temperature", type=non_negative_float, default=1.0,
                   help="1.0, the API's default (the paper gives none)")
    g.add_argument("--max-tokens", type=positive_int, default=2048, help="a reply cut at this length is asked again")
    g.add_argument("--parse-retries", type=non_negative_int, default=2,
                   help="times a reply that does not parse is asked again before it counts as failed")
    g.add_argument("--usd-per-1m-input", type=non_negative_float, default=0.0, help="price, for the cost line")
    g.add_argument("--usd-per-1m-output", type=non_negative_float, default=0.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_flags(p)
    args = p.parse_args(argv)
    if bool(args.context) == bool(args.captions):
        p.error("give either --context (LLaVA's caption/box records) or --captions (COCO's, with --instances)")
    if args.instances and not args.captions:
        p.error("--instances goes with --captions")
    try:
        result = generate(args)
    except USER_ERRORS as e:
        exit_with(e)
    usage = result["usage"]
    cost = (usage["prompt_tokens"] * args.usd_per_1m_input + usage["completion_tokens"] * args.usd_per_1m_output) / 1e6
    print(", ".join(f"{kind}: {n}" for kind, n in result["samples"].items()) + f" samples in {args.out}")
    print(f"tokens this run: {result['run_tokens'][0]} prompt + {result['run_tokens'][1]} completion; all runs: "
          f"{usage['prompt_tokens']} + {usage['completion_tokens']} in {usage['replies']} replies"
          + (f", ${cost:.2f}" if args.usd_per_1m_input or args.usd_per_1m_output else ""))
    if result["failed"]:
        print(f"{len(result['failed'])} replies did not parse after {args.parse_retries} retries (listed in "
              f"{os.path.join(args.out, 'failed.json')}); run again to ask for them again", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
