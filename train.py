"""How the model is trained: the one training loop behind pretrain.py (stage 1) and finetune.py (stage 2).

    python pretrain.py --preset toy                                      # one process (CPU or one GPU)
    torchrun --nproc_per_node 8 finetune.py --preset llava-1.5-7b        # one node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 finetune.py ...

The stages differ in data, template, what is trainable and hyper-parameters, never in code (DESIGN.md decision 5).
A step, in order:
1. Each rank reads grad_accum micro-batches; their supervised tokens are counted and summed over all ranks.
2. Each micro-batch's loss is its summed cross-entropy divided by that global count (times the world size, because
   FSDP averages gradients over ranks), so the gradient is the mean over every supervised token of the global
   batch, however tokens fall across micro-batches and ranks. LLaVA's Trainer averaged per micro-batch instead.
3. Gradient norm (clipped if asked), a non-finite check, AdamW with the cosine learning rate, and now and then a
   checkpoint.

Distributed: FSDP2 `fully_shard` on each decoder layer, then the root; MixedPrecisionPolicy(bf16 params, fp32 reduce)
over fp32 master weights (whatever dtype the backbones were saved in), or fp32 throughout; the frozen vision tower
outside FSDP, replicated in the compute dtype; non-reentrant activation checkpointing per decoder layer; SDPA
attention. The same path runs on one CPU process (gloo), on GPUs (NCCL) and multi-node, all launched by torchrun;
output_dir must then be on a filesystem every node shares (checked at start-up).
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
from dataclasses import asdict, dataclass, field, fields
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

from data import IGNORE_INDEX, ChatFormat, LazySupervisedDataset, ModalityLengthGroupedSampler, collate, \
    load_image_processor
from model import LlavaConfig, LlavaModel, projector_weights


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every knob of a run. Defaults are LLaVA-1.5's where both stages agree; each stage file sets the rest."""

    # the model
    vision_tower: str = arg("openai/clip-vit-large-patch14-336", "vision tower: hub id or local dir")
    llm: str = arg("lmsys/vicuna-7b-v1.5", "LLM (and its tokenizer): hub id or local dir")
    projector_type: str = arg("mlp2x_gelu", "linear or mlpNx_gelu")
    vision_feature_layer: int = arg(-2, "hidden state of the tower the features come from")
    vision_feature_select: str = arg("patch", "patch (drop CLS) or cls_patch")
    init_from: str = arg("", "projector weights to start from: a stage-1 output dir, or LLaVA's mm_projector.bin "
                             "(the file, its directory or its hub repo)")
    train_llm: bool = arg(False, "train the LLM with the projector (stage 2); else the projector alone (stage 1)")
    # the data
    data_path: str = arg("", "LLaVA data file (.json list or .jsonl)")
    image_folder: str = arg("", "folder the samples' image paths are relative to")
    template: str = arg("vicuna_v1", "plain, vicuna_v1, llava_v1, llama_2 or chat_template")
    image_aspect_ratio: str = arg("pad", "pad (expand to square) or crop")
    max_length: int = arg(2048, "tokens per sample, image tokens included")
    group_by_modality_length: bool = arg(False, "LLaVA-1.5's length/modality-grouped batches")
    skip_bad_samples: bool = arg(False, "skip (and count) bad samples instead of stopping")
    num_workers: int = arg(4, "data loader processes per rank")
    # optimization
    epochs: int = arg(1, "passes over the data")
    max_steps: int = arg(0, "stop after this many optimizer steps (0: run the epochs); the schedule spans it")
    global_batch_size: int = arg(128, "samples per optimizer step, over all ranks and accumulation steps")
    micro_batch_size: int = arg(16, "samples per rank per forward/backward")
    lr: float = arg(2e-5, "peak learning rate")
    warmup_ratio: float = arg(0.03, "fraction of the steps with a linear warm-up")
    weight_decay: float = arg(0.0, "AdamW weight decay (not applied to biases and norms)")
    adam_beta1: float = arg(0.9, "AdamW beta1")
    adam_beta2: float = arg(0.999, "AdamW beta2")
    adam_eps: float = arg(1e-8, "AdamW epsilon")
    grad_clip: float = arg(0.0, "max gradient norm; 0 = no clipping, as LLaVA-1.5 trained (the norm is still logged)")
    # precision and memory
    precision: str = arg("bf16", "bf16 (bf16 compute, fp32 master weights and reductions) or fp32")
    activation_checkpointing: bool = arg(True, "recompute each decoder layer in backward")
    dist_timeout: int = arg(30, "minutes any collective may wait before the job is ended (rank 0 alone loads the "
                                "weights and writes each checkpoint while the others wait)")
    # the run
    output_dir: str = arg("runs/run", "where checkpoints, metrics and the final model go")
    save_every: int = arg(1000, "checkpoint every N steps (and at the end)")
    keep_last: int = arg(2, "checkpoints to keep (0: all)")
    resume: bool = arg(False, "continue from the latest checkpoint in output_dir")
    seed: int = arg(42, "seed of the data order and the projector's initialization")

    def model_config(self):
        return LlavaConfig(**{f.name: getattr(self, f.name) for f in fields(LlavaConfig)})


