"""How a LLaVA model is stored: written in our layout, read from ours and from the layouts other projects publish.

    model = checkpoints.load("liuhaotian/llava-v1.5-7b")      # a hub id or a local directory, in any layout below
    checkpoints.save(model, "out")                            # config.json + model.safetensors (sharded when large)
    projector = checkpoints.projector_weights("DIR")          # finetune.py --init-from: the projector alone

The layouts, recognised from config.json (docs/llava.md section 7):
- ours: LlavaConfig's fields, the backbones' configs, and safetensors weights named as transformers' Llava names them
  (vision_tower.*, multi_modal_projector.linear_N.*, language_model.*). A module the directory does not hold (stage 1
  writes only the projector) is loaded from the path its config names, as LLaVA reloads its vision tower.
- the original LLaVA's (haotian-liu/LLaVA `llava/model/llava_arch.py`): `mm_*` config keys, the LLM's weights as
  `model.*` + `lm_head.*` in .bin shards, the projector as `model.mm_projector.{0,2}.*`; its stage-1 output is
  config.json + mm_projector.bin, whose LLM is the base model it was trained on (`model_base`).
- transformers' LlavaForConditionalGeneration (the llava-hf repos), read by transformers itself.

Nothing loaded from a file runs code: safetensors, or torch.load(weights_only=True) for .bin files. Every file is
written to a temporary name and renamed, so a crash leaves the old file or the new one.
"""

import json
import os
from dataclasses import asdict, fields

import torch
from safetensors.torch import load_file, save_file

from model import LlavaConfig, LlavaModel, from_pretrained_complete, load_vision_tower, params_on_meta, \
    quiet_transformers

MODULES = ("vision_tower", "multi_modal_projector", "language_model")


def save(model, path, modules=MODULES, state_dict=None, max_shard_bytes=5 * 2**30):
    """config.json + model.safetensors (or shards + model.safetensors.index.json, above max_shard_bytes).

    `modules` chooses what is written: stage 1 writes only the projector, and load() then takes the backbones from
    config.vision_tower and config.llm. `state_dict` defaults to the model's own (a sharded training run passes the
    full one it gathered on rank 0).
    """
    os.makedirs(path, exist_ok=True)
    state, seen = {}, set()
    for name, tensor in (model.state_dict() if state_dict is None else state_dict).items():
        key = (tensor.data_ptr(), tensor.shape)
        if name.split(".", 1)[0] in modules and key not in seen:  # tied weights are stored once
            seen.add(key)
            state[name] = tensor.detach().cpu().contiguous()
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
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": {k: n for n, shard in zip(names, shards) for k in shard}}
    stale = [f for f in os.listdir(path) if f.startswith("model") and f.endswith(".safetensors") and f not in names]
    if len(shards) > 1:
        atomic_write(os.path.join(path, "model.safetensors.index.json"), lambda tmp: write_json(tmp, index))
    else:
        stale.append("model.safetensors.index.json")
    config = {**asdict(model.config), "vision_config": model.vision_tower.config.to_dict(),
              "text_config": model.language_model.config.to_dict()}
    atomic_write(os.path.join(path, "config.json"), lambda tmp: write_json(tmp, config))
    for f in stale:  # files of an earlier save into the same directory
        if os.path.exists(os.path.join(path, f)):
            os.remove(os.path.join(path, f))


def load(path, dtype=None, model_base=None):
    """A LlavaModel from a directory or hub id in any of the layouts above; dtype None keeps the saved dtypes."""
    path = resolve(path)
    with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)
    with quiet_transformers():
        if "mm_vision_tower" in saved:
            model = from_original_llava(path, saved, model_base)
        elif saved.get("model_type") == "llava":
            model = from_llava_hf(path)
        else:
            model = from_our_layout(path, saved)
    model.vision_tower.requires_grad_(False)
    return model.to(dtype) if dtype is not None else model


def projector_weights(path):
    """The projector's weights (our names) from any checkpoint that has one: ours, the original LLaVA's (a full
    model, or stage 1's mm_projector.bin: the file, its directory, or a hub repo holding it, as
    liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5 does), or llava-hf's."""
    if not os.path.exists(path):
        path = resolve(path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "mm_projector.bin")):
        path = os.path.join(path, "mm_projector.bin")
    state = read_weights(path) if os.path.isdir(path) else load_pickled_tensors(path)
    out = {name: v for k, v in state.items() if (name := projector_name(k))}
    if not out:
        raise ValueError(f"{path} holds no projector weights (multi_modal_projector.* or LLaVA's mm_projector.*)")
    return out


