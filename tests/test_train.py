"""train.py (via pretrain.py / finetune.py): accumulation, resume, freezing, overfitting, crash safety, the shared
output directory. CPU, gloo, fp32 for exact comparisons. Two ranks against one process: test_real_format.py."""

import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoints
import finetune
import pretrain
import train
from model import LlavaModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flags(world, out, stage, **overrides):
    """Command-line flags of a small run of `stage` ("pretrain" or "finetune") in `world`."""
    data = "captions.json" if stage == "pretrain" else "conversations.json"
    settings = dict(vision_tower=world["vision"], llm=world["llm"], data_path=str(world["root"] / data),
                    image_folder=str(world["root"] / "images"), output_dir=str(out), global_batch_size=8,
                    micro_batch_size=2, num_workers=0, precision="fp32", activation_checkpointing=False,
                    max_length=256, max_steps=4, save_every=1000, lr=1e-3, seed=3)
    settings.update(overrides)
    argv = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        argv += ([flag] if value else ["--no-" + key.replace("_", "-")]) if isinstance(value, bool) else [flag, str(value)]
    return argv


def run(world, out, stage="finetune", **overrides):
    """Train in this process; returns the full state dict of the trained model."""
    defaults = pretrain.STAGE_1 if stage == "pretrain" else finetune.STAGE_2
    cfg = train.parse_config(flags(world, out, stage, **overrides), defaults, {}, "")
    try:
        model = train.train(cfg)
        full = train.get_model_state_dict(model, options=train.StateDictOptions(full_state_dict=True))
        return {k: v.clone() for k, v in full.items()}
    finally:
        train.dist.destroy_process_group()


def killed_after_checkpoint(step, monkeypatch, world, out, stage="finetune", **overrides):
    """run(world, out, stage, **overrides), stopped (KeyboardInterrupt) right after checkpoint `step` is written, as
    a run killed there; the next run resumes from it."""
    save = train.save_checkpoint

    def save_then_die(model, optimizer, at, *args):
        save(model, optimizer, at, *args)
        if at == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(world, out, stage, **overrides)
    monkeypatch.setattr(train, "save_checkpoint", save)


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_every_rank_must_see_the_output_dir(tmp_path):
    """Multi-node checkpoints need a filesystem all nodes share: ranks whose output_dir is not rank 0's (node-local
    disks, simulated by a folder per rank) stop at start-up with an error naming them."""
    script = tmp_path / "check.py"
    script.write_text(f"""import sys
sys.path.insert(0, {ROOT!r})
import torch.distributed as dist
import train
device = train.init_distributed()
train.check_shared_output_dir({str(tmp_path / "shared")!r}, device)
sys.stdout.write("shared: ok\\n")  # one write per line: the two ranks share the pipe
sys.stdout.flush()
try:
    train.check_shared_output_dir({str(tmp_path / "local")!r} + str(dist.get_rank()), device, wait_seconds=0.5)
except train.UserError as e:
    sys.stdout.write(f"local: {{e}}\\n")
dist.destroy_process_group()
""")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29532", str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("shared: ok") == 2
    assert result.stdout.count("local: --output-dir") == 2 and "rank(s) [1] cannot see" in result.stdout
    assert os.listdir(tmp_path / "shared") == []  # the probe is removed


def test_micro_batching_does_not_change_the_update(world, tmp_path):
    whole = run(world, tmp_path / "a", micro_batch_size=8)  # 1 x 8
    split = run(world, tmp_path / "b", micro_batch_size=2)  # 4 x 2
    assert max_diff(whole, split) < 1e-6


def test_resumed_run_equals_uninterrupted_run(world, tmp_path, monkeypatch):
    straight = run(world, tmp_path / "straight", max_steps=6, save_every=2)
    killed_after_checkpoint(4, monkeypatch, world, tmp_path / "resumed", max_steps=6, save_every=2)
    resumed = run(world, tmp_path / "resumed", max_steps=6, save_every=2, resume=True)
    assert max_diff(straight, resumed) == 0
    assert losses(tmp_path / "straight")[4:] == losses(tmp_path / "resumed")[4:]