# ----------------------------------------------------------------------------------------------------------------------
# Command line: flags derived from TrainConfig's fields; a preset is a dict of overrides


def parse_config(argv, stage_defaults, presets, description):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--preset", choices=sorted(presets), help="named settings; flags given here override them")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = {**asdict(TrainConfig()), **stage_defaults}[f.name]
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"{f.metadata['help']} ({default})")
        else:
            p.add_argument(flag, type=type(f.default), help=f"{f.metadata['help']} ({default!r})")
    given = vars(p.parse_args(argv))
    preset = presets[given.pop("preset")] if "preset" in given else {}
    return TrainConfig(**{**stage_defaults, **preset, **given})


# ----------------------------------------------------------------------------------------------------------------------
# Distributed setup and the model


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
    model = empty_sharded_model(cfg)
    materialize(model, device)
    full = {}
    if dist.get_rank() == 0:
        projector = projector_weights(cfg.init_from) if cfg.init_from else {}  # first: a bad path fails in seconds
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
    """The trained weights, gathered to rank 0, as a directory LlavaModel.from_pretrained (and generate.py) loads.

    Frozen modules are not written: from_pretrained takes them from the config's paths, as LLaVA does.
    """
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=True))
    if dist.get_rank() == 0:
        dtype = compute_dtype(cfg.precision)
        model.save_pretrained(path, modules=trainable_modules(model), state_dict={k: v.to(dtype) for k, v in full.items()})
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
        for old in checkpoints(cfg.output_dir)[:-cfg.keep_last]:
            shutil.rmtree(old)
    dist.barrier()


def checkpoints(output_dir):
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
# Metrics: tokens/s, MFU (reference/performance.md section 3), memory, and a loss curve


PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class FlopCounter:
    """FLOPs a step must do, per sample of T real tokens: the LLM 6·N·T + 12·L·d·T² when trained (4·N·T when frozen:
    no weight gradients), the projector 6·N_P per image token, the frozen tower's forward 2·N_V·T_v + 4·L_v·d_v·T_v²."""

    def __init__(self, model, train_llm):
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


def plot_loss(metrics_path, png_path, width=640, height=360):
    """The loss curve as a PNG, drawn with pillow."""
    from PIL import Image, ImageDraw

    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f]
    steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 60, 20, width - 20, height - 40
    draw.rectangle((left, top, right, bottom), outline="black")
    lo, hi = min(losses), max(losses)
    span, step_span = (hi - lo) or 1.0, (max(steps) - min(steps)) or 1
    points = [(left + (s - min(steps)) / step_span * (right - left), bottom - (v - lo) / span * (bottom - top))
              for s, v in zip(steps, losses)]
    if len(points) > 1:
        draw.line(points, fill=(31, 119, 180), width=2)
    draw.text((left, bottom + 8), f"step {min(steps)}", fill="black")
    draw.text((right - 70, bottom + 8), f"step {max(steps)}", fill="black")
    draw.text((4, top), f"{hi:.3f}", fill="black")
    draw.text((4, bottom - 10), f"{lo:.3f}", fill="black")
    draw.text((left + 8, top + 4), "training loss", fill="black")
    image.save(png_path)


# ----------------------------------------------------------------------------------------------------------------------
# The loop


class NonFiniteError(RuntimeError):
    pass


