"""The rest of LLaVA-1.5's table: MMBench (the TSV, LLaVA's prompt, CircularEval, the server's .xlsx), SEED-Bench,
MM-Vet (its grader against a loopback server, its aggregation), TextVQA's OCR-token prompts, and the VQAv2 / VizWiz /
MM-Vet submission files. Every fixture is hand-made in the shape of the real file, except MM-Vet's published-number
tests, which read LLaVA-1.5-13B's released MM-Vet files in tests/data/llava_eval/mm-vet (see its README)."""

import base64
import csv
import http.server
import io
import json
import os
import threading
import xml.etree.ElementTree as ET
import zipfile

import pytest
from PIL import Image

import benchmarks
import evaluate
import judge
from tools.tiny import save_tiny_checkpoint

EN = "\nAnswer with the option's letter from the given choices directly."
CN = "\n请直接回答选项字母。"
SHORT = "\nAnswer the question using a single word or phrase."
COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
           "comment", "split"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def png_base64(color, size=(24, 16), noise=False):
    image = Image.new("RGB", size, color)
    if noise:  # incompressible pixels: a base64 field longer than csv's default 131,072-character limit
        image = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path, rows):
    """An MMBench TSV as pandas' to_csv writes one: tab-separated, quoted only where needed, empty cells for NaN."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([row.get(c, "") for c in COLUMNS])
    return str(path)


def mmbench_row(index, question, options, answer, hint="", category="cat", l2="l2", image=None):
    row = {"index": index, "question": question, "hint": hint, "answer": answer, "category": category,
           "l2-category": l2, "image": image or png_base64("red"), "source": "src", "comment": "", "split": "dev"}
    row.update(zip("ABCD", options))
    return row


def rotations(index, question, options, answer, **kwargs):
    """A question and its circular copies as the dev TSV holds them: row index + k * 1e6 shows the options rotated k
    places, the answer's letter moved with its option."""
    rows = []
    for k in range(len(options)):
        shown = options[k:] + options[:k]
        rows.append(mmbench_row(index + k * benchmarks.CIRCULAR, question, shown,
                                "ABCD"[shown.index(options["ABCD".index(answer)])], **kwargs))
    return rows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("benchmodel"))


# ----------------------------------------------------------------------------------------------------------------------
# MMBench: the TSV and LLaVA's prompt


def test_mmbench_tsv_prompts_with_hints_missing_options_chinese_and_big_images(tmp_path):
    big = png_base64("blue", size=(200, 200), noise=True)
    assert len(big) > 131072
    tsv = write_tsv(tmp_path / "dev.tsv", [
        mmbench_row(0, "Which state is highlighted?", ["Ohio", "Iowa", "Utah", "Texas"], "B",
                    hint="Figure: a map of the U.S.\tcolored", image=big),
        mmbench_row(1, "Is the sky blue?", ["yes", "no"], "A", hint="nan"),  # pandas: NaN, LLaVA: no hint line
        mmbench_row(2, "Which is a mammal?", ["whale", "shark", "None", "cod"], "A"),  # "None" is NaN: stops at B
        mmbench_row(3, "图中的动物是什么？", ["猫", "狗", "鸟"], "A", hint="请看图片。\n第二行"),
    ])
    questions = evaluate.load_questions(tsv, "\\n请直接回答选项字母。")  # typed on a shell: a backslash and an n
    assert [q[0] for q in questions] == [0, 1, 2, 3]
    assert questions[0][3] == ("Figure: a map of the U.S.\tcolored\nWhich state is highlighted?\nA. Ohio\nB. Iowa\n"
                               "C. Utah\nD. Texas")
    assert questions[1][3] == "Is the sky blue?\nA. yes\nB. no"
    assert questions[2][3] == "Which is a mammal?\nA. whale\nB. shark"
    assert questions[3][3] == "请看图片。\n第二行\n图中的动物是什么？\nA. 猫\nB. 狗\nC. 鸟"
    assert all(q[2] == q[3] + CN for q in questions)  # the model gets the suffix, the answer's prompt does not
    assert questions[0][1] == base64.b64decode(big) and Image.open(io.BytesIO(questions[1][1])).size == (24, 16)
    assert questions[3][4] == {"round_id": 0, "options": ["猫", "狗", "鸟"], "option_char": ["A", "B", "C"]}

    rounds = evaluate.load_questions(tsv, EN, all_rounds=True)
    assert [(q[0], q[4]["round_id"]) for q in rounds] == [(0, r) for r in range(4)] + [(1, 0), (1, 1)] + \
        [(2, 0), (2, 1)] + [(3, r) for r in range(3)]
    third = [q for q in rounds if q[0] == 3]
    assert [q[4]["option_char"] for q in third] == [["A", "B", "C"], ["B", "C", "A"], ["C", "A", "B"]]
    assert third[2][3].endswith("\nA. 鸟\nB. 猫\nC. 狗") and third[2][4]["options"] == ["鸟", "猫", "狗"]

    (tmp_path / "bad.tsv").write_text("index\tquestion\tA\tB\nx\tq\ta\tb\n")
    with pytest.raises(benchmarks.DataError, match="row 1 has the index 'x'"):
        benchmarks.read_mmbench(str(tmp_path / "bad.tsv"))
    (tmp_path / "wrong.tsv").write_text("question_id\ttext\n1\tq\n")
    with pytest.raises(benchmarks.DataError, match="not an MMBench TSV"):
        benchmarks.read_mmbench(str(tmp_path / "wrong.tsv"))


