"""evaluate.py, benchmarks.py, judge.py: published LLaVA-1.5 numbers from its released answers and reviews (vendored in
tests/data/llava_eval, see its README), every scoring rule on hand-made fixtures, each benchmark's own flags, the judge
client against a loopback server, and `run` end to end with resume."""

import http.server
import json
import os
import re
import threading

import pytest

import benchmarks
import evaluate
import judge

# LLaVA-1.5's released ScienceQA answers and LLaVA-Bench reviews, from haotian-liu/LLaVA's eval.zip
REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "llava_eval")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def fails(capsys, argv, main=evaluate.main):
    """main(argv) stops as a command line does on bad input: exit status 2, one `error: ...` line on stderr, no
    traceback. Returns the line."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


# ----------------------------------------------------------------------------------------------------------------------
# Published numbers


def test_scienceqa_img_of_llava_1_5_13b_is_71_64(tmp_path):
    metrics = evaluate.main(["score", "scienceqa", "--questions", f"{REF}/scienceqa/llava_test_CQM-A.json",
                             "--answers", f"{REF}/scienceqa/llava-v1.5-13b_answers.jsonl", "--out",
                             str(tmp_path / "m.json")])
    counts = (metrics["img_correct"], metrics["img_total"], metrics["correct"], metrics["total"])
    assert counts == (1445, 2017, 3155, 4241)
    assert round(metrics["img_accuracy"], 2) == 71.64 and json.loads((tmp_path / "m.json").read_text()) == metrics


@pytest.mark.parametrize("size,runs,mean", [("13b", [72.8, 72.7, 72.1], 72.5), ("7b", [64.7, 65.3, 66.3], 65.4)])
def test_llava_bench_in_the_wild_relative_scores(size, runs, mean, tmp_path):
    reviews = [f"{REF}/llava-bench-in-the-wild/llava-v1.5-{size}-eval{i}.jsonl" for i in (1, 2, 3)]
    metrics = evaluate.main(["score", "llava_bench", "--reviews", *reviews, "--out", str(tmp_path / "m.json")])
    assert [r["all"]["relative"] for r in metrics["runs"].values()] == runs
    assert metrics["mean"]["all"] == mean


MME_ROOT = os.environ.get("MME_ROOT")


@pytest.mark.skipif(not MME_ROOT, reason="MME's ground truth is not vendored: set MME_ROOT to "
                    "MME_Benchmark_release_version, or to eval_tool/Your_Results of MME's eval_tool.zip")
def test_mme_of_llava_1_5_13b_is_1531_3(tmp_path):
    metrics = evaluate.main(["score", "mme", "--questions", f"{REF}/mme/llava_mme.jsonl", "--answers",
                             f"{REF}/mme/llava-v1.5-13b.jsonl", "--mme-root", MME_ROOT,
                             "--out", str(tmp_path / "m.json")])
    assert metrics["missing"] == 0
    assert (round(metrics["perception"], 1), round(metrics["cognition"], 1)) == (1531.3, 295.4)
    assert {s: round(v["score"], 2) for s, v in metrics["subtasks"].items()} == {  # as calculation.py prints them
        "existence": 185.0, "count": 155.0, "position": 133.33, "color": 170.0, "posters": 160.54, "celebrity": 152.94,
        "scene": 161.25, "landmark": 170.5, "artwork": 117.75, "OCR": 125.0, "commonsense_reasoning": 127.86,
        "numerical_calculation": 42.5, "text_translation": 77.5, "code_reasoning": 47.5}


def test_mme_pairs_each_of_llavas_answers_with_its_own_question(tmp_path):
    """LLaVA's real MME files, where an image's two questions share a question_id: with a ground truth that says each
    answer is right, every yes/no answer must count as right, so only the 11 answers that are neither lose points."""
    answers = benchmarks.read_jsonl(f"{REF}/mme/llava-v1.5-13b.jsonl")
    truth = {}
    for a in answers:  # question_id "artwork/images/17998.jpg": subtask "artwork", file 17998.txt
        subtask, stem = a["question_id"].split("/")[0], a["question_id"].split("/")[-1].split(".")[0]
        question = a["prompt"].replace("\nAnswer the question using a single word or phrase.", "")
        truth.setdefault((subtask, stem), []).append(f"{question} Please answer yes or no.\t"
                                                     f"{'No' if a['text'] == 'No' else 'Yes'}\n")
    for (subtask, stem), lines in truth.items():
        (tmp_path / "MME" / subtask).mkdir(parents=True, exist_ok=True)
        (tmp_path / "MME" / subtask / f"{stem}.txt").write_text("".join(lines))
    metrics = benchmarks.score_mme(f"{REF}/mme/llava_mme.jsonl", f"{REF}/mme/llava-v1.5-13b.jsonl",
                                   str(tmp_path / "MME"))
    assert sum(a["text"] not in ("Yes", "No") for a in answers) == 11  # "Church", "Portrait", ...: all in artwork
    assert metrics["subtasks"]["artwork"] == {"acc": 97.25, "acc_plus": 94.5, "score": 191.75}
    assert (metrics["perception"], metrics["cognition"], metrics["missing"]) == (1991.75, 800.0, 0)


# ----------------------------------------------------------------------------------------------------------------------
# Rules on hand-made fixtures


def test_judge_score_parsing_is_llavas():
    assert [judge.parse_review(t) for t in ["8 6\nwhy", "7.5 9", "9,9\n", "9, 9\n", "8  6", "Score: 8 6", "8"]] == \
        [[8, 6], [7.5, 9], [9, 9], [-1, -1], [-1, -1], [-1, -1], [-1, -1]]  # split on single spaces, as LLaVA


def test_scienceqa_letter_extraction():
    assert [benchmarks.sqa_letter(t) for t in ["B", "C. a cat", "The answer is D.", "I think so. The answer is A. Yes",
                                               "The answer is A. The answer is B.", "b", "F", "C.cat", ""]] == \
        ["B", "C", "D", "A", None, None, None, None, None]


@pytest.mark.parametrize("raw,normalized", [
    ("Yes!", "yes"), ("t-shirt", "t shirt"), ("Two dogs", "2 dogs"), ("the red one", "red 1"), ("A cat.", "cat"),
    ("dont know", "don't know"), ("man's hat", "man 's hat"), ("3.5", "3.5"), ("1,000", "1000"), ("(left)", "left"),
    ("left, right", "left right"), ("none", "0"), ("Isnt it", "isn't it"), ("yes\tno\n", "yes no"),
    ("e-mail address", "e mail address"), ("a - b", "b"), ("@home", "home"),
])
def test_evalai_answer_normalisation(raw, normalized):
    assert benchmarks.normalize_answer(raw) == normalized


@pytest.mark.parametrize("agree,score", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_soft_accuracy_by_number_of_agreeing_humans(agree, score):
    humans = ["two"] * agree + [f"other {i}" for i in range(10 - agree)]
    assert abs(benchmarks.soft_accuracy("2", humans) - score) < 1e-9


def test_vqa_textvqa_and_vqav2_annotations(tmp_path):
    textvqa = {"data": [{"image_id": "img1", "question": "What brand?", "answers": ["Nike"] * 3 + ["adidas"] * 7},
                        {"image_id": "img2", "question": "What year?", "answers": ["1999"] * 10}]}
    (tmp_path / "t.json").write_text(json.dumps(textvqa))
    answers = write_jsonl(tmp_path / "a.jsonl", [
        {"question_id": "img1", "prompt": "What brand?\nReference OCR token: nike, air\nAnswer the question using a "
                                          "single word or phrase.", "text": "nike"}])
    metrics = benchmarks.score_vqa(answers, str(tmp_path / "t.json"))
    assert metrics["missing"] == 1 and abs(metrics["accuracy"] - 100 * 0.9 / 2) < 1e-9
    vqav2 = {"annotations": [{"question_id": 7, "answers": [{"answer": "two"}] * 2 + [{"answer": "3"}] * 8}]}
    (tmp_path / "v.json").write_text(json.dumps(vqav2))
    answers = write_jsonl(tmp_path / "b.jsonl", [{"question_id": 7, "prompt": "How many?", "text": "Two."}])
    assert abs(benchmarks.score_vqa(answers, str(tmp_path / "v.json"))["accuracy"] - 60) < 1e-9


def test_pope_rule_and_per_split_pairing(tmp_path):
    texts = ["Yes", "No", "No, there is not.", "There is no dog.", "Yes. There is no cat.", "Nope", "not sure",
             "Yes, it is there."]
    assert [benchmarks.pope_says_yes(t) for t in texts] == [True, False, False, False, True, True, False, True]
    suffix = "\nAnswer the question using a single word or phrase."
    questions, labels, answers = [], {"random": [], "popular": []}, []
    rows = [("random", "a.jpg", "Is there a dog in the image?", "yes", "Yes"),
            ("random", "a.jpg", "Is there a cat in the image?", "no", "Yes"),
            ("random", "b.jpg", "Is there a car in the image?", "no", "No"),
            ("random", "b.jpg", "Is there a bus in the image?", "yes", None),  # no answer: counts as wrong
            ("popular", "a.jpg", "Is there a dog in the image?", "yes", "No, there is not."),
            ("popular", "c.jpg", "Is there a cup in the image?", "no", "No")]
    for i, (split, image, text, label, answer) in enumerate(rows):
        questions.append({"question_id": 100 + i, "image": image, "text": text + suffix, "category": split})
        labels[split].append({"question_id": i, "image": image, "text": text, "label": label})
        if answer is not None:
            answers.append({"question_id": 100 + i, "prompt": text + suffix, "text": answer})
    (tmp_path / "labels").mkdir()
    for split, rows_ in labels.items():
        write_jsonl(tmp_path / "labels" / f"coco_pope_{split}.json", rows_)
    metrics = benchmarks.score_pope(write_jsonl(tmp_path / "q.jsonl", questions),
                                    write_jsonl(tmp_path / "a.jsonl", answers[::-1]),  # order does not matter here
                                    str(tmp_path / "labels"))
    r, p = metrics["splits"]["random"], metrics["splits"]["popular"]
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (1, 1, 1, 1) and metrics["missing"] == 1
    assert (r["accuracy"], r["precision"], r["recall"], r["f1"], r["yes_ratio"]) == (50, 50, 50, 50, 50)
    assert (p["tp"], p["fp"], p["tn"], p["fn"]) == (0, 0, 1, 1) and p["f1"] == 0 and p["yes_ratio"] == 0
    assert metrics["mean_f1"] == 25


# MME fixtures shaped like the real files: LLaVA's llava_mme.jsonl asks an image's two questions under one
# question_id "subtask/file" (artwork's keep "images/" in it), its answers file repeats each question as "prompt";
# the release's ground truth is a `question<TAB>answer` .txt per image (in questions_answers_YN/ for artwork and the
# like), calculation.py's a `image<TAB>question<TAB>answer` SUBTASK.txt; a few release questions have two spaces
# before "Please answer yes or no." (count/000000195918 is one) or no "?" (position/000000006471).
MME_CASES = [  # question id, question as LLaVA asks it (before the suffix), ground truth, LLaVA's answer or None
    ("count/000000195918.jpg", "Is there only one display device in the image?", "No", "No"),  # both right
    ("count/000000195918.jpg", "Are there two display devices in the image?", "Yes", "Yes"),
    ("count/000000044279.jpg", "Is there a total of two people in the image?", "Yes", "Yes"),  # one right
    ("count/000000044279.jpg", "Is there a total of three people in the image?", "No", "Yes"),
    ("position/000000006471.jpg", "Is the cricket bat above the batter's body?", "Yes", "Yes"),  # both right
    ("position/000000006471.jpg", "Is the cricket bat under the batter's body", "No", "No"),
    ("artwork/images/10002.jpg", "Does this artwork exist in the form of painting?", "Yes", "Yes."),  # one right
    ("artwork/images/10002.jpg", "Does this artwork exist in the form of glassware?", "No", "Church"),  # "other"
    ("artwork/images/10049.jpg", "Does this artwork exist in the form of painting?", "Yes", "yes"),  # one right
    ("artwork/images/10049.jpg", "Does this artwork exist in the form of sculpture?", "No", None),  # no answer
    ("code_reasoning/0001.png", "The image shows a python code. Is the output of the code 'Hello'?", "Yes", "y"),
    ("code_reasoning/0001.png", "The image shows a python code. Is the output of the code 'World'?", "No", "No"),
]


def write_mme_truth(root, layout):
    """MME_CASES' ground truth as the release lays it out, or as eval_tool's Your_Results does."""
    for qid, text, truth, _ in MME_CASES:
        subtask, file = qid.split("/")[0], qid.split("/")[-1]
        spaces = "  " if "only one display" in text else " "  # the release's irregular spacing
        line = f"{text}{spaces}Please answer yes or no.\t{truth}\n"
        if layout == "release":  # artwork keeps its images in images/, its .txt files in questions_answers_YN/
            folder = root / subtask / ("questions_answers_YN" if subtask == "artwork" else "")
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"{file.split('.')[0]}.txt", "a") as f:
                f.write(line)
        else:
            root.mkdir(exist_ok=True)
            with open(root / f"{subtask}.txt", "a") as f:
                f.write(f"{file}\t{line}")


@pytest.mark.parametrize("layout", ["release", "eval_tool"])
def test_mme_on_files_shaped_like_the_real_ones(layout, tmp_path):
    write_mme_truth(tmp_path / "MME", layout)
    suffix = "\nAnswer the question using a single word or phrase."
    questions = [{"question_id": qid, "image": qid, "text": text + suffix, "category": qid.split("/")[0]}
                 for qid, text, _, _ in MME_CASES]
    answers = [{"question_id": qid, "prompt": text + suffix, "text": answer, "answer_id": str(i),
                "model_id": "llava-v1.5-13b", "metadata": {}}
               for i, (qid, text, _, answer) in enumerate(MME_CASES) if answer is not None]
    metrics = benchmarks.score_mme(write_jsonl(tmp_path / "q.jsonl", questions),
                                   write_jsonl(tmp_path / "a.jsonl", answers), str(tmp_path / "MME"))
    assert {s: v["score"] for s, v in metrics["subtasks"].items()} == {"count": 125.0, "position": 200.0,
                                                                       "artwork": 50.0, "code_reasoning": 50.0}
    assert metrics["subtasks"]["count"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert (metrics["perception"], metrics["cognition"], metrics["missing"]) == (375.0, 50.0, 1)
    del answers[0]["prompt"]  # an answer must say which of its image's questions it answers
    with pytest.raises(benchmarks.DataError, match="prompt"):
        benchmarks.score_mme(str(tmp_path / "q.jsonl"), write_jsonl(tmp_path / "a.jsonl", answers),
                             str(tmp_path / "MME"))


def test_mme_reads_yes_and_no_as_its_calculation_py():
    """parse_pred_ans of eval_tool/calculation.py on the lower-cased response: exactly yes/no, else yes or no within
    its first 4 characters; no stripping, no dropping of ".", no lone y/n (those are lmms-eval's)."""
    replies = ["Yes", "NO", "Yes.", "no.", "yes, it is", "Not really", "None", "y", "n", "Y.", "  yes", "maybe",
               "I think yes", "Church", ""]
    assert [benchmarks.mme_label(t) for t in replies] == \
        ["yes", "no", "yes", "no", "yes", "no", "no", "other", "other", "other", "other", "other", "other", "other",
         "other"]


def test_gqa_lowercases_and_strips_the_trailing_period(tmp_path):
    (tmp_path / "gqa.json").write_text(json.dumps({"1": {"answer": "yes"}, "2": {"answer": "left"},
                                                   "3": {"answer": "table"}}))
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": "1", "text": "Yes."},
                                                 {"question_id": "2", "text": "Left"},
                                                 {"question_id": "3", "text": "the table"}])
    metrics = benchmarks.score_gqa(answers, str(tmp_path / "gqa.json"))
    assert (metrics["correct"], metrics["n"]) == (2, 3)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input


