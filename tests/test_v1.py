"""The first paper's LLaVA (v1): --mm-use-im-start-end end to end (the two tokens added, only their input-embedding
rows trained in stage 1, saved with the tokenizer, loaded, wrapped around the image, resumed exactly), and the
released checkpoints' delta weights (tools/convert.py apply-delta). CPU, the toy world of test_train.py."""

import pytest
import torch

import checkpoints
import generate
import train
from data import IM_END_TOKEN, IM_START_TOKEN, IMAGE_TOKEN_INDEX, load_tokenizer
from test_train import killed_after_checkpoint, losses, max_diff, run

EMBED, HEAD = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"


def base_llm(world):
    from transformers import LlamaForCausalLM

    return {f"language_model.{k}": v for k, v in LlamaForCausalLM.from_pretrained(world["llm"]).state_dict().items()}


@pytest.fixture(scope="module")
def stage1(world, tmp_path_factory):
    """A stage-1 run with --mm-use-im-start-end: (output dir, its full trained state dict)."""
    out = tmp_path_factory.mktemp("stage1")
    return out, run(world, out, stage="pretrain", mm_use_im_start_end=True, template="llava_v0", max_steps=3, lr=1e-2)


def test_stage1_trains_only_the_two_new_rows(world, stage1):
    out, trained = stage1
    ids = load_tokenizer(str(out)).convert_tokens_to_ids([IM_START_TOKEN, IM_END_TOKEN])
    assert IM_START_TOKEN not in load_tokenizer(world["llm"]).get_vocab()  # (added by the run)
    base = base_llm(world)
    others = [i for i in range(trained[EMBED].shape[0]) if i not in ids]
    mean_in, mean_out = (base[k][:min(ids)].mean(0) for k in (EMBED, HEAD))
    for i in ids:  # LLaVA's init: the mean of the old rows; the input rows moved, the output rows did not
        assert (trained[EMBED][i] - mean_in).abs().max() > 1e-3
        torch.testing.assert_close(trained[HEAD][i], mean_out)
    assert torch.equal(trained[EMBED][others], base[EMBED][others])  # every other row exactly as it was
    for k, v in base.items():
        if k != EMBED:
            assert torch.equal(trained[k][:v.shape[0]], v), k  # the rest of the LLM: untouched


def test_stage1_output_loads_with_its_tokens_around_the_image(world, stage1):
    out, trained = stage1
    model, fmt, _ = generate.load(str(out))
    assert model.config.mm_use_im_start_end and fmt.im_start_end
    loaded = model.state_dict()
    for k in (EMBED, HEAD, "multi_modal_projector.linear_1.weight"):
        torch.testing.assert_close(loaded[k], trained[k], rtol=0, atol=0)  # (an fp32 run, saved in fp32)
    ids = fmt.prompt([{"role": "user", "content": "<image>\nWhat is it?"}])
    start, end = fmt.tokenizer.convert_tokens_to_ids([IM_START_TOKEN, IM_END_TOKEN])
    ids = ids if isinstance(ids, list) else ids.tolist()
    at = ids.index(IMAGE_TOKEN_INDEX)
    n = model.num_image_tokens
    assert ids[at - 1] == start and ids[at:at + n] == [IMAGE_TOKEN_INDEX] * n and ids[at + n] == end


def test_stage1_resumes_exactly(world, tmp_path, monkeypatch):
    """Stage 1 with the two rows training (their optimizer state, the gradient kept off the other rows) resumed."""
    common = dict(stage="pretrain", mm_use_im_start_end=True, template="llava_v0", max_steps=4, save_every=2, lr=1e-2)
    straight = run(world, tmp_path / "straight", **common)
    killed_after_checkpoint(2, monkeypatch, world, tmp_path / "resumed", **common)
    resumed = run(world, tmp_path / "resumed", resume=True, **common)
    assert max_diff(straight, resumed) == 0
    assert losses(tmp_path / "straight")[2:] == losses(tmp_path / "resumed")[2:]


def test_stage2_starts_from_stage1_rows(world, stage1, tmp_path):
    out, trained = stage1
    run(world, tmp_path / "stage2", mm_use_im_start_end=True, template="llava_v0", init_from=str(out), max_steps=1)
    ids = load_tokenizer(str(tmp_path / "stage2")).convert_tokens_to_ids([IM_START_TOKEN, IM_END_TOKEN])
    model = checkpoints.load(str(tmp_path / "stage2"))
    assert model.language_model.get_input_embeddings().weight.shape[0] == trained[EMBED].shape[0]
    # one step at lr 0 (the warm-up's first): stage 1's rows exactly, not the mean
    assert torch.equal(model.state_dict()[EMBED][ids], trained[EMBED][ids])


# ----------------------------------------------------------------------------------------------------------------------
# The released first-paper checkpoints: original layout, v1 config keys, delta weights


