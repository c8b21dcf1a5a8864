"""How the model is trained: the one training loop behind pretrain.py (stage 1) and finetune.py (stage 2).

    python pretrain.py --preset toy                                      # one process (CPU or one GPU)
    torchrun --nproc_per_node 8 finetune.py --preset llava-1.5-7b        # one node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 finetune.py ...

The stages differ in data, template, what is trainable and hyper-parameters, never in code: each stage file is a
dict of settings and a call to main(). LoRA (--lora-r, lora.py) is a setting too: the LLM frozen under trainable
adapters; and --init-from a whole LLaVA model starts a run from its LLM and projector. A step (train_step), in order:
1. Each rank reads grad_accum micro-batches; their supervised tokens are counted and summed over all ranks.
2. Each micro-batch's loss is its summed cross-entropy divided by that global count (times the world size, because
   FSDP averages gradients over ranks), so the gradient is the mean over every supervised token of the global
   batch, however tokens fall across micro-batches and ranks. LLaVA's Trainer averaged per micro-batch instead.
3. Gradient norm (clipped if asked), a non-finite check, AdamW with the cosine learning rate; now and then a
   checkpoint that a later run resumes exactly (check_resume says what a resume may change; after a non-finite loss,
   set_aside_checkpoint moves the checkpoint of the weights that gave it out of --resume's way).
Settings are checked before anything loads (check_settings, check_paths); input a user can get wrong ends the run
with one `error: ...` line naming the flag, file or sample (data.UserError).

Distributed: FSDP2 `fully_shard` on each decoder layer, then the root; MixedPrecisionPolicy(bf16 params, fp32 reduce)
over fp32 master weights (whatever dtype the backbones were saved in), or fp32 throughout; the frozen vision tower
outside FSDP, replicated in the compute dtype; non-reentrant activation checkpointing of every decoder layer (or
every K-th: --activation-checkpointing-every); SDPA attention. Opt-in speed levers: --compile-blocks (torch.compile
per decoder layer), --micro-batch-order contiguous (micro-batches of similar lengths), --pack (several samples per
row); docs/performance.md section 7. The same path runs on one CPU process (gloo), on GPUs (NCCL) and multi-node, all
launched by torchrun; output_dir must then be on a filesystem every node shares (checked at start-up). Each step
appends a JSON line to output_dir/metrics.jsonl (loss, lr, gradient norm, padded fraction, tokens/s, MFU, memory);
tools/plot_loss.py draws it.
"""

import argparse
import fcntl
import hashlib
import json
import math
import os
import re
import resource
import secrets
import shutil
import socket
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
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
import lora
from data import (DATASET_BALANCES, IGNORE_INDEX, IMAGE_TOKEN_INDEX, MICRO_BATCH_ORDERS, TEMPLATES, BalancedSampler,
                  DataError, DataFiles, LazySupervisedDataset, ModalityLengthGroupedSampler, UserError, collate,
                  collate_packed, data_files, load_image_processor, load_tokenizer)
from model import QFORMER_TOKENIZER, LlavaConfig, LlavaModel, add_im_start_end, load_instruction_tokenizer, \
    load_vision_tower, supervised_targets


