"""tools/instruct_data.py: LLaVA's GPT-assisted instruction data, generated against a loopback server of the tests' own
(127.0.0.1, shut down after each test) that plays the model: good replies, malformed ones, cut ones, 429 and 500
answers and a reply slower than the client waits. The prompt files are in the tests' own words, in LLaVA's layout."""

import http.server
import json
import os
import threading
import time

import pytest
from PIL import Image

import data
import finetune
import train
from tools import instruct_data
from tools.instruct_data import DETAIL_INSTRUCTIONS, parse_reply

KEY = "sk-test-INSTRUCT-0123456789"

# The few-shot examples, in the tests' words: conversation's captions alone, the other kinds' captions and boxes.
PROMPTS = {
    "conversation": ("You talk about one picture, told in five sentences.",
                     [("A dog runs on a beach.\nA brown dog by the sea.",
                       "Question:\nWhat animal is there?\n===\nAnswer:\nA dog.\n===\nQuestion:\nWhere is it?\n===\n"
                       "Answer:\nOn a beach."),
                      ("Two cups on a table.", "Question:\nHow many cups?\n===\nAnswer:\nTwo.")]),
    "detail_description": ("You describe one picture in detail, told in sentences and boxes (x1, y1, x2, y2).",
                           [("A dog runs on a beach.\n\ndog: [0.1, 0.2, 0.5, 0.9]", "A brown dog runs on the sand.")]),
    "complex_reasoning": ("You ask one hard question about a picture and answer it.",
                          [("Two cups on a table.\n\ncup: [0.0, 0.5, 0.25, 1.0]",
                            "Question:\nWhy two cups?\n===\nAnswer:\nTwo people may share a drink.")]),
}


def write_prompts(root):
    for folder, (system, shots) in PROMPTS.items():
        os.makedirs(root / folder)
        (root / folder / "system_message.txt").write_text(system + "\n")
        for n, (caps, conv) in enumerate(shots):
            (root / folder / f"{n:03d}_caps.txt").write_text(caps)
            (root / folder / f"{n:03d}_conv.txt").write_text(conv)
    return str(root)


def kind_of(messages):
    return {PROMPTS[f][0]: k for k, f in [("conversation", "conversation"), ("detail", "detail_description"),
                                          ("complex_reasoning", "complex_reasoning")]}[messages[0]["content"]]


# ----------------------------------------------------------------------------------------------------------------------
# The golden input: COCO annotations -> the messages sent, written by hand