def test_mmbench_rule_based_letter_matching():
    choices = {"A": "a red apple", "B": "a cat", "C": "the sea", "D": "Mount Fuji"}
    cases = {"B": "B", "B.": "B", "(C) the sea": "C", "Answer: D": "D", "The answer is A": "A", "**C**": "C",
             "It shows Mount Fuji.": "D",  # no letter: the one option whose text it contains
             "A or B": None, "b": None, "Z": None, "Cannot determine the answer": None, "a dog": None, "": None,
             "A cat": "A"}  # "A" stands alone: the official rule takes it (it knows "A" may be an article)
    assert {text: benchmarks.mmbench_letter(text, choices) for text in cases} == cases
    assert benchmarks.mmbench_letter("E", {"A": "x", "B": "y"}) is None  # a letter that is not an option
    assert benchmarks.mmbench_letter("D", {"A": "x", "B": "y"}) is None


# ----------------------------------------------------------------------------------------------------------------------
# MMBench: CircularEval


def test_mmbench_circular_eval_groups_by_index_mod_a_million(tmp_path, capsys):
    rows = (rotations(10, "Q ten?", ["w", "x", "y", "z"], "C", category="count", l2="perception") +  # all 4 right
            rotations(11, "Q eleven?", ["p", "q"], "A", category="count", l2="perception") +  # the copy answered wrong
            [mmbench_row(12, "Q twelve?", ["r", "s", "t"], "C", category="ocr", l2="perception")] +  # one row only
            rotations(13, "Q thirteen?", ["u", "v", "w"], "B", category="ocr", l2="reasoning"))  # a copy unanswered
    tsv = write_tsv(tmp_path / "dev.tsv", rows)
    key = {row["index"]: row["answer"] for row in rows}
    answers = [{"question_id": i, "round_id": 0, "prompt": "", "text": f"{key[i]}."} for i in key
               if i != 2000013]
    answers[[a["question_id"] for a in answers].index(1000011)]["text"] = "B" if key[1000011] == "A" else "A"
    metrics = benchmarks.score_mmbench(tsv, write_jsonl(tmp_path / "a.jsonl", answers))
    assert (metrics["correct"], metrics["questions"], metrics["rows"], metrics["missing"]) == (2, 4, 10, 1)
    assert metrics["accuracy"] == 50 and metrics["vanilla_accuracy"] == 100  # 10 and 12 survive their rotations
    assert metrics["category"] == {"count": 50, "ocr": 50} and metrics["l2-category"] == {"perception": 200 / 3,
                                                                                         "reasoning": 0}
    assert "1 rows or rounds have no answer" in capsys.readouterr().err

    # --all-rounds answers: every round of every row must be right, judged against that round's rotation
    single = write_tsv(tmp_path / "one.tsv", [mmbench_row(5, "Q?", ["cat", "dog", "eel"], "C")])
    # round r shows the options rotated r places: the eel is C, then B, then A
    rounds = [{"question_id": 5, "round_id": r, "text": t} for r, t in enumerate(["C", "B", "eel"])]
    assert benchmarks.score_mmbench(single, write_jsonl(tmp_path / "r.jsonl", rounds))["accuracy"] == 100
    rounds[1]["text"] = "C"
    metrics = benchmarks.score_mmbench(single, write_jsonl(tmp_path / "r.jsonl", rounds))
    assert metrics["accuracy"] == 0 and metrics["vanilla_accuracy"] == 100 and metrics["rounds"] == "all"

    with pytest.raises(benchmarks.DataError, match="question 99 is not in"):
        benchmarks.score_mmbench(single, write_jsonl(tmp_path / "u.jsonl", [{"question_id": 99, "text": "A"}]))
    test_split = write_tsv(tmp_path / "test.tsv", [mmbench_row(5, "Q?", ["cat", "dog"], "")])
    with pytest.raises(benchmarks.DataError, match="a test split"):
        benchmarks.score_mmbench(test_split, write_jsonl(tmp_path / "t.jsonl", []))