def test_unknown_missing_and_malformed_answers(tmp_path, capsys):
    questions = f"{REF}/scienceqa/llava_test_CQM-A.json"
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"question_id": "no-such-question", "text": "A"}])
    assert "1 answers to questions not in the question file" in fails(capsys, [
        "score", "scienceqa", "--questions", questions, "--answers", unknown, "--out", str(tmp_path / "m")])
    few = write_jsonl(tmp_path / "f.jsonl", [{"question_id": "4", "text": "B"}])
    metrics = benchmarks.score_scienceqa(questions, few)
    assert metrics["missing"] == 4240 and metrics["correct"] == 1 and "4240 of 4241" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"question_id": "4", "text": "B"}\n{"question_id": "5", "text": \n')
    assert "bad.jsonl: malformed JSON on line 2" in fails(capsys, [
        "score", "scienceqa", "--questions", questions, "--answers", str(tmp_path / "bad.jsonl")])


# ----------------------------------------------------------------------------------------------------------------------
# The command line: a sub-command per benchmark, each with its own flags

BENCHMARK_FLAGS = {
    "scienceqa": {"--questions", "--answers"},
    "pope": {"--questions", "--answers", "--labels"},
    "vqa": {"--answers", "--annotations"},
    "gqa": {"--answers", "--annotations"},
    "mme": {"--questions", "--answers", "--mme-root"},
    "llava_bench": {"--reviews", "--questions", "--context", "--reference", "--answers", "--rules", "--runs",
                    "--reviews-dir", "--judge-endpoint", "--judge-model", "--judge-key-env", "--judge-retries",
                    "--judge-backoff"},
    "mmbench": {"--questions", "--answers"},
    "seed": {"--annotations", "--answers"},
    "mmvet": {"--answers", "--mmvet-json", "--grades", "--runs", "--judge-endpoint", "--judge-model", "--judge-key-env",
              "--judge-retries", "--judge-backoff"},
    "scienceqa_gpt4": {"--questions", "--answers", "--gpt-answers", "--requery", "--judge-endpoint", "--judge-model",
                       "--judge-key-env", "--judge-retries", "--judge-backoff"},
    "mmbench_submit": {"--questions", "--answers", "--submission"},
    "mmvet_submit": {"--answers", "--submission"},
    "vqav2_submit": {"--questions", "--answers", "--test-questions", "--submission"},
    "vizwiz_submit": {"--questions", "--answers", "--submission"},
}


@pytest.mark.parametrize("name", BENCHMARK_FLAGS)
def test_score_help_lists_only_that_benchmarks_flags(name, capsys):
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["score", name, "--help"])  # what `python evaluate.py score NAME --help` runs
    help_text = capsys.readouterr().out
    assert exit.value.code == 0 and help_text.startswith(f"usage: evaluate.py score {name} ")
    assert set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", help_text)) == BENCHMARK_FLAGS[name] | {"--help", "--out"}