def test_messages_of_a_coco_image_are_the_papers_layout(tmp_path):
    captions = {"images": [{"id": 7, "file_name": "000000000007.jpg", "width": 640, "height": 480}],
                "annotations": [{"image_id": 7, "id": 1, "caption": "A cat sits on a mat. "},
                                {"image_id": 7, "id": 2, "caption": "An  orange cat and a dog."}]}
    instances = {"images": [{"id": 7, "file_name": "000000000007.jpg", "width": 640, "height": 480}],
                 "categories": [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}],
                 # COCO's [x, y, width, height] in pixels; the second box runs past the right edge
                 "annotations": [{"image_id": 7, "category_id": 17, "bbox": [64, 48, 128, 96], "iscrowd": 0},
                                 {"image_id": 7, "category_id": 18, "bbox": [100, 240.5, 600, 239.5], "iscrowd": 0}]}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    args = parse(tmp_path, ["--captions", str(tmp_path / "captions.json"), "--instances",
                            str(tmp_path / "instances.json")])
    sent = []

    def ask(messages, info):
        sent.append(messages)
        return {"conversation": "Question:\nWhat sits on the mat?\n===\nAnswer:\nA cat.",
                "detail": "An orange cat sits on a mat beside a dog.",
                "complex_reasoning": "Question:\nWhy is the cat calm?\n===\nAnswer:\nIt is at home."}[kind_of(messages)]

    result = instruct_data.generate(args, ask)
    assert result["failed"] == [] and result["samples"] == {"conversation": 1, "detail": 1, "complex_reasoning": 1}
    by_kind = {kind_of(m): m for m in sent}
    # x1 = 64/640, y1 = 48/480, x2 = (64+128)/640, y2 = (48+96)/480; the dog: 0.15625 -> 0.156, 240.5/480 = 0.50104
    # -> 0.501, x2 = 700/640 clipped to 1.0, y2 = 480/480
    query = "A cat sits on a mat.\nAn orange cat and a dog.\n\ncat: [0.1, 0.1, 0.3, 0.3]\ndog: [0.156, 0.501, 1.0, 1.0]"
    assert by_kind["detail"] == [
        {"role": "system", "content": "You describe one picture in detail, told in sentences and boxes (x1, y1, x2, "
                                      "y2)."},
        {"role": "user", "content": "A dog runs on a beach.\n\ndog: [0.1, 0.2, 0.5, 0.9]"},
        {"role": "assistant", "content": "A brown dog runs on the sand."},
        {"role": "user", "content": query}]
    assert by_kind["conversation"] == [
        {"role": "system", "content": "You talk about one picture, told in five sentences."},
        {"role": "user", "content": "A dog runs on a beach.\nA brown dog by the sea."},
        {"role": "assistant", "content": "Question:\nWhat animal is there?\n===\nAnswer:\nA dog.\n===\nQuestion:\n"
                                         "Where is it?\n===\nAnswer:\nOn a beach."},
        {"role": "user", "content": "Two cups on a table."},
        {"role": "assistant", "content": "Question:\nHow many cups?\n===\nAnswer:\nTwo."},
        {"role": "user", "content": "A cat sits on a mat.\nAn orange cat and a dog."}]  # captions alone
    assert by_kind["complex_reasoning"][-1] == {"role": "user", "content": query}
    merged = json.loads((tmp_path / "out" / "llava_instruct.json").read_text())
    assert [s["conversations"][0]["value"] for s in merged] == [
        "<image>\nWhat sits on the mat?", "<image>\n" + instruct_data.detail_instruction(0, "000000000007"),
        "<image>\nWhy is the cat calm?"]
    assert {s["id"] for s in merged} == {"000000000007"} and {s["image"] for s in merged} == {"000000000007.jpg"}


def test_at_most_workers_requests_are_in_flight(tmp_path):
    context = tmp_path / "c.jsonl"
    context.write_text("".join(json.dumps({"id": n, "image": f"{n}.png", "captions": [f"{n} cats."]}) + "\n"
                               for n in range(4)))
    args = parse(tmp_path, ["--context", str(context), "--workers", "2", "--kinds", "detail", "detail"])
    lock, flying, peak, asked = threading.Lock(), [0], [0], []

    def ask(messages, info):
        with lock:
            asked.append(messages[-1]["content"])
            flying[0] += 1
            peak[0] = max(peak[0], flying[0])
        time.sleep(0.05)
        with lock:
            flying[0] -= 1
        return "Some cats."

    assert instruct_data.generate(args, ask)["samples"] == {"detail": 4}  # a kind named twice is asked once
    assert peak[0] == 2 and sorted(asked) == [f"{n} cats." for n in range(4)]


def parse(tmp_path, argv):
    p = instruct_data.argparse.ArgumentParser()
    instruct_data.add_flags(p)
    return p.parse_args(["--prompts", write_prompts(tmp_path / "prompts"), "--out", str(tmp_path / "out"), *argv])


