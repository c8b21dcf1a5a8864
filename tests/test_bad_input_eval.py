"""Bad input to evaluate.py, benchmarks.py and judge.py (issue 15): each is an `error: ...` line naming the flag, file
and line or question, exit status 2, before the model loads or the judge is asked; answers, scores and reviews are
never damaged, and the judge's key goes to the endpoint named and nowhere else, and is never printed."""

import base64
import http.server
import io
import json
import os
import threading

import pytest
from PIL import Image

import benchmarks
import evaluate
import judge
from data import UserError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def fails(capsys, argv):
    """evaluate.main(argv) stops as a command line does on bad input: exit status 2, its last line on stderr
    `error: ...` (or argparse's usage and error), no traceback. Returns stderr."""
    with pytest.raises(SystemExit) as exit:
        evaluate.main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith(("error: ", "evaluate.py score", "evaluate.py run")), err
    return err


# ----------------------------------------------------------------------------------------------------------------------
# Where the scores go, and how they are written


SQA = [{"id": "q1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhich? A or B"},
                                                         {"from": "gpt", "value": "A"}]},
       {"id": "q2", "conversations": [{"from": "human", "value": "Which? A or B"}, {"from": "gpt", "value": "B"}]}]


def test_scores_go_beside_the_answers_even_in_a_folder_with_a_dot(tmp_path, capsys):
    questions = write_jsonl(tmp_path / "sqa.json", SQA)
    (tmp_path / "run.v1.5").mkdir()
    answers = write_jsonl(tmp_path / "run.v1.5" / "answers", [{"question_id": "q1", "text": "A"}])
    metrics = evaluate.main(["score", "scienceqa", "--questions", questions, "--answers", answers])
    assert json.loads((tmp_path / "run.v1.5" / "answers.scienceqa-scores.json").read_text()) == metrics
    assert sorted(os.listdir(tmp_path)) == ["run.v1.5", "sqa.json"]  # nothing in the parent, no temporary files left
    assert benchmarks.beside("run.v1.5/a.jsonl", ".x") == "run.v1.5/a.x" and benchmarks.beside(".a", ".x") == ".a.x"


def test_an_interrupted_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "deep" / "scores.json"
    benchmarks.atomic_write(str(path), lambda f: f.write("old"))  # the folder made as needed

    def crash(f):
        f.write('{"half": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        benchmarks.atomic_write(str(path), crash)
    assert path.read_text() == "old" and os.listdir(path.parent) == ["scores.json"]


def test_an_output_that_is_an_input_is_refused(tmp_path, capsys):
    questions = write_jsonl(tmp_path / "sqa.json", SQA)
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": "q1", "text": "A"}])
    before = open(answers).read()
    assert "--out" in fails(capsys, ["score", "scienceqa", "--questions", questions, "--answers", answers,
                                     "--out", answers])
    assert "--submission" in fails(capsys, ["score", "vizwiz_submit", "--questions", answers, "--answers", answers,
                                            "--submission", answers])
    assert "--answers" in fails(capsys, ["run", "--model", "nowhere", "--questions", answers, "--answers", answers])
    assert open(answers).read() == before


# ----------------------------------------------------------------------------------------------------------------------
# run: the answers file it appends to


ANSWER = {"question_id": 1, "prompt": "Q?", "text": "yes", "answer_id": "x", "model_id": "model", "metadata": {}}


def test_a_cut_last_line_is_cut_off_in_place_and_said(tmp_path, capsys):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(ANSWER) + "\n" + '{"question_id": 2, "pro')
    inode = os.stat(path).st_ino
    assert evaluate.answered(str(path)) == {("1", None, "Q?"): "model"}
    assert path.read_text() == json.dumps(ANSWER) + "\n" and os.stat(path).st_ino == inode  # truncated, not rewritten
    assert "dropping its last line" in capsys.readouterr().err
    path.write_text(json.dumps(ANSWER))  # a whole answer without its newline: kept, and given one
    assert len(evaluate.answered(str(path))) == 1 and path.read_text() == json.dumps(ANSWER) + "\n"


