"""tools/plot_loss.py on hand-made metrics rows (no training): the PNG, its y range, and the reader's errors."""

import json
import math
import random

import pytest
from PIL import Image

from data import UserError
from tools import plot_loss as pl


def curve(n=300, seed=0, **extra):
    """A loss falling from ~3 to ~1 with noise, one row per step, as train.py writes them."""
    rng = random.Random(seed)
    return [{"step": s, "loss": 1.0 + 2.0 * math.exp(-s / 40) + rng.gauss(0, 0.05), **extra} for s in range(1, n + 1)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def near(pixel, color, tolerance=60):
    return sum(abs(a - b) for a, b in zip(pixel, color)) < tolerance


def test_the_chart_is_a_png_of_the_asked_size_with_both_runs_drawn(tmp_path):
    stage2 = curve(seed=1, samples=16, image_samples=16)
    for row in stage2[::25]:
        row.update(image_samples=0, loss=row["loss"] + 3)  # text-only batches, far above the rest
    path = pl.plot_loss([("stage 1", curve(40)), ("stage 2", stage2)], tmp_path / "loss.png", size=(800, 300))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = Image.open(path).convert("RGB")
    assert image.size == (800, 300)
    white = dict((color, count) for count, color in image.getcolors(800 * 300)).get((255, 255, 255), 0)
    assert white < 0.97 * 800 * 300  # not blank
    left, right = (image.crop(box).getcolors(400 * 300) for box in ((0, 0, 400, 300), (400, 0, 800, 300)))
    assert any(near(c, pl.COLORS[0]) for _, c in left) and any(near(c, pl.COLORS[1]) for _, c in right)  # the lines


def test_rows_without_the_optional_counts_and_a_single_row_run(tmp_path):
    mixed = curve(50)
    for row in mixed[::2]:
        row.update(samples=8, image_samples=3)  # only some rows say how many samples had an image
    pl.plot_loss([("old rows", curve(20)), ("mixed", mixed), ("one step", [{"step": 1, "loss": 2.5}])],
                 tmp_path / "loss.png", size=(900, 320))
    assert Image.open(tmp_path / "loss.png").size == (900, 320)
    assert pl.batch_kind({"step": 1, "loss": 1.0}) is None
    assert pl.batch_kind({"image_samples": 0}) == "text"
    assert pl.batch_kind({"samples": 8, "image_samples": 3}) == "mostly text"
    assert pl.batch_kind({"samples": 8, "image_samples": 4}) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("at", [0, 1, 150, 299])
def test_one_huge_spike_barely_moves_the_y_range(at, seed):
    losses = [r["loss"] for r in curve(seed=seed)]
    lo, hi = pl.y_range(losses)
    losses[at] = 1000.0
    spiked = pl.y_range(losses)
    # a little: next to the first step, the spike can tip that step's (true) loss into the range or out of it;
    # chosen from the extremes, the range would grow ~400 times
    assert abs(spiked[0] - lo) < 0.1 * (hi - lo) and abs(spiked[1] - hi) < 0.1 * (hi - lo), (lo, hi, spiked)
    # and the range still holds the curve: its fall from ~3 and nearly all of the noise around it
    inside = sum(lo <= v <= hi for v in losses)
    assert hi > 2.8 and lo < 1.0 and inside >= 0.97 * len(losses), (lo, hi, inside)


def test_text_only_steps_neither_set_the_scale_nor_enter_the_average():
    rows = curve(samples=16, image_samples=16)
    with_text = [dict(r) for r in rows]
    for row in with_text[5::20]:
        row.update(image_samples=0, loss=8.0)
    plain, panel = pl.prepare([r for r in with_text if r["image_samples"]]), pl.prepare(with_text)
    assert panel["y_range"] == plain["y_range"] and panel["y_range"][1] < 4
    assert len(panel["kept"]) == len(plain["kept"]) and pl.symbols_used(panel) == {"dot", "edge"}


def test_the_average_is_debiased_and_ticks_are_round():
    assert pl.ema([5.0, 5.0, 5.0], span=10) == pytest.approx([5.0, 5.0, 5.0])  # no pull towards zero at the start
    ticks, decimals = pl.nice_ticks(0.337, 1.08)
    assert ticks == pytest.approx([0.4, 0.6, 0.8, 1.0]) and decimals == 1
    ticks, decimals = pl.nice_ticks(0, 396, min_step=1)
    assert ticks == [0, 100, 200, 300] and decimals == 0
    assert pl.nice_ticks(0, 2, min_step=1)[0] == [0, 1, 2]  # steps are whole numbers


def test_the_reader_names_the_file_it_cannot_read(tmp_path, capsys):
    with pytest.raises(UserError, match="nowhere: no such file"):
        pl.read_metrics(str(tmp_path / "nowhere"))
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match="run/metrics.jsonl: no such file"):  # a run that has not started
        pl.read_metrics(str(tmp_path / "run"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="empty.jsonl: no rows"):
        pl.read_metrics(str(empty))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss"\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(UserError, match="broken.jsonl, line 2: not JSON"):
        pl.read_metrics(str(broken))
    no_loss = write_jsonl(tmp_path / "no_loss.jsonl", [{"step": 1, "lr": 0.1}])
    with pytest.raises(UserError, match="no_loss.jsonl, line 1: .*\"loss\""):
        pl.read_metrics(str(no_loss))
    for argv in ([str(empty)], [str(broken)], [str(tmp_path / "run")], [str(tmp_path / "x.jsonl"), "--smooth", "0"],
                 [str(no_loss), "--width", "-5"]):  # the command line says the same, no traceback
        with pytest.raises(SystemExit) as exit:
            pl.main(argv + ["--out", str(tmp_path / "x.png")])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and "Traceback" not in err and "error: " in err, err
    assert not (tmp_path / "x.png").exists()


def test_a_cut_last_line_is_passed_over_and_said(tmp_path, capsys):
    """A run killed mid-write leaves a cut line, with or without its newline (the kill came after a partial flush,
    or the next write added one), or bytes that are not even UTF-8: only the last line may be such."""
    for tail in ('{"step": 6, "lo', '{"step": 6, "lo\n', '{"step": 6, "loss": 1.\xff\x00\n\n'):
        path = write_jsonl(tmp_path / "metrics.jsonl", curve(5))
        with open(path, "ab") as f:
            f.write(tail.encode("latin-1"))
        assert [r["step"] for r in pl.read_metrics(str(path))] == [1, 2, 3, 4, 5]
        assert "metrics.jsonl, line 6: passed over" in capsys.readouterr().err


def test_a_resumed_runs_rows_replace_those_it_redid(tmp_path, capsys):
    """Steps 1-8 written, the run killed and resumed from its step-5 checkpoint: steps 6-8 are redone. The chart shows
    each step once, the resumed run's rows from step 6 on."""
    first, resumed = curve(8), [dict(r, loss=r["loss"] + 10) for r in curve(10)[5:]]
    path = write_jsonl(tmp_path / "metrics.jsonl", first + resumed)
    rows = pl.read_metrics(str(path))
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert rows[:5] == first[:5] and rows[5:] == resumed
    assert "3 rows replaced by those of a resumed run" in capsys.readouterr().err
    pl.main([str(path), "--out", str(tmp_path / "loss.png")])  # and it draws


def test_steps_with_a_nan_loss_are_said_not_drawn(tmp_path, capsys):
    rows = curve(20)
    rows[7]["loss"] = float("nan")  # json.dumps writes NaN, as train.py would for a diverged step
    rows[9]["loss"] = float("inf")
    path = write_jsonl(tmp_path / "metrics.jsonl", rows)
    assert len(pl.read_metrics(str(path))) == 18
    assert "2 steps with a loss of NaN or inf (the first: step 8)" in capsys.readouterr().err
    pl.main([str(path), "--out", str(tmp_path / "loss.png")])


def test_a_run_directory_and_a_live_run_are_read(tmp_path):
    run = tmp_path / "finetune"
    run.mkdir()
    write_jsonl(run / "metrics.jsonl", curve(5))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # train.py is writing this step's row right now
    assert len(pl.read_metrics(str(run))) == 5 and pl.run_label(str(run / "metrics.jsonl")) == "finetune"
    pl.main([str(run), "--out", str(tmp_path / "loss.png"), "--width", "500", "--height", "260"])
    assert Image.open(tmp_path / "loss.png").size == (500, 260)
