"""train.py under bad settings and faults: flags named, a resume that must compute what the run before did, the
non-finite stop's advice followed, checkpoints that cannot run code, metrics without repeats, one run per directory."""

import json
import os
import pickle

import pytest
import torch

import checkpoints
import finetune
import pretrain
import train
from test_train import flags, run


def main(world, out, capsys, **overrides):
    """train.main on these flags; returns (exit status, stderr). 0 when the run ends normally."""
    try:
        train.main(flags(world, out, "finetune", **overrides), finetune.STAGE_2, {}, "")
        status = 0
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize("setting,value", [("max_steps", -5), ("epochs", 0), ("global_batch_size", 0),
                                           ("micro_batch_size", -1), ("save_every", 0), ("keep_last", -1),
                                           ("lr", "nan"), ("lr", 0), ("warmup_ratio", 2), ("max_length", 0),
                                           ("template", "vicuna"), ("image_aspect_ratio", "square"),
                                           ("precision", "fp16"), ("projector_type", "mlp"), ("adam_beta2", 1)])
def test_a_bad_setting_is_named_by_its_flag_before_anything_runs(world, tmp_path, capsys, setting, value):
    status, err = main(world, tmp_path / "out", capsys, **{setting: value})
    assert status == 2 and f"--{setting.replace('_', '-')} {value}" in err.replace("'", ""), err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_bad_setting_in_code_or_a_preset_is_named_too():
    with pytest.raises(train.UserError, match="--max-steps"):
        train.TrainConfig(**{**finetune.STAGE_2, "max_steps": -1})
    with pytest.raises(train.UserError, match="--save-every 2.5: must be an int"):
        train.TrainConfig(**{**finetune.STAGE_2, "save_every": 2.5})
    with pytest.raises(train.UserError, match="unknown settings"):
        train.parse_config(["--preset", "x"], finetune.STAGE_2, {"x": {"learning_rate": 1}}, "")


def test_a_preset_whose_files_are_missing_says_how_to_make_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        train.main(["--preset", "toy"], pretrain.STAGE_1, pretrain.PRESETS, "")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--data-path runs/toy/world/captions.json" in err and "tools/toy_world.py" in err


def test_a_missing_local_backbone_is_named_not_taken_for_a_hub_id(world, tmp_path, capsys):
    status, err = main(world, tmp_path / "out", capsys, llm=str(tmp_path / "no" / "llm"))
    assert status == 2 and "--llm" in err and "no such file or directory" in err and "Repo id" not in err


def test_resume_refuses_what_would_change_the_computation_and_warns_on_the_rest(world, tmp_path, capsys):
    out = tmp_path / "out"
    run(world, out, max_steps=2, save_every=1)
    capsys.readouterr()
    for setting, value in [("template", "llava_v1"), ("image_aspect_ratio", "crop"), ("max_length", 200),
                           ("seed", 4), ("weight_decay", 0.1)]:
        status, err = main(world, out, capsys, resume=True, max_steps=2, **{setting: value})
        assert status == 2 and f"--{setting.replace('_', '-')} was" in err, (setting, err)
    status, err = main(world, out, capsys, resume=True, max_steps=2, lr=5e-4, micro_batch_size=4)
    assert status == 0 and "warning: resuming" in err and "--lr 0.0005" in err, err
    with open(world["root"] / "conversations.json") as f:  # the data file edited: the run goes on, with a warning
        data = json.load(f)
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data[1:]))
    out2 = tmp_path / "out2"
    run(world, out2, max_steps=2, data_path=str(edited))
    edited.write_text(json.dumps(data[2:]))
    status, err = main(world, out2, capsys, resume=True, max_steps=2, data_path=str(edited))
    assert status == 0 and "changed since" in err, err


def test_resume_without_a_checkpoint_is_an_error_not_a_fresh_start(world, tmp_path, capsys):
    status, err = main(world, tmp_path / "typo", capsys, resume=True)
    assert status == 2 and "holds no complete checkpoint" in err
    assert not os.path.exists(tmp_path / "typo" / "metrics.jsonl")