@pytest.mark.parametrize("text,message", [
    (json.dumps(ANSWER) + "\n{not json}\n" + '{"question_id": 2, "pro', "a.jsonl, line 2: not a JSON answer line"),
    (json.dumps(ANSWER) + "\n" + json.dumps({"text": "no id"}) + "\n", "a.jsonl, line 2: no 'question_id' field"),
    (json.dumps(ANSWER) + "\n[1, 2]\n", "a.jsonl, line 2: expected a JSON object"),
    (json.dumps(SQA, indent=1), "a.jsonl, line 1: not a JSON answer line"),  # a question file given as --answers
    (json.dumps(ANSWER) + "\n\xff\xfe\n", "a.jsonl, line 2: not a JSON answer line"),
])
def test_an_answers_file_that_is_not_one_is_refused_untouched(tmp_path, text, message):
    path = tmp_path / "a.jsonl"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(UserError, match=message):
        evaluate.answered(str(path))
    assert path.read_bytes() == text.encode("latin-1")


def test_run_refuses_to_mix_two_models_answers(tmp_path, capsys):
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "text": "Q?"}, {"question_id": 2, "text": "R?"}])
    answers = write_jsonl(tmp_path / "a.jsonl", [ANSWER])
    err = fails(capsys, ["run", "--model", str(tmp_path / "other-model"), "--questions", questions,
                         "--answers", answers])
    assert "holds answers of the model 'model', this run is 'other-model'" in err and "--model-id" in err


# ----------------------------------------------------------------------------------------------------------------------
# run: question files and images, all checked before the model loads (--model names nothing here)


def tiny_png(path, color="red"):
    Image.new("RGB", (8, 8), color).save(path)
    return path


@pytest.mark.parametrize("questions,message", [
    ([{"question_id": 1, "image": "a.png"}], "q.jsonl, question #1: no 'text' field"),
    ([{"text": "Q?"}], "q.jsonl, question #1: no 'question_id' field"),
    ([{"question_id": 1, "text": ["Q?"]}], "q.jsonl, question #1: 'text' is ['Q?'], not a str"),
    ([{"question_id": {"a": 1}, "text": "Q?"}], "'question_id' is {'a': 1}, not a str or int"),
    ([{"question_id": 1, "text": "Q?", "image": ["a.png", "b.png"]}], "q.jsonl, question 1: 'image' is"),
    ([{"id": "s1", "conversations": []}], "q.jsonl, question 's1': conversations[0] has no 'value' text"),
    ([{"id": "s1", "conversations": [{"from": "human"}]}], "conversations[0] has no 'value' text"),
    ([{"conversations": [{"from": "human", "value": "Q?"}]}], "q.jsonl, question #1: no 'id' field"),
    ([{"question_id": 1, "text": "Q?", "image": "missing.png"}], "q.jsonl, question 1: image file"),
    ([{"question_id": 1, "text": "Q?", "image": "../outside.png"}], "q.jsonl, question 1: the image '../outside.png' "
                                                                     "is outside --image-folder"),
    ([{"question_id": 1, "text": "Q?", "image": "{abs}"}], "is outside --image-folder"),
    ([{"question_id": 1, "text": "Q?", "image": "sub/../../outside.png"}], "is outside --image-folder"),
    ([], "q.jsonl: empty"),
    (["not an object"], "q.jsonl, line 1: expected a JSON object"),
])
def test_question_files_are_checked_before_the_model_loads(tmp_path, capsys, questions, message):
    (tmp_path / "images").mkdir()
    tiny_png(tmp_path / "images" / "a.png")
    outside = tiny_png(tmp_path / "outside.png")  # exists: refused for where it is, not for being missing
    questions = [{k: v.format(abs=outside) if isinstance(v, str) else v for k, v in q.items()}
                 if isinstance(q, dict) else q for q in questions]
    err = fails(capsys, ["run", "--model", str(tmp_path / "no-model"), "--questions",
                         write_jsonl(tmp_path / "q.jsonl", questions), "--image-folder", str(tmp_path / "images"),
                         "--answers", str(tmp_path / "a.jsonl")])
    assert message in err and not (tmp_path / "a.jsonl").exists()


def test_a_question_file_that_is_not_utf8_or_not_there(tmp_path, capsys):
    (tmp_path / "q.jsonl").write_bytes(b'{"question_id": 1, "text": "caf\xe9?"}\n')
    argv = ["run", "--model", "nowhere", "--answers", str(tmp_path / "a.jsonl"), "--questions"]
    assert "q.jsonl: not UTF-8 text" in fails(capsys, argv + [str(tmp_path / "q.jsonl")])
    assert "--questions" in fails(capsys, argv + [str(tmp_path / "nope.jsonl")])
    assert "--image-folder" in fails(capsys, argv + [str(tmp_path / "q.jsonl"), "--image-folder", str(tmp_path / "x")])


