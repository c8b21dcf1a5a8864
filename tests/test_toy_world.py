"""The README's main command, shortened (--quick): the toy world end to end (world, backbones, both stages,
evaluation, generation). Besides checking that every step runs and writes what it should, it holds the short run to a
bar it reaches only by looking at the pictures: counting the shapes, which the same model shown a blank picture can't
do. (Colour and shape need a longer run; the README has the full run's numbers.)"""

import json

from tools import toy_world


def test_toy_world_runs_end_to_end_and_learns_to_count(tmp_path, capsys):
    rows = toy_world.main(["--quick", "--out", str(tmp_path), "--test-images", "30"])
    out, err = capsys.readouterr()
    assert "world: CLIP (contrastive)" in err and "world: LLM (text only)" in err  # progress while backbones train
    assert set(rows) == {"finished model", "blind (blank picture)", "after stage 1 only"}
    assert all(set(scores) == set(toy_world.CHANCE) for scores in rows.values())
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    for stage in ("pretrain", "finetune"):
        assert (tmp_path / stage / "model.safetensors").exists()
    with open(tmp_path / "loss.png", "rb") as f:  # both stages' curves in one chart, and the run says where
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"loss curves of both stages: {tmp_path}/loss.png" in out
    for backbone in ("vision", "llm"):  # every special token inside the vocabulary (CLIP's defaults are OpenAI's)
        config = json.loads((tmp_path / "world" / backbone / "config.json").read_text())
        text = config.get("text_config", config)
        ids = [v for k, v in text.items() if k.endswith("_token_id") and isinstance(v, int)]
        assert ids and all(0 <= i < text["vocab_size"] for i in ids), (backbone, text)
    for answers in tmp_path.glob("answers-*.jsonl"):
        lines = [json.loads(line) for line in answers.read_text().splitlines()]
        assert len(lines) == 180 and all(set(a) >= {"question_id", "prompt", "text", "answer_id"} for a in lines)
    assert "held-out accuracy" in out and "$ python generate.py" in out
    finished, blind = rows["finished model"]["count"], rows["blind (blank picture)"]["count"]
    assert finished >= 80 and finished >= blind + 30, rows


def test_the_qformer_world_files_and_presets(tmp_path):
    """What --projector qformer adds to the world, without training anything: the Q-Former's BERT tokenizer reads
    every question and caption prompt of the world without [UNK] (each is a word it knows), conversations_split.json
    holds each conversation's turns one per sample, and the toy-qformer presets parse with the qformer projector."""
    import random

    import finetune
    import pretrain
    import train
    from transformers import AutoTokenizer

    captions, conversations = toy_world.build_data(str(tmp_path), 20, 2, random.Random(0))
    toy_world.write_qformer_data(str(tmp_path), captions, conversations)
    bert = AutoTokenizer.from_pretrained(tmp_path / "qformer_tokenizer")
    tests = [json.loads(line)["text"] for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    said = [t["value"] for c in captions + conversations for t in c["conversations"] if t["from"] == "human"]
    for text in said + tests:
        assert bert.unk_token_id not in bert(text.replace("<image>", "")).input_ids, text
    split = json.loads((tmp_path / "conversations_split.json").read_text())
    assert len(split) == sum(len(c["conversations"]) // 2 for c in conversations)
    by_id = {c["id"]: c for c in conversations}
    for sample in split:
        source, k = sample["id"].rsplit("-", 1)
        human, gpt = by_id[source]["conversations"][2 * int(k):2 * int(k) + 2]
        assert sample["conversations"][1]["value"] == gpt["value"]
        assert sample["conversations"][0]["value"] == (("<image>\n" if "image" in by_id[source] else "") +
                                                      human["value"].replace("<image>", "").strip())
    for module, defaults in ((pretrain, pretrain.STAGE_1), (finetune, finetune.STAGE_2)):
        cfg = train.parse_config(["--preset", "toy-qformer"], defaults, module.PRESETS, "")
        assert cfg.projector_type == "qformer" and cfg.qformer_tokenizer.endswith("world/qformer_tokenizer")
        assert len(bert) <= cfg.qformer["vocab_size"]
