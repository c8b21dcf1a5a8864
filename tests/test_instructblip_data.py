"""tools/instructblip_data.py: InstructBLIP's caption / VQA / VQG templates and the per-turn split of LLaVA
conversations, on tiny files written here; every output is read back by data.py (LazySupervisedDataset with the
tiny Llama tokenizer and real image files), so what is written is what trains."""

import json
import re

import pytest
from PIL import Image

import data
from tests.test_data import supervised_runs
from tools import instructblip_data as ib
from tools.instructblip_data import CAPTION_TEMPLATES, VQA_TEMPLATES, VQG_TEMPLATES


def run(capsys, *argv):
    """The command line: (exit status, stdout, stderr)."""
    try:
        ib.main([str(a) for a in argv])
        status = 0
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def replies_as_trained(path, folder, tok):
    """Each sample of the file through data.py: the decoded supervised text of its one reply, and its input ids."""
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    dataset = data.LazySupervisedDataset(str(path), str(folder), data.ChatFormat(tok, "vicuna_v1", 4), processor)
    items = [dataset[i] for i in range(len(dataset))]
    runs = [supervised_runs(it["input_ids"].tolist(), it["labels"].tolist()) for it in items]
    assert all(len(r) == 1 for r in runs)  # one reply per sample: the single-turn samples InstructBLIP trains on
    return [tok.decode(r[0]).lstrip() for r in runs], items


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    (folder / "coco").mkdir(parents=True)
    for name in ["coco/000000000001.jpg", "coco/000000000002.jpg", "a.png", "b.png"]:
        Image.new("RGB", (20, 12), (200, 30, 30)).save(folder / name)
    return folder


def test_the_papers_template_lists_all_format():
    assert (len(CAPTION_TEMPLATES), len(VQA_TEMPLATES), len(VQG_TEMPLATES)) == (13, 10, 6)
    for templates in (CAPTION_TEMPLATES, VQA_TEMPLATES, VQG_TEMPLATES):
        assert len(set(templates)) == len(templates)
    assert not any(re.search(r"[{}]", t) for t in CAPTION_TEMPLATES)
    for t in VQA_TEMPLATES + VQG_TEMPLATES:
        assert t.count("{}") == 1 and t.replace("{}", "").count("{") == t.replace("{}", "").count("}") == 0, t
        for text in ["What is it?", "how many dogs", "a {brace} and % sign."]:
            filled = ib.fill(t, text)
            assert text in filled and "{}" not in filled and "?." not in filled and ".." not in filled, filled
    # filled by hand: the question as written; the template's "." after it dropped only where it ends a sentence
    assert ib.fill(VQA_TEMPLATES[6], "What is it?") == \
        "Based on the image, respond to this question with a short answer: What is it? Answer:"
    assert ib.fill(VQA_TEMPLATES[6], "how many dogs") == \
        "Based on the image, respond to this question with a short answer: how many dogs. Answer:"
    assert ib.fill(VQA_TEMPLATES[8], "Is it red?") == 'What is the answer to the following question? "Is it red?"'
    assert ib.fill(VQG_TEMPLATES[0], "two") == "Given the image, generate a question whose answer is: two. Question:"


def test_caption_coco_and_json_lines_train(tmp_path, images, llama_tok, capsys):
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "000000000002.jpg"}],
        "annotations": [{"image_id": 1, "id": 5, "caption": "A cat  on a\nmat. "},
                        {"image_id": 2, "id": 6, "caption": "two red squares"},
                        {"image_id": 1, "id": 7, "caption": "A sleeping cat."}]}))
    out = tmp_path / "caps.json"
    status, stdout, err = run(capsys, "caption", "--captions", coco, "--image-prefix", "coco", "--out", out)
    assert status == 0, err
    assert "3 caption samples from 3 COCO captions of 2 images" in stdout
    samples = json.loads(out.read_text())
    assert [s["id"] for s in samples] == ["000000000001-0", "000000000002-0", "000000000001-1"]
    assert [s["image"] for s in samples] == ["coco/000000000001.jpg", "coco/000000000002.jpg",
                                             "coco/000000000001.jpg"]
    for s in samples:
        human = s["conversations"][0]["value"]
        assert human.startswith("<image>\n") and human[len("<image>\n"):] in CAPTION_TEMPLATES
    replies, items = replies_as_trained(out, images, llama_tok)
    assert replies == ["A cat on a mat.</s>", "two red squares</s>", "A sleeping cat.</s>"]
    assert all(it["pixel_values"].shape[0] == 1 for it in items)

    lines = write_lines(tmp_path / "caps.jsonl", [{"image": "a.png", "caption": "A red square."},
                                                  {"image": "a.png", "caption": "Red."},
                                                  {"id": "mine", "image": "b.png", "caption": "Another."}])
    status, stdout, err = run(capsys, "caption", "--captions", lines, "--out", out)
    assert status == 0 and "3 caption samples from 3 captions" in stdout, err
    assert [s["id"] for s in json.loads(out.read_text())] == ["a-0", "a-1", "mine"]
    assert replies_as_trained(out, images, llama_tok)[0] == ["A red square.</s>", "Red.</s>", "Another.</s>"]


