"""ScienceQA as the first LLaVA paper used it: tools/scienceqa.py's QCM-LEA files (against LLaVA's converter, read
and written out by hand), training on them in the llava_v0 template, and the GPT-4 ensemble scored against the
requery script's rule, with a loopback server playing GPT-4."""

import http.server
import json
import re
import threading

import pytest
from PIL import Image

import evaluate
from data import ChatFormat, LazySupervisedDataset
from test_data import supervised_runs
from tools import scienceqa

PROBLEMS = {
    "7": {"question": "Which animal is a mammal?", "choices": ["cat", "trout"], "answer": 0, "hint": "",
          "image": "image.png", "lecture": "Mammals have fur.\nBirds have feathers.", "solution": "A cat has fur.",
          "task": "closed choice", "grade": "grade2", "subject": "natural science", "split": "train"},
    "12": {"question": "What does the text say?", "choices": ["yes", "no", "maybe"], "answer": 1,
           "hint": "Read the text.  Question: is it short?", "image": None, "lecture": "",
           "solution": "First.\\nSecond \u00e9.", "task": "yes or no", "grade": "grade5", "subject": "language science",
           "split": "train"},
}
SPLITS = {"train": ["12", "7"], "test": ["7"]}

# What LLaVA's scripts/convert_sqa_to_llava.py writes for them with QCM-LEA, worked out by reading it: the empty hint
# is "N/A"; one pass of "  " -> " " and every "Question: " gone (the input starts with one); the literal "\n" in the
# solution a newline; the image after the text; the reply without its "Answer: ".
LLAVA_TRAIN_QCM_LEA = [
    {"id": "12", "conversations": [
        {"from": "human", "value": "What does the text say?\nContext: Read the text. is it short?\n"
                                   "Options: (A) yes (B) no (C) maybe"},
        {"from": "gpt", "value": "First.\nSecond \u00e9. The answer is B."}]},
    {"id": "7", "image": "7/image.png", "conversations": [
        {"from": "human", "value": "Which animal is a mammal?\nContext: N/A\nOptions: (A) cat (B) trout\n<image>"},
        {"from": "gpt", "value": "Mammals have fur.\nBirds have feathers. A cat has fur. The answer is A."}]},
]


@pytest.fixture
def release(tmp_path):
    (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
    (tmp_path / "pid_splits.json").write_text(json.dumps(SPLITS))
    (tmp_path / "images" / "train" / "7").mkdir(parents=True)
    Image.new("RGB", (20, 12), "red").save(tmp_path / "images" / "train" / "7" / "image.png")
    return tmp_path


def test_the_files_are_llavas_byte_for_byte(release, capsys):
    scienceqa.main(["--base-dir", str(release), "--split", "train"])
    assert "Number of samples: 2" in capsys.readouterr().out
    # json.dump(..., indent=2) as the original: non-ASCII escaped
    assert (release / "llava_train_QCM-LEA.json").read_text() == json.dumps(LLAVA_TRAIN_QCM_LEA, indent=2)
    assert "\\u00e9" in (release / "llava_train_QCM-LEA.json").read_text()
    # the first paper's LEPA, and the original's swapped AL (the solution), CQM's order
    for fmt, human, gpt in [
            ("QCM-LEPA", None, "LECTURE: Mammals have fur.\nBirds have feathers.\nSOLUTION: A cat has fur.\n###\n"
                               "ANSWER: A."),
            ("QCM-AL", None, "The answer is A. BECAUSE: A cat has fur."),
            ("CQM-A", "Context: N/A\nQuestion: Which animal is a mammal?\nOptions: (A) cat (B) trout\n<image>",
             "The answer is A.")]:
        out = release / f"{fmt}.json"
        scienceqa.main(["--base-dir", str(release), "--split", "test", "--prompt-format", fmt, "--out", str(out)])
        sample = json.loads(out.read_text())[0]
        assert sample["conversations"][1]["value"] == gpt
        assert human is None or sample["conversations"][0]["value"] == human


@pytest.mark.parametrize("change,message", [
    ({"answer": 2}, "problem '7': 'answer' 2 is not the index of one of its 2 choices"),
    ({"choices": list("abcdef")}, "problem '7': 'choices' must be 1 to 5 strings"),
    ({"lecture": None}, "problem '7': 'lecture' must be a str"),
])
def test_a_problem_that_cannot_be_built_is_named(release, change, message, capsys):
    (release / "problems.json").write_text(json.dumps({**PROBLEMS, "7": {**PROBLEMS["7"], **change}}))
    with pytest.raises(SystemExit) as stop:
        scienceqa.main(["--base-dir", str(release), "--split", "test"])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (release / "llava_test_QCM-LEA.json").exists()


def test_a_qcm_lea_file_trains_in_llava_v0_and_its_test_file_scores(release, llama_tok, backbones, tmp_path):
    from data import load_image_processor

    scienceqa.main(["--base-dir", str(release), "--split", "train"])
    fmt = ChatFormat(llama_tok, "llava_v0", 4)
    dataset = LazySupervisedDataset(str(release / "llava_train_QCM-LEA.json"), str(release / "images" / "train"),
                                    fmt, load_image_processor(backbones[0]))
    for i, sample in enumerate(LLAVA_TRAIN_QCM_LEA):
        item = dataset[i]
        assert (item["pixel_values"] is None) == ("image" not in sample)
        replies = [llama_tok.decode(r) for r in supervised_runs(item["input_ids"].tolist(), item["labels"].tolist())]
        assert replies == [sample["conversations"][1]["value"] + "\n###"]
    # the test file's key is in its replies ("The answer is X."): the scorer reads it there
    scienceqa.main(["--base-dir", str(release), "--split", "train", "--out", str(tmp_path / "test.json")])
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": q, "text": t}) + "\n" for q, t in
                               [("7", "Fur. The answer is A."), ("12", "The answer is C.")]))
    metrics = evaluate.main(["score", "scienceqa", "--questions", str(tmp_path / "test.json"), "--answers",
                             str(answers)])
    assert (metrics["correct"], metrics["img_correct"], metrics["img_total"]) == (1, 1, 1)


