"""Per-GPU memory of LLaVA-1.5 stage 2, full or LoRA, at any world size: arithmetic, and the real shard sizes.

    python tools/memory.py                         # 7B and 13B: shard sizes under a simulated world of 8 + arithmetic
    python tools/memory.py --world-size 1 --lora-r 128 --micro-batch-size 4     # LoRA (LLaVA's r) on one GPU
    python tools/memory.py --world-size 1          # full fine-tuning on one GPU, and the smallest world it fits
    python tools/memory.py --measure --model 7b    # on a GPU: one real rank of a simulated world of 8, one full step

The model is built exactly as train.py builds it, from the real backbones' configs (tools/real_configs/: Vicuna-7B
or -13B v1.5, CLIP ViT-L/14-336) without their weights: empty parameters, FSDP2 per decoder layer then the root, the
frozen tower replicated in bf16 outside FSDP, bf16 compute over fp32 master weights (with --lora-r, the LLM's frozen
base in bf16 and fp32 adapters); but in one process that believes it is rank 0 of N (torch's fake process group:
collectives do nothing). Counting the local shards gives the exact
per-rank size of the sharded state. With --measure the rank also allocates its shards on the GPU, runs forward,
backward and AdamW on a batch of real shapes, and reports torch.cuda.max_memory_allocated: what one of 8 real GPUs
would hold (the gathered weights are garbage, the memory is real). Arithmetic follows docs/performance.md
section 5.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

GiB = 2**30
REAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "real_configs")
LLMS = {"7b": os.path.join(REAL, "lmsys", "vicuna-7b-v1.5"), "13b": os.path.join(REAL, "lmsys", "vicuna-13b-v1.5")}
CLIP_L_336 = os.path.join(REAL, "openai", "clip-vit-large-patch14-336")


def fake_world(world_size):
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore  # private: registers the "fake" backend
    except ImportError as e:
        raise SystemExit(f"this torch has no fake process group ({e}); the arithmetic alone: --no-shards")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)


def build_sharded(size, lora_r=0, every=1):
    import finetune
    import train

    lora = dict(finetune.PRESETS["llava-1.5-7b-lora"], lora_r=lora_r) if lora_r else {}
    settings = {k: v for k, v in lora.items() if k.startswith(("lora_", "mm_projector_lr", "lr"))}
    cfg = train.TrainConfig(**{**finetune.STAGE_2, **settings, "vision_tower": CLIP_L_336, "llm": LLMS[size],
                               "activation_checkpointing_every": every})
    return train.empty_sharded_model(cfg), cfg


def local_numel(params):
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)


def sharded(model):
    return [p for n, p in model.named_parameters() if not n.startswith("vision_tower.")]


def arithmetic(model, micro_batch, seq_len, supervised=256, ce_chunk=2048, every=1):
    """Bytes per rank, by item, for stage 2 with FSDP2 full sharding, bf16 compute, activation checkpointing of every
    `every`-th layer (train.checkpointed_layers; 0: none). The sharded weights are counted at their dtypes: fp32
    masters of what trains, bf16 for LoRA's frozen base."""
    text = model.language_model.config
    d, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    params = sharded(model)
    trainable = [p for p in params if p.requires_grad]
    layer = sum(p.numel() for p in model.language_model.base_model.layers[0].parameters())
    root = sum(p.numel() for n, p in model.named_parameters()
               if not n.startswith(("vision_tower.", "language_model.model.layers.")))
    tokens = micro_batch * seq_len
    checkpointed = len(range(0, layers, every)) if every else 0
    return {
        "weights: fp32 masters (+ LoRA's frozen bf16 base), sharded": sum(
            (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in params),
        "frozen vision tower, bf16 (replicated)": 2 * sum(p.numel() for p in model.vision_tower.parameters()),
        "fp32 gradients (sharded)": 4 * local_numel(trainable),
        "AdamW m and v, fp32 (sharded)": 8 * local_numel(trainable),
        "bf16 gathered weights: root + 2 layers (prefetch)": 2 * (root + 2 * layer),
        f"checkpointed layer inputs, bf16 ({checkpointed} of {layers} layers)": 2 * tokens * d * checkpointed,
        "layers not checkpointed: all activations (~34 B/token/width)": 34 * tokens * d * (layers - checkpointed),
        "one layer recomputed in backward (~34 B/token/width)": 34 * tokens * d * (checkpointed > 0),
        "logits of one CE chunk (fp32 + grad), supervised tokens only": 8 * min(ce_chunk, micro_batch * supervised) * vocab,
    }


def trainable(model):
    return [p for p in sharded(model) if p.requires_grad]


def fits(nbytes, gpus=(24, 40, 80), reserve=2 * GiB):
    """Which GPU sizes (GB) hold `nbytes`, leaving `reserve` for the CUDA context, NCCL and the allocator's slack."""
    ok = [g for g in gpus if nbytes + reserve <= g * 1e9]
    return f"fits {ok[0]} GB" if ok else f"over {gpus[-1]} GB"


def smallest_world(model, items, world):
    """The smallest world size at which this rank's total fits 80 GB: the sharded states shrink as 1/world, the
    rest stays (items were counted at `world`)."""
    states = sum(v for k, v in items.items() if "sharded" in k)
    rest = sum(items.values()) - states
    return next(n for n in range(1, 4097) if rest + states * world / n + 2 * GiB <= 80e9)


def measure(model, cfg, micro_batch, seq_len, device, steps=3):
    """One real rank: shards on the device, forward/backward/AdamW steps at real shapes.

    Returns the peak allocated bytes and the last step's seconds. The fake group skips all communication, so the
    time is the rank's compute alone: an upper bound on the throughput of 8 real GPUs.
    """
    import time

    import train
    from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from model import supervised_targets

    train.materialize(model, device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    optimizer = train.make_optimizer(model, cfg)
    n_img = model.num_image_tokens
    ids = torch.randint(0, 32000, (micro_batch, seq_len), device=device)
    ids[:, 1:1 + n_img] = IMAGE_TOKEN_INDEX
    labels = ids.masked_fill(ids == IMAGE_TOKEN_INDEX, -100)
    labels[:, : seq_len - 224] = -100  # the replies: the last ~224 text tokens
    pixels = torch.randn(micro_batch, 3, 336, 336, device=device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        start = time.perf_counter()
        n = (supervised_targets(ids, labels) != IGNORE_INDEX).sum()
        (model(ids, None, pixels, labels) / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device), time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(LLMS), nargs="+", default=sorted(LLMS))
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--lora-r", type=int, default=0, help="LoRA's rank (LLaVA-1.5's recipe: 128); 0: full fine-tuning")
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--activation-checkpointing-every", type=int, default=1, metavar="K",
                   help="checkpoint every K-th decoder layer (train.py's flag; 0: none): less memory, more FLOPs")
    p.add_argument("--seq-len", type=int, nargs="+", default=[800, 2048], help="tokens per sample, 576 of them image")
    p.add_argument("--measure", action="store_true", help="also run one real rank on the GPU")
    p.add_argument("--json", help="write the numbers here too")
    args = p.parse_args(argv)
    if args.measure and not torch.cuda.is_available():
        raise SystemExit("--measure needs a GPU; without one the shard sizes and the arithmetic are reported")

    fake_world(args.world_size)
    report = {}
    for size in args.model:
        model, cfg = build_sharded(size, args.lora_r, args.activation_checkpointing_every)
        total = sum(p.numel() for p in model.parameters())
        how = f"LoRA r {args.lora_r} ({local_numel(trainable(model)) / 1e6:.1f}M trainable here)" if args.lora_r \
            else "full"
        print(f"\nLLaVA-1.5-{size.upper()} stage 2, {how}, world size {args.world_size}, micro-batch "
              f"{args.micro_batch_size}: {total / 1e9:.3f}B parameters, {local_numel(sharded(model)) / 1e6:.1f}M "
              "of them sharded on this rank, the tower's "
              f"{sum(p.numel() for p in model.vision_tower.parameters()) / 1e6:.1f}M replicated")
        for seq_len in args.seq_len:
            items = arithmetic(model, args.micro_batch_size, seq_len, every=args.activation_checkpointing_every)
            print(f"  T = {seq_len}:")
            for name, nbytes in items.items():
                print(f"    {name:<62} {nbytes / GiB:7.2f} GiB")
            print(f"    {'total':<62} {sum(items.values()) / GiB:7.2f} GiB   {fits(sum(items.values()))}")
            if not args.lora_r and sum(items.values()) > 80e9:
                print(f"    {'fits 80 GB from world size':<62} {smallest_world(model, items, args.world_size):7d}")
            entry = {"items_gib": {k: v / GiB for k, v in items.items()}, "total_gib": sum(items.values()) / GiB}
            if args.measure:
                import train

                device = torch.device("cuda")
                peak, seconds = measure(model, cfg, args.micro_batch_size, seq_len, device)
                lengths = torch.full((args.micro_batch_size,), seq_len)
                flops = train.FlopCounter(model, train_llm=not args.lora_r)(  # (measure supervises 224 per sample)
                    lengths, args.micro_batch_size, 224 * args.micro_batch_size)
                entry.update(measured_peak_gib=peak / GiB, step_seconds=seconds,
                             tokens_per_s=args.micro_batch_size * seq_len / seconds,
                             mfu_compute_only=flops / seconds / (train.peak_flops(device) or float("nan")))
                print(f"    {'measured peak (torch.cuda.max_memory_allocated)':<62} {peak / GiB:7.2f} GiB"
                      f"  [{torch.cuda.get_device_name()}]")
                print(f"    step {seconds:.3f} s, {entry['tokens_per_s']:.0f} tokens/s on this rank, MFU "
                      f"{entry['mfu_compute_only']:.1%} (compute only: the fake group does no communication)")
            report[f"{size}/T{seq_len}"] = entry
    dist.destroy_process_group()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