@pytest.mark.parametrize("text, expected", [
    ("Question:\nQ1?\n===\nAnswer:\nA1.\n===\nQuestion:\nQ2?\n===\nAnswer:\nA2.", [("Q1?", "A1."), ("Q2?", "A2.")]),
    ("  Question: Q1?\n ===\nAnswer:\nA1,\n\ntwo paragraphs.\n", [("Q1?", "A1,\n\ntwo paragraphs.")]),
    ("Question:\nQ1?\n===\nAnswer:\nA1.\n===\nQuestion:\nQ2?", "not Question"),    # a question without its answer
    ("Answer:\nA1.\n===\nQuestion:\nQ1?", "not Question"),                          # the wrong order
    ("Sure! Here is a conversation about the image.", "not Question"),
    ("Question:\n\n===\nAnswer:\nA1.", "not Question"),                              # an empty question
])
def test_replies_parse_as_question_answer_blocks_or_not_at_all(text, expected):
    result = parse_reply("conversation", text)
    assert result == expected if isinstance(expected, list) else expected in result
    assert "one" in parse_reply("complex_reasoning", "Question:\nQ?\n===\nAnswer:\nA.\n===\nQuestion:\nR?\n===\n"
                                                     "Answer:\nB.")
    assert parse_reply("detail", " A cat. \n") == [(None, "A cat.")]
    assert isinstance(parse_reply("detail", "Question:\nQ?\n===\nAnswer:\nA."), str)


# ----------------------------------------------------------------------------------------------------------------------
# Against a loopback server