def test_a_llava_v0_model_stops_at_its_separator(release, llama_tok, tmp_path, monkeypatch):
    """evaluate.py run on a llava_v0 model: generation stops at "###" (LLaVA's v0 stopping criterion), and the reply
    holds none of it, though "###" takes several tokens (generate.trim_at_stop)."""
    import types

    import generate

    asked = []

    def generate_then_trim(model, prompts, pixel_values=None, **kwargs):
        asked.append(kwargs)
        ids = llama_tok("The answer is B.\n### Human: next", add_special_tokens=False).input_ids
        return [generate.trim_at_stop(ids, kwargs["stop_strings"], llama_tok) for _ in prompts]

    model = types.SimpleNamespace(config=None, language_model=types.SimpleNamespace(
        generation_config=types.SimpleNamespace(eos_token_id=None)))
    monkeypatch.setattr(generate, "load", lambda *a: (model, ChatFormat(llama_tok, "llava_v0", 4), None))
    monkeypatch.setattr(generate, "generate", generate_then_trim)
    scienceqa.main(["--base-dir", str(release), "--split", "train", "--out", str(tmp_path / "q.json")])
    questions = [q for q in json.loads((tmp_path / "q.json").read_text()) if "image" not in q]
    (tmp_path / "q.json").write_text(json.dumps(questions))
    evaluate.main(["run", "--model", "m", "--questions", str(tmp_path / "q.json"), "--answers", str(tmp_path / "a")])
    assert asked[0]["stop_strings"] == ("###",)
    assert json.loads((tmp_path / "a").read_text().splitlines()[0])["text"] == "The answer is B."


# ----------------------------------------------------------------------------------------------------------------------
# The GPT-4 ensemble


KEY = {"1": "A", "2": "B", "3": "C", "4": "A", "5": "B", "6": "D"}
OURS = {"1": "The answer is A.", "2": "The answer is A.", "3": "The answer is B.", "4": "I cannot tell.",
        "5": "The answer is B.", "6": "The answer is D. The answer is C."}
GPT4 = {"1": "The answer is A.", "2": "The answer is C.", "3": "The answer is A.", "4": "The answer is A.",
        "5": "Unclear.", "6": "The answer is D."}
JUDGE = {"2": "Answer 2 misreads it. The answer is B.", "3": "Neither. The answer is D.", "4": "The answer is A.",
         "5": "Hmm.", "6": "The answer is D."}  # what the judge decides, by question


