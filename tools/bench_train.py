"""Training-step speed on CPU: train.train_step against a plain PyTorch loop, with and without the levers, in one run.

    python tools/bench_train.py                          # a small toy world built in a temporary folder (~1 min)
    python tools/bench_train.py --world runs/toy/world   # the toy world tools/toy_world.py built
    python tools/bench_train.py --steps 20 --levers baseline,pack --compile   # fewer rows, and per-block compile too

The model is the toy world's (tools/toy_world.py: a 3-layer, 96-wide Llama and a tiny CLIP), in stage 2 as
`finetune.py --preset toy` trains it (fp32, the LLM and projector trained), with a fresh projector. Every row runs
the same global batches, read once before any timing from the toy data through the same sampler; the steps' data
loading is therefore not timed, in any row:

- plain: the same model built unsharded (LlavaModel.from_config), fused AdamW (as train.py's), for each micro-batch
  model(...) / N and backward, then clip_grad_norm_ and the update: what a minimal PyTorch loop does, without FSDP,
  counting, metrics.
- train_step rows: train.build_model (FSDP2 in a one-process world) and train.train_step, as train.py runs a step,
  with the settings of each lever (--levers picks them; --compile adds the per-block compile rows, inductor: slow
  to compile on CPU, and its first steps are left out of the timing as warm-up).

The rows run interleaved (step s of every row, then step s + 1), so a load that comes and goes on a shared machine
slows them alike. Each row reports steps/s from its median step time, its step time over the plain loop's (above 1:
slower than plain), tokens/s, and the padded fraction of the positions the LLM ran over. CPU timings swing with
whatever else the machine runs: compare rows of one run.
"""

import argparse
import os
import sys
import statistics
import tempfile
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

LEVERS = {  # name: the TrainConfig settings of a train_step row (also: pack-256, rows of 256 positions)
    "baseline": dict(),
    "ac-all": dict(activation_checkpointing=True, activation_checkpointing_every=1),
    "ac-every-2": dict(activation_checkpointing=True, activation_checkpointing_every=2),
    "contiguous": dict(micro_batch_order="contiguous"),
    "pack": dict(pack=True),
    "contiguous+pack": dict(micro_batch_order="contiguous", pack=True),
}
COMPILED = {"compile": dict(compile_blocks=True), "compile+contiguous+pack": dict(compile_blocks=True,
                                                                                    micro_batch_order="contiguous",
                                                                                    pack=True)}


def toy_config(world, out, micro_batch_size, global_batch_size):
    import finetune
    import train

    toy = {k: v for k, v in finetune.PRESETS["toy"].items() if k != "needs"}
    return train.TrainConfig(**{**finetune.STAGE_2, **toy, "vision_tower": os.path.join(world, "vision"),
                                "llm": os.path.join(world, "llm"),
                                "data_path": os.path.join(world, "conversations.json"),
                                "image_folder": os.path.join(world, "images"), "init_from": "", "output_dir": out,
                                "micro_batch_size": micro_batch_size, "global_batch_size": global_batch_size})


def global_batches(cfg, steps):
    """`steps` global batches of samples (lists of micro-batches of dataset items), in the sampler's order for each
    micro-batch order, read once: {order: [[micro-batch samples, ...] per step]}."""
    from data import MICRO_BATCH_ORDERS, LazySupervisedDataset, ModalityLengthGroupedSampler, load_image_processor, \
        load_tokenizer
    from model import LlavaModel

    tokenizer = load_tokenizer(cfg.llm)
    fmt = LlavaModel.from_config(cfg.model_config(), empty=True).chat_format(tokenizer)
    dataset = LazySupervisedDataset(cfg.data_path, cfg.image_folder, fmt, load_image_processor(cfg.vision_tower),
                                    cfg.image_aspect_ratio, cfg.max_length)
    grad_accum = cfg.global_batch_size // cfg.micro_batch_size
    items, out = {}, {}
    for order in MICRO_BATCH_ORDERS:
        sampler = ModalityLengthGroupedSampler(dataset.modality_lengths, cfg.micro_batch_size, 1, 0, grad_accum,
                                               cfg.group_by_modality_length, cfg.seed, micro_batch_order=order)
        indices = list(sampler)[:steps * cfg.global_batch_size]
        if len(indices) < steps * cfg.global_batch_size:
            raise SystemExit(f"the data has {len(indices) // cfg.global_batch_size} steps of an epoch; ask fewer "
                             "--steps or a bigger --world")
        for i in indices:
            if i not in items:
                items[i] = dataset[i]
        mbs = cfg.micro_batch_size
        micro = [[items[i] for i in indices[j:j + mbs]] for j in range(0, len(indices), mbs)]
        out[order] = [micro[s * grad_accum:(s + 1) * grad_accum] for s in range(steps)]
    return out, fmt.pad_id