# ----------------------------------------------------------------------------------------------------------------------
# MMBench: the server's .xlsx


def read_xlsx(path):
    """Checks the package's parts point at each other, then returns the sheet's rows as {column letter: (type,
    text)}."""
    main = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        types = ET.fromstring(z.read("[Content_Types].xml"))
        assert {o.get("PartName").lstrip("/") for o in types if o.get("PartName")} <= names
        for rels, base in (("_rels/.rels", ""), ("xl/_rels/workbook.xml.rels", "xl/")):
            assert {base + r.get("Target") for r in ET.fromstring(z.read(rels))} <= names
        sheet = ET.fromstring(z.read("xl/worksheets/sheet1.xml"))
    rows = []
    for row in sheet.iter(f"{main}row"):
        cells = {}
        for c in row:
            text = c.find(f"{main}is/{main}t") if c.get("t") == "inlineStr" else c.find(f"{main}v")
            cells["".join(ch for ch in c.get("r") if ch.isalpha())] = (c.get("t"), text.text)
        rows.append(cells)
    return rows


def test_mmbench_submission_is_llavas_xlsx(tmp_path, capsys):
    tsv = write_tsv(tmp_path / "test.tsv", [
        mmbench_row(0, "What is <this> & that?", ["x", "y", "z", "w"], "", hint="a hint"),
        mmbench_row(1, "两个选项？", ["是", "否"], ""),
        mmbench_row(1000001, "两个选项？", ["否", "是"], "")])
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 0, "round_id": 0, "text": " B, y"},
                                                 {"question_id": 1, "round_id": 0, "text": "A"}])
    metrics = evaluate.main(["score", "mmbench_submit", "--questions", tsv, "--answers", answers])
    path = str(tmp_path / "a.submission.xlsx")
    assert metrics == {"submission": path, "rows": 3, "missing": 1} and "1 of 3 rows have no answer" in \
        capsys.readouterr().err
    rows = read_xlsx(path)
    header = ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]  # hint, image, ... dropped
    assert [rows[0][c][1] for c in "ABCDEFGHI"] == header
    assert rows[1] == {"A": ("n", "0"), "B": ("inlineStr", "What is <this> & that?"), "C": ("inlineStr", "x"),
                       "D": ("inlineStr", "y"), "E": ("inlineStr", "z"), "F": ("inlineStr", "w"),
                       "G": ("inlineStr", " B, y"), "I": ("inlineStr", "dev")}  # no answer key: no cell
    assert rows[2]["B"][1] == "两个选项？" and "E" not in rows[2] and "F" not in rows[2] and rows[2]["G"][1] == "A"
    assert "G" not in rows[3]  # unanswered: an empty prediction, as pandas writes None
    with zipfile.ZipFile(path) as z:
        assert '<t xml:space="preserve"> B, y</t>' in z.read("xl/worksheets/sheet1.xml").decode()
    try:
        import openpyxl
    except ImportError:  # not a dependency; where it is installed, it reads the file as pandas.read_excel would
        return
    sheet = openpyxl.load_workbook(path).active
    assert [c.value for c in sheet[1]] == header and [c.value for c in sheet[2]][:2] == [0, "What is <this> & that?"]


