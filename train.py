"""How the model is trained: the one training loop behind pretrain.py (stage 1) and finetune.py (stage 2).

    python pretrain.py --preset toy                                      # one process (CPU or one GPU)
    torchrun --nproc_per_node 8 finetune.py --preset llava-1.5-7b        # one node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 finetune.py ...

The stages differ in data, template, what is trainable and hyper-parameters, never in code: each stage file is a
dict of settings and a call to main(). A step (train_step), in order:
1. Each rank reads grad_accum micro-batches; their supervised tokens are counted and summed over all ranks.
2. Each micro-batch's loss is its summed cross-entropy divided by that global count (times the world size, because
   FSDP averages gradients over ranks), so the gradient is the mean over every supervised token of the global
   batch, however tokens fall across micro-batches and ranks. LLaVA's Trainer averaged per micro-batch instead.
3. Gradient norm (clipped if asked), a non-finite check, AdamW with the cosine learning rate; now and then a
   checkpoint that a later run resumes exactly.

Distributed: FSDP2 `fully_shard` on each decoder layer, then the root; MixedPrecisionPolicy(bf16 params, fp32 reduce)
over fp32 master weights (whatever dtype the backbones were saved in), or fp32 throughout; the frozen vision tower
outside FSDP, replicated in the compute dtype; non-reentrant activation checkpointing per decoder layer; SDPA
attention. The same path runs on one CPU process (gloo), on GPUs (NCCL) and multi-node, all launched by torchrun;
output_dir must then be on a filesystem every node shares (checked at start-up). Each step appends a JSON line to
output_dir/metrics.jsonl (loss, lr, gradient norm, tokens/s, MFU, memory); tools/plot_loss.py draws it.
"""

import argparse
import json
import math
import os
import re
import resource
import secrets
import shutil
import socket
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

import checkpoints
from data import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, ChatFormat, LazySupervisedDataset, ModalityLengthGroupedSampler,
                  collate, load_image_processor)
from model import LlavaConfig, LlavaModel, supervised_targets


def arg(help, default=MISSING):
    return field(default=default, metadata={"help": help})


@dataclass(kw_only=True)
class TrainConfig:
    """Every knob of a run. Where LLaVA-1.5's two stages agree, the default is theirs; where they differ (the fields
    without a default), pretrain.py's STAGE_1 and finetune.py's STAGE_2 give the values."""

    # the model
    vision_tower: str = arg("vision tower: hub id or local dir", "openai/clip-vit-large-patch14-336")
    llm: str = arg("LLM (and its tokenizer): hub id or local dir", "lmsys/vicuna-7b-v1.5")
    projector_type: str = arg("linear or mlpNx_gelu", "mlp2x_gelu")
    vision_feature_layer: int = arg("hidden state of the tower the features come from", -2)
    vision_feature_select: str = arg("patch (drop CLS) or cls_patch", "patch")
    init_from: str = arg("projector weights to start from: a stage-1 output dir, or LLaVA's mm_projector.bin (the "
                         "file, its directory or its hub repo)", "")
    train_llm: bool = arg("train the LLM with the projector (stage 2); else the projector alone (stage 1)")
    # the data
    data_path: str = arg("LLaVA data file (.json list or .jsonl)", "")
    image_folder: str = arg("folder the samples' image paths are relative to", "")
    template: str = arg("plain, vicuna_v1, llava_v1, llama_2 or chat_template")
    image_aspect_ratio: str = arg("pad (expand to square) or crop")
    max_length: int = arg("tokens per sample, image tokens included", 2048)
    group_by_modality_length: bool = arg("LLaVA-1.5's length/modality-grouped batches")
    skip_bad_samples: bool = arg("skip (and count) bad samples instead of stopping", False)
    num_workers: int = arg("data loader processes per rank", 4)
    # optimization
    epochs: int = arg("passes over the data", 1)
    max_steps: int = arg("stop after this many optimizer steps (0: run the epochs); the schedule spans it", 0)
    global_batch_size: int = arg("samples per optimizer step, over all ranks and accumulation steps")
    micro_batch_size: int = arg("samples per rank per forward/backward")
    lr: float = arg("peak learning rate")
    warmup_ratio: float = arg("fraction of the steps with a linear warm-up", 0.03)
    weight_decay: float = arg("AdamW weight decay (not applied to biases and norms)", 0.0)
    adam_beta1: float = arg("AdamW beta1", 0.9)
    adam_beta2: float = arg("AdamW beta2", 0.999)
    adam_eps: float = arg("AdamW epsilon", 1e-8)
    grad_clip: float = arg("max gradient norm; 0 = no clipping, as LLaVA-1.5 trained (the norm is still logged)", 0.0)
    # precision and memory
    precision: str = arg("bf16 (bf16 compute, fp32 master weights and reductions) or fp32", "bf16")
    activation_checkpointing: bool = arg("recompute each decoder layer in backward", True)
    dist_timeout: int = arg("minutes any collective may wait before the job is ended (rank 0 alone loads the weights "
                            "and writes each checkpoint while the others wait)", 30)
    # the run
    output_dir: str = arg("where checkpoints, metrics and the final model go", "runs/run")
    save_every: int = arg("checkpoint every N steps (and at the end)")
    keep_last: int = arg("checkpoints to keep (0: all)", 2)
    resume: bool = arg("continue from the latest checkpoint in output_dir", False)
    seed: int = arg("seed of the data order and the projector's initialization", 42)

    def model_config(self):
        return LlavaConfig(**{f.name: getattr(self, f.name) for f in fields(LlavaConfig)})