def plain_loop(cfg, batches, pad_id):
    """The minimal loop: one unsharded fp32 model, AdamW, no counting. Returns run_step(s)."""
    import train
    from data import collate
    from model import LlavaModel

    torch.manual_seed(cfg.seed)
    model = LlavaModel.from_config(cfg.model_config())
    train.prepare(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, fused=True)  # (as train.make_optimizer)
    collated = [[collate(mb, pad_id) for mb in step] for step in batches]

    def step(s):
        micro = collated[s]
        n = sum((train.supervised_targets(b["input_ids"], b["labels"]) != -100).sum() for b in micro)
        for b in micro:
            (model(b["input_ids"], None, b["pixel_values"], b["labels"]) / n).backward()
        torch.nn.utils.clip_grad_norm_(params, float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return None

    return step


def train_step_row(cfg, batches, pad_id, steps, device):
    """train.train_step as train.py runs it (FSDP2 over one rank, counts, metrics). Returns run_step(s), which
    returns the step's record."""
    import train
    from data import collate, collate_packed

    model = train.build_model(cfg, device)
    optimizer = train.make_optimizer(model, cfg)
    flops = train.FlopCounter(model, cfg.train_llm, device)
    collated = [[collate_packed(mb, pad_id, cfg.pack_length) if cfg.pack else collate(mb, pad_id) for mb in step]
                for step in batches]

    def step(s):
        return train.train_step(model, optimizer, iter(collated[s]), len(collated[s]), s, steps, cfg, flops, device)

    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", help="a toy world's folder (tools/toy_world.py --world-only); when it does not exist, a "
                                   "small one (barely trained backbones of the toy sizes) is built there; default: "
                                   "in a temporary folder")
    p.add_argument("--steps", type=int, default=12, help="steps per row, warm-up included")
    p.add_argument("--warmup", type=int, default=2, help="first steps of each row left out of the timing")
    p.add_argument("--micro-batch-size", type=int, default=4, help="micro-batch (the toy preset's global batch 16 "
                                                                   "then takes 4 accumulation steps)")
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--levers", default=",".join(LEVERS), help=f"train_step rows, of {', '.join(LEVERS)}")
    p.add_argument("--compile", action="store_true", help="add per-block compile rows (inductor, slow on CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import train
    with tempfile.TemporaryDirectory() as tmp:
        world = args.world or os.path.join(tmp, "world")
        if not os.path.isdir(world):
            from model import quiet_transformers
            from tools.toy_world import build_world

            with quiet_transformers():
                build_world(world, n_images=200, n_test=4, clip_steps=2, llm_steps=2)
        cfg = toy_config(world, os.path.join(tmp, "out"), args.micro_batch_size, args.global_batch_size)
        batches, pad_id = global_batches(cfg, args.steps)
        extra = {"pack-256": dict(pack=True, pack_length=256)}
        levers = {**{k: {**LEVERS, **extra}[k] for k in args.levers.split(",") if k},
                  **(COMPILED if args.compile else {})}
        device = train.init_distributed()
        try:
            runs = {"plain PyTorch loop (no FSDP)": plain_loop(cfg, batches["llava"], pad_id)}
            for name, settings in levers.items():
                c = replace(cfg, **settings)
                runs[f"train_step: {name}"] = train_step_row(c, batches[c.micro_batch_order], pad_id, args.steps,
                                                             device)
            # Interleaved: step s of every row, then step s + 1 of every row, so that a load that comes and goes on
            # a shared machine slows every row alike; each row's median step time.
            times, records = {name: [] for name in runs}, {name: [] for name in runs}
            for s in range(args.steps):
                for name, run_step in runs.items():
                    start = time.perf_counter()
                    record = run_step(s)
                    if s >= args.warmup:
                        times[name].append(time.perf_counter() - start)
                        records[name].append(record)
        finally:
            train.dist.destroy_process_group()
    rows = []
    for name in runs:
        timed = [r for r in records[name] if r]  # (the plain loop keeps no records)
        step_s = statistics.median(times[name])
        tokens = sum(r["tokens"] for r in timed) / len(timed) / step_s if timed else None
        padded = 1 - sum(r["tokens"] for r in timed) / sum(r["positions"] for r in timed) if timed else None
        rows.append((name, 1 / step_s, tokens, padded))
    plain = rows[0][1]
    accum = cfg.global_batch_size // cfg.micro_batch_size
    print(f"\ntoy world stage 2, fp32, global batch {cfg.global_batch_size} = {accum} x {cfg.micro_batch_size}, "
          f"{args.steps - args.warmup} timed steps per row (median), {torch.get_num_threads()} threads, CPU\n")
    print(f"| {'row':<42} | steps/s | time vs plain | tokens/s | padded |")
    print(f"|{'-' * 44}|---------|---------------|----------|--------|")
    for name, rate, tokens, padded in rows:
        print(f"| {name:<42} | {rate:7.2f} | {plain / rate:13.2f} | "
              f"{'' if tokens is None else f'{tokens:8.0f}':>8} | {'' if padded is None else f'{padded:.1%}':>6} |")


if __name__ == "__main__":
    main()
