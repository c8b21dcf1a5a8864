"""LoRA (lora.py) and fine-tuning from a whole LLaVA model (--init-from): the adapted model starts as its base, merges
exactly, trains only adapters and projector, is saved in PEFT's layout and loads on its base; resume and two ranks
reproduce one uninterrupted process; a run from a whole checkpoint in each layout begins from that model's logits.
CPU, gloo, fp32, tiny random models."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import generate
import finetune
import lora
import real_format as rf
import train
from tools import convert
from data import IMAGE_TOKEN_INDEX, UserError
from model import LlavaConfig, LlavaModel
from test_train import flags, killed_after_checkpoint, losses, max_diff, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
LORA = dict(lora_r=4, lora_alpha=8, lr=1e-2, mm_projector_lr=2e-3)


def inputs(model, seed=0):
    """A sequence with one image, and its pixels."""
    n = model.num_image_tokens
    ids = torch.tensor([[1, 31, 29, 40] + [IMAGE_TOKEN_INDEX] * n + [13, 57, 88, 9, 2]])
    size = model.vision_tower.config.image_size
    return ids, torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def logits(model, seed=0):
    with torch.no_grad():
        return model.eval()(*(lambda ids, px: (ids, None, px))(*inputs(model, seed)))


def test_adapters_start_as_the_base_and_merge_exactly(backbones):
    """B = 0: the adapted model's logits are the base's, bit for bit; with B non-zero, each layer computes
    W x + b + (alpha / r) B A x (written out here), and merging gives the unmerged logits in fp32."""
    vision, llm = backbones
    model = LlavaModel.from_config(LlavaConfig(vision_tower=vision, llm=llm))
    base = logits(model)
    targets = lora.add_adapters(model.language_model, r=4, alpha=8, dropout=0.05)
    assert targets == LLAMA_LINEARS  # every Linear of the LLM but lm_head (LLaVA's find_all_linear_names)
    assert not isinstance(model.language_model.lm_head, lora.LoraLinear)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n in dict(model.named_parameters()) if ".lora_" in n or n.startswith("multi_modal_projector.")}
    assert torch.equal(logits(model), base)
    torch.manual_seed(1)
    for _, layer in lora.adapted(model.language_model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    layer = model.language_model.model.layers[0].mlp.up_proj
    x = torch.randn(3, layer.base_layer.in_features)
    expected = x @ layer.base_layer.weight.T + 2.0 * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    assert (layer.eval()(x) - expected).abs().max() < 1e-6
    unmerged = logits(model)
    assert (unmerged - base).abs().max() > 1e-3  # the adapters do something
    lora.merge(model.language_model)
    assert not lora.adapted(model.language_model)
    assert set(model.state_dict()) == set(LlavaModel.from_config(LlavaConfig(vision_tower=vision, llm=llm),
                                                                 empty=True).state_dict())
    assert (logits(model) - unmerged).abs().max() < 1e-6


def trained_layers(state):
    return {k.split(".layers.")[1].split(".")[0] for k in state if ".layers." in k and k.startswith("language_model.")}


def test_lora_run_trains_adapters_and_projector_resumes_exactly_and_saves_peft_files(world, tmp_path, monkeypatch):
    """A LoRA run (dropout on: the resumed run must restore each rank's RNG) equals its interrupted-and-resumed twin
    exactly; the base LLM and the tower are bit-for-bit the backbones'; the output is PEFT's files plus the projector,
    loads on its base with the trained model's logits, and merges into a full model with the same logits."""
    from test_train import backbone_weights

    straight = run(world, tmp_path / "straight", max_steps=4, save_every=2, **LORA)
    killed_after_checkpoint(2, monkeypatch, world, tmp_path / "resumed", max_steps=4, save_every=2, **LORA)
    with pytest.raises(UserError, match="--lora-r was 4, now 8"):
        run(world, tmp_path / "resumed", max_steps=4, save_every=2, resume=True, **{**LORA, "lora_r": 8})
    resumed = run(world, tmp_path / "resumed", max_steps=4, save_every=2, resume=True, **LORA)
    assert max_diff(straight, resumed) == 0
    assert losses(tmp_path / "straight")[2:] == losses(tmp_path / "resumed")[2:]

    vision, llm = backbone_weights(world)
    base = {k.replace(f".{m}.", f".{m}.base_layer."): v for k, v in llm.items() for m in LLAMA_LINEARS
            if f".{m}." in k} | {k: v for k, v in llm.items() if not any(f".{m}." in k for m in LLAMA_LINEARS)}
    assert all(torch.equal(straight[k], v) for k, v in {**vision, **base}.items())
    changed = {k for k, v in straight.items() if k.endswith("lora_B.weight") and v.abs().max() > 0}
    every_b = {k for k in straight if k.endswith("lora_B.weight")}
    assert changed == every_b and len(every_b) == 7 * len(trained_layers(straight))
    out = tmp_path / "straight"
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["target_modules"], config["bias"],
            config["base_model_name_or_path"]) == ("LORA", 4, 8, LLAMA_LINEARS, "none", world["llm"])
    adapter = load_file(out / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in adapter
    assert len(adapter) == 2 * len(every_b)
    assert {k.split(".", 1)[0] for k in load_file(out / "model.safetensors")} == {"multi_modal_projector"}

    trained = checkpoints.load(str(out))
    for name, value in straight.items():
        assert torch.equal(trained.state_dict()[name], value), name
    unmerged = logits(trained)
    convert.main(["merge", str(out), str(tmp_path / "merged")])
    merged = checkpoints.load(str(tmp_path / "merged"))
    assert not lora.adapted(merged.language_model)
    assert (logits(merged) - unmerged).abs().max() < 1e-5


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """Tiny models saved as the real repos are (real_format.py), and liuhaotian/llava-v1.5-7b's imported into ours."""
    root = tmp_path_factory.mktemp("repos")
    folders = rf.hub_repos(root, clip_id=str(root / rf.CLIP))
    convert.import_checkpoint(folders[rf.LLAVA], str(root / "ours"))
    return {**folders, "ours": str(root / "ours"), "data": str(root / "data"),
            "finetune": rf.finetune_data(str(root / "data"))}


def start(repos, **overrides):
    """The model a fine-tuning run on the Vicuna- and CLIP-shaped repos starts from (build_model, fp32)."""
    settings = dict(vision_tower=repos[rf.CLIP], llm=repos[rf.VICUNA], data_path=repos["finetune"],
                    image_folder=repos["data"], precision="fp32", activation_checkpointing=False)
    cfg = train.TrainConfig(**{**finetune.STAGE_2, **settings, **overrides})
    device = train.init_distributed()
    try:
        return train.build_model(cfg, device)
    finally:
        train.dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["ours", rf.LLAVA, rf.LLAVA_HF])
