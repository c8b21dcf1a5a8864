"""The 7B/13B path as a GPU node meets it, on tiny models saved the way the real repos ship them (real_format.py):
fp16 configs and .bin shards, SentencePiece tokenizers, the original LLaVA layout, a llava-hf conversion; two ranks
of which one has no image; and the README's commands against a loopback hub (hub.py), online and then offline."""

import json
import os
import subprocess
import sys

import pytest
import torch

import finetune
import real_format as rf
import train
from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ChatFormat, ModalityLengthGroupedSampler, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The repos with the LLaVA checkpoints pointing at the CLIP folder (for loading without a hub), and LLaVA data."""
    root = tmp_path_factory.mktemp("repos")
    folders = rf.hub_repos(root, clip_id=str(root / rf.CLIP))
    return {**folders, "data": str(root / "data"), "finetune": rf.finetune_data(str(root / "data")),
            "pretrain": rf.pretrain_data(str(root / "data"))}


def sentencepiece_reference(prompt, model_file, image_tokens, legacy):
    """LLaVA's tokenizer_image_token with the slow SentencePiece LlamaTokenizer it trained with, from sentencepiece
    itself: one BOS; each chunk around <image> tokenized alone (so it gets the dummy-prefix "▁"); </s> split out as
    the special token; after it, a dummy prefix only in legacy mode (tokenizer_config.json's "legacy")."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    unk = sp.encode("<unk>")

    def after_special(text):
        return sp.encode(text) if legacy else sp.encode("<unk>" + text)[len(unk):]

    ids = [sp.bos_id()]
    for k, chunk in enumerate(prompt.split("<image>")):
        ids += [IMAGE_TOKEN_INDEX] * image_tokens if k else []
        for j, piece in enumerate(chunk.split("</s>")):
            ids += [sp.eos_id()] if j else []
            ids += (after_special(piece) if j else sp.encode(piece)) if piece else []
    return ids


@pytest.mark.parametrize("legacy", [False, True])
def test_a_sentencepiece_only_tokenizer_tokenizes_as_llava_did(local, tmp_path, legacy):
    from transformers import AutoTokenizer

    folder = tmp_path / "vicuna-tokenizer"
    rf.write_tokenizer(str(folder))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": legacy}))
    assert not (folder / "tokenizer.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    fmt = ChatFormat(tokenizer, "vicuna_v1", 4)
    messages = [{"role": "user", "content": "<image>\nWhat is in the image?"}, {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": "What color is it? 12 345"}, {"role": "assistant", "content": "Orange."}]
    ids, labels = fmt.encode(messages)
    text = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
            "detailed, and polite answers to the user's questions. USER: <image>\nWhat is in the image? ASSISTANT: A "
            "cat.</s>USER: What color is it? 12 345 ASSISTANT: Orange.</s>")
    model_file = str(folder / "tokenizer.model")
    assert ids == sentencepiece_reference(text, model_file, 4, legacy)
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "A cat.</s> Orange.</s>"
    prompt = text[:text.index(" A cat.")]
    assert fmt.prompt(messages[:1]) == sentencepiece_reference(prompt, model_file, 4, legacy)


def run_stage(local, out, **overrides):
    """Stage 2 in this process on the Vicuna- and CLIP-shaped repos; returns the trained model."""
    settings = dict(vision_tower=local[rf.CLIP], llm=local[rf.VICUNA], data_path=local["finetune"],
                    image_folder=local["data"], output_dir=str(out), global_batch_size=4, micro_batch_size=2,
                    num_workers=0, max_steps=2, save_every=1000, lr=1e-3, max_length=512)
    cfg = train.TrainConfig(**{**finetune.STAGE_2, **settings, **overrides})
    return cfg, train.train(cfg)


def test_fp16_backbones_train_in_bf16_over_fp32_master_weights(local, tmp_path, monkeypatch):
    """Vicuna's config says float16: the default bf16 path keeps fp32 master weights and AdamW states, computes in
    bf16, and holds the frozen tower as a bf16 replica outside FSDP."""
    from torch.distributed.tensor import DTensor

    optimizers = []
    make_optimizer = train.make_optimizer
    monkeypatch.setattr(train, "make_optimizer", lambda *a: optimizers.append(make_optimizer(*a)) or optimizers[-1])
    try:
        cfg, model = run_stage(local, tmp_path / "out")
        assert cfg.precision == "bf16" and cfg.activation_checkpointing
        for name, p in model.named_parameters():
            if name.startswith("vision_tower."):
                assert not isinstance(p, DTensor) and p.dtype == torch.bfloat16, name
            else:
                assert isinstance(p, DTensor) and p.to_local().dtype == torch.float32, name
        states = [t for s in optimizers[0].state.values() for t in s.values() if t.ndim > 0]
        assert states and all(t.dtype == torch.float32 for t in states)
        with open(tmp_path / "out" / "metrics.jsonl") as f:
            assert all(torch.isfinite(torch.tensor(json.loads(line)["loss"])) for line in f)
    finally:
        train.dist.destroy_process_group()


def micro_batches_have_images(local, world, grad_accum):
    """[step][rank] -> whether that micro-batch has an image, from the sampler train.py uses (micro-batch 1)."""
    with open(local["finetune"]) as f:
        samples = json.load(f)
    has_image = ["image" in s for s in samples]
    lengths = [sum(len(t["value"].split()) for t in s["conversations"]) * (1 if i else -1)  # as the dataset counts
               for s, i in zip(samples, has_image)]
    order = [list(ModalityLengthGroupedSampler(lengths, 1, world, r, grad_accum, True, 3)) for r in range(world)]
    return [[has_image[order[r][step]] for r in range(world)] for step in range(grad_accum)]


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "qformer"])
def test_two_ranks_of_which_one_has_no_image_equal_one_process(local, tmp_path, projector):
    """Rank 0's first micro-batch is text-only while rank 1's has an image, and the reverse in the second, with
    gradient accumulation: the two ranks must neither hang nor abort, and must train exactly what one process
    trains on the same global batch. With the qformer too, whose text side a text-only micro-batch never reaches
    (its dropout off: one process and two ranks draw their masks from different streams)."""
    assert micro_batches_have_images(local, world=2, grad_accum=2) == [[False, True], [True, False]]
    common = dict(global_batch_size=4, micro_batch_size=1, precision="fp32", seed=3)
    extra = []
    if projector == "qformer":
        from tools.tiny import bert_tokenizer

        bert_tokenizer().save_pretrained(tmp_path / "bert")
        sizes = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                     num_query_tokens=4, vocab_size=200, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        common.update(projector_type="qformer", qformer=sizes, qformer_tokenizer=str(tmp_path / "bert"))
        extra = ["--projector-type", "qformer", "--qformer", json.dumps(sizes), "--qformer-tokenizer",
                 str(tmp_path / "bert")]
    cfg, model = run_stage(local, tmp_path / "one", **common, activation_checkpointing=False)
    try:
        one = train.get_model_state_dict(model, options=train.StateDictOptions(full_state_dict=True))
        one = {k: v.clone() for k, v in one.items() if not k.startswith("vision_tower.")}
    finally:
        train.dist.destroy_process_group()
    flags = ["--vision-tower", local[rf.CLIP], "--llm", local[rf.VICUNA], "--data-path", local["finetune"],
             "--image-folder", local["data"], "--output-dir", str(tmp_path / "two"), "--num-workers", "0",
             "--max-steps", "2", "--lr", "1e-3", "--max-length", "512", "--global-batch-size", "4",
             "--micro-batch-size", "1", "--precision", "fp32", "--seed", "3", *extra]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29533", os.path.join(ROOT, "finetune.py"), *flags], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file

    two = load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    # AdamW's first steps move a weight by about lr x gradient / (|gradient| + eps): for a gradient near eps (1e-8),
    # the rounding of a different summation order shows as a visible fraction of lr. A broken step (a lost
    # micro-batch, a wrong normaliser) moves most weights by a large fraction of lr; summation order moves a handful,
    # by a small one.
    diffs = torch.cat([(one[k] - two[k]).abs().flatten() for k in one])
    assert diffs.max() < 0.05 * 1e-3 and (diffs > 1e-6).float().mean() < 1e-4, (diffs.max(), (diffs > 1e-6).sum())
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / run / "metrics.jsonl")] for run in ("one", "two")]
    assert max(abs(a - b) for a, b in zip(*losses)) < 1e-6, losses