# ----------------------------------------------------------------------------------------------------------------------
# run on an MMBench TSV and on TextVQA's OCR-token questions, end to end with a tiny model


def test_run_answers_an_mmbench_tsv_in_llavas_schema(model_dir, tmp_path, monkeypatch):
    import generate
    tsv = write_tsv(tmp_path / "dev.tsv", [mmbench_row(7, "Which?", ["cat", "dog", "eel"], "A", hint="Look."),
                                           mmbench_row(8, "Color?", ["red", "blue"], "B", image=png_base64("blue"))])
    seen, answer = [], generate.answer
    monkeypatch.setattr(generate, "answer", lambda model, fmt, conversations, pixel_values, **kw: (
        seen.extend(c[0]["content"] for c in conversations) or answer(model, fmt, conversations, pixel_values, **kw)))
    argv = ["run", "--model", model_dir, "--questions", tsv, "--answers", str(tmp_path / "a.jsonl"), "--all-rounds",
            "--suffix", "\\nAnswer with the option's letter from the given choices directly.", "--max-new-tokens", "3",
            "--batch-size", "2"]
    evaluate.main(argv)
    lines = [json.loads(line) for line in open(tmp_path / "a.jsonl")]
    assert [(a["question_id"], a["round_id"]) for a in lines] == [(7, 0), (7, 1), (7, 2), (8, 0), (8, 1)]
    assert lines[1]["prompt"] == "Look.\nWhich?\nA. dog\nB. eel\nC. cat" and lines[1]["option_char"] == ["B", "C", "A"]
    assert lines[1]["options"] == ["dog", "eel", "cat"] and set(lines[0]) >= {"text", "answer_id", "model_id"}
    assert seen[1] == "<image>\n" + lines[1]["prompt"] + EN
    evaluate.main(argv)  # everything answered: nothing asked again
    assert len(seen) == 5 and len(open(tmp_path / "a.jsonl").readlines()) == 5
    assert benchmarks.score_mmbench(tsv, str(tmp_path / "a.jsonl"))["rounds"] == "all"


def test_textvqa_ocr_prompts_pass_through_and_resume_per_question(model_dir, tmp_path, crash_on_second_answer):
    """llava_textvqa_val_v051_ocr.jsonl: question_id is the image id, shared by the (up to two) questions on an image;
    the text already holds the OCR tokens and the suffix. run passes it on untouched; a resumed run must not take the
    second question of an image for answered; the scorer finds each by (image id, question)."""
    for name in ("img1", "img2"):
        Image.new("RGB", (24, 16), "white").save(tmp_path / f"{name}.jpg")
    rows = [("img1", "What brand is it?", "NIKE, air"), ("img1", "what year?", "1999, nike"),
            ("img2", "What does the sign say?", "STOP")]
    questions = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": i, "image": f"{i}.jpg", "text": f"{q}\nReference OCR token: {ocr}{SHORT}",
         "category": "default"} for i, q, ocr in rows])
    loaded = evaluate.load_questions(questions, "")
    assert [q[2] for q in loaded] == [q[3] for q in loaded] == [json.loads(line)["text"] for line in open(questions)]

    restore_answer = crash_on_second_answer()
    argv = ["run", "--model", model_dir, "--questions", questions, "--image-folder", str(tmp_path), "--answers",
            str(tmp_path / "a.jsonl"), "--batch-size", "1", "--max-new-tokens", "2"]
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(argv)
    restore_answer()
    evaluate.main(argv)
    lines = [json.loads(line) for line in open(tmp_path / "a.jsonl")]
    assert [(a["question_id"], a["prompt"]) for a in lines] == [(q[0], q[3]) for q in loaded]
    truth = {"data": [{"image_id": i, "question": q, "answers": [lines[n]["text"]] * 10} for n, (i, q, _) in
                      enumerate(rows)]}
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(truth))
    metrics = benchmarks.score_vqa(str(tmp_path / "a.jsonl"), str(tmp_path / "TextVQA_0.5.1_val.json"))
    assert metrics == {"accuracy": 100.0, "n": 3, "missing": 0}