def test_init_from_a_whole_model_begins_from_its_logits(repos, layout):
    """--init-from a whole LLaVA checkpoint (ours, the original layout, llava-hf) takes its LLM and projector: the
    run's first model gives that checkpoint's logits (llava-hf's added vocabulary rows dropped; the tower is
    --vision-tower's, here CLIP's fp32 weights, where llava-hf's copy of it is fp16), with LoRA on too (B = 0); a
    stage-1 directory still gives only the projector (the LLM is --llm's)."""
    from model import load_vision_tower

    source = checkpoints.load(repos[layout], dtype=torch.float32)
    source.vision_tower = load_vision_tower(repos[rf.CLIP], torch.float32)
    expected = logits(source)[..., :320]
    for overrides in ({}, dict(lora_r=4, lora_alpha=8)) if layout == "ours" else ({},):
        model = start(repos, init_from=repos[layout], **overrides)
        got = logits(model)
        assert got.shape[-1] == 320 and (got - expected).abs().max() < 1e-5, (layout, overrides)
    if layout == rf.LLAVA:
        model = start(repos, init_from=repos[rf.LLAVA_STAGE1])
        vicuna = checkpoints.read_weights(repos[rf.VICUNA])["model.layers.0.mlp.up_proj.weight"]
        assert torch.equal(model.state_dict()["language_model.model.layers.0.mlp.up_proj.weight"].full_tensor(),
                           vicuna.float())


def test_init_from_a_model_of_another_llm_is_refused(repos, backbones):
    with pytest.raises(UserError, match="--init-from .*pass the --llm and --vision-tower it was fine-tuned from"):
        start(repos, init_from=repos["ours"], llm=backbones[1])


