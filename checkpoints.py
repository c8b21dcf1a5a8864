"""How a LLaVA model is stored: written in our layout, read from ours and from the layouts other projects publish.

    model = checkpoints.load("liuhaotian/llava-v1.5-7b")      # a hub id or a local directory, in any layout below
    checkpoints.save(model, "out")                            # config.json + model.safetensors (sharded when large)
    projector = checkpoints.projector_weights("DIR")          # finetune.py --init-from: the projector alone
    weights = checkpoints.whole_model_weights("DIR", expected)   # --init-from a whole model: projector and LLM

The layouts, recognised from config.json (docs/llava.md section 7):
- ours: LlavaConfig's fields, the backbones' configs, and safetensors weights named as transformers' Llava names them
  (vision_tower.*, multi_modal_projector.linear_N.*, language_model.*). A module the directory does not hold (stage 1
  writes only the projector) is loaded from the path its config names, as LLaVA reloads its vision tower: an absolute
  path or a hub id (at the commit it had), with a fingerprint of its files that load checks, so that a checkpoint
  finds exactly the backbone it was trained with or says it cannot.
- the original LLaVA's (haotian-liu/LLaVA `llava/model/llava_arch.py`): `mm_*` config keys, the LLM's weights as
  `model.*` + `lm_head.*` in .bin shards, the projector as `model.mm_projector.{0,2}.*`; its stage-1 output is
  config.json + mm_projector.bin, whose LLM is the base model it was trained on (`model_base`).
- transformers' LlavaForConditionalGeneration (the llava-hf repos), read by transformers itself.
- transformers' InstructBlipForConditionalGeneration (Salesforce/instructblip-vicuna-7b): read by transformers, its
  Q-Former copied into our qformer projector (from_instructblip_hf), its two tokenizers and BlipImageProcessor used.
- a LoRA run's output (ours, plus PEFT's adapter_config.json + adapter_model.safetensors; lora.py): the projector in
  model.safetensors, the adapters put on their base LLM as they load (config.llm, or the whole LLaVA model the run
  started from, config.json's "lora_base"). tools/convert.py merge folds them in.
And for --init-from alone: BLIP-2's stage-1 Q-Former in LAVIS's checkpoint (blip2_pretrained_vitL.pth for CLIP-L),
renamed to ours (lavis_qformer_weights); it has no language_projection, which starts fresh.

Nothing loaded from a file runs code: safetensors, or torch.load(weights_only=True) for .bin and .pth files, and a
training run's sharded state (load_sharded) with its pickles checked first. A file that is cut, corrupt or
inconsistent with the rest is a UserError naming it. Every file is written to a temporary name, flushed to disk and
renamed, so a crash or a power cut leaves the old file or the new one.
"""

import errno
import hashlib
import json
import os
import pickle
import re
from dataclasses import asdict, fields

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import DefaultLoadPlanner

import lora
from data import UserError, load_tokenizer
from model import QFORMER_TOKENIZER, LlavaConfig, LlavaModel, add_im_start_end, first_line, from_pretrained_complete, \
    grow_vocab, load_vision_tower, looks_like_hub_id, params_on_meta, quiet_transformers, reading, resolve
from qformer import QFormerConfig, QFormerProjector

MODULES = ("vision_tower", "multi_modal_projector", "language_model")
BACKBONES = {"vision_tower": ("vision_tower", "vision tower"), "llm": ("language_model", "LLM")}  # field: module, name
LORA_BASE = "lora_base"  # config.json's field naming the whole model whose LLM a LoRA run's adapters sit on
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's file names
LAYOUTS = ("ours (checkpoints.save: projector_type, vision_config, text_config), the original LLaVA's (mm_vision_tower "
           "and the other mm_* keys), transformers' Llava (model_type \"llava\", the llava-hf repos) and transformers' "
           "InstructBLIP (model_type \"instructblip\", the Salesforce/instructblip-vicuna-* repos)")


def save(model, path, modules=MODULES, state_dict=None, max_shard_bytes=5 * 2**30, lora_base=None, extra=()):
    """config.json + model.safetensors (or shards + model.safetensors.index.json, above max_shard_bytes).

    `modules` chooses what is written: stage 1 writes only the projector, and load() then takes the backbones from
    config.vision_tower and config.llm, recorded by reference(). `state_dict` defaults to the model's own (a sharded
    training run passes the full one it gathered on rank 0). `lora_base`: a LoRA run that started from a whole LLaVA
    model names it, recorded as the backbones are (save_adapter writes the adapters themselves). `extra`: tensors
    written although their module is not (stage 1's trained input embeddings with <im_start>/<im_end>): load() takes
    that module from its reference, then these tensors.

    Saving over an earlier checkpoint is safe across its files: the old config.json goes first and the new one is
    written last, so a save cut short leaves a directory load() refuses (it has no config.json), never new weights
    read with an old config or through an old shard index.
    """
    path = os.fspath(path)
    config = {**asdict(model.config), "vision_config": model.vision_tower.config.to_dict(),
              "text_config": model.language_model.config.to_dict()}
    backbones = {}
    for field, (module, _) in BACKBONES.items():
        if module not in modules:
            config[field], backbones[field] = reference(config[field])
        elif os.path.isdir(config[field]):  # held, but its path still says where it came from (the LLM: the tokenizer)
            config[field] = os.path.abspath(config[field])
    if model.config.projector_type == "qformer":  # every size, so that a later change of a default changes no model;
        config["qformer"] = model.multi_modal_projector.config.to_dict()   # its tokenizer is saved beside (train.py)
        if os.path.isdir(config["qformer_tokenizer"]):
            config["qformer_tokenizer"] = os.path.abspath(config["qformer_tokenizer"])
    if lora_base:
        config[LORA_BASE], backbones[LORA_BASE] = reference(lora_base)
    if backbones:
        config["backbones"] = backbones
    state, seen = {}, set()
    for name, tensor in (model.state_dict() if state_dict is None else state_dict).items():
        key = (tensor.data_ptr(), tensor.shape)
        if (name.split(".", 1)[0] in modules or name in extra) and key not in seen:  # tied weights are stored once
            seen.add(key)
            state[name] = tensor.detach().cpu().contiguous()
    os.makedirs(path, exist_ok=True)
    remove(os.path.join(path, "config.json"))
    write_weights(path, state, max_shard_bytes)
    atomic_write(os.path.join(path, "config.json"), lambda tmp: write_json(tmp, config))


def write_weights(path, state, max_shard_bytes=5 * 2**30):
    """`state` as model.safetensors, or shards + model.safetensors.index.json above max_shard_bytes (transformers'
    layout); earlier shards and half-written files in `path` removed. The caller writes config.json after."""
    shards, size = [{}], 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    for name, shard in zip(names, shards):
        atomic_write(os.path.join(path, name), lambda tmp, shard=shard: save_file(shard, tmp, {"format": "pt"}))
    index = os.path.join(path, "model.safetensors.index.json")
    if len(shards) > 1:
        atomic_write(index, lambda tmp: write_json(tmp, {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {k: n for n, shard in zip(names, shards) for k in shard}}))
    else:
        remove(index)  # before config.json: an old index would be read instead of the new model.safetensors
    for f in os.listdir(path):  # shards of an earlier save into this directory; files a killed save left half-written
        stale_shard = f.startswith("model") and f.endswith(".safetensors") and f not in names
        if stale_shard or (f.startswith(("model", "config.json")) and ".tmp" in f):
            remove(os.path.join(path, f))