def test_run_chunks_as_llava_splits_them(tmp_path):
    questions = list(range(10))
    assert [evaluate.chunk(questions, 3, k) for k in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert evaluate.chunk(questions[:5], 4, 3) == []  # LLaVA's get_chunk would fail here: 3 chunks of 2
    assert evaluate.load_questions(write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "text": "Q"}]),
                                   "\\nA\\nB") == [(1, None, "Q\nA\nB", "Q\nA\nB", {})]


# ----------------------------------------------------------------------------------------------------------------------
# SEED-Bench


def test_seed_exact_letter_match_image_and_video_accuracy(tmp_path, capsys):
    seed = {"question_type": {"Scene Understanding": 1, "Instance Identity": 2, "Action Recognition": 10},
            "questions": [
                {"question_id": "101669", "data_type": "image", "question_type_id": 1, "answer": "A",
                 "data_id": "1454426_2591111986.jpg", "question": "How many towels?", "choice_a": "One"},
                {"question_id": "8", "data_type": "image", "question_type_id": 1, "answer": "B"},
                {"question_id": "9", "data_type": "image", "question_type_id": 2, "answer": "C"},
                {"question_id": "10", "data_type": "image", "question_type_id": 2, "answer": "D"},
                {"question_id": "v1", "data_type": "video", "question_type_id": 10, "answer": "A"}]}
    (tmp_path / "SEED-Bench.json").write_text(json.dumps(seed))
    # llava-seed-bench.jsonl's ids are ints where SEED-Bench.json's are strings
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 101669, "text": "A"}, {"question_id": 8, "text": "B."},
                                                 {"question_id": 9, "text": "C"}, {"question_id": "v1", "text": "A"}])
    metrics = evaluate.main(["score", "seed", "--annotations", str(tmp_path / "SEED-Bench.json"), "--answers", answers])
    assert (metrics["image_accuracy"], metrics["video_accuracy"], metrics["accuracy"]) == (50, 100, 60)
    assert metrics["types"] == {"Scene Understanding": 50, "Instance Identity": 50, "Action Recognition": 100}
    assert (metrics["image"], metrics["video"], metrics["missing"]) == (4, 1, 1) and "1 of 5" in capsys.readouterr().err
    line = {"question_id": 101669, "image": "SEED-Bench-image/1454426_2591111986.jpg",
            "text": "How many towels are in the image?\nA. One\nB. Two\nC. Three\nD. Four" + EN}
    assert evaluate.load_questions(write_jsonl(tmp_path / "q.jsonl", [line]), "")[0][2] == line["text"]


# ----------------------------------------------------------------------------------------------------------------------
# MM-Vet


class Grader(http.server.BaseHTTPRequestHandler):
    """A chat-completions endpoint that replies from a script: (request body -> reply text)."""
    reply, requests = None, []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Grader.requests.append(body)
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": Grader.reply(body)}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


MMVET = {"v1_0": {"imagename": "v1_0.png", "question": "What is x in the equation?", "answer": "-1<AND>-5",
                  "capability": ["ocr", "math"]},
         "v1_1": {"imagename": "v1_1.png", "question": "Which animal is this?", "answer": "cat<OR>kitten",
                  "capability": ["rec"]},
         "v1_2": {"imagename": "v1_2.png", "question": "What is written?", "answer": "STOP",
                  "capability": ["ocr", "rec"]},
         "v1_3": {"imagename": "v1_3.png", "question": "Explain the joke.", "answer": "It is a pun.",
                  "capability": ["rec", "know", "gen"]}}