def original_requery_score(key, ours, gpt4, requery):
    """eval_science_qa_gpt4_requery.py's rule (its random fallback for an answer naming no letter made wrong)."""
    def letter(text):
        found = re.compile(r'The answer is ([A-Z]).').findall(text)
        return found[0] if len(found) == 1 else "FAILED"

    correct = 0
    for pid in key:
        requery_answer = letter(requery[pid]["text"] if pid in requery else "MISSING")
        pred = letter(ours[pid]) if requery_answer == "FAILED" else requery_answer
        correct += pred == key[pid]
    return correct


class PlaysGPT4(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        question = request["messages"][1]["content"].split("\n")[0]
        self.server.seen.append(request)
        pid = question.removeprefix("Question ")
        body = json.dumps({"choices": [{"message": {"content": JUDGE[pid]}, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def gpt4_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), PlaysGPT4)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def test_the_ensemble_asks_about_disagreements_only_and_scores_as_llavas_script(tmp_path, gpt4_server, monkeypatch):
    server, endpoint = gpt4_server
    questions = [{"id": pid, **({"image": f"{pid}/image.png"} if pid in "135" else {}), "conversations": [
        {"from": "human", "value": f"Question {pid}\nContext: N/A\nOptions: (A) a (B) b (C) c (D) d\n<image>"},
        {"from": "gpt", "value": f"Because. The answer is {key}."}]} for pid, key in KEY.items()]
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "ours.jsonl").write_text("".join(json.dumps({"question_id": p, "text": t}) + "\n"
                                                 for p, t in OURS.items()))
    (tmp_path / "gpt4.json").write_text(json.dumps({"acc": 0, "outputs": GPT4}))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    argv = ["score", "scienceqa_gpt4", "--questions", str(tmp_path / "q.json"), "--answers",
            str(tmp_path / "ours.jsonl"), "--gpt-answers", str(tmp_path / "gpt4.json"), "--judge-endpoint", endpoint]
    metrics = evaluate.main(argv)
    # asked once per question whose two letters differ (6: "D" against two letters, which name none), GPT-4's first
    asked = [r["messages"][1]["content"] for r in server.seen]
    assert [a.split("\n")[0] for a in asked] == ["Question 2", "Question 3", "Question 4", "Question 5", "Question 6"]
    assert asked[0].index(GPT4["2"]) < asked[0].index(OURS["2"]) and "<image>" not in asked[0]
    assert all(r["model"] == "gpt-4-0314" and r["temperature"] == 0.0 for r in server.seen)
    requery = {r["question_id"]: r for r in map(json.loads, open(tmp_path / "ours.gpt4-requery.jsonl"))}
    assert {q: r["text"] for q, r in requery.items()} == {q: JUDGE[q] for q in "23456"}
    # 1 agreed and right; 2 the judge right; 3 the judge wrong; 4 ours unparsed, the judge right; 5 the judge says
    # nothing, ours right; 6 the judge right
    assert metrics["correct"] == original_requery_score(KEY, OURS, GPT4, requery) == 5
    assert (metrics["img_accuracy"], metrics["ours_accuracy"], metrics["gpt4_accuracy"]) == (
        pytest.approx(200 / 3), pytest.approx(100 * 2 / 6), pytest.approx(100 * 3 / 6))
    assert metrics["upper_bound"] == pytest.approx(100 * 4 / 6) and metrics["requeried"] == 5
    # a second run reads the replies back and asks nothing
    assert evaluate.main(argv)["correct"] == 5 and len(server.seen) == 5


def test_the_ensemble_needs_gpt4s_answer_to_every_question(tmp_path, capsys):
    (tmp_path / "q.json").write_text(json.dumps([{"id": "1", "conversations": [
        {"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]}]))
    (tmp_path / "ours.jsonl").write_text(json.dumps({"question_id": "1", "text": "The answer is A."}) + "\n")
    (tmp_path / "gpt4.json").write_text(json.dumps({"outputs": {"2": "The answer is A."}}))
    with pytest.raises(SystemExit):
        evaluate.main(["score", "scienceqa_gpt4", "--questions", str(tmp_path / "q.json"), "--answers",
                       str(tmp_path / "ours.jsonl"), "--gpt-answers", str(tmp_path / "gpt4.json")])
    assert "no GPT-4 answer to 1 of the 1 questions" in capsys.readouterr().err