def test_templates_are_drawn_by_seed_and_id(tmp_path, capsys):
    records = [{"image": f"img{i}.png", "caption": f"Caption {i}."} for i in range(60)]
    source = write_lines(tmp_path / "caps.jsonl", records)
    one, two, other = tmp_path / "one.json", tmp_path / "two.json", tmp_path / "other.json"
    for out, seed in [(one, 0), (two, 0), (other, 1)]:
        assert run(capsys, "caption", "--captions", source, "--seed", seed, "--out", out)[0] == 0
    assert one.read_bytes() == two.read_bytes()
    chosen = {s["id"]: s["conversations"][0]["value"] for s in json.loads(one.read_text())}
    assert len(set(chosen.values())) >= 8  # 60 draws from 13 cover most of them
    assert chosen != {s["id"]: s["conversations"][0]["value"] for s in json.loads(other.read_text())}
    # a sample's template depends on the seed and its id alone, not on the samples around it
    write_lines(source, records[::-1][:30])
    assert run(capsys, "caption", "--captions", source, "--out", two)[0] == 0
    assert all(chosen[s["id"]] == s["conversations"][0]["value"] for s in json.loads(two.read_text()))


def test_vqa_and_vqg_from_json_lines_and_vqav2(tmp_path, images, llama_tok, capsys):
    source = write_lines(tmp_path / "vqa.jsonl", [
        {"image": "a.png", "question": " What color is the square? ", "answer": ["red", "blue", "red", "blue"]},
        {"question_id": 17, "image": "b.png", "question": "how many squares", "answer": "one"},
        {"image": "a.png", "question": "Is it red?",
         "answers": [{"answer": "no"}, {"answer": "yes"}, {"answer": "yes"}]}])
    out = tmp_path / "vqa.json"
    status, stdout, err = run(capsys, "vqa", "--data", source, "--out", out)
    assert status == 0 and "3 VQA samples from 3 questions" in stdout, err
    samples = json.loads(out.read_text())
    assert [s["id"] for s in samples] == ["a-0", "17", "a-1"]
    questions = ["What color is the square?", "how many squares", "Is it red?"]
    for s, q in zip(samples, questions):
        instruction = s["conversations"][0]["value"][len("<image>\n"):]
        assert any(ib.fill(t, q) == instruction for t in VQA_TEMPLATES), instruction
    assert replies_as_trained(out, images, llama_tok)[0] == ["red</s>", "one</s>", "yes</s>"]  # a tie: the first

    status, stdout, err = run(capsys, "vqa", "--data", source, "--vqg", "--out", out)
    assert status == 0 and "3 question-generation samples" in stdout, err
    samples = json.loads(out.read_text())
    assert [s["id"] for s in samples] == ["a-0-vqg", "17-vqg", "a-1-vqg"]
    for s, a in zip(samples, ["red", "one", "yes"]):
        assert any(ib.fill(t, a) == s["conversations"][0]["value"][len("<image>\n"):] for t in VQG_TEMPLATES)
    assert replies_as_trained(out, images, llama_tok)[0] == [q + "</s>" for q in questions]

    # VQAv2's pair of files: joined on question_id, its multiple_choice_answer, its image names
    (tmp_path / "q.json").write_text(json.dumps({"data_subtype": "train2014", "questions": [
        {"question_id": 10, "image_id": 9, "question": "What is it?"},
        {"question_id": 11, "image_id": 9, "question": "Is it big?"}]}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [
        {"question_id": 11, "image_id": 9, "multiple_choice_answer": "no", "answers": [{"answer": "yes"}]},
        {"question_id": 10, "image_id": 9, "answers": [{"answer": "a cat"}, {"answer": "cat"}, {"answer": "cat"}]}]}))
    status, stdout, err = run(capsys, "vqa", "--questions", tmp_path / "q.json", "--annotations", tmp_path / "a.json",
                              "--image-prefix", "coco/train2014", "--out", out)
    assert status == 0 and "2 VQA samples from 2 VQAv2 questions" in stdout, err
    samples = json.loads(out.read_text())
    assert [(s["id"], s["image"], s["conversations"][1]["value"]) for s in samples] == [
        ("10", "coco/train2014/COCO_train2014_000000000009.jpg", "cat"),
        ("11", "coco/train2014/COCO_train2014_000000000009.jpg", "no")]
    status, _, err = run(capsys, "vqa", "--questions", tmp_path / "q.json", "--annotations", tmp_path / "a.json",
                         "--image-name", "{image_id:012d}.jpg", "--out", out)
    assert status == 0 and json.loads(out.read_text())[0]["image"] == "000000000009.jpg", err
    (tmp_path / "q.json").write_text(json.dumps({"questions": [{"question_id": 10, "image_id": 9, "question": "Q?"}]}))
    status, _, err = run(capsys, "vqa", "--questions", tmp_path / "q.json", "--annotations", tmp_path / "a.json",
                         "--out", out)
    assert status == 2 and "q.json: no 'data_subtype'" in err, err