def parse_config(argv, stage_defaults, presets, description):
    """Flags derived from TrainConfig's fields, defaults from the stage; a preset is a dict of overrides, and flags
    given on the command line win over it."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--preset", choices=sorted(presets), help="named settings; flags given here override them")
    for f in fields(TrainConfig):
        flag, default = "--" + f.name.replace("_", "-"), stage_defaults.get(f.name, f.default)
        default = "no default" if default is MISSING else default
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"{f.metadata['help']} ({default})")
        else:
            p.add_argument(flag, type=f.type, help=f"{f.metadata['help']} ({default!r})")
    given = vars(p.parse_args(argv))
    preset = presets[given.pop("preset")] if "preset" in given else {}
    settings = {**stage_defaults, **preset, **given}
    unset = [f.name for f in fields(TrainConfig) if f.default is MISSING and f.name not in settings]
    if unset:
        raise ValueError(f"no value for {unset}: a stage gives them (pretrain.py's STAGE_1, finetune.py's STAGE_2), "
                         "or pass them as flags")
    return TrainConfig(**settings)


# ----------------------------------------------------------------------------------------------------------------------
# The loop


def train(cfg):
    device = init_distributed(cfg.dist_timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    grad_accum = accumulation_steps(cfg, world)
    check_output_dir(cfg, device)
    torch.manual_seed(cfg.seed)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.llm)  # first: a tokenizer that cannot load fails in seconds
    image_processor = load_image_processor(cfg.vision_tower)
    model = build_model(cfg, device)
    fmt = ChatFormat(tokenizer, cfg.template, model.num_image_tokens)
    dataset = LazySupervisedDataset(cfg.data_path, cfg.image_folder, fmt, image_processor, cfg.image_aspect_ratio,
                                    cfg.max_length, cfg.skip_bad_samples)
    sampler = ModalityLengthGroupedSampler(dataset.modality_lengths, cfg.micro_batch_size, world, rank, grad_accum,
                                           cfg.group_by_modality_length, cfg.seed)
    steps_per_epoch = sampler.steps_per_epoch()
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    optimizer = make_optimizer(model, cfg)
    step = load_checkpoint(model, optimizer, saved_checkpoints(cfg.output_dir)[-1], cfg) if cfg.resume and \
        saved_checkpoints(cfg.output_dir) else 0
    log = MetricsLog(cfg.output_dir, fresh=step == 0, total=total, initial=step)
    flops = FlopCounter(model, cfg.train_llm, device)

    batches = None
    while step < total:
        if batches is None or step % steps_per_epoch == 0:  # a new epoch, or the resumed one from its step
            sampler.set_epoch(step // steps_per_epoch, step % steps_per_epoch)
            batches = iter(torch.utils.data.DataLoader(
                dataset, cfg.micro_batch_size, sampler=sampler, num_workers=cfg.num_workers,
                collate_fn=partial(collate, pad_id=fmt.pad_id), pin_memory=device.type == "cuda"))
        record = train_step(model, optimizer, batches, grad_accum, step, total, cfg, flops, device)
        step += 1
        log.write({"step": step, "epoch": round(step / steps_per_epoch, 4), **record})
        if step % cfg.save_every == 0 or step == total:
            save_checkpoint(model, optimizer, step, cfg, tokenizer, image_processor)
    log.close()
    export_model(model, cfg.output_dir, tokenizer, image_processor, cfg)
    dist.barrier()
    return model


def train_step(model, optimizer, batches, grad_accum, step, total, cfg, flops, device):
    """One optimizer step: this rank reads its grad_accum micro-batches, then every rank counts, runs forward and
    backward, and updates together. `step` counts from 0 and sets the learning rate. Returns the step's metrics (the
    time includes reading the data)."""
    start = time.perf_counter()
    micro = [next(batches) for _ in range(grad_accum)]
    counts = global_counts(micro, flops, device)
    if counts["supervised_tokens"] == 0:
        raise RuntimeError(f"step {step}: no supervised token in the whole global batch")
    lr = cosine_lr(step, total, math.ceil(cfg.warmup_ratio * total), cfg.lr)
    for group in optimizer.param_groups:
        group["lr"] = lr
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    loss, grad_norm = forward_backward(model, micro, counts["supervised_tokens"], trainable, cfg.grad_clip, device)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise NonFiniteError(f"step {step}: loss {loss}, gradient norm {grad_norm}; stopping before the update. "
                             f"The last good checkpoint in {cfg.output_dir} is untouched: resume from it with "
                             "--resume, with a lower --lr or --grad-clip 1.0")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    work = counts.pop("flops")
    return {"loss": loss, "lr": lr, "grad_norm": grad_norm, **{k: int(v) for k, v in counts.items()},
            "tokens_per_s": counts["tokens"] / seconds,
            "mfu": work / (seconds * dist.get_world_size() * flops.peak) if flops.peak else None,
            "peak_memory_gb": peak_memory_gb(device)}


def global_counts(micro, flops, device):
    """What the global batch holds: this rank's micro-batches counted, then summed over all ranks in one all-reduce.
    supervised_tokens is the loss's denominator (model.supervised_targets defines what counts)."""
    images = [0 if b["pixel_values"] is None else len(b["pixel_values"]) for b in micro]
    local = {"supervised_tokens": sum((supervised_targets(b["input_ids"], b["labels"]) != IGNORE_INDEX).sum().item()
                                      for b in micro),
             "tokens": sum(b["attention_mask"].sum().item() for b in micro),
             "samples": sum(len(b["input_ids"]) for b in micro),
             "image_samples": sum((b["input_ids"] == IMAGE_TOKEN_INDEX).any(1).sum().item() for b in micro),
             "images": sum(images),
             "skipped_samples": sum(b["skipped"] for b in micro),
             "flops": sum(flops(b["attention_mask"].sum(1), n) for b, n in zip(micro, images))}
    counts = torch.tensor(list(local.values()), dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    return dict(zip(local, counts.tolist()))


def forward_backward(model, micro, n_supervised, trainable, grad_clip, device):
    """Forward and backward over this rank's micro-batches of one step, then the gradient norm (clipped when
    grad_clip > 0). Returns the loss of the whole global batch and the gradient norm, every rank the same.

    Each micro-batch's summed cross-entropy is divided by the global batch's supervised-token count, times the world
    size because FSDP averages gradients over ranks: the gradient is then the mean over every supervised token.
    """
    world = dist.get_world_size()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for b in micro:
        pixel_values = b["pixel_values"].to(device, non_blocking=True) if b["pixel_values"] is not None else None
        # no attention mask: right padding needs none, and SDPA keeps its causal flash kernel (model.forward)
        ce = model(b["input_ids"].to(device), None, pixel_values, b["labels"].to(device))
        (ce * world / n_supervised).backward()
        loss_sum += ce.detach()
    dist.all_reduce(loss_sum)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip if grad_clip > 0 else float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    return loss_sum.item() / n_supervised, grad_norm.item()


class NonFiniteError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------------------
# Distributed setup and the model


def accumulation_steps(cfg, world):
    per_step = cfg.micro_batch_size * world
    if cfg.global_batch_size % per_step:
        raise ValueError(f"global batch {cfg.global_batch_size} is not a multiple of micro batch "
                         f"{cfg.micro_batch_size} x {world} ranks; change --micro-batch-size")
    return cfg.global_batch_size // per_step


def check_output_dir(cfg, device):
    """Before anything is loaded: every rank sees the same output_dir, and a fresh run does not overwrite another's."""
    if dist.get_world_size() > 1:
        check_shared_output_dir(cfg.output_dir, device)
    if not cfg.resume and saved_checkpoints(cfg.output_dir):
        raise ValueError(f"{cfg.output_dir} already holds checkpoints of an earlier run; pass --resume to continue it, "
                         "or choose another --output-dir (or delete them) to start afresh")


def init_distributed(timeout_minutes=30):
    """The process group torchrun describes in the environment, or a group of one without torchrun.

    The timeout covers the longest wait of any rank: the others wait in the first broadcast while rank 0 reads the
    backbones (13B: 26 GB of fp16), and at the end of each checkpoint while rank 0 writes it. NCCL's default (10
    minutes) can end a healthy job.
    """
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = timedelta(minutes=timeout_minutes)
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return device


def build_model(cfg, device):
    """Every rank builds the model with empty parameters and shards it; rank 0 loads the weights and broadcasts them.

    So only rank 0 ever holds a full copy (in CPU memory, in the backbones' saved dtype), and only once.
    """
    from data import UserError

    model = empty_sharded_model(cfg)
    materialize(model, device)
    full, projector = {}, {}
    if dist.get_rank() == 0:
        try:  # first: a bad path, or a projector of another type or width, fails in seconds
            if cfg.init_from:
                projector = checkpoints.projector_weights(cfg.init_from, expected=model.multi_modal_projector)
        except UserError as e:
            raise UserError(f"--init-from {e}") from None
        full = LlavaModel.from_config(cfg.model_config(), dtype="auto").state_dict()
        full.update({f"multi_modal_projector.{k}": v for k, v in projector.items()})
    # Each tensor is copied into the rank's shard (or replica) in that parameter's dtype: fp16 -> fp32 is exact.
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    model.train()
    return model


def empty_sharded_model(cfg):
    """The model on the meta device, fp32 whatever the backbones' configs say (the optimizer's master weights), with
    what trains and activation checkpointing set, sharded: what each rank builds before any memory is allocated."""
    model = LlavaModel.from_config(cfg.model_config(), dtype=torch.float32, empty=True)
    prepare(model, cfg)
    shard(model, cfg.precision)
    return model


def prepare(model, cfg):
    """What trains (the projector; the LLM too in stage 2; never the tower) and activation checkpointing.

    Checkpointing wraps each decoder layer's forward in torch's non-reentrant checkpoint itself, rather than through
    transformers' switch, whose mechanics differ between the versions GPU nodes and laptops have.
    """
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    model.language_model.requires_grad_(cfg.train_llm)
    if cfg.activation_checkpointing:
        for layer in model.language_model.base_model.layers:
            layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)