def test_fresh_run_refuses_to_start_over_old_checkpoints(world, tmp_path):
    run(world, tmp_path / "out", max_steps=2)
    before = {p: os.path.getmtime(p) for p in train.saved_checkpoints(tmp_path / "out")}
    assert before
    with pytest.raises(ValueError, match="--resume"):
        run(world, tmp_path / "out", max_steps=2)
    assert {p: os.path.getmtime(p) for p in train.saved_checkpoints(tmp_path / "out")} == before


def backbone_weights(world):
    from transformers import CLIPVisionModel, LlamaForCausalLM

    return ({f"vision_tower.{k}": v for k, v in CLIPVisionModel.from_pretrained(world["vision"]).state_dict().items()},
            {f"language_model.{k}": v for k, v in LlamaForCausalLM.from_pretrained(world["llm"]).state_dict().items()})


def test_stage1_trains_only_the_projector_and_stage2_never_the_tower(world, tmp_path):
    vision, llm = backbone_weights(world)
    stage1 = run(world, tmp_path / "s1", "pretrain")
    assert all(torch.equal(stage1[k], v) for k, v in {**vision, **llm}.items())
    initial = LlavaModel.from_config(train.parse_config(flags(world, tmp_path, "pretrain"), pretrain.STAGE_1, {}, "")
                                     .model_config()).state_dict()
    assert not torch.equal(stage1["multi_modal_projector.linear_1.weight"], initial["multi_modal_projector.linear_1.weight"])
    # stage 2 starts from stage 1's projector and trains it with the LLM
    loaded = checkpoints.load(str(tmp_path / "s1"))
    assert torch.equal(loaded.state_dict()["multi_modal_projector.linear_2.weight"],
                       stage1["multi_modal_projector.linear_2.weight"])
    stage2 = run(world, tmp_path / "s2", init_from=str(tmp_path / "s1"))
    assert all(torch.equal(stage2[k], v) for k, v in vision.items())
    assert not torch.equal(stage2["language_model.model.layers.0.mlp.up_proj.weight"],
                           llm["language_model.model.layers.0.mlp.up_proj.weight"])


def test_tiny_model_overfits_one_batch(world, tmp_path):
    data = json.loads((world["root"] / "conversations.json").read_text())[:4]
    (tmp_path / "one_batch.json").write_text(json.dumps(data))
    run(world, tmp_path / "fit", data_path=str(tmp_path / "one_batch.json"), global_batch_size=4, micro_batch_size=4,
        max_steps=150, lr=5e-3, warmup_ratio=0.0)
    curve = losses(tmp_path / "fit")
    assert curve[-1] < 0.1 * curve[0], curve
    rows = [json.loads(line) for line in (tmp_path / "fit" / "metrics.jsonl").read_text().splitlines()]
    with_image = sum("image" in d for d in data)
    assert {(r["samples"], r["image_samples"], r["images"]) for r in rows} == {(4, with_image, with_image)}


def test_crash_during_a_checkpoint_write_keeps_the_previous_one(world, tmp_path, monkeypatch):
    save = train.dcp.save
    calls = []

    def dcp_save_crashing_the_second_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return save(*args, **kwargs)

    monkeypatch.setattr(train.dcp, "save", dcp_save_crashing_the_second_time)
    with pytest.raises(OSError, match="disk full"):
        run(world, tmp_path / "out", max_steps=4, save_every=2)
    monkeypatch.setattr(train.dcp, "save", save)
    assert [os.path.basename(c) for c in train.saved_checkpoints(str(tmp_path / "out"))] == ["checkpoint-000002"]
    checkpoints.load(str(tmp_path / "out" / "checkpoint-000002"))
    run(world, tmp_path / "out", max_steps=4, save_every=2, resume=True)
    assert [os.path.basename(c) for c in train.saved_checkpoints(str(tmp_path / "out"))] == \
        ["checkpoint-000002", "checkpoint-000004"]