@pytest.fixture(scope="module")
def v1_release(tmp_path_factory, llama_tok):
    """A v1 model as liuhaotian/LLaVA-*-delta-v* ship it, on a base whose vocabulary is its tokenizer's (as LLaMA's):
    (base dir, delta dir, the target's weights in the original names, the vision tower dir)."""
    import copy
    import json

    from transformers import CLIPVisionConfig, LlamaForCausalLM

    from checkpoints import read_weights
    from model import add_im_start_end
    from tools.tiny import save_tiny_backbones, tiny_llama_config

    root = tmp_path_factory.mktemp("v1")
    vision, base = save_tiny_backbones(str(root), llama_config=tiny_llama_config(vocab_size=len(llama_tok)),
                                       tokenizer=llama_tok)
    tokenizer = copy.deepcopy(llama_tok)
    ids, added = add_im_start_end(tokenizer)
    assert added and max(ids) == len(llama_tok) + 1
    torch.manual_seed(1)
    target = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer)))  # the fine-tuned LLM: other weights
    width = CLIPVisionConfig.from_pretrained(vision).hidden_size
    state = {k: v.detach().clone() for k, v in target.state_dict().items()}
    state.update({"model.mm_projector.weight": torch.randn(48, width), "model.mm_projector.bias": torch.randn(48)})
    base_state, delta = read_weights(base), {}
    for k, v in state.items():  # LLaVA's make_delta: target - base, extra rows as they are
        d = v.clone()
        if k in base_state:
            d[:base_state[k].shape[0]] -= base_state[k]
        delta[k] = d
    out = root / "delta"
    out.mkdir()
    torch.save(delta, out / "pytorch_model.bin")
    config = {**target.config.to_dict(), "model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"],
              "mm_vision_tower": vision, "mm_hidden_size": width, "mm_vision_select_layer": -2,
              "mm_use_im_start_end": True, "mm_use_im_patch_token": False, "tune_mm_mlp_adapter": False}
    (out / "config.json").write_text(json.dumps(config))  # (no mm_projector_type: linear)
    tokenizer.save_pretrained(out)
    return base, str(out), state, vision


def test_apply_delta_gives_base_plus_delta_and_loads_as_v1(v1_release, tmp_path):
    from tools import convert

    base, delta, target, _ = v1_release
    out = str(tmp_path / "target")
    convert.main(["apply-delta", delta, out, "--model-base", base])
    got = checkpoints.read_weights(out)
    assert got.keys() == target.keys()
    for k, v in target.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5)
    model, fmt, _ = generate.load(out)
    c = model.config
    assert (c.projector_type, c.vision_feature_layer, c.mm_use_im_start_end) == ("linear", -2, True)
    assert model.language_model.get_input_embeddings().num_embeddings == len(fmt.tokenizer)
    torch.testing.assert_close(model.state_dict()[EMBED], target["model.embed_tokens.weight"], rtol=0, atol=1e-5)
    ids = fmt.prompt([{"role": "user", "content": "<image>\nWhat is it?"}])
    ids = ids if isinstance(ids, list) else ids.tolist()
    at = ids.index(IMAGE_TOKEN_INDEX)
    assert fmt.tokenizer.convert_ids_to_tokens([ids[at - 1], ids[at + model.num_image_tokens]]) == \
        [IM_START_TOKEN, IM_END_TOKEN]
    convert.main(["import", out, str(tmp_path / "ours"), "--template", "llava_v0"])  # a v0 model: its template kept
    ours, fmt, _ = generate.load(str(tmp_path / "ours"))
    assert (ours.config.template, ours.config.mm_use_im_start_end, fmt.im_start_end) == ("llava_v0", True, True)
    torch.testing.assert_close(ours.state_dict()[EMBED], model.state_dict()[EMBED], rtol=0, atol=0)


def test_apply_delta_refuses_another_base(v1_release, tmp_path, backbones):
    _, delta, _, _ = v1_release
    with pytest.raises(ValueError, match="pass the base LLM the delta was made from"):
        checkpoints.apply_delta(backbones[1], delta)  # (a vocabulary of 640 rows: larger than the delta's 602)