def mmbench_tsv(path, rows, header=("index", "question", "A", "B", "answer", "image")):
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    return str(path)


def png_cell():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("header,rows,message", [
    (("index", "question", "A"), [("1", "Q?", "x")], "not an MMBench TSV"),
    (None, [("1", "Q?", "x")], "row 1 has no 'B' cell"),
    (None, [("one", "Q?", "x", "y", "A", "")], "row 1 has the index 'one'"),
    (None, [("1", "Q?", "x", "y", "A", "!!!")], "question 1: the image is not base64"),
    (None, [("1", "Q?", "x", "y", "A", base64.b64encode(b"not an image").decode())], "question 1: the image cell"),
    (None, [], "no rows"),
])
def test_mmbench_tsvs_are_checked_before_the_model_loads(tmp_path, capsys, header, rows, message):
    tsv = mmbench_tsv(tmp_path / "mmb.tsv", rows, *([header] if header else []))
    err = fails(capsys, ["run", "--model", "nowhere", "--questions", tsv, "--answers", str(tmp_path / "a.jsonl")])
    assert "mmb.tsv" in err and message in err


def test_mmbench_answers_need_integer_ids(tmp_path, capsys):
    tsv = mmbench_tsv(tmp_path / "mmb.tsv", [("1", "Q?", "x", "y", "A", png_cell())])
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": "one", "text": "A"}])
    for name in ("mmbench", "mmbench_submit"):
        assert "a.jsonl, answer #1: question_id 'one'" in fails(capsys, ["score", name, "--questions", tsv,
                                                                         "--answers", answers])


# ----------------------------------------------------------------------------------------------------------------------
# Flags


@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got '0'"),
    (["--max-new-tokens", "-1"], "argument --max-new-tokens: must be a positive integer"),
    (["--num-chunks", "0"], "argument --num-chunks: must be a positive integer"),
    (["--chunk-idx", "-1"], "argument --chunk-idx: must be an integer >= 0"),
    (["--num-chunks", "2", "--chunk-idx", "2"], "argument --chunk-idx: must be below --num-chunks (2), got 2"),
    (["--temperature", "-0.5"], "argument --temperature: must be a number >= 0"),
    (["--temperature", "nan"], "argument --temperature: must be a number >= 0"),
])
def test_run_flags_out_of_range_are_refused_by_name(flags, message, capsys):
    assert message in fails(capsys, ["run", "--model", "m", "--questions", "q.jsonl", "--answers", "a.jsonl", *flags])


@pytest.mark.parametrize("name,flags,message", [
    ("llava_bench", ["--runs", "0"], "argument --runs: must be a positive integer"),
    ("mmvet", ["--runs", "0"], "argument --runs: must be a positive integer"),
    ("mmvet", ["--judge-retries", "-1"], "argument --judge-retries: must be an integer >= 0"),
    ("mmvet", ["--judge-backoff", "-1"], "argument --judge-backoff: must be a number >= 0"),
    ("mmvet", ["--judge-endpoint", "file:///etc/passwd"], "argument --judge-endpoint: 'file:///etc/passwd': not an "
                                                          "http(s) URL"),
    ("mmvet", ["--judge-endpoint", "https://user:pw@example.com/v1"], "a URL with credentials"),
    ("pope", ["--labels", "nowhere"], "--questions q.jsonl: no such file"),
])
def test_score_flags_out_of_range_are_refused_by_name(name, flags, message, capsys):
    required = {"mmvet": ["--answers", "a.jsonl", "--mmvet-json", "m.json"], "llava_bench": [],
                "pope": ["--questions", "q.jsonl", "--answers", "a.jsonl"]}[name]
    assert message in fails(capsys, ["score", name, *required, *flags])


# ----------------------------------------------------------------------------------------------------------------------
# Scoring inputs: files and folders that are missing, malformed, or of another benchmark


@pytest.fixture
def pope(tmp_path):
    """A one-question POPE set: the question file, answers, a labels folder."""
    q = {"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "category": "random"}
    (tmp_path / "labels").mkdir()
    write_jsonl(tmp_path / "labels" / "coco_pope_random.json", [{"image": "a.jpg", "text": "Is there a dog?",
                                                                 "label": "yes"}])
    return (write_jsonl(tmp_path / "q.jsonl", [q]), write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1,
                                                                                        "text": "Yes"}]),
            str(tmp_path / "labels"))