def test_two_ranks_with_lora_equal_one_process(world, tmp_path):
    """LoRA under FSDP2 over two ranks (gloo), activation checkpointing on, trains what one process trains without
    it: the same losses, the same adapters and projector up to summation order (dropout off: each rank draws its own
    masks)."""
    common = dict(max_steps=2, lora_dropout=0.0, **{**LORA, "lr": 1e-3, "mm_projector_lr": 1e-4})
    one = run(world, tmp_path / "one", **common)
    argv = flags(world, tmp_path / "two", "finetune", activation_checkpointing=True, **common)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29541", os.path.join(ROOT, "finetune.py"), *argv], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    two = {f"multi_modal_projector.{k.split('multi_modal_projector.')[1]}": v
           for k, v in load_file(tmp_path / "two" / "model.safetensors").items()}
    two.update({"language_model." + lora.from_peft_key(k): v
                for k, v in load_file(tmp_path / "two" / "adapter_model.safetensors").items()})
    assert len(two) > 4
    diffs = torch.cat([(one[k] - two[k]).abs().flatten() for k in two])
    # (as test_real_format.py's two-rank test: AdamW's first steps magnify summation-order rounding for gradients
    # near eps; a broken step moves most weights by a large fraction of lr)
    assert diffs.max() < 0.05 * 1e-3 and (diffs > 1e-6).float().mean() < 1e-3, (diffs.max(), (diffs > 1e-6).sum())
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "one"), losses(tmp_path / "two"))) < 1e-6


def test_lora_on_a_whole_model_saves_loads_and_resumes_on_that_base(repos, tmp_path):
    """LoRA on --init-from a whole model (finetune_task_lora.sh): the output references that model as the adapters'
    base (config.json's lora_base, adapter_config.json's base_model_name_or_path) and loads on it with the trained
    model's logits; a resume with another --init-from (another base) is refused."""
    settings = dict(vision_tower=repos[rf.CLIP], llm=repos[rf.VICUNA], data_path=repos["finetune"],
                    image_folder=repos["data"], output_dir=str(tmp_path / "out"), global_batch_size=2,
                    micro_batch_size=2, num_workers=0, max_steps=1, warmup_ratio=0.0, save_every=1, precision="fp32",
                    activation_checkpointing=False, max_length=512, init_from=repos[rf.LLAVA], **LORA)
    cfg = train.TrainConfig(**{**finetune.STAGE_2, **settings})
    try:
        trained = logits(train.train(cfg))
    finally:
        train.dist.destroy_process_group()
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["lora_base"] == repos[rf.LLAVA]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == repos[rf.LLAVA]
    model, _, _ = generate.load(str(out), dtype=torch.float32)
    assert (logits(model) - trained).abs().max() < 1e-5
    initial = logits(checkpoints.load(repos[rf.LLAVA], dtype=torch.float32))
    assert (trained - initial).abs().max() > 1e-4  # the step moved the adapters
    again = start(repos, init_from=str(out))  # a new run from the LoRA output: its LLM, the adapters merged (in the
    assert (logits(again) - trained).abs().max() < 2e-3  # base's fp16)
    with pytest.raises(UserError, match="--init-from was"):
        train.check_resume(train.saved_checkpoints(str(out))[-1],
                           train.replace(cfg, resume=True, init_from=repos[rf.LLAVA_HF]))