def test_non_finite_loss_stops_the_run_and_names_the_checkpoint(world, tmp_path):
    """The projector starts from an original-LLaVA mm_projector.bin (keys model.mm_projector.{0,2}.*) holding NaNs."""
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(world["llm"]).hidden_size
    vision = AutoConfig.from_pretrained(world["vision"]).vision_config.hidden_size
    state = {"model.mm_projector.0.weight": torch.full((text, vision), float("nan")),
             "model.mm_projector.0.bias": torch.zeros(text), "model.mm_projector.2.weight": torch.zeros(text, text),
             "model.mm_projector.2.bias": torch.zeros(text)}
    torch.save(state, tmp_path / "mm_projector.bin")
    with pytest.raises(train.NonFiniteError, match="stopping before the update"):
        run(world, tmp_path / "out", init_from=str(tmp_path / "mm_projector.bin"))


def test_cosine_schedule_is_hfs():
    from transformers import get_cosine_schedule_with_warmup

    total, warmup = 50, 2
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    for step in range(total):
        assert abs(train.cosine_lr(step, total, warmup, 1.0) - optimizer.param_groups[0]["lr"]) < 1e-12
        optimizer.step()
        schedule.step()


def test_presets_and_flags():
    cfg = train.parse_config(["--preset", "llava-1.5-7b", "--micro-batch-size", "4"], finetune.STAGE_2,
                             finetune.PRESETS, "")
    assert (cfg.lr, cfg.global_batch_size, cfg.micro_batch_size, cfg.template, cfg.image_aspect_ratio) == \
        (2e-5, 128, 4, "vicuna_v1", "pad")
    assert cfg.train_llm and cfg.group_by_modality_length and cfg.init_from.endswith("7b-pretrain")
    cfg = train.parse_config(["--preset", "llava-1.5-13b"], pretrain.STAGE_1, pretrain.PRESETS, "")
    assert (cfg.lr, cfg.global_batch_size, cfg.template, cfg.image_aspect_ratio, cfg.train_llm) == \
        (1e-3, 256, "plain", "crop", False)
    assert (cfg.weight_decay, cfg.warmup_ratio, cfg.epochs, cfg.max_length) == (0.0, 0.03, 1, 2048)


def test_memory_tool_shards_and_runs_one_rank_of_a_simulated_world(tmp_path, monkeypatch):
    """tools/memory.py at tiny sizes (the real configs, shrunk): each rank holds 1/world of the sharded parameters
    and a whole bf16 tower, and the --measure path (one rank of a fake process group: forward, backward, AdamW)
    runs; on CPU the CUDA memory calls are stubbed."""
    import tools.memory as memory
    from transformers import AutoConfig

    for name, folder, sizes in [("llm", memory.LLMS["7b"], dict(hidden_size=64, intermediate_size=128,
                                                                num_hidden_layers=2, num_attention_heads=4,
                                                                num_key_value_heads=4)),
                                ("vision", memory.CLIP_L_336, {})]:
        config = AutoConfig.from_pretrained(folder)
        if name == "vision":
            config.vision_config.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4))
        config.update(sizes)
        config.save_pretrained(tmp_path / name)
    monkeypatch.setitem(memory.LLMS, "tiny", str(tmp_path / "llm"))
    monkeypatch.setattr(memory, "CLIP_L_336", str(tmp_path / "vision"))
    for name in ("reset_peak_memory_stats", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, lambda device: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 0)
    memory.fake_world(4)
    try:
        model, cfg = memory.build_sharded("tiny")
        params = memory.sharded(model)
        total, local = sum(p.numel() for p in params), memory.local_numel(params)
        assert total / 4 <= local < total / 4 + 4 * 64 * 20  # uneven dim-0 shards round up a little
        assert all(p.dtype == torch.bfloat16 for p in model.vision_tower.parameters())
        items = memory.arithmetic(model, micro_batch=2, seq_len=600)
        assert items["AdamW m and v, fp32 (sharded)"] == 2 * items["fp32 gradients (sharded)"]
        assert items["frozen vision tower, bf16 (replicated)"] == 2 * sum(
            p.numel() for p in model.vision_tower.parameters())
        _, seconds = memory.measure(model, cfg, 2, 600, torch.device("cpu"), steps=1)
        assert seconds > 0
    finally:
        train.dist.destroy_process_group()