def test_pope_inputs(pope, tmp_path, capsys):
    questions, answers, labels = pope
    argv = ["score", "pope", "--questions", questions, "--answers", answers, "--labels"]
    assert evaluate.main(argv + [labels])["mean_f1"] == 100
    capsys.readouterr()
    assert "--labels" in fails(capsys, argv + [str(tmp_path / "nowhere")])
    assert "--labels" in fails(capsys, argv + [questions]) and "not a folder" in fails(capsys, argv + [questions])
    write_jsonl(tmp_path / "labels" / "coco_pope_popular.json", [{"image": "a.jpg", "label": "yes"}])
    assert "coco_pope_popular.json, line 1: no 'text' field" in fails(capsys, argv + [labels])
    write_jsonl(tmp_path / "labels" / "coco_pope_popular.json", [])
    assert "coco_pope_popular.json: empty" in fails(capsys, argv + [labels])
    write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "answer": "Yes"}])  # LLaVA's field is "text"
    assert "a.jsonl, line 1: no 'text' field" in fails(capsys, argv + [labels])
    write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": None}])
    assert "a.jsonl, line 1: 'text' is None, not a str" in fails(capsys, argv + [labels])


@pytest.mark.parametrize("annotations,message", [
    ("{not json", "ann.json: malformed JSON at line 1, column 2"),
    (json.dumps([1, 2]), "ann.json: expected a JSON object"),
    (json.dumps({"annotations": [{"question_id": 7}]}), "ann.json, annotations[0]: no 'answers' field"),
    (json.dumps({"annotations": [{"question_id": 7, "answers": [{"text": "x"}]}]}), "ann.json, question 7: 'answers'"),
    (json.dumps({"data": [{"image_id": "i", "question": "Q?"}]}), "ann.json, data[0]: no 'answers' field"),
    (json.dumps({"annotations": []}), "ann.json: no annotations"),
    (json.dumps({"something": "else"}), "ann.json: no 'data' field"),
])
def test_vqa_annotations(tmp_path, capsys, annotations, message):
    (tmp_path / "ann.json").write_text(annotations)
    answers = write_jsonl(tmp_path / "a.jsonl", [])
    assert message in fails(capsys, ["score", "vqa", "--answers", answers, "--annotations", str(tmp_path / "ann.json")])


def test_textvqa_answers_need_their_prompt(tmp_path, capsys):
    (tmp_path / "ann.json").write_text(json.dumps({"data": [{"image_id": "i", "question": "Q?", "answers": ["x"]}]}))
    argv = ["score", "vqa", "--annotations", str(tmp_path / "ann.json"), "--answers"]
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": "i", "text": "x"}])
    assert "a.jsonl, answer #1: no 'prompt' field" in fails(capsys, argv + [answers])
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": "i", "text": "x", "prompt": "OCR tokens: a b"}])
    assert "a.jsonl, answer #1: cannot find the question" in fails(capsys, argv + [answers])


@pytest.mark.parametrize("name,document,message", [
    ("gqa", {"1": {"answers": "yes"}}, "ann.json, '1': no 'answer' field"),
    ("gqa", {}, "ann.json: expected a non-empty JSON object"),
    ("seed", {"questions": []}, "ann.json: no 'question_type' field"),
    ("seed", {"question_type": {"Scene": 1}, "questions": [{"question_id": 1, "answer": "A", "question_type_id": 2,
                                                              "data_type": "image"}]}, "question_type_id 2 is not"),
    ("seed", {"question_type": {"Scene": 1}, "questions": []}, "ann.json: no questions"),
])
def test_gqa_and_seed_annotations(tmp_path, capsys, name, document, message):
    (tmp_path / "ann.json").write_text(json.dumps(document))
    answers = write_jsonl(tmp_path / "a.jsonl", [])
    assert message in fails(capsys, ["score", name, "--answers", answers, "--annotations", str(tmp_path / "ann.json")])