def load(path, dtype=None, model_base=None):
    """A LlavaModel from a directory or hub id in any of the layouts above; dtype None keeps the saved dtypes."""
    path = resolve(path)
    saved = read_config(path)
    with quiet_transformers():
        if "mm_vision_tower" in saved:
            model = from_original_llava(path, saved, model_base)
        elif saved.get("model_type") == "llava":
            model = from_llava_hf(path)
        elif saved.get("model_type") == "instructblip":
            model = from_instructblip_hf(path)
        elif {"projector_type", "vision_config", "text_config"} & saved.keys():
            model = from_our_layout(path, saved)
        else:
            kind = f"a {saved['model_type']!r} model's config" if isinstance(saved.get("model_type"), str) else \
                "a config"
            raise UserError(f"{path}/config.json is {kind}, in none of the layouts this project reads: {LAYOUTS}; "
                            "pass a LLaVA checkpoint")
    model.vision_tower.requires_grad_(False)
    return model.to(dtype) if dtype is not None else model


def read_config(path):
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise UserError(f"{path} holds no config.json, so it is no checkpoint in a layout this project reads "
                        f"({LAYOUTS}); pass a checkpoint directory (a save cut short leaves none: save it again)")
    return read_json(file)


def projector_weights(path, expected=None):
    """The projector's weights (our names) from any checkpoint that has one: ours, the original LLaVA's (a full
    model, or stage 1's mm_projector.bin: the file, its directory, or a hub repo holding it, as
    liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5 does), llava-hf's, or BLIP-2's stage-1 Q-Former (a
    LAVIS .pth, blip2_pretrained_vitL.pth: lavis_qformer_weights). `expected` is the Projector they are for: weights
    of another projector type or width are refused, saying which each is. Every error's message starts with `path`
    (train.py names the flag before it)."""
    path, state = stage_one_weights(path)
    if any(k.startswith(LAVIS_QFORMER) for k in state):
        return lavis_qformer_weights(state, path, expected)
    out = {name: v for k, v in state.items() if (name := projector_name(k))}
    if not out:
        raise UserError(f"{path} holds no projector weights (multi_modal_projector.*, LLaVA's mm_projector.* or "
                        "LAVIS's Qformer.bert.*); pass a stage-1 output or a LLaVA checkpoint")
    if expected is not None:
        check_projector(out, expected, path)
    return out


