"""What only a GPU can check: bf16 against fp32, FSDP over NCCL (at world size 1: one GPU), the compiled decode step.
Skipped without CUDA; tools/gpu_check.py runs them on a GPU node with the rest of its checks.

Tolerances (bf16 keeps 8 bits of mantissa, ~3 significant digits): logits of the same weights agree to a cosine
similarity of 0.999 and a loss within 1%; a short training run in bf16 follows the fp32 run's losses within 2%.
"""

import json

import pytest
import torch

import checkpoints
import finetune
import generate
import real_format as rf
import train
from data import IMAGE_TOKEN_INDEX

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tools/gpu_check.py)")


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("repos")
    folders = rf.hub_repos(root, clip_id=str(root / rf.CLIP))
    return {**folders, "data": str(root / "data"), "finetune": rf.finetune_data(str(root / "data"))}


def batch(model, device):
    n = model.num_image_tokens
    ids = torch.tensor([[1, 319, 29, 40] + [IMAGE_TOKEN_INDEX] * n + list(range(30, 90)) + [2]], device=device)
    pixel_values = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0)).to(device)
    return ids, pixel_values, ids.masked_fill(ids == IMAGE_TOKEN_INDEX, -100)


def test_bf16_logits_and_loss_match_fp32(local):
    device = torch.device("cuda")
    fp32 = checkpoints.load(local[rf.LLAVA], dtype=torch.float32).to(device).eval()
    bf16 = checkpoints.load(local[rf.LLAVA], dtype=torch.bfloat16).to(device).eval()
    ids, pixel_values, labels = batch(fp32, device)
    with torch.no_grad():
        a, b = fp32(ids, None, pixel_values).float(), bf16(ids, None, pixel_values).float()
        (ce_a, _), (ce_b, _) = fp32(ids, None, pixel_values, labels), bf16(ids, None, pixel_values, labels)
    cosine = torch.nn.functional.cosine_similarity(a.flatten(0, 1), b.flatten(0, 1), dim=-1)
    assert cosine.min() > 0.999, cosine.min()
    assert abs(ce_a.item() - ce_b.item()) / ce_a.item() < 0.01


def test_fsdp_over_nccl_trains_bf16_like_fp32(local, tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = train.TrainConfig(**{**finetune.STAGE_2, **dict(
            vision_tower=local[rf.CLIP], llm=local[rf.VICUNA], data_path=local["finetune"], image_folder=local["data"],
            output_dir=str(tmp_path / precision), global_batch_size=4, micro_batch_size=2, num_workers=0,
            max_steps=4, lr=1e-3, warmup_ratio=0.0, max_length=512, precision=precision)})
        try:
            train.train(cfg)
            assert train.dist.get_backend() == "nccl"
        finally:
            train.dist.destroy_process_group()
        with open(tmp_path / precision / "metrics.jsonl") as f:
            losses[precision] = [json.loads(line)["loss"] for line in f]
    assert all(abs(a - b) / a < 0.02 for a, b in zip(losses["fp32"], losses["bf16"])), losses


def test_compiled_decode_gives_the_eager_tokens(local):
    """One StaticDecoder for calls of different prompt lengths: the eager tokens, one graph captured, and inductor
    wraps it in a CUDA graph (a skip, e.g. for a mutated input that is not at a static address, is counted)."""
    from torch._dynamo.utils import counters

    device = torch.device("cuda")
    model = checkpoints.load(local[rf.LLAVA], dtype=torch.bfloat16).to(device).eval()
    ids, pixel_values, _ = batch(model, device)
    prompts = [ids[0, :-1].tolist(), ids[0, :-20].tolist(), ids[0, :-1].tolist() + [319, 29, 40]]
    eager = [generate.generate(model, [p], pixel_values, max_new_tokens=24) for p in prompts]
    graphs, skips = counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]
    static = generate.StaticDecoder(model)
    compiled = [generate.generate(model, [p], pixel_values, max_new_tokens=24, decoder=static) for p in prompts]
    assert compiled == eager and all(len(e[0]) == 24 for e in eager)  # later calls replay the compiled step
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert counters["inductor"]["cudagraph_skips"] - skips == 0