def test_mmvet_grader_prompt_retries_resume_and_scores(tmp_path, monkeypatch, capsys):
    server = http.server.HTTPServer(("127.0.0.1", 0), Grader)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Grader.requests.clear()

    def first_run(body):
        row = body["messages"][0]["content"][len(judge.MMVET_PROMPT):]  # the row to complete, after the few shots
        if "x = -1" in row:
            return "0.5"
        if "a cat" in row:  # unreadable twice, then a score
            return "1.0 because" if len(Grader.requests) == 4 else "Correct"
        return "maybe"  # never a score: 0.0 after five retries

    Grader.reply = staticmethod(first_run)
    (tmp_path / "mm-vet.json").write_text(json.dumps(MMVET))
    answers = write_jsonl(tmp_path / "mmvet.jsonl", [{"question_id": 0, "prompt": "", "text": "x = -1"},
                                                     {"question_id": 1, "prompt": "", "text": "a cat"},
                                                     {"question_id": 2, "prompt": "", "text": "GO"}])  # 3: unanswered
    monkeypatch.setenv("GRADER_KEY", "sk-mmvet")
    argv = ["score", "mmvet", "--answers", answers, "--mmvet-json", str(tmp_path / "mm-vet.json"), "--judge-endpoint",
            f"http://127.0.0.1:{server.server_port}/v1", "--judge-key-env", "GRADER_KEY", "--judge-model", "grader-1"]
    metrics = evaluate.main(argv)
    first = Grader.requests[0]
    assert first["model"] == "grader-1" and first["max_tokens"] == 3 and first["temperature"] == 0.0
    assert first["messages"] == [{"role": "user", "content": judge.MMVET_PROMPT +
                                  "\nWhat is x in the equation? | -1 <AND> -5 | x = -1 | "}]
    assert [r["temperature"] for r in Grader.requests[1:4]] == [0.0, 0.0, 0.5]  # v1_1: asked, retried, retried
    assert Grader.requests[2]["messages"][0]["content"].endswith(" | a cat | \nPredict the correctness of the answer "
                                                                 "(digit): ")
    assert [r["temperature"] for r in Grader.requests[4:]] == [0.0, 0.0, 0.5, 1.0, 1.5, 2.0]  # v1_2: 1 + 5 asks
    grades = json.loads((tmp_path / "mmvet.mmvet-grades.json").read_text())
    assert grades == {"v1_0": {"model": ["grader-1"], "content": ["0.5"], "score": [0.5]},
                      "v1_1": {"model": ["grader-1"], "content": ["1.0"], "score": [1.0]},
                      "v1_2": {"model": ["grader-1"], "content": ["maybe"], "score": [0.0]}}
    # total 100 * 1.5 / 4; ocr: v1_0, v1_2; rec: v1_1, v1_2, v1_3 (unanswered: 0); math: v1_0
    assert (metrics["total"], metrics["std"], metrics["runs"], metrics["missing"]) == (37.5, 0.0, [37.5], 1)
    assert metrics["capabilities"] == {"rec": 33.3, "ocr": 25.0, "math": 50.0, "know": 0.0, "gen": 0.0}
    assert metrics["combinations"] == {"math_ocr": 50.0, "rec": 100.0, "ocr_rec": 0.0, "gen_know_rec": 0.0}
    assert "1 of 4 questions have no answer" in capsys.readouterr().err

    count = len(Grader.requests)
    assert evaluate.main(argv) == metrics and len(Grader.requests) == count  # all graded: the API is not asked
    Grader.reply = staticmethod(lambda body: "1.0")
    metrics = evaluate.main(argv + ["--runs", "2"])  # a second run: only its grades are asked for
    assert len(Grader.requests) == count + 3
    assert metrics["runs"] == [37.5, 75.0] and metrics["total"] == 56.2 and metrics["std"] == 18.8
    server.shutdown()
    monkeypatch.delenv("GRADER_KEY")
    with pytest.raises(SystemExit):
        evaluate.main(argv + ["--runs", "3"])
    assert "error: --judge-key-env GRADER_KEY: the environment variable is not set" in capsys.readouterr().err
    assert not any("sk-mmvet" in open(os.path.join(d, f)).read() for d, _, fs in os.walk(tmp_path) for f in fs)