def test_scienceqa_key_and_mme_truth(tmp_path, capsys):
    answers = write_jsonl(tmp_path / "a.jsonl", [])
    key = write_jsonl(tmp_path / "sqa.json", [{"id": "q1", "conversations": [{"from": "human", "value": "Q?"}]}])
    assert "sqa.json, question 'q1': conversations[1] has no 'value' text" in fails(
        capsys, ["score", "scienceqa", "--questions", key, "--answers", answers])
    text_only = write_jsonl(tmp_path / "sqa.json", SQA[1:])  # no question with an image: no img_accuracy, no crash
    assert evaluate.main(["score", "scienceqa", "--questions", text_only, "--answers", answers])["img_accuracy"] is None
    (tmp_path / "MME" / "count").mkdir(parents=True)
    (tmp_path / "MME" / "count" / "0001.txt").write_bytes(b"Is there one?\xff\tYes\n")
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": "count/0001.jpg", "text": "Is there one?"}])
    assert "0001.txt: not UTF-8 text" in fails(capsys, ["score", "mme", "--questions", questions, "--answers",
                                                         answers, "--mme-root", str(tmp_path / "MME")])


def test_llava_bench_reviews(tmp_path, capsys):
    def review(category, content="8 6\nfine"):
        return {"category": f"llava_bench_{category}", "content": content}

    one = write_jsonl(tmp_path / "r1.jsonl", [review("conv"), review("detail")])
    argv = ["score", "llava_bench", "--reviews", one]
    assert "r2.jsonl, line 1: no 'content' field" in fails(capsys, argv + [write_jsonl(tmp_path / "r2.jsonl", [
        {"category": "llava_bench_conv"}])])
    assert "r2.jsonl: empty" in fails(capsys, argv + [write_jsonl(tmp_path / "r2.jsonl", [])])
    assert "r2.jsonl: reviews of the categories ['all', 'conv']" in fails(capsys, argv + [write_jsonl(
        tmp_path / "r2.jsonl", [review("conv")])])
    assert "the reference's mean score in 'all' is 0" in fails(capsys, ["score", "llava_bench", "--reviews",
                                                                        write_jsonl(tmp_path / "r3.jsonl", [
                                                                            review("conv", "0 5")])])


def test_the_judges_inputs_are_checked_before_the_first_request(tmp_path, capsys, monkeypatch):
    def no_judge(*args, **kwargs):
        raise AssertionError("the judge was asked")

    monkeypatch.setattr(judge, "chat_completion", no_judge)
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-x")
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 0, "image": "x.jpg", "text": "Q?",
                                                    "category": "conv"}])
    context = write_jsonl(tmp_path / "c.jsonl", [{"image": "y.jpg", "caption": "A dog."}])
    reference = write_jsonl(tmp_path / "r.jsonl", [{"question_id": 0, "text": "gpt4"}])
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 0, "text": "model"}])
    argv = ["score", "llava_bench", "--questions", questions, "--reference", reference, "--answers", answers,
            "--judge-key-env", "JUDGE_TEST_KEY", "--reviews-dir", str(tmp_path / "rev"), "--context"]
    assert "q.jsonl, question 0: --context has no caption of its image" in fails(capsys, argv + [context])
    write_jsonl(tmp_path / "c.jsonl", [{"image": "x.jpg", "caption": "A dog."}])
    write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "model"}])
    assert "q.jsonl, question 0: --answers has no answer to it" in fails(capsys, argv + [context])
    (tmp_path / "rules.json").write_text("{")
    assert "rules.json: malformed JSON" in fails(capsys, argv + [context, "--rules", str(tmp_path / "rules.json")])
    assert not (tmp_path / "rev").exists()
    write_jsonl(tmp_path / "a.jsonl", [{"question_id": 0, "text": "model"}])  # all good, but a file is in the way
    assert str(questions) in fails(capsys, argv + [context, "--reviews-dir", questions])


# ----------------------------------------------------------------------------------------------------------------------
# The judge client, against loopback servers: redirects, errors that echo the key, answers that are no completion

KEY = "sk-test-SECRET-0123456789"