def arg(help, default=MISSING):
    if isinstance(default, dict):  # (a mutable default: each config gets its own copy)
        return field(default_factory=lambda: dict(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def default_of(f):
    return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default


@dataclass(kw_only=True)
class TrainConfig:
    """Every knob of a run. Where LLaVA-1.5's two stages agree, the default is theirs; where they differ (the fields
    without a default), pretrain.py's STAGE_1 and finetune.py's STAGE_2 give the values."""

    # the model
    vision_tower: str = arg("vision tower: hub id or local dir", "openai/clip-vit-large-patch14-336")
    llm: str = arg("LLM (and its tokenizer): hub id or local dir", "lmsys/vicuna-7b-v1.5")
    projector_type: str = arg("linear, mlpNx_gelu (LLaVA's) or qformer (InstructBLIP's)", "mlp2x_gelu")
    qformer: dict = arg("the qformer projector's sizes as JSON (qformer.QFormerConfig's fields; InstructBLIP's "
                        "where not given), e.g. '{\"num_hidden_layers\": 4}'", {})
    qformer_tokenizer: str = arg("the qformer's own tokenizer: a BERT tokenizer's hub id or local dir", "")
    vision_feature_layer: int = arg("hidden state of the tower the features come from", -2)
    vision_feature_select: str = arg("patch (drop CLS) or cls_patch", "patch")
    init_from: str = arg("what to start from: a stage-1 output dir or LLaVA's mm_projector.bin (the file, its "
                         "directory or its hub repo) for the projector; or a whole LLaVA model (ours, the original "
                         "layout, llava-hf; a dir or hub id) for the projector and the LLM", "")
    train_llm: bool = arg("train the LLM with the projector (stage 2); else the projector alone (stage 1)")
    lora_r: int = arg("LoRA rank: train low-rank adapters on the LLM's linear layers (base frozen, held in the "
                      "compute dtype) instead of the whole LLM; 0: no LoRA", 0)
    lora_alpha: int = arg("LoRA alpha: the adapters' update is scaled by alpha / r", 256)
    lora_dropout: float = arg("dropout on the adapters' input", 0.05)
    # the data
    data_path: str = arg("LLaVA data file (.json list or .jsonl); several separated by commas (a.json,b.jsonl), "
                         "each one dataset", "")
    image_folder: str = arg("folder the samples' image paths are relative to", "")
    template: str = arg("plain, vicuna_v1, llava_v1, llama_2, chat_template or llava_v0 (the first paper's ###)")
    image_aspect_ratio: str = arg("pad (expand to square) or crop")
    max_length: int = arg("tokens per sample, image tokens included", 2048)
    mm_use_im_start_end: bool = arg("the first paper's <im_start>/<im_end> around each image: two tokens added to the "
                                    "tokenizer, their input embeddings trained with the projector in stage 1", False)
    group_by_modality_length: bool = arg("LLaVA-1.5's length/modality-grouped batches")
    dataset_balance: str = arg("with several data files: concat (one dataset of all) or sqrt (InstructBLIP: each "
                               "global batch from one file, drawn with probability proportional to the square root "
                               "of its size)", "concat")
    skip_bad_samples: bool = arg("skip (and count) bad samples instead of stopping", False)
    num_workers: int = arg("data loader processes per rank", 4)
    # optimization
    epochs: int = arg("passes over the data", 1)
    max_steps: int = arg("stop after this many optimizer steps (0: run the epochs); the schedule spans it", 0)
    global_batch_size: int = arg("samples per optimizer step, over all ranks and accumulation steps")
    micro_batch_size: int = arg("samples per rank per forward/backward")
    lr: float = arg("peak learning rate")
    mm_projector_lr: float = arg("peak learning rate of the projector (LLaVA's mm_projector_lr); 0: --lr", 0.0)
    warmup_ratio: float = arg("fraction of the steps with a linear warm-up", 0.03)
    weight_decay: float = arg("AdamW weight decay (not applied to biases and norms)", 0.0)
    adam_beta1: float = arg("AdamW beta1", 0.9)
    adam_beta2: float = arg("AdamW beta2", 0.999)
    adam_eps: float = arg("AdamW epsilon", 1e-8)
    grad_clip: float = arg("max gradient norm; 0 = no clipping, as LLaVA-1.5 trained (the norm is still logged)", 0.0)
    # precision and memory
    precision: str = arg("bf16 (bf16 compute, fp32 master weights and reductions) or fp32", "bf16")
    activation_checkpointing: bool = arg("recompute decoder layers in backward (which: "
                                         "--activation-checkpointing-every)", True)
    activation_checkpointing_every: int = arg("with --activation-checkpointing, recompute every K-th decoder layer "
                                              "(layers 0, K, 2K, ...): 1 all of them (+1 forward of FLOPs, least "
                                              "memory), 2 half, 0 none", 1)
    compile_blocks: bool = arg("torch.compile each decoder layer (torchtitan's per-block compile; the first steps "
                               "compile)", False)
    micro_batch_order: str = arg("how a global batch is dealt into micro-batches: llava (with "
                                 "--group-by-modality-length LLaVA's split_to_even_chunks of the length-sorted batch: "
                                 "each spans all lengths; else in order) or contiguous (sorted, cut into runs of "
                                 "similar lengths: less padding)", "llava")
    pack: bool = arg("pack each micro-batch's samples into as few rows as hold them (per-sample positions, "
                     "attention within a sample only: the same loss and gradients, less padding)", False)
    pack_length: int = arg("with --pack, the rows' length; 0: the micro-batch's longest sample (never more positions "
                           "than unpacked). Longer rows pack fuller but SDPA's attention then spans the whole row "
                           "(masked), so its cost grows with the row", 0)
    dist_timeout: int = arg("minutes any collective may wait before the job is ended (rank 0 alone loads the weights "
                            "and writes each checkpoint while the others wait)", 30)
    # the run
    output_dir: str = arg("where checkpoints, metrics and the final model go", "runs/run")
    save_every: int = arg("checkpoint every N steps (and at the end)")
    keep_last: int = arg("checkpoints to keep (0: all)", 2)
    resume: bool = arg("continue from the latest checkpoint in output_dir", False)
    seed: int = arg("seed of the data order and the projector's initialization", 42)

    def __post_init__(self):
        check_settings(self)

    def model_config(self):
        return LlavaConfig(**{f.name: getattr(self, f.name) for f in fields(LlavaConfig)})


def flag(name):
    return "--" + name.replace("_", "-")


# What a setting may hold, beyond its type. Flags, presets and a TrainConfig built in code all pass through
# check_settings, so a bad value is named by its flag before anything is loaded.
RULES = {
    "projector_type": (lambda v: re.fullmatch(r"linear|mlp[1-9]\d*x_gelu|qformer", v),
                       "'linear', 'mlpNx_gelu' (mlp2x_gelu) or 'qformer'"),
    "vision_feature_select": (lambda v: v in ("patch", "cls_patch"), "'patch' or 'cls_patch'"),
    "template": (lambda v: v in TEMPLATES, " or ".join(map(repr, TEMPLATES))),
    "image_aspect_ratio": (lambda v: v in ("pad", "crop"), "'pad' or 'crop'"),
    "dataset_balance": (lambda v: v in DATASET_BALANCES, " or ".join(map(repr, DATASET_BALANCES))),
    "precision": (lambda v: v in ("bf16", "fp32"), "'bf16' or 'fp32'"),
    "activation_checkpointing_every": (lambda v: v >= 0, "0 (none) or more"),
    "pack_length": (lambda v: v >= 0, "0 (the longest sample of each micro-batch) or more"),
    "micro_batch_order": (lambda v: v in MICRO_BATCH_ORDERS, " or ".join(map(repr, MICRO_BATCH_ORDERS))),
    "max_length": (lambda v: v >= 1, "at least 1"),
    "num_workers": (lambda v: v >= 0, "0 or more"),
    "epochs": (lambda v: v >= 1, "at least 1"),
    "max_steps": (lambda v: v >= 0, "0 (run --epochs) or more"),
    "global_batch_size": (lambda v: v >= 1, "at least 1"),
    "micro_batch_size": (lambda v: v >= 1, "at least 1"),
    "lr": (lambda v: v > 0, "above 0"),
    "mm_projector_lr": (lambda v: v >= 0, "0 (the same as --lr) or more"),
    "lora_r": (lambda v: v >= 0, "0 (no LoRA) or more"),
    "lora_alpha": (lambda v: v >= 1, "at least 1"),
    "lora_dropout": (lambda v: 0 <= v < 1, "from 0 up to (not including) 1"),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "from 0 to 1"),
    "weight_decay": (lambda v: v >= 0, "0 or more"),
    "adam_beta1": (lambda v: 0 <= v < 1, "from 0 up to (not including) 1"),
    "adam_beta2": (lambda v: 0 <= v < 1, "from 0 up to (not including) 1"),
    "adam_eps": (lambda v: v > 0, "above 0"),
    "grad_clip": (lambda v: v >= 0, "0 (no clipping) or more"),
    "dist_timeout": (lambda v: v >= 1, "at least 1 (minutes)"),
    "save_every": (lambda v: v >= 1, "at least 1"),
    "keep_last": (lambda v: v >= 0, "0 (keep all) or more"),
}


def check_settings(cfg):
    """Each setting has its field's type (an int where a float is asked is taken) and obeys RULES."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            setattr(cfg, f.name, value)
        if not isinstance(value, f.type) or (f.type is int and isinstance(value, bool)):
            raise UserError(f"{flag(f.name)} {value!r}: must be a{'n' if f.type is int else ''} {f.type.__name__}")
        if f.type is float and not math.isfinite(value):
            raise UserError(f"{flag(f.name)} {value!r}: must be a finite number")
        rule = RULES.get(f.name)
        if rule and not rule[0](value):
            raise UserError(f"{flag(f.name)} {value!r}: must be {rule[1]}")
    if cfg.mm_use_im_start_end and cfg.template == "plain":
        raise UserError("--mm-use-im-start-end with --template plain: plain writes each image alone (LLaVA's "
                        "preprocess_plain drops the wrapping too), so the two tokens would never be read; use "
                        "--template llava_v0, the first paper's, or --no-mm-use-im-start-end")
    if cfg.mm_use_im_start_end and cfg.lora_r:
        raise UserError("--mm-use-im-start-end with --lora-r: a LoRA output holds the adapters and the projector, not "
                        "the two new embedding rows its base LLM lacks; fine-tune fully (--lora-r 0)")
    try:  # the model's own checks (the qformer's sizes and tokenizer)
        cfg.model_config()
    except UserError as e:
        name = re.match(r"\w*", str(e)).group()  # (its messages start with the field's name)
        raise UserError(flag(name) + str(e)[len(name):] if name in {f.name for f in fields(cfg)} else str(e)) from None
    if cfg.lora_r and not cfg.train_llm:
        raise UserError(f"--lora-r {cfg.lora_r}: LoRA adapts the LLM, which this stage keeps frozen (--no-train-llm); "
                        "use it with finetune.py (--train-llm), or pass --lora-r 0")


def parse_config(argv, stage_defaults, presets, description, check_files=False):
    """Flags derived from TrainConfig's fields, defaults from the stage; a preset is a dict of overrides, and flags
    given on the command line win over it. check_files: the files the run reads must exist (check_paths), and a
    preset's missing ones are reported with what the preset needs."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--preset", choices=sorted(presets), help="named settings; flags given here override them")
    for f in fields(TrainConfig):
        default = stage_defaults.get(f.name, default_of(f))
        default = "no default" if default is MISSING else default
        if f.type is bool:
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, help=f"{f.metadata['help']} ({default})")
        else:
            p.add_argument(flag(f.name), type=json_object if f.type is dict else f.type,
                           help=f"{f.metadata['help']} ({default!r})")
    given = vars(p.parse_args(argv))
    preset = dict(presets[given["preset"]]) if "preset" in given else {}
    needs = preset.pop("needs", None)  # what a preset's paths need, said when one is missing (check_paths)
    unknown = sorted(set(preset) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise UserError(f"--preset {given['preset']} sets unknown settings {unknown}; fix the preset")
    settings = {**stage_defaults, **preset, **{k: v for k, v in given.items() if k != "preset"}}
    unset = [flag(f.name) for f in fields(TrainConfig) if default_of(f) is MISSING and f.name not in settings]
    if unset:
        raise UserError(f"no value for {', '.join(unset)}: a stage gives them (pretrain.py's STAGE_1, finetune.py's "
                        "STAGE_2), or pass them as flags")
    cfg = TrainConfig(**settings)
    if check_files:
        check_paths(cfg, set(preset), f"--preset {given.get('preset')}" + (f", which needs {needs}" if needs else ""))
    return cfg


def json_object(text):
    """A flag's JSON object (--qformer '{"num_hidden_layers": 4}')."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("not a JSON object ({...})")
    return value


def check_paths(cfg, from_preset=(), preset_note=""):
    """The files a run reads exist: a missing one is named by its flag (and, when a preset set it, what the preset
    needs) before anything loads. A backbone that is not a local path is a hub id, which loading resolves."""
    def missing(name, what, value=None):  # (value: the one file of --data-path's several that is missing)
        value = getattr(cfg, name) if value is None else value
        note = f" (set by {preset_note})" if name in from_preset and preset_note else ""
        return UserError(f"{flag(name)} {value}: {what}{note}")

    for path in data_files(cfg.data_path):
        if not os.path.isfile(path):
            raise missing("data_path", "no such data file" if not os.path.isdir(path) else
                          "is a directory; pass the .json or .jsonl data file", path)
    if cfg.image_folder and not os.path.isdir(cfg.image_folder):
        raise missing("image_folder", "no such directory")
    # (a resumed run starts from its checkpoint, not --init-from)
    for name in ("vision_tower", "llm", "qformer_tokenizer") + (() if cfg.resume else ("init_from",)):
        value = getattr(cfg, name)
        local = value.startswith((".", "/", "~")) or value.count("/") != 1
        if value and local and not os.path.exists(value):
            raise missing(name, "no such file or directory (nor a hub id, owner/name)")


# ----------------------------------------------------------------------------------------------------------------------
# The loop


def train(cfg):
    """A run of cfg: the model it trained (the final one is also in cfg.output_dir)."""
    check_paths(cfg)
    device = init_distributed(cfg.dist_timeout)
    lock = check_output_dir(cfg, device)
    try:
        return fit(cfg, device)
    finally:
        if lock:
            lock.close()


def fit(cfg, device):
    rank, world = dist.get_rank(), dist.get_world_size()
    grad_accum = accumulation_steps(cfg, world)
    resume_from = saved_checkpoints(cfg.output_dir)[-1] if cfg.resume else None
    saved = check_resume(resume_from, cfg) if resume_from else None
    torch.manual_seed(cfg.seed)

    tokenizer = named(load_tokenizer, "llm", cfg.llm)  # first: a tokenizer that cannot load fails in seconds
    tokenizers = (tokenizer, load_instruction_tokenizer(cfg.model_config()))  # the qformer's too; None for the others
    image_processor = named(load_image_processor, "vision_tower", cfg.vision_tower)
    im_ids, added = add_im_start_end(tokenizer) if cfg.mm_use_im_start_end else ((), False)  # (saved with the model)
    # A resumed run takes its trainable weights from the checkpoint; LoRA's frozen base may come from --init-from.
    model = build_model(replace(cfg, init_from="") if resume_from and not cfg.lora_r else cfg, device, im_ids, added)
    torch.manual_seed(cfg.seed + rank)  # from here each rank draws its own random numbers (dropout masks): the weights
                                        # were initialised on rank 0 and broadcast
    fmt = model.chat_format(*tokenizers)
    paths = data_files(cfg.data_path)
    dataset = DataFiles(LazySupervisedDataset(path, cfg.image_folder, fmt, image_processor, cfg.image_aspect_ratio,
                                              cfg.max_length, cfg.skip_bad_samples) for path in paths)
    data_sha256 = ",".join(file_sha256(path) for path in paths) if rank == 0 else None  # (one file: its sha256)
    if saved and rank == 0 and saved.get("data_sha256") not in (None, data_sha256):
        print(f"warning: --data-path {cfg.data_path} changed since {resume_from} was written (its sha256 differs): "
              "the run goes on over the file as it is now, so its data order differs from the run's before",
              file=sys.stderr)
    balanced = {"sizes": dataset.sizes} if cfg.dataset_balance == "sqrt" else {}
    sampler = (BalancedSampler if balanced else ModalityLengthGroupedSampler)(
        dataset.modality_lengths, cfg.micro_batch_size, world, rank, grad_accum, cfg.group_by_modality_length,
        cfg.seed, micro_batch_order=cfg.micro_batch_order, **balanced)
    steps_per_epoch = sampler.steps_per_epoch()
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    optimizer = make_optimizer(model, cfg)
    step = load_checkpoint(model, optimizer, resume_from) if resume_from else 0
    log = MetricsLog(cfg.output_dir, step, total)
    flops = FlopCounter(model, cfg.train_llm and not cfg.lora_r, device)
    if device.type == "cuda" and flops.peak is None:
        print(f"warning: [rank {rank}] no dense bf16 peak known for {torch.cuda.get_device_name(device)!r} "
              "(train.PEAK_BF16_FLOPS): metrics.jsonl's mfu is null; tflops_per_gpu is still reported",
              file=sys.stderr)
    skipped = torch.zeros(len(dataset), dtype=torch.bool)

    batches = None
    while step < total:
        if batches is None or step % steps_per_epoch == 0:  # a new epoch, or the resumed one from its step
            sampler.set_epoch(step // steps_per_epoch, step % steps_per_epoch)
            # The loader draws its workers' seed from a generator of its own: from the global RNG, it would take a
            # draw where a resumed run does not, and the steps' random numbers (LoRA's dropout) would differ.
            batches = iter(torch.utils.data.DataLoader(
                ReportErrors(dataset), cfg.micro_batch_size, sampler=sampler, num_workers=cfg.num_workers,
                collate_fn=partial(collate_or_error, pad_id=fmt.pad_id, pack=cfg.pack, row_length=cfg.pack_length),
                pin_memory=device.type == "cuda",
                generator=torch.Generator().manual_seed(cfg.seed)))
        try:
            record = train_step(model, optimizer, batches, grad_accum, step, total, cfg, flops, device, skipped)
        except NonFiniteError as e:
            raise NonFiniteError(f"{e}; {set_aside_checkpoint(cfg.output_dir, step)}") from None
        if rank == 0:  # checkpoint-{step}'s weights gave a finite loss: older checkpoints may go
            prune_checkpoints(cfg.output_dir, cfg.keep_last, good_up_to=step)
        step += 1
        log.write({"step": step, "epoch": round(step / steps_per_epoch, 4), **record})
        if step % cfg.save_every == 0 or step == total:
            save_checkpoint(model, optimizer, step, cfg, tokenizers, image_processor, data_sha256)
    if rank == 0:
        prune_checkpoints(cfg.output_dir, cfg.keep_last, good_up_to=step)
    log.close()
    report_skipped(dataset, skipped, device)
    export_model(model, cfg.output_dir, tokenizers, image_processor, cfg, final=True)
    dist.barrier()
    return model


def named(load, name, path):
    """load(path), a UserError naming the flag that gave the path."""
    try:
        return load(path)
    except UserError as e:
        raise UserError(f"{flag(name)} {e}") from None


class ReportErrors(torch.utils.data.Dataset):
    """The dataset, with a sample's UserError returned as an item rather than raised: raised in a loader worker, it
    would reach the user wrapped in the worker's traceback. train_step raises it, as it was."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return self.dataset[i]
        except UserError as e:
            return {"error": e}


def collate_or_error(samples, pad_id, pack=False, row_length=0):
    errors = [s["error"] for s in samples if "error" in s]
    if errors:
        return {"error": errors[0]}
    return collate_packed(samples, pad_id, row_length) if pack else collate(samples, pad_id)


def report_skipped(dataset, skipped, device):
    """--skip-bad-samples' totals, on rank 0: the samples dropped when the data file was read, and the distinct ones
    passed over since (an unreadable image, a sample too long), over every rank."""
    seen = skipped.to(device, torch.uint8)  # (collectives reduce no bools)
    dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0 and (dataset.num_bad or seen.any()):
        print(f"skipped bad samples: {dataset.num_bad} when reading {dataset.data_path}, {int(seen.sum())} more "
              "while training (each named in a warning above)", file=sys.stderr)


def train_step(model, optimizer, batches, grad_accum, step, total, cfg, flops, device, skipped=None):
    """One optimizer step: this rank reads its grad_accum micro-batches, then every rank counts, runs forward and
    backward, and updates together. `step` counts from 0 and sets the learning rate; `skipped` marks the dataset
    indices of bad samples passed over. Returns the step's metrics (the time includes reading the data)."""
    start = time.perf_counter()
    micro = [next(batches) for _ in range(grad_accum)]
    for b in micro:
        if "error" in b:
            raise b["error"]
        if skipped is not None and b["skipped"]:
            skipped[b["skipped"]] = True
    counts = global_counts(micro, flops, device)
    peak = global_peak(flops, device)
    if counts["supervised_tokens"] == 0:
        raise DataError(f"step {step + 1}: no supervised token in the whole global batch (every reply was cut by "
                        "--max-length or is empty); check the data")
    warmup = math.ceil(cfg.warmup_ratio * total)
    lr = cosine_lr(step, total, warmup, cfg.lr)
    for group in optimizer.param_groups:
        group["lr"] = cosine_lr(step, total, warmup, peak_lr(group, cfg))
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    loss, grad_norm = forward_backward(model, micro, counts["supervised_tokens"], trainable, cfg.grad_clip, device)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise NonFiniteError(f"step {step + 1}: loss {loss}, gradient norm {grad_norm}; stopping before the update")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    work = counts.pop("flops")
    world = dist.get_world_size()
    return {"loss": loss, "lr": lr, "grad_norm": grad_norm, **{k: int(v) for k, v in counts.items()},
            "padded_fraction": 1 - counts["tokens"] / counts["positions"],
            "tokens_per_s": counts["tokens"] / seconds, "tokens_per_s_per_gpu": counts["tokens"] / seconds / world,
            "tflops_per_gpu": work / seconds / world / 1e12,
            "mfu": work / (seconds * peak) if peak else None,
            "peak_memory_gb": peak_memory_gb(device)}


def global_peak(flops, device):
    """The peak FLOP/s of all ranks together (each its own device's, FlopCounter.peak), or None when a rank's device
    has no known peak: MFU is then not reported rather than guessed. Every rank's FLOPs over every rank's peak is the
    mean of the per-GPU MFUs when each rank does its share of the work."""
    if not hasattr(flops, "peak_sum"):  # (once per run: one all-reduce)
        peak = torch.tensor([flops.peak or 0.0, flops.peak is None], dtype=torch.float64, device=device)
        dist.all_reduce(peak)
        flops.peak_sum = None if peak[1] else peak[0].item()
    return flops.peak_sum


def global_counts(micro, flops, device):
    """What the global batch holds: this rank's micro-batches counted, then summed over all ranks in one all-reduce.
    supervised_tokens is the loss's denominator (model.supervised_targets defines what counts)."""
    images = [0 if b["pixel_values"] is None else len(b["pixel_values"]) for b in micro]
    supervised = [(supervised_targets(b["input_ids"], b["labels"]) != IGNORE_INDEX).sum().item() for b in micro]
    lengths = [sample_lengths(b) for b in micro]
    local = {"supervised_tokens": sum(supervised),
             "tokens": sum(b["attention_mask"].sum().item() for b in micro),
             "positions": sum(b["input_ids"].numel() for b in micro),  # real tokens and padding: what the LLM runs on
             "samples": sum(len(n) for n in lengths),
             "image_samples": sum(b["has_image"].sum().item() if "has_image" in b else
                                  (b["input_ids"] == IMAGE_TOKEN_INDEX).any(1).sum().item() for b in micro),
             "images": sum(images),
             "skipped_samples": sum(len(b["skipped"]) for b in micro),
             "flops": sum(flops(n, i, s) for n, i, s in zip(lengths, images, supervised))}
    counts = torch.tensor(list(local.values()), dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    return dict(zip(local, counts.tolist()))


def sample_lengths(batch):
    """The real tokens of each sample of a micro-batch: its rows', or, packed (data.collate_packed), its samples'."""
    return batch["lengths"] if "lengths" in batch else batch["attention_mask"].sum(1)


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
        # each image's instruction (the qformer's), and a packed batch's per-sample positions (data.collate_packed)
        inputs = {k: b[k].to(device) for k in ("instruction_ids", "instruction_mask", "position_ids")
                  if b.get(k) is not None}
        ce = model(b["input_ids"].to(device), None, pixel_values, b["labels"].to(device), **inputs)
        (ce * world / n_supervised).backward()
        loss_sum += ce.detach()
    dist.all_reduce(loss_sum)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip if grad_clip > 0 else float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    return loss_sum.item() / n_supervised, grad_norm.item()


class NonFiniteError(UserError, RuntimeError):
    """A non-finite loss or gradient: the run stops before the update, and says which checkpoint to resume from."""


# ----------------------------------------------------------------------------------------------------------------------
# Distributed setup and the model


def accumulation_steps(cfg, world):
    per_step = cfg.micro_batch_size * world
    if cfg.global_batch_size % per_step:
        raise UserError(f"--global-batch-size {cfg.global_batch_size} is not a multiple of --micro-batch-size "
                        f"{cfg.micro_batch_size} x {world} ranks; change --micro-batch-size")
    return cfg.global_batch_size // per_step


def check_output_dir(cfg, device):
    """Before anything is loaded: every rank sees the same output_dir, no other run is using it, a fresh run does not
    overwrite another's and --resume finds a checkpoint. Returns rank 0's lock on it (None on the other ranks)."""
    if os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        raise UserError(f"--output-dir {cfg.output_dir}: is a file, not a directory")
    if dist.get_world_size() > 1:
        check_shared_output_dir(cfg.output_dir, device)
    lock = lock_output_dir(cfg.output_dir) if dist.get_rank() == 0 else None
    if not cfg.resume and saved_checkpoints(cfg.output_dir):
        raise UserError(f"--output-dir {cfg.output_dir} already holds checkpoints of an earlier run; pass --resume to "
                        "continue it, or choose another --output-dir (or delete them) to start afresh")
    if cfg.resume and not saved_checkpoints(cfg.output_dir):
        raise UserError(f"--resume: --output-dir {cfg.output_dir} holds no complete checkpoint to resume from (is it "
                        "the right directory?); to start a run, leave out --resume")
    return lock


def lock_output_dir(output_dir):
    """An exclusive lock on output_dir/.lock for the life of the run (the kernel drops it when the process ends, even
    by kill -9): two runs in one directory would interleave their metrics and checkpoints."""
    os.makedirs(output_dir, exist_ok=True)
    f = open(os.path.join(output_dir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"--output-dir {output_dir} is in use by another run ({holder}); wait for it to end, or "
                        "choose another --output-dir") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


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


def build_model(cfg, device, im_token_ids=(), added=False):
    """Every rank builds the model with empty parameters and shards it; rank 0 loads the weights and broadcasts them.

    So only rank 0 ever holds a full copy (in CPU memory, in the backbones' saved dtype), and only once.
    With --init-from a whole LLaVA model, its LLM and projector replace --llm's weights and the fresh projector;
    with LoRA, rank 0 also draws the adapters' initial values (B = 0), so every world size starts from the same ones.
    im_token_ids: <im_start> and <im_end>'s ids (--mm-use-im-start-end); added: the tokenizer has just been given
    them, so their embedding rows are new (model.grow_vocab).
    """
    new = im_token_ids if added else ()
    model = empty_sharded_model(cfg, new, im_token_ids)
    materialize(model, device)
    full = {}
    if dist.get_rank() == 0:
        full = initial_weights(cfg, model, new)
    # Each tensor is copied into the rank's shard (or replica) in that parameter's dtype: fp16 -> fp32 is exact.
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    model.train()
    return model


def initial_weights(cfg, model, added_token_ids=()):
    """On rank 0, the full state dict a run starts from, under the names of `model` (LoRA's base layers included).
    New <im_start>/<im_end> rows start from the mean of the others, or, after a stage 1 that trained them
    (--init-from its output), from its rows, as LLaVA's pretrain_mm_mlp_adapter brings them."""
    projector, whole, rows = {}, {}, None
    try:  # first: a bad path, or a projector of another type or width, fails in seconds
        if cfg.init_from and checkpoints.holds_llm(cfg.init_from):
            expected = LlavaModel.from_config(cfg.model_config(), empty=True).state_dict()
            whole = checkpoints.whole_model_weights(cfg.init_from, {k: v.shape for k, v in expected.items()})
        elif cfg.init_from:
            projector = checkpoints.projector_weights(cfg.init_from, expected=model.multi_modal_projector)
            rows = checkpoints.token_rows(cfg.init_from, added_token_ids) if added_token_ids else None
    except UserError as e:
        raise UserError(f"--init-from {e}") from None
    if whole:  # the tower from --vision-tower, everything else from the whole model
        tower = load_vision_tower(cfg.vision_tower)
        full = {**{f"vision_tower.{k}": v for k, v in tower.state_dict().items()}, **whole}
    else:
        built = LlavaModel.from_config(cfg.model_config(), dtype="auto", added_token_ids=added_token_ids)
        full = built.state_dict()
        full.update({f"multi_modal_projector.{k}": v for k, v in projector.items()})
        if rows is not None:
            embedding = full[input_embedding_name(built)]
            embedding[list(added_token_ids)] = rows.to(embedding.dtype)
    for name, layer in lora.adapted(model.language_model):
        prefix = f"language_model.{name}."
        for param in ("weight", "bias"):
            if prefix + param in full:
                full[f"{prefix}base_layer.{param}"] = full.pop(prefix + param)
        a = torch.empty(layer.lora_A.weight.shape)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as LoraLinear.reset_adapter, on real memory
        full[f"{prefix}lora_A.weight"], full[f"{prefix}lora_B.weight"] = a, torch.zeros(layer.lora_B.weight.shape)
    return full


def empty_sharded_model(cfg, added_token_ids=(), im_token_ids=()):
    """The model on the meta device, fp32 whatever the backbones' configs say (the optimizer's master weights), with
    what trains and activation checkpointing set, sharded: what each rank builds before any memory is allocated."""
    model = LlavaModel.from_config(cfg.model_config(), dtype=torch.float32, empty=True,
                                   added_token_ids=added_token_ids)
    prepare(model, cfg, im_token_ids)
    if cfg.compile_blocks:
        compile_blocks(model)
    shard(model, cfg.precision)
    return model


def compile_blocks(model, backend="inductor"):
    """torch.compile each decoder layer, in place (nn.Module.compile: the parameters keep their names, so checkpoints
    do not change), after activation checkpointing has wrapped its forward and before FSDP shards it: the order of
    torchtitan's per-block compile (pytorch/torchtitan `torchtitan/models/llama3/infra/parallelize.py`: AC, compile,
    FSDP) and torchtune's in-place layer.compile(). Every layer has the same code and shapes, so one compilation
    serves them all; FSDP's hooks run outside the compiled graph (torch._dynamo.config.skip_fsdp_hooks). Sequence
    lengths vary from step to step: after the first recompile dynamo marks the length dynamic."""
    for layer in model.language_model.base_model.layers:
        layer.compile(backend=backend)


def prepare(model, cfg, im_token_ids=()):
    """What trains (the projector; the LLM too in stage 2; never the tower) and activation checkpointing.

    Checkpointing wraps each decoder layer's forward in torch's non-reentrant checkpoint itself, rather than through
    transformers' switch, whose mechanics differ between the versions GPU nodes and laptops have.
    With LoRA, the LLM's base weights stay frozen in the compute dtype (bf16: half the memory of fp32 masters; they
    get no gradient and no optimizer state) and the fp32 adapters train.
    With --mm-use-im-start-end, stage 1 also trains the input embeddings of <im_start> and <im_end>, and only those
    two rows (LlavaModel.trainable_token_ids), as the paper-era code did (`llava/model/llava.py` detached every other
    embedding); LLaVA's later llava_arch.py trains the whole input matrix there. The output head stays frozen.
    """
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    model.language_model.requires_grad_(cfg.train_llm and not cfg.lora_r)
    if cfg.mm_use_im_start_end and not cfg.train_llm:
        if model.language_model.config.get_text_config().tie_word_embeddings:
            raise UserError(f"--mm-use-im-start-end: {cfg.llm} ties its input embeddings to its output head, so "
                            "training the two rows would move the head's every row too; use an LLM with its own "
                            "head (Vicuna, Llama)")
        model.language_model.get_input_embeddings().requires_grad_(True)
        model.trainable_token_ids = tuple(im_token_ids)
    if cfg.lora_r:
        model.language_model.to(compute_dtype(cfg.precision))
        lora.add_adapters(model.language_model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        for name, p in model.language_model.named_parameters():
            p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    for i in checkpointed_layers(cfg, len(model.language_model.base_model.layers)):
        layer = model.language_model.base_model.layers[i]
        layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)


def checkpointed_layers(cfg, num_layers):
    """The decoder layers activation checkpointing recomputes: every K-th (K = --activation-checkpointing-every),
    from layer 0, as torchtitan's selective layer checkpointing picks them (`layer_id % ac_freq == 0`).

    The trade, per layer left out: its activations stay (~34 bytes x tokens x width in bf16, Korthikanti et al.
    arXiv:2205.05198 section 4.1) instead of its input alone (2 bytes x tokens x width), and the backward skips its
    second forward (a third of its FLOPs). docs/performance.md section 5 has the arithmetic."""
    every = cfg.activation_checkpointing_every if cfg.activation_checkpointing else 0
    return [i for i in range(num_layers) if every and i % every == 0]


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
        raise UserError(f"--output-dir {output_dir} is not shared by every rank: rank(s) {blind} cannot see what "
                           f"rank 0 wrote there (this is rank {rank} on {socket.gethostname()}). Every rank writes "
                           "its part of each checkpoint; on several nodes, put output_dir on a filesystem all mount")


def read_text(path):
    with open(path) as f:
        return f.read()


# ----------------------------------------------------------------------------------------------------------------------
# Optimization


def make_optimizer(model, cfg):
    """AdamW over the trainable parameters; LLaVA's Trainer exempts biases and norms (1-D tensors) from decay. With
    --mm-projector-lr, the projector's parameters form groups of their own at that peak lr (LLaVA's create_optimizer,
    haotian-liu/LLaVA `llava/train/llava_trainer.py`); each group's name says which (peak_lr). fused: one kernel over
    each group's tensors, torchtitan's default (on the toy world's CPU step it measured the same as the per-tensor
    loop; not measured on a GPU)."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            own = cfg.mm_projector_lr > 0 and name.startswith("multi_modal_projector.")
            # (stage 1's input embeddings, where only <im_start>'s and <im_end>'s rows may move, never decay)
            decays = p.ndim >= 2 and not (model.trainable_token_ids and name.startswith("language_model."))
            groups.setdefault(("projector_" if own else "") + ("decay" if decays else "no_decay"), []).append(p)
    order = ("decay", "no_decay", "projector_decay", "projector_no_decay")
    return torch.optim.AdamW([{"params": groups[k], "name": k, "weight_decay": 0.0 if k.endswith("no_decay") else
                               cfg.weight_decay} for k in order if k in groups],
                             lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, fused=True)


def peak_lr(group, cfg):
    """A parameter group's peak learning rate, from the settings (so a resume's --lr takes effect)."""
    return cfg.mm_projector_lr if group.get("name", "").startswith("projector_") else cfg.lr


def cosine_lr(step, total, warmup, peak):
    """HF's cosine schedule with linear warm-up (LLaVA's): the lr of optimizer step `step` (from 0)."""
    if step < warmup:
        return peak * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: the model as safetensors (rank 0) + resumable state (sharded, torch.distributed.checkpoint)


def trainable_modules(model):
    """The modules a checkpoint writes whole: those that train (with LoRA, the projector: the LLM's adapters go to
    PEFT's files, its base stays where it was loaded from; in stage 1 with <im_start>/<im_end>, the projector: the
    LLM's input embeddings are written alone, trained_tensors)."""
    return tuple(name for name, m in model.named_children() if any(p.requires_grad for p in m.parameters())
                 and not (name == "language_model" and (lora.adapted(m) or model.trainable_token_ids)))


def trained_tensors(model):
    """Trained tensors of a module written by reference: stage 1's input embeddings (--mm-use-im-start-end)."""
    return (input_embedding_name(model),) if model.trainable_token_ids else ()


def input_embedding_name(model):
    """The state-dict name of the LLM's input embeddings (language_model.model.embed_tokens.weight for Llama)."""
    weight = model.language_model.get_input_embeddings().weight
    return next(f"language_model.{n}" for n, p in model.language_model.named_parameters() if p is weight)


def lora_base(cfg):
    """The whole LLaVA model whose LLM a LoRA run's adapters sit on (--init-from a whole model), or None: --llm."""
    return cfg.init_from if cfg.lora_r and cfg.init_from and checkpoints.holds_llm(cfg.init_from) else None


def export_model(model, path, tokenizers, image_processor, cfg, final=False):
    """The trained weights, gathered to rank 0, as a directory checkpoints.load (and generate.py) loads, with the
    tokenizers (the LLM's, and the qformer's in model.QFORMER_TOKENIZER when there is one) and image processor.

    Frozen modules are not written: checkpoints.load takes them from the config's paths, as LLaVA does. With LoRA,
    the adapters go to PEFT's files next to the projector (checkpoints.save_adapter); their base is referenced. The
    final model goes to output_dir itself, written first into a temporary directory whose files then replace the old
    ones one by one (config.json last), so a crash leaves each file whole.
    """
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=True))
    if dist.get_rank() == 0:
        out = os.path.join(path, ".tmp-final") if final else path
        if final:
            shutil.rmtree(out, ignore_errors=True)
        dtype = compute_dtype(cfg.precision)
        modules, extra = trainable_modules(model), trained_tensors(model)
        checkpoints.save(model, out, modules=modules, lora_base=lora_base(cfg), extra=extra,
                         state_dict={k: v.to(dtype) for k, v in full.items()
                                     if k.split(".", 1)[0] in modules or k in extra})
        if cfg.lora_r:  # the adapters in PEFT's files, kept in fp32 (they are small)
            llm = model.language_model
            adapters = {k.removeprefix("language_model."): v for k, v in full.items()
                        if k.startswith("language_model.")}
            targets = {name.rsplit(".", 1)[-1] for name, _ in lora.adapted(llm)}
            checkpoints.save_adapter(out, adapters, lora.peft_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                                                     targets, lora_base(cfg) or cfg.llm))
        tokenizer, instruction_tokenizer = tokenizers
        tokenizer.save_pretrained(out)
        if instruction_tokenizer is not None:
            instruction_tokenizer.save_pretrained(os.path.join(out, QFORMER_TOKENIZER))
        if image_processor is not None:
            image_processor.save_pretrained(out)
        sync_tree(out)
        if final:
            for name in sorted(os.listdir(out), key=lambda n: n == "config.json"):
                if os.path.isdir(os.path.join(path, name)):  # (a resumed run's earlier export: a folder is replaced
                    shutil.rmtree(os.path.join(path, name))  # whole, not file by file)
                os.replace(os.path.join(out, name), os.path.join(path, name))
            os.rmdir(out)
            sync_tree(path, files=False)