def test_the_original_layout_gives_transformers_llavas_logits(local):
    """liuhaotian/llava-v1.5-7b's layout (fp16 .bin shards, model_type "llava", inv_freq buffers, a CLIP copy) read by
    us equals transformers' LlavaForConditionalGeneration reading its llava-hf conversion."""
    from transformers import LlavaForConditionalGeneration

    import checkpoints

    ours = checkpoints.load(local[rf.LLAVA], dtype=torch.float32).eval()
    hf = LlavaForConditionalGeneration.from_pretrained(local[rf.LLAVA_HF], dtype=torch.float32).eval()
    assert (ours.config.projector_type, ours.config.vision_feature_layer, ours.config.image_aspect_ratio,
            ours.config.max_length) == ("mlp2x_gelu", -2, "pad", 2048)
    n = ours.num_image_tokens
    ids = torch.tensor([[1, 319, 29, 40] + [IMAGE_TOKEN_INDEX] * n + [13, 57, 88, 9, 2]])
    pixel_values = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(ids, None, pixel_values)
        expected = hf(input_ids=ids.masked_fill(ids == IMAGE_TOKEN_INDEX, hf.config.image_token_index),
                      pixel_values=pixel_values).logits[..., :logits.shape[-1]]
    assert (logits - expected).abs().max() < 1e-4