def test_split_turns_gives_one_sample_per_round(tmp_path, images, llama_tok, capsys):
    source = tmp_path / "llava.json"
    source.write_text(json.dumps([
        {"id": "c1", "image": "a.png", "conversations": [
            {"from": "human", "value": "What shape is it?\n<image>"}, {"from": "gpt", "value": "A square."},
            {"from": "human", "value": "What color is it?"}, {"from": "gpt", "value": "It is red."},
            {"from": "human", "value": "Is there a circle?"}, {"from": "gpt", "value": "No."}]},
        {"id": 7, "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."},
                                    {"from": "human", "value": "Again."}, {"from": "gpt", "value": "Hi again."}]}]))
    out = tmp_path / "turns.json"
    status, stdout, err = run(capsys, "split-turns", "--data", source, "--out", out)
    assert status == 0 and "5 single-turn samples from 5 turns of 2 conversations" in stdout, err
    samples = json.loads(out.read_text())
    assert samples[:3] == [
        {"id": "c1-0", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat shape is it?"},
                                                           {"from": "gpt", "value": "A square."}]},
        {"id": "c1-1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat color is it?"},
                                                           {"from": "gpt", "value": "It is red."}]},
        {"id": "c1-2", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nIs there a circle?"},
                                                           {"from": "gpt", "value": "No."}]}]
    assert samples[3:] == [
        {"id": "7-0", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]},
        {"id": "7-1", "conversations": [{"from": "human", "value": "Again."}, {"from": "gpt", "value": "Hi again."}]}]
    replies, items = replies_as_trained(out, images, llama_tok)
    assert replies == ["A square.</s>", "It is red.</s>", "No.</s>", "Hi.</s>", "Hi again.</s>"]
    assert [it["pixel_values"] is None for it in items] == [False] * 3 + [True] * 2


@pytest.mark.parametrize("command,records,said", [
    ("caption", [{"image": "a.png", "caption": "Red."}, {"image": "b.png"}], "line 2: no 'caption' field"),
    ("caption", [{"image": "a.png", "caption": "Red."}, {"image": "b.png", "caption": "  "}], "line 2: 'caption' is "
     "empty"),
    ("vqa", [{"image": "a.png", "question": "Q?", "answer": "x"}, {"image": "a.png", "answer": "y"}],
     "line 2: no 'question' field"),
    ("vqa", [{"image": "a.png", "question": "Q?", "answer": []}], "line 1: 'answer' holds no non-empty answer"),
    ("vqa", [{"id": 1, "image": "a.png", "question": "Q?", "answer": "x"},
             {"id": "1", "image": "b.png", "question": "R?", "answer": "y"}], "id '1' is already the id of"),
    ("split-turns", [{"id": "x", "conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hi."}]},
                     {"id": "y", "conversations": [{"from": "human", "value": "Hi."}]}], "line 2 (id 'y')"),
])
def test_a_bad_record_is_named_or_skipped(tmp_path, capsys, command, records, said):
    source = write_lines(tmp_path / "in.jsonl", records)
    flag = "--captions" if command == "caption" else "--data"
    out = tmp_path / "out.json"
    status, _, err = run(capsys, command, flag, source, "--out", out)
    assert status == 2 and err.startswith("error: ") and said in err, err
    assert not out.exists()
    status, stdout, err = run(capsys, command, flag, source, "--out", out, "--skip-bad")
    if len(records) == 1:  # nothing left
        assert status == 2 and "no samples made" in err, err
    else:
        assert status == 0 and "1 bad records skipped" in stdout and said in stdout, err
        assert len(json.loads(out.read_text())) >= 1


def test_bad_files_and_flags_are_errors(tmp_path, capsys):
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                "annotations": [{"image_id": 1, "caption": "A."}, {"image_id": 3, "caption": "B."}]}))
    status, _, err = run(capsys, "caption", "--captions", coco, "--out", tmp_path / "o.json")
    assert status == 2 and "captions.json, annotations[1]: 'image_id' 3 is not in the file's images" in err, err
    coco.write_text(json.dumps({"info": {}}))
    status, _, err = run(capsys, "caption", "--captions", coco, "--out", tmp_path / "o.json")
    assert status == 2 and "without COCO's 'images' and 'annotations'" in err, err
    status, _, err = run(capsys, "vqa", "--questions", coco, "--out", tmp_path / "o.json")
    assert status == 2 and "--annotations" in err, err
    status, _, err = run(capsys, "vqa", "--out", tmp_path / "o.json")
    assert status == 2 and "give --data" in err, err
    status, _, err = run(capsys, "caption", "--captions", tmp_path / "missing.json", "--out", tmp_path / "o.json")
    assert status == 2 and "missing.json: no such data file" in err, err
    with pytest.raises(SystemExit):
        ib.main(["vqa", "--data", "x", "--image-name", "{image}.jpg", "--out", "o.json"])
    assert "not a format of {image_id} and {data_subtype}" in capsys.readouterr().err