def test_mmvet_aggregation_is_the_officials():
    grades = {"v1_0": {"score": [0.0, 0.1, 0.2]}, "v1_1": {"score": [1.0, 1.0, 0.9]},
              "v1_2": {"score": [0.5, 0.4, 0.4]}, "v1_3": {"score": [0.3, 0.3, 0.25]}}
    metrics = benchmarks.mmvet_scores(MMVET, grades, 3)
    # per run: 100 * (0 + 1 + .5 + .3) / 4 = 45, 45, 43.75 -> mean 44.58; numpy's std 0.589
    assert metrics["runs"] == [45.0, 45.0, 43.8] and metrics["total"] == 44.6 and metrics["std"] == 0.6
    assert metrics["capabilities"]["ocr"] == round(100 * (0.5 + 0.5 + 0.6) / 2 / 3, 1)
    assert metrics["combinations"]["gen_know_rec"] == 28.3  # 100 * (0.3 + 0.3 + 0.25) / 3
    assert benchmarks.mmvet_scores(MMVET, grades, 1)["runs"] == [45.0]
    with pytest.raises(benchmarks.DataError, match="v1_0 has 3 grades, fewer than the 4 runs"):
        benchmarks.mmvet_scores(MMVET, grades, 4)
    assert [judge.mmvet_score(t) for t in ["0.4", "1.0 ", "0.7\n", "1.5", "-0.1", "Score: 1", "nan", ""]] == \
        [0.4, 1.0, 0.7, None, None, None, None, None]


MMVET_REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "llava_eval", "mm-vet")


def llava_cap_score(runs):
    """LLaVA-1.5-13B's row of MM-Vet's cap-score CSV, as the official export_result wrote it: {column: text}."""
    with open(f"{MMVET_REF}/results/llava-v1.5-13b_gpt-4-cap-score-{runs}runs.csv", newline="") as f:
        return next(row for row in csv.DictReader(f) if row[""] == "llava-v1.5-13b")


def test_mmvet_submission_of_llava_1_5_13b_is_llavas_results_file(tmp_path):
    out = tmp_path / "llava-v1.5-13b.json"
    metrics = evaluate.main(["score", "mmvet_submit", "--answers", f"{MMVET_REF}/answers/llava-v1.5-13b.jsonl",
                             "--submission", str(out), "--out", str(tmp_path / "m.json")])
    assert metrics["answers"] == 218
    with open(f"{MMVET_REF}/results/llava-v1.5-13b.json", "rb") as f:
        assert out.read_bytes() == f.read()  # byte for byte: indent 2, ASCII escapes, no final newline


@pytest.mark.parametrize("runs,total,std,totals", [(1, 36.1, 0.0, [36.1]), (3, 36.3, 0.2, [36.1, 36.5, 36.3])])
def test_mmvet_of_llava_1_5_13b_from_its_grade_files(runs, total, std, totals, tmp_path, monkeypatch):
    # The grade file holds every grade, so nothing is asked; mm-vet.json (the key, with each sample's capabilities) is
    # not public in LLaVA's repository, so a stand-in with the 218 sample ids and no capabilities takes its place:
    # the total, its spread and the run totals depend on the ids alone, the per-capability columns cannot be checked.
    def no_judge(*args, **kwargs):
        raise AssertionError("the judge was asked although the grade file holds every grade")

    monkeypatch.setattr(judge, "chat_completion", no_judge)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    grades = tmp_path / "grades.json"
    with open(f"{MMVET_REF}/results/llava-v1.5-13b_gpt-4-grade-{runs}runs.json", "rb") as f:
        released = f.read()
    (tmp_path / "mm-vet.json").write_text(json.dumps({sample: {"question": "", "capability": []}
                                                      for sample in json.loads(released)}))
    grades.write_bytes(released)
    metrics = evaluate.main(["score", "mmvet", "--answers", f"{MMVET_REF}/answers/llava-v1.5-13b.jsonl",
                             "--mmvet-json", str(tmp_path / "mm-vet.json"), "--grades", str(grades),
                             "--runs", str(runs), "--out", str(tmp_path / "m.json")])
    assert (metrics["total"], metrics["std"], metrics["runs"], metrics["missing"]) == (total, std, totals, 0)
    row = llava_cap_score(runs)  # LLaVA's CSV says the same
    assert (float(row["total"]), float(row["std"]), json.loads(row["runs"])) == (total, std, totals)
    assert grades.read_bytes() == released  # read, not rewritten