def test_init_from_takes_the_projector_of_every_layout(local, tmp_path):
    """--init-from: LLaVA's full checkpoint, its stage-1 directory or mm_projector.bin (bf16), the llava-hf
    conversion: the same projector (to bf16's precision); a checkpoint without one, or a path that is not there,
    is an error naming it, never a silently fresh projector."""
    import checkpoints
    from checkpoints import projector_weights

    reference = checkpoints.load(local[rf.LLAVA]).multi_modal_projector.state_dict()
    stage1 = local[rf.LLAVA_STAGE1]
    for source in (local[rf.LLAVA], local[rf.LLAVA_HF], stage1, os.path.join(stage1, "mm_projector.bin")):
        weights = projector_weights(source)
        assert weights.keys() == reference.keys(), source
        for k, v in reference.items():
            assert (weights[k].float() - v.float()).abs().max() <= 0.01 * v.float().abs().max(), (source, k)
    with pytest.raises(ValueError, match="holds no projector weights"):
        projector_weights(local[rf.VICUNA])
    with pytest.raises(UserError, match="is not a directory here, and not a hub repo id"):
        projector_weights(str(tmp_path / "checkpoints" / "llava-v1.5-7b-pretrain"))


@pytest.fixture(scope="module")
def hub_repos(tmp_path_factory):
    """The repos as the hub holds them: the LLaVA checkpoints name their tower by hub id."""
    return rf.hub_repos(tmp_path_factory.mktemp("hub"))


def test_the_readme_commands_through_a_loopback_hub(hub_repos, local, tmp_path):
    """Both stages (bf16, activation checkpointing; stage 2 on two ranks with images on one only, from LLaVA's
    released stage-1 projector), conversion and evaluation, every model named by hub id and downloaded through
    huggingface_hub from a hub on 127.0.0.1; then generation offline, from the cache, as on a GPU node without
    internet. Nothing pickled beyond tensors is downloaded or opened."""
    from hub import serve

    repos = hub_repos
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
           "OMP_NUM_THREADS": "1"}
    env.pop("DISABLE_SAFETENSORS_CONVERSION", None)  # model.py sets it: no hub-side conversion of .bin repos
    small = ["--image-folder", local["data"], "--num-workers", "0", "--max-steps", "2", "--global-batch-size", "4",
             "--max-length", "512", "--vision-tower", rf.CLIP, "--llm", rf.VICUNA]
    question = {"question_id": 7, "image": "coco/train2017/000000000001.png", "text": "What is in the image?"}
    (tmp_path / "questions.jsonl").write_text(json.dumps(question) + "\n")
    commands = [
        ["pretrain.py", "--data-path", local["pretrain"], *small, "--micro-batch-size", "2", "--output-dir",
         str(tmp_path / "pretrain")],
        ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534", "finetune.py", "--data-path",
         local["finetune"], *small, "--micro-batch-size", "1", "--init-from", rf.LLAVA_STAGE1,
         "--output-dir", str(tmp_path / "finetune")],
        ["tools/convert.py", "import", rf.LLAVA_STAGE1, str(tmp_path / "stage1"), "--model-base", rf.VICUNA],
        ["evaluate.py", "run", "--model", rf.LLAVA, "--questions", str(tmp_path / "questions.jsonl"), "--image-folder",
         local["data"], "--answers", str(tmp_path / "answers.jsonl"), "--max-new-tokens", "3"],
    ]
    with serve(repos) as hub:
        env["HF_ENDPOINT"] = hub.url
        for command in commands:
            result = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True,
                                    timeout=300)
            assert result.returncode == 0, (command, result.stderr[-3000:])
        downloaded = {repo: set(hub.downloaded(repo)) for repo in repos}
        asked = [path for _, path in hub.requests]
    assert {"pytorch_model-00001-of-00002.bin", "tokenizer.model"} <= downloaded[rf.LLAVA]
    assert "mm_projector.bin" in downloaded[rf.LLAVA_STAGE1]
    assert not [p for p in asked if "/discussions" in p or "/commits/" in p]  # no safetensors conversion asked for
    assert "training_args.bin" not in downloaded[rf.LLAVA]
    assert not os.path.exists(os.path.join(repos[rf.LLAVA], "training_args.bin.opened"))
    assert json.loads((tmp_path / "answers.jsonl").read_text())["question_id"] == 7
    for out in ("pretrain", "finetune", "stage1"):
        assert (tmp_path / out / "config.json").exists(), out
    # The hub gone, as on a GPU node without internet: everything from the cache. (Without HF_HUB_OFFLINE=1,
    # resolve() falls back to the cache too, but transformers' own loading fails with huggingface_hub 1.x.)
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "generate.py", "--model", rf.LLAVA, "--image",
                             os.path.join(local["data"], question["image"]), "--max-new-tokens", "3",
                             "--temperature", "0", "What is it?"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