def test_score_knows_every_benchmark_and_rejects_what_it_does_not(capsys, tmp_path):
    assert set(benchmarks.BENCHMARKS) == set(BENCHMARK_FLAGS)  # a new benchmark: add its flags above
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["score", "nosuch", "--answers", "a.jsonl"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "invalid choice: 'nosuch'" in err and all(f"'{n}'" in err for n in BENCHMARK_FLAGS)
    with pytest.raises(SystemExit) as exit:  # another benchmark's flag
        evaluate.main(["score", "scienceqa", "--questions", "q.json", "--answers", "a.jsonl", "--labels", "dir"])
    assert exit.value.code == 2 and "unrecognized arguments: --labels dir" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:  # a required flag left out
        evaluate.main(["score", "pope", "--questions", "q.jsonl", "--answers", "a.jsonl"])
    assert exit.value.code == 2 and "the following arguments are required: --labels" in capsys.readouterr().err
    questions = write_jsonl(tmp_path / "q.jsonl", [])  # neither reviews nor a judge's inputs
    assert "missing: --context, --reference" in fails(capsys, ["score", "llava_bench", "--questions", questions,
                                                               "--answers", questions])


# ----------------------------------------------------------------------------------------------------------------------
# The judge client, against a loopback server that speaks chat completions


class ChatServer(http.server.BaseHTTPRequestHandler):
    replies, requests = [], []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ChatServer.requests.append({"path": self.path, "auth": self.headers["Authorization"], "body": body})
        status, content = ChatServer.replies.pop(0)
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_llava_bench_judge_layout_parsing_and_retries(tmp_path, monkeypatch, capsys):
    server = http.server.HTTPServer(("127.0.0.1", 0), ChatServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ChatServer.requests.clear()
    ChatServer.replies[:] = [(503, ""), (200, "8 6\nAssistant 2 misses the dog."), (200, "I cannot rate this."),
                        (200, "9,9\nBoth fine.")]
    questions = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 0, "image": "x.jpg", "text": "What is here?", "category": "conv"},
        {"question_id": 1, "image": "x.jpg", "text": "Describe it.", "category": "detail"},
        {"question_id": 2, "image": "y.jpg", "text": "Why?", "category": "complex"}])
    context = write_jsonl(tmp_path / "c.jsonl", [{"image": "x.jpg", "caption": "A dog on grass."},
                                                 {"image": "y.jpg", "caption": ["Line one.", "Line two."]}])
    reference = write_jsonl(tmp_path / "r.jsonl", [{"question_id": i, "text": f"gpt4 says {i}"} for i in range(3)])
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": i, "text": f"model says {i}", "answer_id": f"m{i}"}
                                                 for i in range(3)])
    monkeypatch.setenv("SECRET_KEY_VAR", "sk-test-123")
    metrics = evaluate.main(["score", "llava_bench", "--questions", questions, "--context", context, "--reference",
                             reference, "--answers", answers, "--runs", "1", "--reviews-dir", str(tmp_path / "rev"),
                             "--judge-endpoint", f"http://127.0.0.1:{server.server_port}/v1", "--judge-model",
                             "judge-1", "--judge-key-env", "SECRET_KEY_VAR", "--judge-backoff", "0.01"])
    server.shutdown()
    assert len(ChatServer.requests) == 4 and "retrying" in capsys.readouterr().err  # the 503 was retried
    first = ChatServer.requests[1]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test-123"
    assert first["body"]["model"] == "judge-1" and first["body"]["temperature"] == 0.2
    assert first["body"]["messages"][0] == {"role": "system", "content": judge.JUDGE_SYSTEM}
    assert first["body"]["messages"][1]["content"] == (
        "[Context]\nA dog on grass.\n\n[Question]\nWhat is here?\n\n[Assistant 1]\ngpt4 says 0\n\n[End of Assistant 1]"
        f"\n\n[Assistant 2]\nmodel says 0\n\n[End of Assistant 2]\n\n[System]\n{judge.JUDGE_RULE}\n\n")
    assert "[Context]\nLine one.\nLine two.\n\n" in ChatServer.requests[3]["body"]["messages"][1]["content"]
    reviews = [json.loads(line) for line in open(tmp_path / "rev" / "a-eval1.jsonl")]
    assert [r["tuple"] for r in reviews] == [[8, 6], [-1, -1], [9, 9]]  # unparseable: [-1, -1], kept in the means
    assert metrics["mean"]["all"] == round(100 * (6 - 1 + 9) / (8 - 1 + 9), 1)
    assert not any("sk-test-123" in open(os.path.join(d, f)).read()
                   for d, _, files in os.walk(tmp_path) for f in files)