# ----------------------------------------------------------------------------------------------------------------------
# Submission files: VQAv2 test-dev, VizWiz, MM-Vet


def test_vqav2_submission_merges_chunks_and_fills_test2015(tmp_path, capsys):
    test = [{"question_id": i, "image": f"COCO_test2015_{i:012d}.jpg", "text": "Q" + SHORT, "category": "default"}
            for i in (262144000, 262144001, 262144002, 262144005, 262144006)]
    full = write_jsonl(tmp_path / "llava_vqav2_mscoco_test2015.jsonl", test)
    dev = write_jsonl(tmp_path / "llava_vqav2_mscoco_test-dev2015.jsonl", [test[0], test[1], test[3]])
    chunk0 = write_jsonl(tmp_path / "2_0.jsonl", [{"question_id": 262144000, "text": "Two dogs."},
                                                  {"question_id": 262144001, "text": "no"}])
    chunk1 = write_jsonl(tmp_path / "2_1.jsonl", [{"question_id": 262144001, "text": "Yes!"}])  # a later line wins
    metrics = evaluate.main(["score", "vqav2_submit", "--questions", dev, "--answers", chunk0, chunk1,
                             "--test-questions", full, "--submission", str(tmp_path / "up.json")])
    assert json.loads((tmp_path / "up.json").read_text()) == [
        {"question_id": 262144000, "answer": "2 dogs"}, {"question_id": 262144001, "answer": "yes"},
        {"question_id": 262144002, "answer": ""}, {"question_id": 262144005, "answer": ""},  # test-dev, unanswered
        {"question_id": 262144006, "answer": ""}]
    assert (metrics["rows"], metrics["test_dev"], metrics["answered"], metrics["missing"]) == (5, 3, 2, 1)
    assert "1 of 3 questions have no answer" in capsys.readouterr().err
    assert os.path.exists(tmp_path / "2_0.vqav2_submit-scores.json")  # the summary goes next to the first chunk
    with pytest.raises(SystemExit):
        evaluate.main(["score", "vqav2_submit", "--questions", dev, "--answers",
                       write_jsonl(tmp_path / "x.jsonl", [{"question_id": 262144002, "text": "a"}]),
                       "--test-questions", full])
    assert "1 answers to questions not in the question file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["score", "vqav2_submit", "--questions", full, "--answers", chunk0, "--test-questions", dev])
    assert "2 questions are not in" in capsys.readouterr().err


def test_vizwiz_and_mmvet_submissions(tmp_path, capsys):
    suffix = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT
    questions = write_jsonl(tmp_path / "llava_test.jsonl", [
        {"question_id": i, "image": f"VizWiz_test_{i:08d}.jpg", "text": "What is this?" + suffix, "category": "default"}
        for i in range(3)])
    answers = write_jsonl(tmp_path / "vizwiz.jsonl", [{"question_id": 0, "text": "Unanswerable"},
                                                      {"question_id": 2, "text": "A can of soup."}])
    metrics = evaluate.main(["score", "vizwiz_submit", "--questions", questions, "--answers", answers])
    assert (tmp_path / "vizwiz.submission.json").read_text() == (
        '[{"image": "VizWiz_test_00000000.jpg", "answer": "unanswerable"}, {"image": "VizWiz_test_00000001.jpg", '
        '"answer": ""}, {"image": "VizWiz_test_00000002.jpg", "answer": "can of soup"}]')
    assert metrics["missing"] == 1 and "1 of 3" in capsys.readouterr().err
    answers = write_jsonl(tmp_path / "mmvet.jsonl", [{"question_id": 0, "text": "x = 3"}, {"question_id": 7,
                                                                                           "text": "über"}])
    evaluate.main(["score", "mmvet_submit", "--answers", answers])
    assert (tmp_path / "mmvet.submission.json").read_text() == '{\n  "v1_0": "x = 3",\n  "v1_7": "\\u00fcber"\n}'