def sync_tree(path, files=True):
    """fsync every file (and every directory) under path: a rename makes them visible at once, durable only then."""
    for root, _, names in os.walk(path):
        for name in names if files else ():
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if not files:
            break


def resumable_state(model, optimizer):
    return {"model": get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)),
            "optim": get_optimizer_state_dict(model, optimizer)}


def save_checkpoint(model, optimizer, step, cfg, tokenizers, image_processor, data_sha256=None):
    """output_dir/checkpoint-NNNNNN, written as .tmp-checkpoint-NNNNNN, synced to disk and renamed when complete.
    trainer_state.json records the settings and the data file's sha256, which a resume checks (check_resume)."""
    name = f"checkpoint-{step:06d}"
    tmp = os.path.join(cfg.output_dir, f".tmp-{name}")
    if dist.get_rank() == 0:  # leftovers of interrupted writes
        for old in os.listdir(cfg.output_dir) if os.path.isdir(cfg.output_dir) else []:
            if old.startswith(".tmp-checkpoint-"):
                shutil.rmtree(os.path.join(cfg.output_dir, old))
    dist.barrier()
    export_model(model, tmp, tokenizers, image_processor, cfg)
    dcp.save(resumable_state(model, optimizer), checkpoint_id=os.path.join(tmp, "train_state"))
    rng = os.path.join(tmp, "train_state", f"rng-rank{dist.get_rank()}.pt")
    torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               rng)
    with open(rng, "rb") as f:
        os.fsync(f.fileno())
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step, "config": asdict(cfg), "data_sha256": data_sha256}, f, indent=2)
        sync_tree(tmp)
        os.replace(tmp, os.path.join(cfg.output_dir, name))
        sync_tree(cfg.output_dir, files=False)
    dist.barrier()