def global_counts(micro, flops, device):
    """Supervised tokens, tokens, skipped samples and FLOPs of the global batch: this rank's micro-batches, summed
    over all ranks in one all-reduce."""
    local = [sum((b["labels"][:, 1:] != IGNORE_INDEX).sum().item() for b in micro),
             sum(b["attention_mask"].sum().item() for b in micro), sum(b["skipped"] for b in micro),
             sum(flops(b["attention_mask"].sum(1), 0 if b["pixel_values"] is None else len(b["pixel_values"]))
                 for b in micro)]
    counts = torch.tensor(local, dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    return counts.tolist()


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
        # right padding: causal attention alone keeps padding out of every real token's view (model.forward)
        ce, _ = model(b["input_ids"].to(device), None, pixel_values, b["labels"].to(device))
        (ce * world / n_supervised).backward()
        loss_sum += ce.detach()
    dist.all_reduce(loss_sum)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip if grad_clip > 0 else float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    return loss_sum.item() / n_supervised, grad_norm.item()


def train(cfg):
    device = init_distributed(cfg.dist_timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    per_step = cfg.micro_batch_size * world
    if cfg.global_batch_size % per_step:
        raise ValueError(f"global batch {cfg.global_batch_size} is not a multiple of micro batch "
                         f"{cfg.micro_batch_size} x {world} ranks; change --micro-batch-size")
    grad_accum = cfg.global_batch_size // per_step
    if world > 1:
        check_shared_output_dir(cfg.output_dir, device)
    if not cfg.resume and checkpoints(cfg.output_dir):
        raise ValueError(f"{cfg.output_dir} already holds checkpoints of an earlier run; pass --resume to continue it, "
                         "or choose another --output-dir (or delete them) to start afresh")
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
    warmup = math.ceil(cfg.warmup_ratio * total)
    optimizer = make_optimizer(model, cfg)

    step = 0
    if cfg.resume and checkpoints(cfg.output_dir):
        step = load_checkpoint(model, optimizer, checkpoints(cfg.output_dir)[-1], cfg)
    os.makedirs(cfg.output_dir, exist_ok=True)
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    if rank == 0 and step == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)
    flops, peak = FlopCounter(model, cfg.train_llm), peak_flops(device)
    trainable = [p for p in model.parameters() if p.requires_grad]

    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, disable=rank != 0, desc=os.path.basename(cfg.output_dir.rstrip("/")))
    batches = None
    while step < total:
        if batches is None or step % steps_per_epoch == 0:
            sampler.set_epoch(step // steps_per_epoch, step % steps_per_epoch)
            batches = iter(torch.utils.data.DataLoader(
                dataset, cfg.micro_batch_size, sampler=sampler, num_workers=cfg.num_workers,
                collate_fn=partial(collate, pad_id=fmt.pad_id), pin_memory=device.type == "cuda"))
        start = time.perf_counter()
        micro = [next(batches) for _ in range(grad_accum)]
        n_supervised, n_tokens, n_skipped, work = global_counts(micro, flops, device)
        if n_supervised == 0:
            raise RuntimeError(f"step {step}: no supervised token in the whole global batch")
        lr = cosine_lr(step, total, warmup, cfg.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, grad_norm = forward_backward(model, micro, n_supervised, trainable, cfg.grad_clip, device)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise NonFiniteError(f"step {step}: loss {loss}, gradient norm {grad_norm}; stopping before the update. "
                                 f"The last good checkpoint in {cfg.output_dir} is untouched: resume from it with "
                                 "--resume, with a lower --lr or --grad-clip 1.0")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss, "lr": lr,
                  "grad_norm": grad_norm, "supervised_tokens": int(n_supervised), "tokens": int(n_tokens),
                  "tokens_per_s": n_tokens / seconds,
                  "mfu": work / (seconds * world * peak) if peak else None,
                  "peak_memory_gb": peak_memory_gb(device), "skipped_samples": int(n_skipped)}
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
        if step % cfg.save_every == 0 or step == total:
            save_checkpoint(model, optimizer, step, cfg, tokenizer, image_processor)
    bar.close()
    export_model(model, cfg.output_dir, tokenizer, image_processor, cfg)
    if rank == 0 and os.path.exists(metrics_path):
        plot_loss(metrics_path, os.path.join(cfg.output_dir, "loss.png"))
    dist.barrier()
    return model


def main(argv=None, stage_defaults=None, presets=None, description=None):
    cfg = parse_config(argv, stage_defaults or {}, presets or {}, description)
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