def projector_name(key):
    """Our name (linear_N.weight / .bias) of a projector weight in any layout, or None for other weights.

    LLaVA's keys are model.mm_projector.{0,2,...}.* for mlpNx_gelu (an nn.Sequential whose odd indices are the GELUs)
    and model.mm_projector.{weight,bias} for linear (haotian-liu/LLaVA `llava/model/multimodal_projector/
    builder.py`); ours and llava-hf's hold multi_modal_projector.linear_N.* under some prefix."""
    if "multi_modal_projector." in key:
        return key.split("multi_modal_projector.", 1)[1]
    if "mm_projector." in key:
        index, _, param = key.split("mm_projector.", 1)[1].rpartition(".")
        return f"linear_{int(index) // 2 + 1 if index else 1}.{param}"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# The layouts


def from_our_layout(path, saved):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = LlavaConfig(**{f.name: saved[f.name] for f in fields(LlavaConfig) if f.name in saved})
    state = read_weights(path)
    present = {name.split(".", 1)[0] for name in state}
    if "multi_modal_projector" not in present:
        raise ValueError(f"{path} holds no projector weights (multi_modal_projector.*); is it a LLaVA checkpoint "
                         "written by checkpoints.save?")

    def sub_config(key):
        d = dict(saved[key])
        return AutoConfig.for_model(d.pop("model_type"), **d)

    if "vision_tower" in present:
        with params_on_meta():
            tower = AutoModel.from_config(sub_config("vision_config"))
    else:
        tower = load_vision_tower(config.vision_tower)
    if "language_model" in present:
        with params_on_meta():
            llm = AutoModelForCausalLM.from_config(sub_config("text_config"))
    else:
        llm = from_pretrained_complete(AutoModelForCausalLM, config.llm)
    return assign_weights(LlavaModel(config, tower, llm), state, path)


def from_original_llava(path, saved, model_base):
    """A missing mm_* key takes the original code's default (haotian-liu/LLaVA `llava/train/train.py`,
    ModelArguments: select layer -1, select feature "patch", projector "linear"); the tower is reloaded from
    mm_vision_tower (the checkpoint's own copy is ignored, as LLaVA ignores it); the LLM is the checkpoint's `model.*`
    + `lm_head` weights, or `model_base` for a stage-1 directory (mm_projector.bin). The released configs say
    model_type "llava" (transformers' own Llava type since 4.36): the mm_* keys, not the model type, identify the
    layout."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    aspect = saved.get("image_aspect_ratio", "square")
    config = LlavaConfig(vision_tower=saved["mm_vision_tower"], llm=model_base or path,
                         projector_type=saved.get("mm_projector_type", "linear"),
                         vision_feature_layer=saved.get("mm_vision_select_layer", -1),
                         vision_feature_select=saved.get("mm_vision_select_feature", "patch"), template="vicuna_v1",
                         image_aspect_ratio="pad" if aspect == "pad" else "crop",
                         max_length=saved.get("tokenizer_model_max_length") or 2048)
    tower = load_vision_tower(config.vision_tower)
    if model_base is not None or not has_weights(path):
        if model_base is None:
            raise ValueError(f"{path} holds no LLM weights (pytorch_model*.bin or model*.safetensors), as LLaVA's "
                             "stage-1 output (config.json + mm_projector.bin) does not: pass the base LLM as model_base")
        model = LlavaModel(config, tower, from_pretrained_complete(AutoModelForCausalLM, model_base))
        model.multi_modal_projector.load_state_dict(projector_weights(os.path.join(path, "mm_projector.bin")))
        return model
    text = {k: v for k, v in saved.items() if not k.startswith("mm_") and k not in ("architectures", "model_type")}
    with params_on_meta():
        llm = AutoModelForCausalLM.from_config(LlamaConfig(**text))
    state = {}
    for name, tensor in read_weights(path).items():
        if ours := projector_name(name):
            state[f"multi_modal_projector.{ours}"] = tensor
        elif not name.startswith("model.vision_tower.") and not name.endswith("rotary_emb.inv_freq"):
            state[f"language_model.{name}"] = tensor  # (inv_freq: saved by older transformers, now computed)
    return assign_weights(LlavaModel(config, tower, llm), state, path)


def from_llava_hf(path):
    """transformers' LlavaForConditionalGeneration (llava-hf), read by transformers itself (every on-disk layout)."""
    from transformers import LlavaForConditionalGeneration

    return from_transformers_llava(from_pretrained_complete(LlavaForConditionalGeneration, path), path)