def test_llavas_own_lora_output_loads_on_its_base_and_imports_merged(repos, tmp_path):
    """A LoRA output of LLaVA's train.py (config.json with mm_* keys, adapter_config.json + adapter_model.bin, the
    projector in non_lora_trainables.bin under PEFT's prefix) loads on --model-base as the same model built by hand
    (Vicuna + those adapters merged + that projector); convert.py import writes it merged, in our layout (in the
    base's fp16)."""
    import shutil

    from transformers import LlamaForCausalLM

    folder = tmp_path / "llava-v1.5-7b-lora"
    folder.mkdir()
    shutil.copy(os.path.join(repos[rf.LLAVA], "config.json"), folder)
    llm = LlamaForCausalLM.from_pretrained(repos[rf.VICUNA], dtype=torch.float32)
    targets = lora.add_adapters(llm, r=4, alpha=8, dropout=0.05)
    torch.manual_seed(2)
    for _, layer in lora.adapted(llm):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    checkpoints.save_adapter(str(folder), llm.state_dict(), lora.peft_config(4, 8, 0.05, targets, "lmsys/vicuna"))
    adapter = load_file(folder / "adapter_model.safetensors")
    os.remove(folder / "adapter_model.safetensors")
    torch.save(adapter, folder / "adapter_model.bin")
    projector = checkpoints.projector_weights(repos[rf.LLAVA])
    torch.save({f"base_model.model.model.mm_projector.{2 * (int(k[7]) - 1)}.{k.split('.')[-1]}": v
                for k, v in projector.items()}, folder / "non_lora_trainables.bin")

    lora.merge(llm)
    by_hand = LlavaModel(LlavaConfig(vision_tower=repos[rf.CLIP], llm=repos[rf.VICUNA]),
                         checkpoints.load_vision_tower(repos[rf.CLIP], torch.float32), llm)
    by_hand.multi_modal_projector.load_state_dict(projector)
    expected = logits(by_hand.float())
    loaded = checkpoints.load(str(folder), dtype=torch.float32, model_base=repos[rf.VICUNA])
    assert len(lora.adapted(loaded.language_model)) == len(adapter) // 2
    assert (logits(loaded) - expected).abs().max() < 1e-5
    convert.main(["import", str(folder), str(tmp_path / "ours"), "--model-base", repos[rf.VICUNA]])
    imported = checkpoints.load(str(tmp_path / "ours"))  # merged in the base's dtype: Vicuna's fp16
    assert imported.language_model.model.layers[0].mlp.up_proj.weight.dtype == torch.float16
    assert (logits(imported.float()) - expected).abs().max() < 2e-3


def test_lora_holds_the_frozen_base_in_bf16_and_memory_counts_it(tmp_path, monkeypatch):
    """train.py's sharded LoRA model at world size 2 (the fake process group of tools/memory.py, the real configs
    shrunk): the base (every LLM weight but the adapters) is bf16 and frozen, the adapters and projector fp32 and
    trainable, tools/memory.py counts the weights at those dtypes, and its --measure step runs."""
    import tools.memory as memory
    from transformers import AutoConfig

    for name, folder in [("llm", memory.LLMS["7b"]), ("vision", memory.CLIP_L_336)]:
        config = AutoConfig.from_pretrained(folder)
        if name == "vision":
            config.vision_config.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4))
        else:
            config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=4))
        config.save_pretrained(tmp_path / name)
    monkeypatch.setitem(memory.LLMS, "tiny", str(tmp_path / "llm"))
    monkeypatch.setattr(memory, "CLIP_L_336", str(tmp_path / "vision"))
    memory.fake_world(2)
    try:
        model, cfg = memory.build_sharded("tiny", lora_r=8)
        assert (cfg.lora_r, cfg.lora_alpha, cfg.lr, cfg.mm_projector_lr) == (8, 256, 2e-4, 2e-5)
        for name, p in model.named_parameters():
            adapter = ".lora_A." in name or ".lora_B." in name
            if name.startswith("language_model."):
                assert p.requires_grad == adapter and p.dtype == (torch.float32 if adapter else torch.bfloat16), name
            elif name.startswith("multi_modal_projector."):
                assert p.requires_grad and p.dtype == torch.float32
        params, trainable = memory.sharded(model), memory.trainable(model)
        items = memory.arithmetic(model, micro_batch=2, seq_len=600)
        frozen = memory.local_numel([p for p in params if not p.requires_grad])
        assert items["weights: fp32 masters (+ LoRA's frozen bf16 base), sharded"] == \
            2 * frozen + 4 * memory.local_numel(trainable)
        assert items["AdamW m and v, fp32 (sharded)"] == 8 * memory.local_numel(trainable)
        groups = {g["name"]: g for g in train.make_optimizer(model, cfg).param_groups}
        assert set(groups) == {"decay", "projector_decay", "projector_no_decay"}  # adapters have no 1-D tensor
        assert train.peak_lr(groups["projector_decay"], cfg) == 2e-5 and train.peak_lr(groups["decay"], cfg) == 2e-4
        for name in ("reset_peak_memory_stats", "synchronize"):  # --measure's path, its CUDA calls stubbed
            monkeypatch.setattr(torch.cuda, name, lambda device: None)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 0)
        assert memory.measure(model, cfg, 1, 600, torch.device("cpu"), steps=1)[1] > 0
    finally:
        train.dist.destroy_process_group()