def test_v1_stage1_projector_brings_its_token_rows(v1_release, tmp_path):
    """A v1 stage-1 output (config.json + mm_projector.bin holding model.embed_tokens.weight, as LLaVA saves it with
    tune_mm_mlp_adapter and mm_use_im_start_end) on its base: the vocabulary grown, the two rows from the file."""
    import json

    base, delta, target, _ = v1_release
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    with open(f"{delta}/config.json") as f:
        config = json.load(f)
    (stage1 / "config.json").write_text(json.dumps({**config, "tune_mm_mlp_adapter": True}))
    embed = target["model.embed_tokens.weight"]
    torch.save({"model.mm_projector.weight": target["model.mm_projector.weight"],
                "model.mm_projector.bias": target["model.mm_projector.bias"], "model.embed_tokens.weight": embed},
               stage1 / "mm_projector.bin")
    model = checkpoints.load(str(stage1), model_base=base)
    got = model.state_dict()[EMBED]
    n = len(load_tokenizer(base))
    assert got.shape[0] == n + 2
    torch.testing.assert_close(got[n:], embed[n:], rtol=0, atol=0)
    torch.testing.assert_close(got[:n], checkpoints.read_weights(base)["model.embed_tokens.weight"], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# The presets: each new one runs a step end to end, on the toy world's backbones and data in the real files' formats


@pytest.fixture(scope="module")
def v1_data(world, tmp_path_factory):
    """CC-595K's chat.json, the Instruct-158K file and ScienceQA's QCM-LEA file (tools/scienceqa.py), on the world's
    pictures: {name: (data file, image folder)}."""
    import json

    from PIL import Image

    from test_scienceqa import PROBLEMS, SPLITS
    from tools import scienceqa

    root = tmp_path_factory.mktemp("v1data")
    pictures = sorted((world["root"] / "images").iterdir())[:4]
    (root / "cc" / "images").mkdir(parents=True)
    (root / "coco").mkdir()
    chat, instruct = [], []
    for i, picture in enumerate(pictures):
        cc, coco = f"GCC_train_{i:09d}.jpg", f"{i:012d}.jpg"
        Image.open(picture).convert("RGB").save(root / "cc" / "images" / cc)
        Image.open(picture).convert("RGB").save(root / "coco" / coco)
        chat.append({"id": cc[:-4], "image": cc, "conversations": [  # (CC-595K puts <image> after the text)
            {"from": "human", "value": "Describe the image concisely.\n<image>"},
            {"from": "gpt", "value": f"a picture with shapes number {i} ."}]})
        instruct.append({"id": coco[:-4], "image": coco, "conversations": [
            {"from": "human", "value": "What is in the image?\n<image>"}, {"from": "gpt", "value": "Shapes."},
            {"from": "human", "value": "How many?"}, {"from": "gpt", "value": f"There are {i + 1}."}]})
    (root / "cc" / "chat.json").write_text(json.dumps(chat))
    (root / "instruct.json").write_text(json.dumps(instruct))
    sqa = root / "sqa"
    (sqa / "images" / "train" / "7").mkdir(parents=True)
    (sqa / "problems.json").write_text(json.dumps(PROBLEMS))
    (sqa / "pid_splits.json").write_text(json.dumps(SPLITS))
    Image.open(pictures[0]).convert("RGB").save(sqa / "images" / "train" / "7" / "image.png")
    sqa_file, _ = scienceqa.build(str(sqa), "train", "QCM-LEA")
    return {"cc595k": (root / "cc" / "chat.json", root / "cc" / "images"), "instruct": (root / "instruct.json",
            root / "coco"), "scienceqa": (sqa_file, sqa / "images" / "train")}


def preset_run(world, module, preset, out, data, init_from=None):
    """One step of `preset` with the world's backbones and tiny sizes; the preset's recipe (template, projector,
    tower layer, the <im_start>/<im_end> flag, schedule) as it is. Returns the run's settings."""
    stage = module.STAGE_1 if module.__name__ == "pretrain" else module.STAGE_2
    argv = ["--preset", preset, "--vision-tower", world["vision"], "--llm", world["llm"], "--output-dir", str(out),
            "--data-path", str(data[0]), "--image-folder", str(data[1]), "--global-batch-size", "2",
            "--micro-batch-size", "2", "--max-steps", "1", "--num-workers", "0", "--precision", "fp32",
            "--no-activation-checkpointing", "--max-length", "256"] + (["--init-from", str(init_from)] if init_from
                                                                      else [])
    cfg = train.parse_config(argv, stage, module.PRESETS, "")
    try:
        train.train(cfg)
    finally:
        train.dist.destroy_process_group()
    return cfg


def test_the_first_papers_presets_run(world, v1_data, tmp_path):
    import finetune
    import pretrain

    runs = [(pretrain, "llava-v0-13b", "cc595k", None), (finetune, "llava-v0-13b", "instruct", "p-llava-v0-13b"),
            (finetune, "llava-v0-13b-scienceqa", "scienceqa", "p-llava-v0-13b"),
            (pretrain, "llava-v1-7b", "cc595k", None), (finetune, "llava-v1-7b-lightning", "instruct", "p-llava-v1-7b"),
            (finetune, "llava-v1-13b-scienceqa", "scienceqa", "p-llava-v1-7b")]
    for module, preset, data, init in runs:
        out = tmp_path / f"{module.__name__[0]}-{preset}"
        cfg = preset_run(world, module, preset, out, v1_data[data], init and tmp_path / init)
        assert (cfg.projector_type, cfg.vision_feature_layer, cfg.image_aspect_ratio) == ("linear", -2, "crop")
        assert cfg.mm_use_im_start_end == ("v0" in preset) and cfg.template == \
            ("llava_v0" if "v0" in preset else "plain" if module is pretrain else "vicuna_v1")
        assert len(losses(out)) == 1 and losses(out)[0] == losses(out)[0]  # a step, finite
        model, fmt, _ = generate.load(str(out))
        assert fmt.im_start_end == cfg.mm_use_im_start_end and model.config.template == cfg.template
    assert (cfg.epochs, cfg.global_batch_size) == (12, 2)  # (the ScienceQA schedule's epochs; the batch ours)


# (epochs, global batch, lr, data file) as LLaVA's scripts and the April-2023 README give them (docs/llava.md 5.2)
SCHEDULES = {("pretrain", "llava-v0-13b"): (1, 128, 2e-3, "chat.json"),
             ("pretrain", "llava-v1-13b"): (1, 128, 2e-3, "blip_laion_cc_sbu_558k.json"),
             ("finetune", "llava-v0-13b"): (3, 32, 2e-5, "llava_instruct_158k.json"),
             ("finetune", "llava-v1-7b-lightning"): (1, 128, 2e-5, "llava_instruct_80k.json"),
             ("finetune", "llava-v1-13b"): (3, 128, 2e-5, "llava_instruct_158k.json"),
             ("finetune", "llava-v1-13b-scienceqa"): (12, 128, 2e-5, "llava_train_QCM-LEA.json")}


@pytest.mark.parametrize("stage, preset", sorted(SCHEDULES))
def test_the_presets_schedules_are_the_scripts(stage, preset):
    import finetune
    import pretrain

    module = pretrain if stage == "pretrain" else finetune
    cfg = train.parse_config(["--preset", preset], module.STAGE_1 if module is pretrain else module.STAGE_2,
                             module.PRESETS, "")
    assert (cfg.epochs, cfg.global_batch_size, cfg.lr, cfg.data_path.rsplit("/", 1)[1]) == SCHEDULES[stage, preset]
    assert (cfg.vision_tower, cfg.weight_decay, cfg.warmup_ratio) == ("openai/clip-vit-large-patch14", 0, 0.03)


def test_a_bf16_stage1_output_keeps_the_base_rows_exact(world, stage1, tmp_path):
    """A bf16 run saves the embedding matrix in bf16; loading takes only the two trained rows from it, the others
    stay the base LLM's (not their bf16 rounding)."""
    import shutil

    from safetensors.torch import load_file, save_file

    out, trained = stage1
    copy = tmp_path / "bf16"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    state = load_file(copy / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, copy / "model.safetensors", {"format": "pt"})
    ids = load_tokenizer(str(out)).convert_tokens_to_ids([IM_START_TOKEN, IM_END_TOKEN])
    loaded = checkpoints.load(str(copy), dtype=torch.float32).state_dict()[EMBED]
    base = base_llm(world)[EMBED]
    others = [i for i in range(loaded.shape[0]) if i not in ids]
    assert torch.equal(loaded[others], base[others])
    assert torch.equal(loaded[ids], trained[EMBED][ids].to(torch.bfloat16).float())


def test_settings_that_cannot_work_are_refused(world, tmp_path):
    from test_train import flags

    import pretrain

    def refused(stage, **overrides):
        defaults = pretrain.STAGE_1 if stage == "pretrain" else __import__("finetune").STAGE_2
        with pytest.raises(ValueError) as e:
            train.parse_config(flags(world, tmp_path, stage, mm_use_im_start_end=True, **overrides), defaults, {}, "")
        return str(e.value)

    assert "--template plain" in refused("pretrain")  # plain writes the image alone: the tokens would never be read
    assert "--lora-r" in refused("finetune", template="llava_v0", lora_r=4)


def test_a_tied_head_is_refused(world, tmp_path, llama_tok):
    import pretrain
    from test_train import flags
    from tools.tiny import save_tiny_backbones, tiny_llama_config

    _, llm = save_tiny_backbones(str(tmp_path), llama_config=tiny_llama_config(tie_word_embeddings=True),
                                 tokenizer=llama_tok)
    cfg = train.parse_config(flags(world, tmp_path / "out", "pretrain", llm=llm, template="llava_v0",
                                   mm_use_im_start_end=True), pretrain.STAGE_1, {}, "")
    from model import LlavaModel

    model = LlavaModel.from_config(cfg.model_config(), empty=True, added_token_ids=(600, 601))
    with pytest.raises(ValueError, match="ties its input embeddings"):
        train.prepare(model, cfg, (600, 601))