def test_the_checkpoint_saved_from_weights_that_give_a_non_finite_loss_is_set_aside(world, tmp_path, monkeypatch):
    """Checkpoints after steps 1 and 2; the weights after step 2 give NaN. The advice must name checkpoint 1, and
    --resume must then start from it: checkpoint 2 holds the weights that diverged. With keep_last 1, checkpoint 1
    must still be there."""
    real = train.forward_backward
    calls = []

    def nan_on_third_step(*args):
        calls.append(1)
        return (float("nan"), float("nan")) if len(calls) == 3 else real(*args)

    monkeypatch.setattr(train, "forward_backward", nan_on_third_step)
    out = tmp_path / "out"
    with pytest.raises(train.NonFiniteError) as e:
        run(world, out, max_steps=4, save_every=1, keep_last=1)
    assert "checkpoint-000001" in str(e.value).split("resume from")[1] and "checkpoint-000002.nonfinite" in str(e.value)
    assert [os.path.basename(c) for c in train.saved_checkpoints(out)] == ["checkpoint-000001"]
    monkeypatch.setattr(train, "forward_backward", real)
    run(world, out, max_steps=4, save_every=1, keep_last=1, resume=True, lr=5e-4)
    assert [os.path.basename(c) for c in train.saved_checkpoints(out)] == ["checkpoint-000004"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


class RunsCode:
    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_crafted_checkpoint_cannot_run_code_on_resume(world, tmp_path, capsys):
    out = tmp_path / "out"
    run(world, out, max_steps=1)
    metadata = out / "checkpoint-000001" / "train_state" / ".metadata"
    evil = RunsCode()
    evil.path = str(tmp_path / "pwned")
    with open(metadata, "rb") as f:
        real = pickle.load(f)
    real.storage_meta.modules = [evil]  # a real metadata object, carrying a call
    metadata.write_bytes(pickle.dumps(real))
    status, err = main(world, out, capsys, resume=True, max_steps=1)
    assert status == 2 and "would run code" in err and "posix.mkdir" in err
    assert not (tmp_path / "pwned").exists()


def test_a_crafted_value_in_the_optimizer_state_cannot_run_code(tmp_path):
    import io

    evil = RunsCode()
    evil.path = str(tmp_path / "pwned")
    buffer = io.BytesIO()
    torch.save({"lr": evil}, buffer)
    buffer.seek(0)
    with pytest.raises(checkpoints.UnsafeCheckpoint):
        checkpoints.SafeLoadPlanner().load_bytes(None, buffer)
    assert not (tmp_path / "pwned").exists()


def test_metrics_hold_each_step_once_after_a_resume_and_a_cut_line(world, tmp_path, monkeypatch):
    """Killed after step 3 was logged (the last checkpoint is step 2), with a half-written line: the resumed run
    writes steps 3.. again, so the file must hold 1, 2, 3, 4 once each."""
    write = train.MetricsLog.write

    def die_after_step_3(self, record):
        write(self, record)
        if record["step"] == 3:
            with open(self.path, "a") as f:
                f.write('{"step": 4, "lo')
            raise KeyboardInterrupt

    monkeypatch.setattr(train.MetricsLog, "write", die_after_step_3)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(world, out, max_steps=4, save_every=2)
    monkeypatch.setattr(train.MetricsLog, "write", write)
    run(world, out, max_steps=4, save_every=2, resume=True)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_two_runs_cannot_share_an_output_dir(world, tmp_path, capsys):
    lock = train.lock_output_dir(str(tmp_path / "out"))  # as a run in another process holds it
    try:
        status, err = main(world, tmp_path / "out", capsys)
        assert status == 2 and "in use by another run" in err and f"pid {os.getpid()}" in err
    finally:
        lock.close()
    assert main(world, tmp_path / "out", capsys)[0] == 0  # released


def test_a_bad_sample_read_by_a_loader_worker_is_one_clear_message(world, tmp_path, capsys):
    with open(world["root"] / "conversations.json") as f:
        data = json.load(f)
    first_with_image = next(i for i, d in enumerate(data) if "image" in d)
    data[first_with_image]["image"] = "missing.png"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    status, err = main(world, tmp_path / "out", capsys, data_path=str(tmp_path / "bad.json"), num_workers=1,
                       group_by_modality_length=False, max_steps=len(data) // 8 + 1)
    assert status == 2 and "missing.png" in err and "Traceback" not in err and "worker" not in err, err


def test_skipped_samples_are_counted_once_and_totalled(world, tmp_path, capsys):
    with open(world["root"] / "conversations.json") as f:
        data = json.load(f)
    with_image = [i for i, d in enumerate(data) if "image" in d]
    data[with_image[0]]["image"] = "missing.png"
    data[with_image[1]]["conversations"] = "not a list"
    (tmp_path / "bad.json").write_text(json.dumps(data + ["not a sample"]))
    steps = len(data) // 8 + 1
    status, err = main(world, tmp_path / "out", capsys, data_path=str(tmp_path / "bad.json"), skip_bad_samples=True,
                       group_by_modality_length=False, max_steps=2 * steps)
    assert status == 0, err
    assert "skipped bad samples: 2 when reading" in err and "1 more while training" in err, err