def stage_one_weights(path):
    """(the file or directory read, its tensors) for a stage-1 output: mm_projector.bin (the file, its directory or
    its hub repo), one of our directories, or a LAVIS checkpoint file ({"model": state dict, ...}, as
    lavis/runners/runner_base.py saves one; read with weights_only=True like any .bin)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        path = resolve(path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "mm_projector.bin")):
        path = os.path.join(path, "mm_projector.bin")
    if os.path.isdir(path):
        return path, read_weights(path)
    return path, read_file(path) if path.endswith(".safetensors") else load_pickled_tensors(path, nested="model")


def token_rows(path, token_ids):
    """The input-embedding rows of `token_ids` (<im_start>, <im_end>) that a stage 1 trained, or None where it trained
    none: ours hold the LLM's input embeddings (language_model.model.embed_tokens.weight), LLaVA's mm_projector.bin
    model.embed_tokens.weight, the whole matrix or just the new rows (`llava/train/train.py`
    get_mm_adapter_state_maybe_zero_3 keeps `embed_tokens`; `llava_arch.py` reads both shapes)."""
    path, state = stage_one_weights(path)
    found = [v for k, v in state.items() if k.endswith("embed_tokens.weight")]
    if not found:
        return None
    rows = found[0]
    if rows.shape[0] == len(token_ids):
        return rows
    if rows.shape[0] <= max(token_ids):
        raise UserError(f"{path}: its input embeddings have {rows.shape[0]} rows, too few for tokens "
                        f"{list(token_ids)}: it was trained with another tokenizer; pass the --llm it was trained with")
    return rows[list(token_ids)]


def holds_llm(path):
    """Whether --init-from `path` is a whole LLaVA model (its LLM included), not a stage-1 output: our layout with
    language_model.* weights, the original layout with weights beside config.json, or a llava-hf repo."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return False  # mm_projector.bin
    path = resolve(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    saved = read_config(path)
    if "mm_vision_tower" in saved:
        return has_weights(path)
    if saved.get("model_type") == "llava":
        return True
    if {"projector_type", "vision_config", "text_config"} & saved.keys() and has_weights(path):
        adapters = os.path.exists(os.path.join(path, ADAPTER_CONFIG))  # a LoRA run's output: its LLM is base + adapters
        referenced = isinstance(saved.get("backbones"), dict) and "llm" in saved["backbones"]  # (stage 1's embeddings)
        return adapters or (not referenced and any(k.startswith("language_model.") for k in weight_names(path)))
    return False


def whole_model_weights(path, expected):
    """--init-from a whole LLaVA model (any layout load reads): its projector and LLM weights under our names, for a
    model whose state dict shapes are `expected` ({name: shape}, built from the run's --llm and --vision-tower).
    Every projector and LLM tensor must be there with the expected shape, so the run begins from exactly that model;
    one exception: llava-hf's conversion appended rows to the embeddings and the head (`<image>`, `<pad>`, padding
    to a multiple of 64) for ids the run's tokenizer never produces, which are dropped. A LoRA run's output gives its
    LLM with the adapters merged. The error names the tensor and says which --llm to pass."""
    model = load(path)
    lora.merge(model.language_model)
    kept = ("language_model.", "multi_modal_projector.")
    weights = {k: v for k, v in model.state_dict().items() if k.startswith(kept)}
    del model
    wanted = {k: tuple(s) for k, s in expected.items() if k.startswith(kept)}
    lacking, extra = sorted(wanted.keys() - weights.keys()), sorted(weights.keys() - wanted.keys())
    if lacking or extra:
        raise UserError(f"{path} is a model of another architecture than --llm's: it lacks {lacking[:3]} and has "
                        f"{extra[:3]} ({len(lacking)} and {len(extra)} tensors); pass the --llm it was fine-tuned from")
    for name, shape in wanted.items():
        have = tuple(weights[name].shape)
        rows_added = name.endswith(("embed_tokens.weight", "lm_head.weight")) and have[1:] == shape[1:] and \
            have[0] > shape[0]
        if rows_added:
            weights[name] = weights[name][:shape[0]]
        elif have != shape:
            raise UserError(f"{path}: tensor {name} is {list(have)} there, {list(shape)} in the model --llm and "
                            "--vision-tower describe; pass the --llm and --vision-tower it was fine-tuned from "
                            "(--projector-type too, for a projector of another type)")
    return weights


def weight_names(path):
    """The tensor names of a directory's weights, without reading the tensors (safetensors or an index)."""
    from safetensors import safe_open

    files = weight_files(path)
    if files and files[0].endswith(".index.json"):
        return list(read_json(os.path.join(path, files[0]))["weight_map"])
    if files and files[0].endswith(".safetensors"):
        with safe_open(os.path.join(path, files[0]), "pt") as f:
            return list(f.keys())
    return list(read_weights(path))


def projector_name(key):
    """Our name (linear_N.weight / .bias) of a projector weight in any layout, or None for other weights.

    LLaVA's keys are model.mm_projector.{0,2,...}.* for mlpNx_gelu (an nn.Sequential whose odd indices are the GELUs)
    and model.mm_projector.{weight,bias} for linear (haotian-liu/LLaVA `llava/model/multimodal_projector/
    builder.py`); ours and llava-hf's hold multi_modal_projector.linear_N.* under some prefix."""
    if "multi_modal_projector." in key:
        return key.split("multi_modal_projector.", 1)[1]
    if "mm_projector." in key:
        index, _, param = key.split("mm_projector.", 1)[1].rpartition(".")
        if index and not index.isdigit():
            return None
        return f"linear_{int(index) // 2 + 1 if index else 1}.{param}"
    return None


# BLIP-2's stage-1 Q-Former, from LAVIS's checkpoints (salesforce/LAVIS `lavis/models/blip2_models/blip2_qformer.py`,
# `Qformer.py`): the Q-Former as Qformer.bert.* (a BertLMHeadModel whose BertLayers have the Q-Former's cross-attention
# and query FFN), query_tokens, ln_vision; the ViT, the contrastive and matching heads, the MLM head beside them.
LAVIS_QFORMER = "Qformer.bert."
LAVIS_TOWERS = {1408: ("EVA-CLIP ViT-g/14", "blip2_pretrained.pth"),  # vision width -> (tower, its checkpoint)
                1024: ("CLIP ViT-L/14", "blip2_pretrained_vitL.pth")}


def lavis_qformer_name(key):
    """Our QFormerProjector's name for a LAVIS weight, or None for those it has no place for (visual_encoder.*,
    vision_proj, text_proj, itm_head, temp, Qformer.cls.*, the position_ids buffer). The renames are transformers'
    (`convert_instructblip_original_to_pytorch.py`): Qformer.bert -> qformer, attention.self -> attention.attention
    (crossattention too), the embeddings' LayerNorm -> layernorm, ln_vision -> the vision LayerNorm, llm_proj (an
    InstructBLIP's, stage 2 on) -> language_projection."""
    if key == "query_tokens":
        return key
    for theirs, ours in (("ln_vision.", "vision_layernorm."), ("llm_proj.", "language_projection.")):
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    if not key.startswith(LAVIS_QFORMER) or key.endswith("position_ids"):
        return None
    name = key[len(LAVIS_QFORMER):].replace("embeddings.LayerNorm.", "embeddings.layernorm.")
    return "qformer." + re.sub(r"\.(attention|crossattention)\.self\.", r".\1.attention.", name)


def lavis_qformer_weights(state, path, expected=None):
    """projector_weights for a LAVIS checkpoint. Stage 1 trains no LLM, so it has no language_projection: that one
    layer stays as the model initialised it, and saying so is printed; anything else missing, or of another shape,
    is an error. The usual mistake, a checkpoint for another vision tower (EVA-CLIP-g's 1408 wide into CLIP-L's
    1024), is named as such, with the checkpoint that fits."""
    out = {name: v for k, v in state.items() if (name := lavis_qformer_name(k))}
    if expected is None:
        return out
    if not isinstance(expected, QFormerProjector):
        raise UserError(f"{path} holds BLIP-2's Q-Former (a LAVIS checkpoint: Qformer.bert.*); this model's projector "
                        "is LLaVA's: pass --projector-type qformer")
    want = {n: tuple(p.shape) for n, p in expected.named_parameters()}
    have = {n: tuple(v.shape) for n, v in out.items()}
    width, built = have.get("vision_layernorm.weight", (None,))[0], want["vision_layernorm.weight"][0]
    if width is not None and width != built:
        tower, _ = LAVIS_TOWERS.get(width, ("another vision tower", None))
        fits = LAVIS_TOWERS.get(built)
        fit = (f"for a {fits[0]} tower (--vision-tower openai/clip-vit-large-patch14 or -336) pass LAVIS's {fits[1]}"
               if fits else "pass a Q-Former trained on this tower's features")
        raise UserError(f"{path} is BLIP-2's Q-Former for a vision tower {width} wide ({tower}); this model's "
                        f"--vision-tower gives features {built} wide: {fit}")
    lacking = sorted(want.keys() - have.keys())
    if "qformer.embeddings.word_embeddings.weight" in lacking:
        raise UserError(f"{path} holds BLIP-2's Q-Former without its text side (its word embeddings and the text's "
                        "feed-forward layers: BLIP-2's stage-2 checkpoints delete them, blip2_opt.py), which the "
                        "instruction-aware Q-Former reads the instruction with; pass the stage-1 checkpoint "
                        "(blip2_pretrained_vitL.pth for CLIP-L)")
    projection = [n for n in lacking if n.startswith("language_projection.")]
    others = sorted(set(lacking) - set(projection)) + sorted(have.keys() - want.keys()) + \
        sorted(n for n in want.keys() & have.keys() if want[n] != have[n])
    if others:
        n = others[0]
        there = f"{list(have[n])} there" if n in have else "not there"
        here = f"{list(want[n])} in this model" if n in want else "not in this model"
        raise UserError(f"{path}: the Q-Former tensor {n} is {there}, {here} ({len(others)} tensor(s) differ): "
                        "its sizes are not those of --qformer (BLIP-2's are BERT-base's, InstructBLIP's defaults: "
                        "pass no --qformer sizes, or the ones it was trained with)")
    if projection:
        print(f"note: {path} is BLIP-2's stage-1 Q-Former, which has no language_projection (stage 1 has no LLM): "
              "that layer starts freshly initialised, the rest from the checkpoint")
    return out


def check_projector(weights, projector, source):
    """Projector weights must be of the projector's type and widths: loaded into another, they fail as a raw
    "Unexpected key(s)" or size mismatch, or (a linear layer of the right shape in an MLP) silently train wrong."""
    have = {name: tuple(v.shape) for name, v in weights.items()}
    want = {name: tuple(p.shape) for name, p in projector.named_parameters()}
    if have == want:
        return
    found, built = projector_type_of(have), projector_type_of(want)
    if found == built == "qformer":
        n = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))[0]
        raise UserError(f"{source} holds a qformer projector of other sizes ({layers_of(have)}; {n} is "
                        f"{list(have[n]) if n in have else 'missing'} there) than this model's ({layers_of(want)}): "
                        "pass the --qformer sizes, --vision-tower and --llm it was trained with")
    if found is None:
        raise UserError(f"{source} holds projector weights of no type this project builds ({', '.join(sorted(have))}); "
                        "pass a checkpoint of a linear or mlpNx_gelu projector")
    if found != built:
        raise UserError(f"{source} holds a {found} projector ({layers_of(have)}); this model's projector type is "
                        f"{built} ({layers_of(want)}): pass --projector-type {found}")
    raise UserError(f"{source} holds a projector for another vision tower or LLM ({layers_of(have)}); this model's is "
                    f"{layers_of(want)}: pass the --vision-tower and --llm it was trained with, or another checkpoint")