# ----------------------------------------------------------------------------------------------------------------------
# run: answering end to end, and resuming


def test_run_writes_llavas_schema_and_resumes(colour_checkpoint, tmp_path, crash_on_second_answer):
    suffix = "\nAnswer the question using a single word or phrase."
    questions = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 10 + i, "image": f"{i}.png", "text": f"What color is it?{suffix}", "category": "c"}
        for i in range(5)] + [{"question_id": 99, "text": "Name a shape." + suffix, "category": "text"}])
    argv = ["run", "--model", str(colour_checkpoint / "model"), "--questions", questions, "--image-folder",
            str(colour_checkpoint), "--batch-size", "2", "--max-new-tokens", "4"]
    evaluate.main(argv + ["--answers", str(tmp_path / "straight.jsonl")])
    straight = [json.loads(line) for line in open(tmp_path / "straight.jsonl")]
    assert [a["question_id"] for a in straight] == [10, 11, 12, 13, 14, 99]
    assert all(set(a) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} for a in straight)
    assert straight[0]["prompt"] == f"What color is it?{suffix}" and straight[0]["model_id"] == "model"

    restore_answer = crash_on_second_answer()
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(argv + ["--answers", str(tmp_path / "resumed.jsonl")])
    with open(tmp_path / "resumed.jsonl", "a") as f:
        f.write('{"question_id": 12, "prom')  # a line cut short by the crash
    restore_answer()
    evaluate.main(argv + ["--answers", str(tmp_path / "resumed.jsonl")])
    resumed = [json.loads(line) for line in open(tmp_path / "resumed.jsonl")]
    assert [(a["question_id"], a["text"]) for a in resumed] == [(a["question_id"], a["text"]) for a in straight]


def test_run_reports_a_missing_image(colour_checkpoint, tmp_path, capsys):
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "image": "nope.png", "text": "Q?"}])
    assert "q.jsonl, question 1: image file" in fails(capsys, [
        "run", "--model", str(colour_checkpoint / "model"), "--questions", questions, "--image-folder",
        str(colour_checkpoint), "--answers", str(tmp_path / "a.jsonl")])


def test_two_runs_cannot_write_one_answers_file(colour_checkpoint, tmp_path, capsys):
    import fcntl

    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "text": "Name a shape."}])
    argv = ["run", "--model", str(colour_checkpoint / "model"), "--questions", questions, "--answers",
            str(tmp_path / "a.jsonl"), "--max-new-tokens", "2"]
    with open(tmp_path / "a.jsonl", "a") as held:  # as a run in another process holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert "another evaluate.py run is writing it" in fails(capsys, argv)
    evaluate.main(argv)  # released
    assert [json.loads(line)["question_id"] for line in open(tmp_path / "a.jsonl")] == [1]