def compute_dtype(precision):
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be bf16 or fp32, not {precision!r}")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def shard(model, precision):
    """FSDP2: each decoder layer, then the root (embeddings, norm, head, projector). The frozen vision tower stays out
    of FSDP, a full copy on every rank in the compute dtype (CLIP-L: 0.6 GB in bf16): it needs no all-gather and no
    fp32 copy, and a rank whose micro-batch has no image simply skips it. Sharded, it would be a collective that
    such a rank skips while the others run it, and every rank would hang."""
    dtype = compute_dtype(precision)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    assert not any(p.requires_grad for p in model.vision_tower.parameters()), "a replicated tower must stay frozen"
    for layer in model.language_model.base_model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp, ignored_params=set(model.vision_tower.parameters()))
    model.vision_tower.to(dtype)


def materialize(model, device):
    """Allocate the (sharded) parameters on `device`, uninitialized; keep the buffers' values (rotary frequencies,
    CLIP's position ids: computed at construction, in no checkpoint)."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


def check_shared_output_dir(output_dir, device, wait_seconds=10.0):
    """Every rank must see the same output_dir: each writes its shard of every checkpoint's training state there, and
    rank 0 completes the checkpoint by renaming its directory. Across nodes that takes a filesystem they all share;
    on node-local disks the other nodes' shards would be left out, silently, and resuming would fail."""
    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(output_dir, exist_ok=True)
    probe = os.path.join(output_dir, ".shared-filesystem-check")
    nonce = torch.tensor([secrets.randbits(62) if rank == 0 else 0], device=device)
    if rank == 0:
        with open(probe, "w") as f:
            f.write(str(nonce.item()))
    dist.broadcast(nonce, 0)
    expected, seen = str(nonce.item()), torch.zeros(world, dtype=torch.int64, device=device)
    deadline = time.monotonic() + wait_seconds  # a network filesystem may show another node's file after a moment
    while not seen[rank] and time.monotonic() < deadline:
        if os.path.exists(probe) and read_text(probe) == expected:
            seen[rank] = 1
        else:
            time.sleep(0.2)
    dist.all_reduce(seen)
    if rank == 0:
        os.remove(probe)
    blind = [r for r, ok in enumerate(seen.tolist()) if not ok]
    if blind:
        raise RuntimeError(f"--output-dir {output_dir} is not shared by every rank: rank(s) {blind} cannot see what "
                           f"rank 0 wrote there (this is rank {rank} on {socket.gethostname()}). Every rank writes "
                           "its part of each checkpoint; on several nodes, put output_dir on a filesystem all mount")