def projector_type_of(shapes):
    if "query_tokens" in shapes:
        return "qformer"
    n = sum(name.endswith(".weight") for name in shapes)
    if not n or set(shapes) != {f"linear_{i}.{p}" for i in range(1, n + 1) for p in ("weight", "bias")}:
        return None
    return "linear" if n == 1 else f"mlp{n}x_gelu"


def layers_of(shapes):
    """'linear_1 1024→4096, linear_2 4096→4096' (in→out, from the weights' (out, in) shapes); a qformer's sizes."""
    if projector_type_of(shapes) == "qformer":
        layers = len({k.split(".")[3] for k in shapes if k.startswith("qformer.encoder.layer.")})
        queries, width = shapes["query_tokens"][1:]
        vision = shapes.get("vision_layernorm.weight", ["?"])[0]
        text = shapes.get("language_projection.weight", ["?"])[0]
        return f"{layers} layers {width} wide, {queries} queries, vision {vision}→LLM {text}"
    return ", ".join(f"{name.removesuffix('.weight')} {s[1]}→{s[0]}" if len(s) == 2 else f"{name} {list(s)}"
                     for name, s in sorted(shapes.items()) if not name.endswith(".bias"))


# ----------------------------------------------------------------------------------------------------------------------
# The layouts


def from_our_layout(path, saved):
    from transformers import AutoConfig, AutoModelForCausalLM

    config, backbones = our_config(path, saved)
    state = read_weights(path)
    present = {name.split(".", 1)[0] for name in state}
    if "multi_modal_projector" not in present:
        raise UserError(f"{path} holds no projector weights (multi_modal_projector.*); is it a LLaVA checkpoint "
                        "written by checkpoints.save?")

    def sub_config(key):
        d = dict(saved[key])
        with reading(path, "checkpoint"):
            return AutoConfig.for_model(d.pop("model_type"), **d)

    if "vision_tower" in present:
        with params_on_meta(), reading(path, "checkpoint"):
            tower = vision_tower_from_config(sub_config("vision_config"))
    else:
        tower = load_vision_tower(find_backbone(path, "vision_tower", config.vision_tower,
                                                backbones.get("vision_tower")))
    if "language_model" in present and "llm" in backbones:  # stage 1's input embeddings over the referenced LLM
        base = find_backbone(path, "llm", config.llm, backbones.get("llm"))
        llm = from_pretrained_complete(AutoModelForCausalLM, base)
        ids = added_rows(path, config, base)
        grow_vocab(llm, ids)
        if ids:  # only the new rows: the others were not trained, and their copy here is in the saved dtype (bf16)
            for name, tensor in llm.state_dict().items():
                key = f"language_model.{name}"
                if key in state and tensor.shape == state[key].shape:
                    state[key] = tensor.index_copy(0, torch.tensor(ids), state[key][list(ids)].to(tensor.dtype))
    elif "language_model" in present:
        with params_on_meta(), reading(path, "checkpoint"):
            llm = AutoModelForCausalLM.from_config(sub_config("text_config"))
    elif isinstance(saved.get(LORA_BASE), str):
        llm = load(find_backbone(path, LORA_BASE, saved[LORA_BASE], backbones.get(LORA_BASE))).language_model
        vocab = saved["text_config"].get("vocab_size")
        if isinstance(vocab, int) and llm.get_input_embeddings().num_embeddings > vocab:  # llava-hf's added rows,
            llm.resize_token_embeddings(vocab)                                          # dropped as training did
    else:
        llm = from_pretrained_complete(AutoModelForCausalLM, find_backbone(path, "llm", config.llm,
                                                                           backbones.get("llm")))
    if os.path.exists(os.path.join(path, ADAPTER_CONFIG)):
        load_adapter(llm, path)
    return assign_weights(llava_model(path, config, tower, llm), state, path)


def added_rows(path, config, base):
    """<im_start>'s and <im_end>'s ids in the checkpoint's tokenizer, when the run added them to its --llm's: their
    rows in the LLM are then new, initialised as training did (model.grow_vocab); () otherwise."""
    if not config.mm_use_im_start_end:
        return ()
    ids, _ = add_im_start_end(load_tokenizer(path))
    _, base_lacked = add_im_start_end(load_tokenizer(base))
    return ids if base_lacked else ()


def our_config(path, saved):
    """The LlavaConfig and the backbone records of our config.json, every value checked: a field missing (which
    would take a default: another tower, another template) or of the wrong type is a UserError naming the file."""
    file = os.path.join(path, "config.json")
    # (written since the first paper's models came in, and since the qformer did)
    saved = {"mm_use_im_start_end": False, "qformer": {}, "qformer_tokenizer": "", **saved}
    lacking = [k for k in [f.name for f in fields(LlavaConfig)] + ["vision_config", "text_config"] if k not in saved]
    if lacking:
        raise UserError(f"{file} lacks {', '.join(lacking)}, which checkpoints.save writes: the file is damaged or not "
                        "ours; save the checkpoint again")
    try:
        config = LlavaConfig(**{f.name: saved[f.name] for f in fields(LlavaConfig)})
    except UserError as e:
        raise UserError(f"{file}: {e}") from None
    for key in ("vision_config", "text_config"):
        if not (isinstance(saved[key], dict) and isinstance(saved[key].get("model_type"), str)):
            raise UserError(f"{file}: {key} is not a model config (an object with a model_type); the file is damaged: "
                            "save the checkpoint again")
    backbones = saved.get("backbones", {})
    valid = isinstance(backbones, dict) and all(
        field in (*BACKBONES, LORA_BASE) and isinstance(r, dict) and isinstance(r.get("fingerprint"), dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in r["fingerprint"].items())
        and re.fullmatch("[0-9a-f]{40}", r.get("revision", "0" * 40)) for field, r in backbones.items())
    if not valid:
        raise UserError(f"{file}: backbones is not what checkpoints.save writes ({{\"vision_tower\": "
                        "{\"fingerprint\": {file: digest}, \"revision\": commit}, ...}); the file is damaged: save the "
                        "checkpoint again")
    return config, backbones