class Server(http.server.BaseHTTPRequestHandler):
    """Answers every request with its server's `reply` (status, headers, body) and records (path, Authorization)."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.seen.append((self.path, self.headers.get("Authorization")))
        status, headers, body = self.server.reply
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """serve(status, headers, body) -> a loopback server in a thread answering so, shut down after the test."""
    servers = []

    def start(status, headers=None, body=b""):
        server = http.server.HTTPServer(("127.0.0.1", 0), Server)
        server.reply, server.seen, server.timeout = (status, headers or {}, body), [], 5
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_port}/v1"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def ask(endpoint, **kwargs):
    return judge.chat_completion([{"role": "user", "content": "hi"}], endpoint, "judge-1", KEY, retries=1,
                                 backoff=0.01, timeout=5, **kwargs)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_with_the_key(serve, status, capsys):
    elsewhere, elsewhere_url = serve(200, {}, json.dumps({"choices": [{"message": {"content": "8 6"}}]}).encode())
    redirecting, endpoint = serve(status, {"Location": f"{elsewhere_url}/chat/completions"})
    with pytest.raises(UserError) as error:
        ask(endpoint)
    assert elsewhere.seen == [] and len(redirecting.seen) == 1  # the key went nowhere else, and was not retried
    assert f"redirects (HTTP {status}) to http://127.0.0.1:{elsewhere.server_port}/v1/chat/completions" in \
        str(error.value) and "--judge-endpoint" in str(error.value)
    assert KEY not in str(error.value) + capsys.readouterr().err


@pytest.mark.parametrize("body", [
    json.dumps({"error": {"message": f"Incorrect API key provided: {KEY}.", "type": "invalid_request_error"}}).encode(),
    f"<html>Unauthorized: Bearer {KEY}</html>".encode(),
    f"bad key {KEY[:14]}... (starts with {KEY[:12]})".encode(),
    json.dumps({"error": {"message": {"key": KEY}}}).encode(),
])
def test_an_error_that_echoes_the_key_is_printed_without_it(serve, body, capsys):
    server, endpoint = serve(401, {"Content-Type": "application/json"}, body)
    with pytest.raises(UserError) as error:
        ask(endpoint)
    message = str(error.value)
    assert "HTTP 401" in message and "***" in message and len(message) < 400
    assert KEY not in message and KEY[:12] not in message and server.seen[0][1] == f"Bearer {KEY}"
    assert KEY[:8] not in capsys.readouterr().err


@pytest.mark.parametrize("body", [b"not json", b'{"id": 1}', b'{"choices": []}', b'{"choices": [{"text": "8 6"}]}',
                                  b'{"choices": [{"message": {"content": null}}]}', b"[1]"])
def test_a_200_that_is_no_chat_completion_is_a_clear_error_at_once(serve, body):
    server, endpoint = serve(200, {}, body)
    with pytest.raises(UserError, match=f"judge endpoint {endpoint} "):
        ask(endpoint)
    assert len(server.seen) == 1  # not retried: a wrong URL stays wrong


@pytest.mark.parametrize("endpoint", ["file:///etc/passwd", "ftp://example.com/v1", "example.com/v1", "/v1",
                                      "http:///v1", "https://example.com/v1?key=1"])
def test_only_an_http_endpoint_gets_the_key(endpoint):
    with pytest.raises(UserError, match="--judge-endpoint"):
        ask(endpoint)


def test_a_judge_that_stays_down_is_one_error_line(serve, tmp_path, capsys, monkeypatch):
    server, endpoint = serve(503)
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    mmvet = tmp_path / "mm-vet.json"
    mmvet.write_text(json.dumps({"v1_0": {"question": "Q?", "answer": "A", "capability": ["rec"]}}))
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 0, "text": "A"}])
    err = fails(capsys, ["score", "mmvet", "--answers", answers, "--mmvet-json", str(mmvet), "--judge-endpoint",
                         endpoint, "--judge-key-env", "JUDGE_TEST_KEY", "--judge-retries", "1", "--judge-backoff", "0"])
    assert "still failing after 1 retries (HTTP 503)" in err and len(server.seen) == 2
    assert not (tmp_path / "a.mmvet-grades.json").exists()
    for sample in ({"question": "Q?", "capability": ["rec"]}, {"question": "Q?", "capability": "rec"}):
        mmvet.write_text(json.dumps({"v1_0": sample}))  # no key to grade against; capabilities not a list
        assert "v1_0" in fails(capsys, ["score", "mmvet", "--answers", answers, "--mmvet-json", str(mmvet)])
    mmvet.write_text(json.dumps({"v1_0": {"question": "Q?", "answer": "A", "capability": ["rec"]}}))
    grades = tmp_path / "g.json"
    grades.write_text(json.dumps({"v1_0": {"model": [], "content": [], "score": ["high"]}}))
    assert "g.json, 'v1_0': 'score' must be" in fails(capsys, ["score", "mmvet", "--answers", answers,
                                                               "--mmvet-json", str(mmvet), "--grades", str(grades)])