def read_text(path):
    with open(path) as f:
        return f.read()


# ----------------------------------------------------------------------------------------------------------------------
# Optimization


def make_optimizer(model, cfg):
    """AdamW over the trainable parameters; LLaVA's Trainer exempts biases and norms (1-D tensors) from decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def cosine_lr(step, total, warmup, peak):
    """HF's cosine schedule with linear warm-up (LLaVA's): the lr of optimizer step `step` (from 0)."""
    if step < warmup:
        return peak * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: the model as safetensors (rank 0) + resumable state (sharded, torch.distributed.checkpoint)


def trainable_modules(model):
    return tuple(name for name, m in model.named_children() if any(p.requires_grad for p in m.parameters()))


def export_model(model, path, tokenizer, image_processor, cfg):
    """The trained weights, gathered to rank 0, as a directory checkpoints.load (and generate.py) loads.

    Frozen modules are not written: checkpoints.load takes them from the config's paths, as LLaVA does.
    """
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=True))
    if dist.get_rank() == 0:
        dtype = compute_dtype(cfg.precision)
        checkpoints.save(model, path, modules=trainable_modules(model), state_dict={k: v.to(dtype) for k, v in full.items()})
        tokenizer.save_pretrained(path)
        if image_processor is not None:
            image_processor.save_pretrained(path)


def resumable_state(model, optimizer):
    return {"model": get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)),
            "optim": get_optimizer_state_dict(model, optimizer)}


def save_checkpoint(model, optimizer, step, cfg, tokenizer, image_processor):
    """output_dir/checkpoint-NNNNNN, written as .tmp-checkpoint-NNNNNN and renamed when complete."""
    name = f"checkpoint-{step:06d}"
    tmp = os.path.join(cfg.output_dir, f".tmp-{name}")
    if dist.get_rank() == 0:  # leftovers of interrupted writes
        for old in os.listdir(cfg.output_dir) if os.path.isdir(cfg.output_dir) else []:
            if old.startswith(".tmp-checkpoint-"):
                shutil.rmtree(os.path.join(cfg.output_dir, old))
    dist.barrier()
    export_model(model, tmp, tokenizer, image_processor, cfg)
    dcp.save(resumable_state(model, optimizer), checkpoint_id=os.path.join(tmp, "train_state"))
    torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               os.path.join(tmp, "train_state", f"rng-rank{dist.get_rank()}.pt"))
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step, "config": asdict(cfg)}, f, indent=2)
        os.replace(tmp, os.path.join(cfg.output_dir, name))
        for old in saved_checkpoints(cfg.output_dir)[:-cfg.keep_last]:
            shutil.rmtree(old)
    dist.barrier()


def saved_checkpoints(output_dir):
    """Complete checkpoints, oldest first (an interrupted write leaves only a .tmp- directory)."""
    if not os.path.isdir(output_dir):
        return []
    names = sorted(n for n in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d{6}", n))
    return [os.path.join(output_dir, n) for n in names]


def load_checkpoint(model, optimizer, path, cfg):
    """Restore the trainable weights, the optimizer and the RNG of a checkpoint; returns its step."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        saved = json.load(f)
    for key in ("global_batch_size", "seed", "data_path", "group_by_modality_length", "epochs", "max_steps"):
        if saved["config"][key] != getattr(cfg, key):
            raise ValueError(f"{path} was written with {key}={saved['config'][key]!r}, this run has "
                             f"{getattr(cfg, key)!r}; resuming would change the data order or the schedule")
    state = resumable_state(model, optimizer)
    dcp.load(state, checkpoint_id=os.path.join(path, "train_state"))
    missing, unexpected = set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise ValueError(f"{path} does not match this model: missing {sorted(trainable & set(missing))[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    set_optimizer_state_dict(model, optimizer, state["optim"])
    rng = torch.load(os.path.join(path, "train_state", f"rng-rank{dist.get_rank()}.pt"), weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    return saved["step"]


# ----------------------------------------------------------------------------------------------------------------------
# Metrics: MFU (FLOPs as docs/performance.md section 3 counts them), memory, the log


class MetricsLog:
    """output_dir/metrics.jsonl, a JSON object per optimizer step (appended on resume), and a progress bar, on rank 0."""

    def __init__(self, output_dir, fresh, total, initial):
        from tqdm import tqdm

        self.rank0 = dist.get_rank() == 0
        self.path = os.path.join(output_dir, "metrics.jsonl")
        os.makedirs(output_dir, exist_ok=True)
        if self.rank0 and fresh and os.path.exists(self.path):
            os.remove(self.path)
        self.bar = tqdm(total=total, initial=initial, disable=not self.rank0,
                        desc=os.path.basename(output_dir.rstrip("/")))

    def write(self, record):
        if self.rank0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
            self.bar.update(1)

    def close(self):
        self.bar.close()


# Dense bf16 peaks (docs/performance.md section 1), matched against torch.cuda.get_device_name in this order: the
# PCIe and NVL H100s ("NVIDIA H100 PCIe", "NVIDIA H100 NVL") before the SXM one ("NVIDIA H100 80GB HBM3").
PEAK_BF16_FLOPS = {"A100": 312e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class FlopCounter:
    """FLOPs a step must do, per sample of T real tokens: the LLM 6·N·T + 12·L·d·T² when trained (4·N·T when frozen:
    no weight gradients), the projector 6·N_P per image token, the frozen tower's forward 2·N_V·T_v + 4·L_v·d_v·T_v².
    `peak` is the device's dense bf16 FLOP/s (None off a known GPU), MFU's denominator per rank."""

    def __init__(self, model, train_llm, device=None):
        self.peak = peak_flops(device) if device is not None else None
        text, vision = model.language_model.config.get_text_config(), model.vision_tower.config
        embed = model.language_model.get_input_embeddings().weight.numel()
        tied = text.tie_word_embeddings
        self.n_llm = sum(p.numel() for p in model.language_model.parameters()) - (0 if tied else embed)
        self.llm_coeff = 6 if train_llm else 4
        self.attn = 12 * text.num_hidden_layers * text.hidden_size
        self.proj_per_token = 6 * sum(p.numel() for p in model.multi_modal_projector.parameters())
        t_v = (vision.image_size // vision.patch_size) ** 2 + model.has_cls
        n_vision = sum(p.numel() for p in model.vision_tower.parameters())
        self.per_image = 2 * n_vision * t_v + 4 * vision.num_hidden_layers * vision.hidden_size * t_v ** 2
        self.image_tokens = model.num_image_tokens

    def __call__(self, tokens_per_sample, n_images):
        t = tokens_per_sample.double()
        llm = (self.llm_coeff * self.n_llm * t + self.attn * t * t).sum().item()
        return llm + n_images * (self.per_image + self.proj_per_token * self.image_tokens)


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main(argv=None, stage_defaults=None, presets=None, description=None):
    cfg = parse_config(argv, stage_defaults or {}, presets or {}, description)
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
