"""LLaVA-1.5-7B and -13B from the real backbones' configs, without weights, as rank 0 of a simulated world of 8:
built, sharded and stepped by train.py's own code (tools/dry_run.py: fake tensors, no compute). Checks the dtypes of
the real recipe and that a rank whose micro-batch has no image issues the same collectives as one whose has."""

from collections import Counter

import pytest
import torch

from tools import dry_run
from tools.memory import fake_world


@pytest.fixture(scope="module")
def simulated_world():
    fake_world(8)
    yield
    torch.distributed.destroy_process_group()


def check_recipe(r, trainable):
    assert r["sharded_dtypes"] == ["DTensor(FakeTensor) torch.float32"]  # fp32 masters, though Vicuna says float16
    assert r["replicated_dtypes"] == ["FakeTensor torch.bfloat16"]  # the tower, outside FSDP
    assert set(r["computes_with"].values()) == {"FakeTensor torch.bfloat16"}
    assert r["optimizer_state"] == ["exp_avg: DTensor(FakeTensor) torch.float32",  # (fused AdamW: the step count
                                    "exp_avg_sq: DTensor(FakeTensor) torch.float32",  # on the device too)
                                    "step: FakeTensor torch.float32"]
    assert r["trainable_params"] == trainable and r["sharded_params"] == trainable
    assert r["local_params"] == pytest.approx(r["sharded_params"] / 8, rel=2e-3)
    assert r["replicated_params"] == 303_507_456  # CLIP ViT-L/14-336's vision tower
    for step in r["steps"].values():
        assert step["gradients"] == ["DTensor(FakeTensor) torch.float32"]


def test_7b_steps_with_and_without_an_image_issue_the_same_collectives(simulated_world):
    r = dry_run.dry_run("7b")
    check_recipe(r, trainable=6_738_415_616 + 20_979_712)  # Vicuna-7B (Llama-2-7B's count) + mlp2x_gelu 1024->4096
    assert r["difference"] is None
    ops = [op for op, _, _, _ in r["steps"]["text-only"]["collectives"]]
    assert ops.count("c10d._allgather_base_") == 1 + 32 + 32  # root + each layer in forward and again in backward
    assert ops.count("c10d._reduce_scatter_base_") == 33


def test_13b_builds_loads_shards_and_steps(simulated_world):
    r = dry_run.dry_run("13b", steps=("image",), load=True)
    check_recipe(r, trainable=13_015_864_320 + 31_467_520)  # Vicuna-13B + mlp2x_gelu 1024->5120
    sent = Counter()
    for _, numel, dtype, _ in r["load_collectives"]:
        sent[dtype] += numel
    assert sent[torch.float16] >= 13_015_864_320  # the LLM goes out in Vicuna's saved fp16: half of fp32's traffic
    assert sent[torch.float16] + sent[torch.float32] >= r["total_params"]  # every weight comes from rank 0