class Model(http.server.BaseHTTPRequestHandler):
    """Plays the model: each request goes to its server's respond(kind, image, attempt) -> (status, content, finish,
    delay); the request bodies and Authorization headers are recorded."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        messages = body["messages"]
        kind, image = kind_of(messages), messages[-1]["content"].split(" ")[0]
        with self.server.lock:
            self.server.seen.append((kind, image, self.headers.get("Authorization"), messages))
            attempt = sum(1 for k, i, *_ in self.server.seen if (k, i) == (kind, image))
        status, content, finish, delay = self.server.respond(kind, image, attempt)
        time.sleep(delay)
        reply = {"choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": finish}],
                 "usage": {"prompt_tokens": 100, "completion_tokens": 10}} if status == 200 else {"error": "busy"}
        raw = json.dumps(reply).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
        except OSError:  # the client gave up waiting (the slow reply)
            pass

    def log_message(self, *args):
        pass


GOOD = {"conversation": "Question:\nWhat is on the mat?\n===\nAnswer:\nA cat.\n===\nQuestion:\nWhat colour is it?\n"
                        "===\nAnswer:\nIt is orange.",
        "detail": "There is an orange cat on a mat.",
        "complex_reasoning": "Question:\nWhy might the cat rest there?\n===\nAnswer:\nThe mat is warm."}


def awkward(kind, image, attempt):
    """What each (kind, image) gets on its n-th request: a 429, a 500, a slow reply, malformed or cut ones, or good."""
    first = attempt == 1
    if (kind, image) == ("conversation", "Ann") and first:
        return 429, None, None, 0
    if (kind, image) == ("detail", "Bob") and first:
        return 500, None, None, 0
    if (kind, image) == ("conversation", "Bob") and first:
        return 200, GOOD[kind], "stop", 1.5  # slower than --gpt-timeout: asked again
    if (kind, image) == ("complex_reasoning", "Ann") and first:
        return 200, "Sure! A question: why is the cat there? Because it is warm.", "stop", 0
    if (kind, image) == ("detail", "Cy") and first:
        return 200, GOOD[kind], "length", 0  # cut at max_tokens: asked again
    if (kind, image) == ("conversation", "Cy"):
        return 200, "I cannot see images.", "stop", 0  # never parses
    return 200, GOOD[kind], "stop", 0


@pytest.fixture
def model_server():
    servers = []

    def start(respond):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Model)
        server.daemon_threads, server.respond, server.seen, server.lock = True, respond, [], threading.Lock()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_port}/v1"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def main(argv, capsys):
    try:
        instruct_data.main(argv)
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def test_a_run_against_an_awkward_model_writes_only_whole_samples_resumes_and_trains(tmp_path, model_server, capsys,
                                                                                    monkeypatch, backbones):
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for name, colour in [("Ann", "orange"), ("Bob", "grey"), ("Cy", "white")]:
        Image.new("RGB", (20, 14), colour).save(images / f"{name}.png")
        records.append({"id": name, "image": f"{name}.png", "captions": [f"{name} sees a cat on a mat.", "A cat."],
                        "instances": [{"category": "cat", "bbox": [0.1, 0.2, 0.5, 0.75]}]})
    context = tmp_path / "context.jsonl"
    context.write_text("".join(json.dumps(r) + "\n" for r in records))
    server, endpoint = model_server(awkward)
    monkeypatch.setenv("INSTRUCT_TEST_KEY", KEY)
    out = tmp_path / "out"
    argv = ["--prompts", write_prompts(tmp_path / "prompts"), "--context", str(context), "--out", str(out),
            "--gpt-endpoint", endpoint, "--gpt-model", "test-model", "--gpt-key-env", "INSTRUCT_TEST_KEY",
            "--gpt-retries", "2", "--gpt-backoff", "0", "--gpt-timeout", "0.5", "--workers", "3",
            "--parse-retries", "1", "--usd-per-1m-input", "10", "--usd-per-1m-output", "30"]
    status, stdout, err = main(argv, capsys)
    assert status == 1 and "1 replies did not parse after 1 retries" in err, err
    assert json.loads((out / "failed.json").read_text()) == [
        {"kind": "conversation", "id": "Cy", "why": "not Question: / === / Answer: blocks"}]
    asked = [(k, i) for k, i, *_ in server.seen]
    assert asked.count(("conversation", "Cy")) == 2 and asked.count(("conversation", "Bob")) == 2  # timed out once
    assert len(asked) == 9 + 6  # each pair once, and again after the 429, 500, slow, malformed, cut and bad ones
    assert {auth for _, _, auth, _ in server.seen} == {f"Bearer {KEY}"}
    assert KEY not in stdout + err and not any(KEY in (out / f).read_text() for f in os.listdir(out))
    # 12 replies came back (the 429, the 500 and the slow one were retried inside the client): their tokens, and
    # their cost at $10 / $30 per million (0.0156)
    assert "all runs: 1200 + 120 in 12 replies, $0.02" in stdout
    assert json.loads((out / "usage.json").read_text()) == {"replies": 12, "prompt_tokens": 1200,
                                                            "completion_tokens": 120}
    merged = json.loads((out / "llava_instruct.json").read_text())
    assert [(s["id"], len(s["conversations"])) for s in merged] == [
        ("Ann", 4), ("Ann", 2), ("Ann", 2), ("Bob", 4), ("Bob", 2), ("Bob", 2), ("Cy", 2), ("Cy", 2)]
    assert merged[0] == {"id": "Ann", "image": "Ann.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is on the mat?"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "It is orange."}]}
    detail = json.loads((out / "detail.json").read_text())
    assert all(s["conversations"][0]["value"][len("<image>\n"):] in DETAIL_INSTRUCTIONS for s in detail)
    assert [s["conversations"][1]["value"] for s in detail] == [GOOD["detail"]] * 3
    assert [s["id"] for s in json.loads((out / "conversation.json").read_text())] == ["Ann", "Bob"]

    # A crash cut the last line of a work file; the resumed run drops it and asks only for what is missing.
    lines = (out / "detail.jsonl").read_text().splitlines(keepends=True)
    cut = json.loads(lines[-1])["id"]
    (out / "detail.jsonl").write_text("".join(lines[:-1]) + lines[-1][:20])
    server.respond = lambda kind, image, attempt: (200, GOOD[kind], "stop", 0)
    before = len(server.seen)
    status, stdout, err = main(argv, capsys)
    assert status == 0 and "dropping its last line" in err, err
    assert sorted((k, i) for k, i, *_ in server.seen[before:]) == [("conversation", "Cy"), ("detail", cut)]
    assert [json.loads(line)["id"] for line in (out / "detail.jsonl").read_text().splitlines()][-1] == cut
    assert not (out / "failed.json").exists() and "all runs: 1400 + 140 in 14 replies" in stdout
    merged = json.loads((out / "llava_instruct.json").read_text())
    assert [s["id"] for s in merged] == ["Ann"] * 3 + ["Bob"] * 3 + ["Cy"] * 3

    # The merged file is training data: it loads through data.py and trains a step.
    vision, llm = backbones
    fmt = data.ChatFormat(data.load_tokenizer(llm), "vicuna_v1", 4)
    dataset = data.LazySupervisedDataset(str(out / "llava_instruct.json"), str(images), fmt,
                                         data.load_image_processor(vision))
    assert len(dataset) == 9 and all((dataset[i]["labels"] != data.IGNORE_INDEX).any() for i in range(9))
    argv = ["--vision-tower", vision, "--llm", llm, "--data-path", str(out / "llava_instruct.json"), "--image-folder",
            str(images), "--output-dir", str(tmp_path / "run"), "--global-batch-size", "3", "--micro-batch-size", "3",
            "--num-workers", "0", "--precision", "fp32", "--no-activation-checkpointing", "--max-length", "256",
            "--max-steps", "1", "--save-every", "1000"]
    try:
        train.train(train.parse_config(argv, finetune.STAGE_2, {}, ""))
    finally:
        train.dist.destroy_process_group()
    step = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert step["samples"] == 3 and step["loss"] > 0


def test_bad_input_is_one_error_line_before_any_request(tmp_path, model_server, capsys, monkeypatch):
    server, endpoint = model_server(awkward)
    monkeypatch.setenv("INSTRUCT_TEST_KEY", KEY)
    prompts = write_prompts(tmp_path / "prompts")
    base = ["--prompts", prompts, "--out", str(tmp_path / "out"), "--gpt-endpoint", endpoint, "--gpt-key-env",
            "INSTRUCT_TEST_KEY"]
    context = tmp_path / "c.jsonl"
    for box, said in [([64, 48, 128, 96], "not [x1, y1, x2, y2] as fractions"),   # COCO's pixels
                      ([0.5, 0.1, 0.2, 0.3], "not [x1, y1, x2, y2] as fractions"),  # corners swapped
                      ([0.1, 0.2], "must be [x1, y1, x2, y2]")]:
        context.write_text(json.dumps({"id": 1, "image": "a.png", "captions": ["A cat."],
                                       "instances": [{"category": "cat", "bbox": box}]}) + "\n")
        status, _, err = main(base + ["--context", str(context)], capsys)
        assert status == 2 and said in err and "record 0 (id 1), instance 0" in err, err
    context.write_text(json.dumps({"id": 1, "image": "a.png", "captions": ["A cat."]}) + "\n")
    os.remove(os.path.join(prompts, "detail_description", "000_conv.txt"))
    status, _, err = main(base + ["--context", str(context)], capsys)
    assert status == 2 and "example '000' has only one of 000_caps.txt and 000_conv.txt" in err
    status, _, err = main(base + ["--context", str(context), "--kinds", "conversation", "--gpt-key-env", "NO_SUCH_KEY"],
                          capsys)
    assert status == 2 and "error: --gpt-key-env NO_SUCH_KEY: the environment variable is not set" in err
    status, _, err = main(base + ["--context", str(context), "--gpt-endpoint", "file:///etc/passwd"], capsys)
    assert status == 2 and "--gpt-endpoint" in err
    assert server.seen == []
    # A model that stays down: one error line naming the flag to raise; nothing written in part.
    server.respond = lambda kind, image, attempt: (503, None, None, 0)
    status, _, err = main(base + ["--context", str(context), "--kinds", "conversation", "--gpt-retries", "1",
                                  "--gpt-backoff", "0"], capsys)
    assert status == 2 and "still failing after 1 retries (HTTP 503)" in err and "--gpt-retries" in err, err
    assert len(server.seen) == 2 and (tmp_path / "out" / "conversation.jsonl").read_text() == ""
    assert json.loads((tmp_path / "out" / "llava_instruct.json").read_text()) == []
