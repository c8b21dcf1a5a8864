"""The README's main command, shortened (--quick): the toy world end to end (world, backbones, both stages,
evaluation, generation). Besides checking that every step runs and writes what it should, it holds the short run to a
bar it reaches only by looking at the pictures: counting the shapes, which the same model shown a blank picture can't
do. (Colour and shape need a longer run; the README has the full run's numbers.)"""

import json
import os

from tools import toy_world


def test_toy_world_runs_end_to_end_and_learns_to_count(tmp_path, capsys):
    rows = toy_world.main(["--quick", "--out", str(tmp_path), "--test-images", "30"])
    out = capsys.readouterr().out
    assert set(rows) == {"finished model", "blind (blank picture)", "after stage 1 only"}
    assert all(set(scores) == set(toy_world.CHANCE) for scores in rows.values())
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    for stage in ("pretrain", "finetune"):
        assert os.path.getsize(tmp_path / stage / "loss.png") > 0
        assert (tmp_path / stage / "model.safetensors").exists()
    for answers in tmp_path.glob("answers-*.jsonl"):
        lines = [json.loads(line) for line in answers.read_text().splitlines()]
        assert len(lines) == 180 and all(set(a) >= {"question_id", "prompt", "text", "answer_id"} for a in lines)
    assert "held-out accuracy" in out and "$ python generate.py" in out
    finished, blind = rows["finished model"]["count"], rows["blind (blank picture)"]["count"]
    assert finished >= 80 and finished >= blind + 30, rows