def from_transformers_llava(hf, source=""):
    """Our model over the modules of a LlavaForConditionalGeneration (the weights are shared, not copied).
    Its 2-layer GELU projector is our mlp2x_gelu."""
    from transformers import AutoModelForCausalLM

    c = hf.config
    if not isinstance(c.vision_feature_layer, int) or c.projector_hidden_act != "gelu":
        raise ValueError(f"{source}: only a single vision_feature_layer and a GELU projector map onto LLaVA-1.5")
    config = LlavaConfig(vision_tower=source, llm=source, projector_type="mlp2x_gelu",
                         vision_feature_layer=c.vision_feature_layer, template="vicuna_v1",
                         vision_feature_select={"default": "patch", "full": "cls_patch"}[c.vision_feature_select_strategy])
    with params_on_meta():
        llm = AutoModelForCausalLM.from_config(c.text_config)
    setattr(llm, llm.base_model_prefix, hf.model.language_model)
    llm.lm_head = hf.lm_head
    model = LlavaModel(config, hf.model.vision_tower, llm)
    model.multi_modal_projector = hf.model.multi_modal_projector
    return model


def assign_weights(model, state, path):
    """Load `state` into a model whose missing parameters sit on the meta device; every one must be filled."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"{path}: weights the model does not have: {unexpected[:5]}...")
    if model.language_model.config.get_text_config().tie_word_embeddings:
        model.language_model.tie_weights()
    still_empty = [n for n, p in model.named_parameters() if p.is_meta]
    if still_empty:
        raise ValueError(f"{path}: weights missing for {still_empty[:5]} ({len(still_empty)} in all)")
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Files: the hub, weight files, atomic writes

# What a LLaVA checkpoint needs from a hub repo: configs, the tokenizer (tokenizer.json, or SentencePiece's
# tokenizer.model as Vicuna and liuhaotian/llava-v1.5-* ship it), stage 1's mm_projector.bin, and the weights in one
# format. Never training_args.bin or optimizer states (pickles), nor a second copy of the weights.
HUB_FILES = ["*.json", "*.jinja", "*.model", "*.txt", "mm_projector.bin"]
HUB_WEIGHTS = ["*.safetensors", "pytorch_model*.bin"]  # in order of preference


def resolve(path):
    """A local directory as is; anything else is a hub repo id, fetched into (or found in) huggingface_hub's cache.
    Without a reachable hub (HF_HUB_OFFLINE=1, no network, the hub down) the cached snapshot is used, holding the
    weights an earlier download put in it."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"{path} is not a checkpoint directory (nor a hub repo id, owner/name)")
    from fnmatch import filter as matching

    from huggingface_hub import model_info, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:  # the repo's file list, in one request (list_repo_files retries an unreachable hub for half a minute)
        files = [f.rfilename for f in model_info(path).siblings or []]
    except GatedRepoError:  # (a kind of RepositoryNotFoundError)
        raise
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{path}: no such directory here, and no hub repo of that name") from e
    except Exception as unreachable:  # the client's transport errors differ between huggingface_hub versions
        try:
            return snapshot_download(path, allow_patterns=HUB_FILES, local_files_only=True)
        except LocalEntryNotFoundError:
            raise unreachable from None
    weights = [w for w in HUB_WEIGHTS if matching(files, w)][:1]
    return snapshot_download(path, allow_patterns=HUB_FILES + weights)


WEIGHT_FILES = (("model.safetensors.index.json", "model.safetensors"),
                ("pytorch_model.bin.index.json", "pytorch_model.bin"))


def has_weights(path):
    return any(os.path.exists(os.path.join(path, f)) for pair in WEIGHT_FILES for f in pair)


def read_weights(path):
    """Every tensor of a checkpoint directory: safetensors, or .bin read with weights_only=True; sharded or not."""
    for index, single in WEIGHT_FILES:
        if os.path.exists(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            break
        if os.path.exists(os.path.join(path, single)):
            files = [single]
            break
    else:
        raise FileNotFoundError(f"{path} has no model.safetensors, pytorch_model.bin or their sharded index")
    state = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)) if f.endswith(".safetensors") else
                     load_pickled_tensors(os.path.join(path, f)))
    return state


def load_pickled_tensors(path):
    """A torch.save file of tensors. weights_only=True: a pickle that carries anything else is refused, never run."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"refusing to load {path}: it holds pickled objects other than tensors, and loading it would "
                         f"run code; convert it to safetensors from a trusted source ({str(e).splitlines()[0]})") from None


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def atomic_write(path, write):
    """write(tmp_path), then rename over path: a crash leaves the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