def saved_checkpoints(output_dir):
    """Complete checkpoints, oldest first (an interrupted write leaves only a .tmp- directory)."""
    if not os.path.isdir(output_dir):
        return []
    names = sorted(n for n in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d{6}", n))
    return [os.path.join(output_dir, n) for n in names]


def checkpoint_step(path):
    return int(os.path.basename(path).split("-")[1])


def prune_checkpoints(output_dir, keep_last, good_up_to):
    """Keep the keep_last newest checkpoints whose weights are known good (a step from them gave a finite loss: those
    up to step good_up_to), and every newer one. A checkpoint saved from weights that give a non-finite loss is then
    never the only one left."""
    good = [c for c in saved_checkpoints(output_dir) if checkpoint_step(c) <= good_up_to]
    for old in good[:-keep_last] if keep_last else []:
        shutil.rmtree(old)


def set_aside_checkpoint(output_dir, step):
    """After a non-finite loss at step step + 1: checkpoint-{step} (if saved) holds the weights that gave it, so it is
    renamed out of --resume's way, kept for inspection. Returns what to do, naming the checkpoint to resume from."""
    bad = [c for c in saved_checkpoints(output_dir) if checkpoint_step(c) >= step]
    dist.barrier()  # every rank has looked before rank 0 renames
    if dist.get_rank() == 0:
        for c in bad:
            os.replace(c, c + ".nonfinite")
    dist.barrier()
    aside = "".join(f"{c} holds the weights that gave it, renamed to {os.path.basename(c)}.nonfinite; " for c in bad)
    good = saved_checkpoints(output_dir)
    if not good:
        return f"{aside}no checkpoint of {output_dir} predates it: start the run again with a lower --lr, or " \
               "--grad-clip 1.0"
    return f"{aside}resume from {good[-1]} (its weights gave a finite loss) with --resume and a lower --lr, or " \
           "--grad-clip 1.0"


# What a resumed run may change: how it runs, not what it computes (the data order, the schedule, the model and its
# numerics all come from the checkpoint's settings). The non-finite stop's remedies (--lr, --grad-clip) and a moved
# image folder are taken with a warning; anything else that differs is refused by name.
RESUME_MAY_CHANGE = {"micro_batch_size", "num_workers", "dist_timeout", "activation_checkpointing",
                     "activation_checkpointing_every", "compile_blocks", "micro_batch_order", "pack", "pack_length",
                     "save_every", "keep_last", "resume", "output_dir", "init_from", "skip_bad_samples"}
RESUME_WARNS = {"lr", "grad_clip", "image_folder"}


def check_resume(path, cfg):
    """The settings of checkpoint `path` against this run's (see RESUME_MAY_CHANGE); returns its trainer_state."""
    state_file = os.path.join(path, "trainer_state.json")
    try:
        with open(state_file) as f:
            saved = json.load(f)
        before, step = saved["config"], int(saved["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--resume: {state_file} is unreadable ({type(e).__name__}: {e}); delete {path} to resume from "
                        "the checkpoint before it") from None
    if step != checkpoint_step(path):
        raise UserError(f"--resume: {state_file} says step {step}, its directory's name another; delete {path}")
    now = asdict(cfg)
    for key in ("vision_tower", "llm", "data_path", "image_folder"):  # the same file, however it was spelt
        before[key], now[key] = (same_path(before.get(key)), same_path(now[key]))
    changed = [k for k in now if k in before and before[k] != now[k] and k not in RESUME_MAY_CHANGE]
    if now.get("lora_r") and before.get("init_from") != now["init_from"]:  # LoRA's frozen base may come from it
        changed.append("init_from")
    refused = [k for k in changed if k not in RESUME_WARNS]
    if refused:
        listed = "; ".join(f"{flag(k)} was {before[k]!r}, now {now[k]!r}" for k in refused)
        raise UserError(f"--resume: {path} was trained with other settings ({listed}); a resumed run must compute what "
                        "the run before it did: pass the checkpoint's values, or start a new run in another "
                        "--output-dir")
    if dist.get_rank() == 0:
        for k in changed:
            print(f"warning: resuming {path} with {flag(k)} {now[k]!r} (it was trained with {before[k]!r})",
                  file=sys.stderr)
    return saved


def same_path(path):
    if path and "," in path:  # several data files
        return ",".join(map(same_path, path.split(",")))
    return os.path.realpath(path) if path and os.path.exists(path) else path


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(model, optimizer, path):
    """Restore the trainable weights, the optimizer and the RNG of a checkpoint; returns its step. Nothing in it runs
    code (checkpoints.load_sharded)."""
    state = resumable_state(model, optimizer)
    train_state = os.path.join(path, "train_state")
    try:
        checkpoints.load_sharded(state, train_state)
    except UserError as e:
        raise UserError(f"--resume: {e}") from None
    missing, unexpected = set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise UserError(f"--resume: {path} does not match this model: missing {sorted(trainable & set(missing))[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]}")
    set_optimizer_state_dict(model, optimizer, state["optim"])
    rng = torch.load(os.path.join(train_state, f"rng-rank{dist.get_rank()}.pt"), weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    return checkpoint_step(path)


# ----------------------------------------------------------------------------------------------------------------------
# Metrics: MFU (FLOPs as docs/performance.md section 3 counts them), memory, the log


class MetricsLog:
    """output_dir/metrics.jsonl, a JSON object per optimizer step, and a progress bar, on rank 0. A run resumed at
    step `initial` first drops the records after it (the steps it runs again) and a last line cut by a crash."""

    def __init__(self, output_dir, initial, total):
        from tqdm import tqdm

        self.rank0 = dist.get_rank() == 0
        self.path = os.path.join(output_dir, "metrics.jsonl")
        os.makedirs(output_dir, exist_ok=True)
        if self.rank0 and os.path.exists(self.path):
            kept = []
            with open(self.path, "rb") as f:
                for line in f.read().splitlines() if initial else []:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= initial:
                        kept.append(line + b"\n")
            checkpoints.atomic_write(self.path, partial(write_lines, lines=kept))
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


def write_lines(path, lines):
    with open(path, "wb") as f:
        f.writelines(lines)


# Dense bf16 peaks per GPU (docs/performance.md section 1; NVIDIA's data sheets, as pytorch/torchtitan
# `torchtitan/tools/utils.py` get_peak_flops), matched against torch.cuda.get_device_name in this order: the PCIe and
# NVL H100s ("NVIDIA H100 PCIe", "NVIDIA H100 NVL") before the SXM one ("NVIDIA H100 80GB HBM3").
# A GPU not listed gets no MFU (None, and a warning at start-up naming it): add its data-sheet dense bf16 figure here.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device):
    """The device's dense bf16 FLOP/s, or None (a CPU, or a GPU not in PEAK_BF16_FLOPS: then MFU is None)."""
    if device.type != "cuda":
        return None
    return device_peak(torch.cuda.get_device_name(device))


def device_peak(name):
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class FlopCounter:
    """FLOPs a step must do (docs/performance.md section 3), per sample of T real tokens of which S are supervised:
    the LLM's layers 6·N·T + 12·L·d·T² when trained (4·N·T when frozen: no weight gradients), its output head
    6·N_head·S (4·N_head·S frozen): model.chunked_cross_entropy runs the head on the supervised positions only; the
    projector 6·N_P per image token; the frozen tower's forward 2·N_V·T_v + 4·L_v·d_v·T_v². N excludes the input
    embedding (a lookup; when the head shares its matrix, the head counts it). `peak` is this device's dense bf16
    FLOP/s (None off a known GPU)."""

    def __init__(self, model, train_llm, device=None):
        self.peak = peak_flops(device) if device is not None else None
        llm, vision = model.language_model, model.vision_tower.config
        text = llm.config.get_text_config()
        embed, head = llm.get_input_embeddings().weight, llm.get_output_embeddings()
        head_params = {id(p): p for p in head.parameters()}
        self.n_head = sum(p.numel() for p in head_params.values())
        self.n_llm = sum(p.numel() for p in llm.parameters() if p is not embed and id(p) not in head_params)
        self.llm_coeff = 6 if train_llm else 4
        self.attn = 12 * text.num_hidden_layers * text.hidden_size
        self.proj_per_token = 6 * sum(p.numel() for p in model.multi_modal_projector.parameters())
        t_v = (vision.image_size // vision.patch_size) ** 2 + model.has_cls
        n_vision = sum(p.numel() for p in model.vision_tower.parameters())
        self.per_image = 2 * n_vision * t_v + 4 * vision.num_hidden_layers * vision.hidden_size * t_v ** 2
        self.image_tokens = model.num_image_tokens

    def __call__(self, tokens_per_sample, n_images, n_supervised):
        t = torch.as_tensor(tokens_per_sample).double()
        llm = (self.llm_coeff * self.n_llm * t + self.attn * t * t).sum().item()
        head = self.llm_coeff * self.n_head * n_supervised
        return llm + head + n_images * (self.per_image + self.proj_per_token * self.image_tokens)


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main(argv=None, stage_defaults=None, presets=None, description=None):
    """The command line: a UserError (a bad flag, data sample, checkpoint; a non-finite loss) is printed as one
    message, by every rank that meets it, and the process exits with status 2; anything else is a bug, with its
    traceback."""
    try:
        cfg = parse_config(argv, stage_defaults or {}, presets or {}, description, check_files=True)
        train(cfg)
    except UserError as e:
        rank, world = os.environ.get("RANK", "0"), int(os.environ.get("WORLD_SIZE", "1"))
        if dist.is_initialized() or rank == "0":  # a settings error is the same on every rank: rank 0 says it
            print(f"error: {f'[rank {rank}] ' if world > 1 else ''}{e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