def from_original_llava(path, saved, model_base):
    """A missing mm_* key takes the original code's default (haotian-liu/LLaVA `llava/train/train.py`,
    ModelArguments: select layer -1, select feature "patch", projector "linear"); the tower is reloaded from
    mm_vision_tower (the checkpoint's own copy is ignored, as LLaVA ignores it); the LLM is the checkpoint's `model.*`
    + `lm_head` weights, or `model_base` for a stage-1 directory (mm_projector.bin). The released configs say
    model_type "llava" (transformers' own Llava type since 4.36): the mm_* keys, not the model type, identify the
    layout. A LoRA output of LLaVA's (adapter_config.json, adapter_model.bin, the projector in
    non_lora_trainables.bin; `llava/model/builder.py`) loads its adapters on `model_base`. The first paper's (v0/v1)
    configs say mm_use_im_start_end: the tokenizer beside them has <im_start>/<im_end>, the LLM's vocabulary two rows
    more; a v1 stage-1 mm_projector.bin holds those rows (model.embed_tokens.weight), put on model_base's grown
    vocabulary. The released v0/v1 models are deltas: apply_delta first."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    aspect = saved.get("image_aspect_ratio", "square")
    try:
        config = LlavaConfig(vision_tower=saved["mm_vision_tower"], llm=model_base or path,
                             projector_type=saved.get("mm_projector_type", "linear"),
                             vision_feature_layer=saved.get("mm_vision_select_layer", -1),
                             vision_feature_select=saved.get("mm_vision_select_feature", "patch"),
                             template="vicuna_v1", image_aspect_ratio="pad" if aspect == "pad" else "crop",
                             max_length=saved.get("tokenizer_model_max_length") or 2048,
                             mm_use_im_start_end=saved.get("mm_use_im_start_end", False))
    except UserError as e:
        raise UserError(f"{path}/config.json (the original LLaVA's mm_* keys): {e}") from None
    tower = load_vision_tower(find_backbone(path, "mm_vision_tower", config.vision_tower))
    if model_base is not None or not has_weights(path):
        if model_base is None:
            raise UserError(f"{path} holds no LLM weights (pytorch_model*.bin or model*.safetensors), as LLaVA's "
                            "stage-1 output (config.json + mm_projector.bin) does not: pass the base LLM as model_base "
                            "(--model-base)")
        llm = from_pretrained_complete(AutoModelForCausalLM, model_base)
        if config.mm_use_im_start_end:  # the v1 stage 1's <im_start>/<im_end> rows, in mm_projector.bin
            ids, added = add_im_start_end(load_tokenizer(model_base))
            grow_vocab(llm, ids if added else ())
            rows = token_rows(path, ids) if os.path.exists(os.path.join(path, "mm_projector.bin")) else None
            if rows is not None:
                with torch.no_grad():
                    llm.get_input_embeddings().weight[list(ids)] = rows.to(llm.dtype)
        adapters = os.path.exists(os.path.join(path, ADAPTER_CONFIG))  # a LoRA run's output (finetune_lora.sh)
        if adapters:
            load_adapter(llm, path)
        model = llava_model(path, config, tower, llm)
        model.multi_modal_projector.load_state_dict(projector_weights(
            os.path.join(path, "non_lora_trainables.bin" if adapters else "mm_projector.bin"),
            expected=model.multi_modal_projector))
        return model
    text = {k: v for k, v in saved.items() if not k.startswith("mm_") and k not in ("architectures", "model_type")}
    with params_on_meta(), reading(path, "checkpoint"):
        llm = AutoModelForCausalLM.from_config(LlamaConfig(**text))
    state = {}
    for name, tensor in read_weights(path).items():
        if ours := projector_name(name):
            state[f"multi_modal_projector.{ours}"] = tensor
        elif not name.startswith("model.vision_tower.") and not name.endswith("rotary_emb.inv_freq"):
            state[f"language_model.{name}"] = tensor  # (inv_freq: saved by older transformers, now computed)
    return assign_weights(llava_model(path, config, tower, llm), state, path)


def apply_delta(base, delta):
    """The weights of a model released as a delta (liuhaotian/LLaVA-7b-delta-v0, LLaVA-13b-delta-v1-1, ...; the
    original layout): target = base + delta for every tensor both hold. The delta's vocabulary is larger by the
    added tokens (<im_start>, <im_end>, ...): the embeddings' and head's first rows are base + delta, the extra rows
    the delta's alone; the projector (and anything else the base lacks) is the delta's, as LLaVA's
    `llava/model/apply_delta.py` does. Sums are done in float32 and stored in the delta's dtype (LLaVA adds in fp16).
    `base` is the LLM the delta was made from (the original LLaMA weights, in transformers' layout)."""
    base_dir, delta_dir = resolve(base), resolve(delta)
    base_state, target = read_weights(base_dir), read_weights(delta_dir)
    for name, d in target.items():
        b = base_state.get(name)
        if b is None:
            if not (projector_name(name) or "vision_tower" in name):
                raise UserError(f"delta {delta}: tensor {name} is not in base {base} (which holds "
                                f"{len(base_state)} tensors): pass the base LLM the delta was made from")
            continue
        rows = name.endswith(("embed_tokens.weight", "lm_head.weight")) and d.shape[1:] == b.shape[1:] and \
            d.shape[0] > b.shape[0]
        if d.shape != b.shape and not rows:
            raise UserError(f"delta {delta}: tensor {name} is {list(d.shape)} there but {list(b.shape)} in base "
                            f"{base}: pass the base LLM the delta was made from (LLaMA of the same size)")
        summed = d.float()
        summed[:b.shape[0]] += b.float()
        target[name] = summed.to(d.dtype)
    return target


def from_llava_hf(path):
    """transformers' LlavaForConditionalGeneration (llava-hf), read by transformers itself (every on-disk layout)."""
    from transformers import LlavaForConditionalGeneration

    return from_transformers_llava(from_pretrained_complete(LlavaForConditionalGeneration, path, what="checkpoint"),
                                   path)


def from_transformers_llava(hf, source=""):
    """Our model over the modules of a LlavaForConditionalGeneration (the weights are shared, not copied).
    Its 2-layer GELU projector is our mlp2x_gelu."""
    from transformers import AutoModelForCausalLM

    c = hf.config
    select = {"default": "patch", "full": "cls_patch"}.get(c.vision_feature_select_strategy)
    if not isinstance(c.vision_feature_layer, int) or c.projector_hidden_act != "gelu" or select is None:
        raise UserError(f"{source}: only a single vision_feature_layer, a GELU projector and the default or full "
                        "vision_feature_select_strategy map onto LLaVA-1.5; this checkpoint is another model")
    config = LlavaConfig(vision_tower=source, llm=source, projector_type="mlp2x_gelu", template="vicuna_v1",
                         vision_feature_layer=c.vision_feature_layer, vision_feature_select=select)
    with params_on_meta():
        llm = AutoModelForCausalLM.from_config(c.text_config)
    setattr(llm, llm.base_model_prefix, hf.model.language_model)
    llm.lm_head = hf.lm_head
    model = llava_model(source, config, hf.model.vision_tower, llm)
    for name in ("linear_1", "linear_2"):  # (its Linear layers in our projector, which reads no instruction)
        setattr(model.multi_modal_projector, name, getattr(hf.model.multi_modal_projector, name))
    return model


def from_instructblip_hf(path):
    """transformers' InstructBlipForConditionalGeneration (Salesforce/instructblip-vicuna-7b and -13b), read by
    transformers itself: its LLM tokenizer at the top (InstructBLIP's Vicuna quirks included: BOS "</s>"), the
    Q-Former's BERT tokenizer in qformer_tokenizer/, a BlipImageProcessor (a plain resize to 224 x 224)."""
    from transformers import InstructBlipForConditionalGeneration

    hf = from_pretrained_complete(InstructBlipForConditionalGeneration, path, what="checkpoint")
    return from_transformers_instructblip(hf, path)


def from_transformers_instructblip(hf, source=""):
    """Our model over the modules of an InstructBlipForConditionalGeneration: its vision model as the tower and its
    LLM shared, not copied; its Q-Former's weights (query_tokens, qformer.*, language_projection) copied into our
    QFormerProjector, whose module names are transformers' (qformer.py). transformers applies the vision model's
    post_layernorm (LAVIS's ln_vision, renamed by transformers' convert_instructblip_original_to_pytorch.py) to its
    last hidden state before the Q-Former; here the tower gives hidden_states[-1] with CLS (257 features at 224 px)
    and the projector's vision_layernorm, that LayerNorm's copy, normalises them in fp32 as LAVIS does.
    The image goes through the processor alone (image_aspect_ratio "crop": BlipImageProcessor resizes to a square,
    as LAVIS's blip_image_eval does; no padding to a square first)."""
    c = hf.config
    q = c.qformer_config
    if not c.use_decoder_only_language_model:
        raise UserError(f"{source}: an InstructBLIP with an encoder-decoder LLM ({c.text_config.model_type}, the "
                        "FLAN-T5 variants); this project's LLaVA runs a decoder-only LLM: use a Vicuna one")
    if q.hidden_act != "gelu" or getattr(q, "position_embedding_type", "absolute") != "absolute" or \
            q.encoder_hidden_size != c.vision_config.hidden_size:
        raise UserError(f"{source}: its Q-Former (hidden_act {q.hidden_act!r}, position_embedding_type "
                        f"{getattr(q, 'position_embedding_type', None)!r}, encoder_hidden_size "
                        f"{q.encoder_hidden_size}) is not InstructBLIP's (gelu, absolute, the vision width "
                        f"{c.vision_config.hidden_size}); qformer.py builds only that one")
    sizes = QFormerConfig(num_hidden_layers=q.num_hidden_layers, hidden_size=q.hidden_size,
                          num_attention_heads=q.num_attention_heads, intermediate_size=q.intermediate_size,
                          cross_attention_frequency=q.cross_attention_frequency, num_query_tokens=c.num_query_tokens,
                          vocab_size=q.vocab_size, max_position_embeddings=q.max_position_embeddings,
                          pad_token_id=q.pad_token_id, layer_norm_eps=q.layer_norm_eps,
                          vision_layer_norm_eps=c.vision_config.layer_norm_eps,
                          hidden_dropout_prob=q.hidden_dropout_prob,
                          attention_probs_dropout_prob=q.attention_probs_dropout_prob)
    config = LlavaConfig(vision_tower=source, llm=source, projector_type="qformer", qformer=sizes.to_dict(),
                         qformer_tokenizer=os.path.join(source, QFORMER_TOKENIZER), vision_feature_layer=-1,
                         vision_feature_select="cls_patch", template="instructblip", image_aspect_ratio="crop")
    with params_on_meta():
        model = llava_model(source, config, hf.vision_model, hf.language_model)
    state = {}
    for name, tensor in hf.state_dict().items():
        if name.startswith(("qformer.", "language_projection.")) or name == "query_tokens":
            state[name] = tensor
        elif name.startswith("vision_model.post_layernorm."):
            state[name.replace("vision_model.post_layernorm.", "vision_layernorm.")] = tensor.clone()
    own = model.multi_modal_projector.state_dict()
    state = {k: v for k, v in state.items() if k in own}  # (buffers transformers keeps: the Q-Former's position_ids)
    assign_weights(model, {f"multi_modal_projector.{k}": v for k, v in state.items()}, source)
    return model


def vision_tower_from_config(config):
    """The vision tower a saved vision_config describes, on AutoModel's map; InstructBLIP's vision model is not on it
    (transformers builds it only inside InstructBlipForConditionalGeneration), so it is named here."""
    from transformers import AutoModel, InstructBlipVisionModel

    if config.model_type == "instructblip_vision_model":
        return InstructBlipVisionModel(config)
    return AutoModel.from_config(config)


def llava_model(path, config, tower, llm):
    """LlavaModel(...), whose checks of the config against the backbones (a vision_feature_layer the tower does not
    have, cls_patch without a CLS token) name the checkpoint's config.json."""
    try:
        return LlavaModel(config, tower, llm)
    except UserError as e:
        raise UserError(f"{os.path.join(path, 'config.json')}: {e}") from None


def assign_weights(model, state, path):
    """Load `state` into a model whose missing parameters sit on the meta device; every one must be filled, each by a
    tensor of its shape (load_state_dict would raise a RuntimeError listing them all, or, with assign=True, take a
    float's place with an integer tensor)."""
    expected = model.state_dict()
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise UserError(f"{path}: the weight files hold tensors the model its config.json describes does not have "
                        f"({', '.join(unexpected[:3])}; {len(unexpected)} in all): the weights and config.json are "
                        "not of one checkpoint; save or fetch it again")
    wrong = [k for k, v in state.items() if v.shape != expected[k].shape or
             v.dtype.is_floating_point != expected[k].dtype.is_floating_point]
    if wrong:
        k = wrong[0]
        raise UserError(f"{path}: tensor {k} is {tuple(state[k].shape)} {state[k].dtype} in the weight files but "
                        f"{tuple(expected[k].shape)} {expected[k].dtype} in the model its config.json describes "
                        f"({len(wrong)} tensors differ): the weights and config.json are not of one checkpoint; save "
                        "or fetch it again")
    model.load_state_dict(state, strict=False, assign=True)
    if model.language_model.config.get_text_config().tie_word_embeddings:
        model.language_model.tie_weights()
    still_empty = [n for n, p in model.named_parameters() if p.is_meta]
    if still_empty:
        raise UserError(f"{path}: weights missing for {', '.join(still_empty[:5])} ({len(still_empty)} in all): the "
                        "checkpoint is incomplete; save or fetch it again")
    return model


# ----------------------------------------------------------------------------------------------------------------------
# LoRA adapters in PEFT's files (lora.py holds the layers and the key names)


def save_adapter(path, state, config):
    """adapter_config.json + adapter_model.safetensors in `path`: `state` is the adapters' tensors under their names
    inside the LLM (model.layers.0.self_attn.q_proj.lora_A.weight), written under PEFT's keys; `config` is
    lora.peft_config's."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in lora.adapter_state(state).items()}
    os.makedirs(path, exist_ok=True)
    atomic_write(os.path.join(path, ADAPTER_WEIGHTS), lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
    atomic_write(os.path.join(path, ADAPTER_CONFIG), lambda tmp: write_json(tmp, config))


def load_adapter(llm, path):
    """Put the adapters of `path` (PEFT's files) on `llm`, in place: r, lora_alpha and target_modules from
    adapter_config.json; every adapter tensor must be there, of its shape. Dropout is the saved one (off in eval())."""
    file = os.path.join(path, ADAPTER_CONFIG)
    saved = read_json(file)
    r, alpha, targets = saved.get("r"), saved.get("lora_alpha"), saved.get("target_modules")
    valid = saved.get("peft_type") == "LORA" and isinstance(r, int) and r >= 1 and \
        isinstance(alpha, (int, float)) and alpha > 0 and isinstance(targets, list) and targets and \
        all(isinstance(t, str) for t in targets) and saved.get("bias", "none") == "none" and \
        not saved.get("use_dora") and not saved.get("use_rslora")
    if not valid:
        raise UserError(f"{file}: not a plain LoRA adapter config (peft_type \"LORA\", integer r, lora_alpha, a list "
                        "of target_modules, bias \"none\", no DoRA or rsLoRA), which is what this project loads")
    dropout = saved.get("lora_dropout", 0.0)
    lora.add_adapters(llm, r, alpha, dropout if isinstance(dropout, float) and 0 <= dropout < 1 else 0.0, targets)
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.exists(weights) and os.path.exists(os.path.join(path, "adapter_model.bin")):  # LLaVA's, older PEFT
        weights = os.path.join(path, "adapter_model.bin")
    try:
        state = {lora.from_peft_key(k): v for k, v in read_file(weights).items()}
    except ValueError as e:
        raise UserError(f"{weights}: {e}") from None
    expected = {k: p for k, p in llm.named_parameters() if ".lora_A." in k or ".lora_B." in k}
    lacking, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    wrong = [k for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape]
    if lacking or extra or wrong:
        raise UserError(f"{weights} does not fit its base model with {file}'s r and target_modules: missing "
                        f"{lacking[:2]}, unexpected {extra[:2]}, of another shape {wrong[:2]}; is it the adapter of "
                        "this base?")
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(state[k])


# ----------------------------------------------------------------------------------------------------------------------
# The backbones a checkpoint references: recorded by save, found and checked by load

FINGERPRINT_BLOCK = 2**16


def reference(path):
    """How save() names a backbone it does not write: a local directory by its absolute path (a relative one would be
    relative to wherever training ran, unknown later), a hub id as it is, with the commit of its snapshot; and a
    record of what identifies its files (fingerprint), which load() checks."""
    local = resolve(path)
    record = {"fingerprint": fingerprint(local)}
    if os.path.isdir(path):
        return os.path.abspath(path), record
    if os.path.basename(os.path.dirname(local)) == "snapshots":  # huggingface_hub's cache: snapshots/<commit>
        record["revision"] = os.path.basename(local)
    return path, record


def find_backbone(checkpoint, field, where, record=None):
    """The directory of the backbone a checkpoint names in config.json's `field`, which must be the one it was
    trained with: a hub id at the commit save() recorded, and files whose fingerprint is the recorded one. A path that
    is not there, or whose files differ, is a UserError saying so; checkpoints saved before fingerprints were
    recorded (record None) load from whatever is there."""
    what = BACKBONES[field][1] if field in BACKBONES else "LoRA base model" if field == LORA_BASE else "vision tower"
    config = os.path.join(checkpoint, "config.json")
    relative = (f"a relative path in a checkpoint saved before backbone paths were stored absolute is relative to the "
                f"directory its training ran in: run from there, or write the {what}'s absolute path into {config} "
                f"(\"{field}\")")
    if not os.path.isdir(where) and not looks_like_hub_id(where):
        if os.path.isabs(where):
            raise UserError(f"checkpoint {checkpoint} was trained with the {what} at {where}, which is not there now: "
                            f"restore it, or write where it is now into {config} (\"{field}\")")
        raise UserError(f"checkpoint {checkpoint} names its {what} by the relative path {where}, which is not a "
                        f"directory from here ({os.getcwd()}); {relative}")
    try:
        found = resolve(where, revision=record.get("revision") if record else None)
    except UserError as e:
        hint = f"; if it is a path: {relative}" if record is None and not os.path.isdir(where) else ""
        raise UserError(f"checkpoint {checkpoint}, its {what} (\"{field}\" in config.json): {e}{hint}") from None
    if record is not None:
        now = fingerprint(found)
        if now != record["fingerprint"]:
            then = record["fingerprint"]
            changes = [f"{f} differs" for f in sorted(then.keys() & now.keys()) if then[f] != now[f]]
            changes += [f"{f} is gone" for f in sorted(then.keys() - now.keys())]
            changes += [f"{f} is new" for f in sorted(now.keys() - then.keys())]
            raise UserError(f"checkpoint {checkpoint} was trained with the {what} at {where} (fingerprint "
                            f"{digest(then)}); the files there now differ ({', '.join(changes)}; fingerprint "
                            f"{digest(now)}): restore the {what} it was trained with, or point \"{field}\" in {config} "
                            "at a copy of it")
    return found


def fingerprint(directory):
    """What identifies a backbone's files, cheaply even for a 13B model: for config.json and each weight file that
    transformers loads (weight_files), a sha256 over its size and content, where a weight file's content is sampled:
    four 64 KiB blocks at fixed places (start, thirds, end). A tower rebuilt with another seed (the same shapes, so the
    same sizes and safetensors header) differs in the sampled weights. {file name: digest}."""
    out = {}
    for name in ["config.json", *weight_files(directory)]:
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            continue
        size = os.path.getsize(file)
        h = hashlib.sha256(str(size).encode())
        with open(file, "rb") as f:
            if name.endswith(".json"):
                h.update(f.read())
            for offset in [] if name.endswith(".json") else sorted({0, size // 3, 2 * size // 3,
                                                                     max(size - FINGERPRINT_BLOCK, 0)}):
                f.seek(offset)
                h.update(f.read(FINGERPRINT_BLOCK))
        out[name] = h.hexdigest()[:16]
    return out


def digest(fingerprint):
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------------------------
# Files: weight files, JSON, atomic writes

WEIGHT_FILES = (("model.safetensors.index.json", "model.safetensors"),
                ("pytorch_model.bin.index.json", "pytorch_model.bin"))


def has_weights(path):
    return any(os.path.exists(os.path.join(path, f)) for pair in WEIGHT_FILES for f in pair)


def weight_files(path):
    """The weight files of a directory, as transformers picks them (safetensors before .bin, an index before a single
    file), index first; [] if there are none. An index that is damaged or names a shard that is not there (an
    incomplete download or copy) is a UserError naming both."""
    for index, single in WEIGHT_FILES:
        if os.path.exists(os.path.join(path, index)):
            saved = read_json(os.path.join(path, index))
            weight_map = saved.get("weight_map")
            if not (isinstance(weight_map, dict) and weight_map and all(
                    isinstance(f, str) and f == os.path.basename(f) and f.endswith(single.rsplit(".", 1)[1])
                    for f in weight_map.values())):
                raise UserError(f"{os.path.join(path, index)}: its weight_map is not a map of tensor names to shard "
                                "files in this directory; the file is damaged: fetch or save the checkpoint again")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
            if missing:
                raise UserError(f"{os.path.join(path, index)} names {missing[0]}, which is not in {path} "
                                f"({len(missing)} of {len(files)} shards missing): the download or copy is incomplete; "
                                "fetch them again")
            return [index, *files]
        if os.path.exists(os.path.join(path, single)):
            return [single]
    return []


def read_weights(path):
    """Every tensor of a checkpoint directory: safetensors, or .bin read with weights_only=True; sharded or not."""
    files = [f for f in weight_files(path) if not f.endswith(".index.json")]
    if not files:
        raise UserError(f"{path} has no model.safetensors, pytorch_model.bin or their sharded index: its weights are "
                        "missing (an interrupted download or save?); fetch or save them again")
    state = {}
    for f in files:
        state.update(read_file(os.path.join(path, f)))
    return state


def read_file(file):
    """The tensors of one weight file (safetensors, or a torch.save .bin); one cut short or corrupt (safetensors'
    HeaderTooLarge, torch's zip errors) is a UserError naming it."""
    if not file.endswith(".safetensors"):
        return load_pickled_tensors(file)
    try:
        return load_file(file)
    except MemoryError:
        raise
    except Exception as e:
        raise UserError(f"{file}: not a readable safetensors file ({first_line(e)}): it is cut short or damaged; fetch "
                        "or save it again") from None


def load_pickled_tensors(path, nested=None):
    """A torch.save file of tensors. weights_only=True: a pickle that carries anything else is refused, never run.
    `nested`: the tensors may instead sit under that key of a dict whose other entries are dropped (LAVIS saves
    {"model": state dict, "optimizer": ..., "epoch": ...})."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = [line for line in str(e).splitlines() if "GLOBAL" in line]
        if reason:
            raise UserError(f"refusing to load {path}: it holds pickled objects other than tensors, and loading it "
                            f"would run code; convert it to safetensors from a trusted source ({reason[0]})") from None
        raise UserError(f"{path}: not a PyTorch weights file (torch.save's zip), or cut short (a pickle that is no "
                        "torch.save of tensors); fetch it again") from None
    except MemoryError:
        raise
    except Exception as e:  # torch.load meets a cut or foreign file with many kinds of error (OSError, KeyError, ...)
        raise UserError(f"{path}: not a PyTorch weights file (torch.save's zip), or cut short ({type(e).__name__}: "
                        f"{first_line(e)}); fetch it again") from None
    if nested is not None and isinstance(state, dict) and isinstance(state.get(nested), dict):
        state = state[nested]
    if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in
                                            state.items())):
        raise UserError(f"{path} holds a {type(state).__name__} rather than named tensors: it is no weights file; "
                        "pass a checkpoint's weights")
    return state


def read_json(file):
    """A JSON object from a checkpoint's file; one that is cut, not JSON or not an object is a UserError naming it."""
    try:
        with open(file, encoding="utf-8") as f:
            obj = json.load(f)
    except (ValueError, OSError) as e:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        raise UserError(f"{file}: not readable JSON ({first_line(e)}): the file is cut short or damaged; fetch or save "
                        "it again") from None
    if not isinstance(obj, dict):
        raise UserError(f"{file}: a JSON {type(obj).__name__}, not an object: the file is damaged or of another kind; "
                        "fetch or save it again")
    return obj


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def atomic_write(path, write):
    """write(tmp_path), then rename over path, durably: the temporary file is flushed to disk before the rename and
    the directory after it (POSIX makes a rename survive a power cut only then), so a crash leaves the old file or the
    new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync(os.path.dirname(os.path.abspath(path)))


def remove(path):
    """Remove a file, if it is there, durably (its directory flushed), before what follows is written."""
    if os.path.exists(path):
        os.remove(path)
        fsync(os.path.dirname(os.path.abspath(path)))


def fsync(path):
    """Flush a file, or a directory's entries, to disk. A filesystem that cannot sync a directory (some FUSE and
    network mounts say EINVAL) keeps the rename without the guarantee, as before."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if not (os.path.isdir(path) and e.errno in (errno.EINVAL, errno.ENOTSUP, errno.ENOSYS)):
            raise
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------------------
# Training state: torch.distributed.checkpoint's sharded files, read without running code


def load_sharded(state, path):
    """dcp.load(state, path): a training run's sharded weights and optimizer (train.py writes them with dcp.save), read
    so that nothing in the files runs: dcp's metadata and its non-tensor values are pickles, which may name any
    function to call, so both are checked against what such files hold before torch's own code reads them. A file
    that fails the check, or cannot be read, is a UserError naming it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        check_metadata(path)  # on every rank, before dcp's reader unpickles the file
        dcp.load(state, checkpoint_id=path, planner=SafeLoadPlanner())
    except (UnsafeCheckpoint, CheckpointException) as e:
        error = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) else e
        if isinstance(error, UnsafeCheckpoint):
            raise UserError(f"refusing to load {path}: {error}, and loading it would run code; load only "
                            "checkpoints this project wrote") from None
        raise UserError(f"cannot read {path} ({type(error).__name__}: {error}); delete its checkpoint to resume from "
                        "the one before it") from None


class UnsafeCheckpoint(Exception):
    pass


class MetadataUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint's .metadata file is a pickle, which may name any function to call. Only the
    classes such a file holds are allowed (the Restricting Globals recipe of Python's pickle documentation)."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "PurePosixPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
               *(("torch.distributed.checkpoint.metadata", n) for n in (
                   "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                   "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"))}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"its metadata names {module}.{name}")


def check_metadata(path):
    """Unpickle path/.metadata with MetadataUnpickler: UnsafeCheckpoint if it names anything else."""
    try:
        with open(os.path.join(path, ".metadata"), "rb") as f:
            MetadataUnpickler(f).load()
    except UnsafeCheckpoint:
        raise
    except Exception as e:  # cut, or not a pickle at all
        raise UserError(f"{path}/.metadata is unreadable ({type(e).__name__}: {e}); delete its checkpoint to resume "
                        "from the one before it") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """A checkpoint's non-tensor values (the optimizer's hyper-parameters) are torch.save pickles, which the default
    planner loads with weights_only=False; here they must pass weights_only=True first."""

    def load_bytes(self, read_item, value):
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpoint(f"a value holds {str(e).splitlines()[0]}") from None
        value.seek(0)
        super().load_bytes(read_item, value)
