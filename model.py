"""What LLaVA is: a vision tower, a projector, and an LLM that reads image features as if they were words.

    model = LlavaModel.from_config(LlavaConfig())          # CLIP-L/14-336 + Vicuna-7B + a fresh mlp2x_gelu projector
    loss_sum, n_tokens = model(input_ids, attention_mask, pixel_values, labels)
    model.save_pretrained("out"); model = LlavaModel.from_pretrained("out")

The wiring follows LLaVA-1.5 (../shared/reference/llava.md section 1):
1. The vision tower (any transformers vision model with hidden states: CLIP, SigLIP, ...) encodes each image; the
   features are hidden_states[vision_feature_layer] (-2: the penultimate layer, without CLIP's post-layernorm), and
   `patch` drops the CLS token. CLIP-L/14-336 gives 24 x 24 = 576 features of width 1024 per image.
2. The projector maps them to the LLM's width: `linear`, or `mlp2x_gelu` = Linear, GELU (erf), Linear.
3. data.py has already written N = num_image_tokens placeholders (IMAGE_TOKEN_INDEX) per image into input_ids; the
   projected features are written into those positions of the token embeddings, images in order.
4. The LLM runs on the result. Training returns the summed cross-entropy and the number of supervised tokens
   separately, so the training loop can normalise by the token count of the whole global batch.

Module names match transformers' LlavaForConditionalGeneration (vision_tower, multi_modal_projector.linear_1/linear_2,
language_model), which makes parity testable and export a renaming.
"""

import json
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX

# Loading a hub repo that ships only .bin weights (Vicuna v1.5, LLaVA-1.5) makes transformers start a background
# thread that asks the hub to convert it and downloads the safetensors copy: another 13-26 GB, while the other ranks
# wait for rank 0. The weights this project reads are the ones it asks for.
os.environ.setdefault("DISABLE_SAFETENSORS_CONVERSION", "1")


@dataclass
class LlavaConfig:
    vision_tower: str = "openai/clip-vit-large-patch14-336"  # hub id or local dir of a transformers vision model
    llm: str = "lmsys/vicuna-7b-v1.5"  # hub id or local dir of a transformers causal LM (and its tokenizer)
    projector_type: str = "mlp2x_gelu"  # "linear" or "mlp{N}x_gelu" (LLaVA's regex ^mlp(\d+)x_gelu$)
    vision_feature_layer: int = -2  # index into the tower's hidden_states
    vision_feature_select: str = "patch"  # "patch" drops the CLS token, "cls_patch" keeps it
    # How the model talks and sees, saved with it so that inference uses what training used (data.py):
    template: str = "vicuna_v1"
    image_aspect_ratio: str = "pad"
    max_length: int = 2048


# ----------------------------------------------------------------------------------------------------------------------
# The projector


class Projector(nn.Module):
    """LLaVA's projector: `linear` is Linear(vision, text); `mlp{N}x_gelu` is Linear(vision, text) followed by N-1 x
    (GELU, Linear(text, text)). The layers are named linear_1 ... linear_N, as in transformers' Llava."""

    def __init__(self, projector_type, vision_hidden, text_hidden):
        super().__init__()
        mlp = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
        if projector_type != "linear" and not (mlp and int(mlp.group(1)) >= 1):
            raise ValueError(f"unknown projector type {projector_type!r}; use 'linear' or 'mlp2x_gelu' (mlpNx_gelu)")
        depth = int(mlp.group(1)) if mlp else 1
        self.linear_1 = nn.Linear(vision_hidden, text_hidden)
        for i in range(2, depth + 1):
            self.add_module(f"linear_{i}", nn.Linear(text_hidden, text_hidden))

    def forward(self, x):
        layers = list(self.children())
        x = layers[0](x)
        for layer in layers[1:]:
            x = layer(F.gelu(x))  # nn.GELU's default: the exact erf form, as in LLaVA
        return x


# ----------------------------------------------------------------------------------------------------------------------
# The model


class LlavaModel(nn.Module):
    def __init__(self, config, vision_tower, language_model):
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower
        self.multi_modal_projector = Projector(config.projector_type, vision_tower.config.hidden_size,
                                               language_model.config.hidden_size)
        self.language_model = language_model
        self.vision_tower.requires_grad_(False)  # LLaVA never trains the tower; unfreezing it is the caller's choice
        if config.vision_feature_select not in ("patch", "cls_patch"):
            raise ValueError(f"vision_feature_select must be 'patch' or 'cls_patch', not {config.vision_feature_select!r}")
        # CLIP-like towers put a CLS token before the patches; SigLIP-like ones have none.
        self.has_cls = any(n.endswith(("class_embedding", "cls_token")) for n, _ in vision_tower.named_parameters())
        if config.vision_feature_select == "cls_patch" and not self.has_cls:
            raise ValueError(f"{config.vision_tower} has no CLS token; use vision_feature_select='patch'")

    @property
    def num_image_tokens(self):
        """Placeholders per image in input_ids = features the projector emits per image (576 for CLIP-L/14-336)."""
        c = self.vision_tower.config
        return (c.image_size // c.patch_size) ** 2 + (self.config.vision_feature_select == "cls_patch")

    # --- forward ---

    def image_features(self, pixel_values):
        """(images, 3, H, W) -> (images, num_image_tokens, LLM width)."""
        frozen = not any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            dtype = next(self.vision_tower.parameters()).dtype
            hidden = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True).hidden_states
        features = hidden[self.config.vision_feature_layer]
        if self.has_cls and self.config.vision_feature_select == "patch":
            features = features[:, 1:]
        assert features.shape[1] == self.num_image_tokens, (features.shape, self.num_image_tokens)
        return self.multi_modal_projector(features.to(self.multi_modal_projector.linear_1.weight.dtype))

    def embed(self, input_ids, pixel_values=None):
        """Token embeddings with the projected image features written into the IMAGE_TOKEN_INDEX positions."""
        is_image = input_ids == IMAGE_TOKEN_INDEX
        embeds = self.language_model.get_input_embeddings()(input_ids.clamp(min=0))
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if is_image.sum() != n_images * self.num_image_tokens:
            raise ValueError(f"input_ids hold {int(is_image.sum())} image placeholders but {n_images} image(s) x "
                             f"{self.num_image_tokens} tokens were given; build inputs with data.ChatFormat")
        if n_images == 0:
            return self.keep_projector_in_graph(embeds)
        features = self.image_features(pixel_values).to(embeds.dtype)
        return embeds.masked_scatter(is_image.unsqueeze(-1), features)

    def keep_projector_in_graph(self, embeds):
        """A text-only batch in training still runs the projector, on zero rows, so that its parameters get a (zero)
        gradient. FSDP reduce-scatters only the parameters that have one: a rank whose micro-batch has no image would
        otherwise send less than the others and desynchronise every rank (a gloo error, an NCCL hang). LLaVA splices
        an empty slice of a dummy image's features into text-only samples for the same reason."""
        projector = self.multi_modal_projector
        weight = next(projector.parameters())
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return embeds
        nothing = projector(weight.new_zeros(0, self.vision_tower.config.hidden_size))
        return torch.cat([embeds.flatten(0, 1), nothing.to(embeds.dtype)]).view_as(embeds)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, labels=None):
        """Logits (B, T, V) without labels; with labels, (summed cross-entropy, number of supervised tokens).

        attention_mask may be None for right-padded batches: causal attention never lets a real token see the
        padding after it, and the losses at padding positions are masked, so the result is the same.
        """
        embeds = self.embed(input_ids, pixel_values)
        hidden = self.language_model.base_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                                use_cache=False).last_hidden_state
        head = self.language_model.get_output_embeddings()
        if labels is None:
            return head(hidden)
        # Image positions are never targets, whatever the caller's labels say (LLaVA's splice does the same).
        targets = labels.masked_fill(input_ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX)[:, 1:]
        supervised = targets != IGNORE_INDEX
        return chunked_cross_entropy(hidden[:, :-1][supervised], targets[supervised], head), supervised.sum()

    # --- building, saving, loading ---

    @classmethod
    def from_config(cls, config, dtype=torch.float32, empty=False):
        """The backbones with their pretrained weights (from config.vision_tower and config.llm), a fresh projector.

        dtype is every parameter's, float32 by default whatever dtype a backbone was saved in (Vicuna's config says
        float16): training keeps fp32 master weights. dtype="auto" keeps each backbone's saved dtype (a sharded run's
        rank 0 loads so, in half the memory; copying into the fp32 shards is exact). empty=True builds the model with
        every parameter on the meta device, reading only the backbones' configs: sharded training builds it so on
        each rank and lets rank 0 load and broadcast the weights.
        """
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        with quiet_transformers():  # a full CLIP checkpoint reports its unused text tower; that is expected
            if empty:
                vision_config = AutoConfig.from_pretrained(config.vision_tower)
                vision_config = getattr(vision_config, "vision_config", vision_config)
                with params_on_meta():
                    return cls(config, AutoModel.from_config(vision_config, dtype=dtype),
                               AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.llm), dtype=dtype))
            tower = load_vision_tower(config.vision_tower, dtype)
        llm = AutoModelForCausalLM.from_pretrained(config.llm, dtype=dtype)
        model = cls(config, tower, llm)
        return model if dtype == "auto" else model.to(dtype)

    def save_pretrained(self, path, modules=("vision_tower", "multi_modal_projector", "language_model"),
                        state_dict=None, max_shard_bytes=5 * 2**30):
        """config.json + model.safetensors (or shards + model.safetensors.index.json, above max_shard_bytes).

        `modules` chooses what is written: stage 1 writes only the projector, and from_pretrained then takes the
        backbones from config.vision_tower and config.llm. `state_dict` defaults to this model's (a sharded training
        run passes the full one it gathered). Each file is written to a temporary name and renamed.
        """
        os.makedirs(path, exist_ok=True)
        state, seen = {}, set()
        for name, tensor in (self.state_dict() if state_dict is None else state_dict).items():
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
        config = {**asdict(self.config), "vision_config": self.vision_tower.config.to_dict(),
                  "text_config": self.language_model.config.to_dict()}
        atomic_write(os.path.join(path, "config.json"), lambda tmp: write_json(tmp, config))
        for f in stale:  # files of an earlier save into the same directory
            if os.path.exists(os.path.join(path, f)):
                os.remove(os.path.join(path, f))

    @classmethod
    def from_pretrained(cls, path, dtype=None, model_base=None):
        """A directory (or hub id) in any of these layouts, recognised from its config.json:
        - ours (save_pretrained): backbones whose weights the directory does not hold are loaded from the paths in
          its config, as LLaVA reloads its vision tower;
        - the original LLaVA's (liuhaotian/llava-v1.5-7b: `mm_*` config keys, `model.*` / `lm_head` weights), or its
          stage-1 output (config.json + mm_projector.bin), whose LLM comes from `model_base`;
        - transformers' llava-hf (`model_type: llava`), in any on-disk layout transformers reads.
        """
        path = resolve(path)
        with open(os.path.join(path, "config.json")) as f:
            saved = json.load(f)
        if "mm_vision_tower" in saved:
            model = from_original_llava(cls, path, saved, model_base)
        elif saved.get("model_type") == "llava":
            model = from_llava_hf(cls, path)
        else:
            model = from_our_layout(cls, path, saved)
        model.vision_tower.requires_grad_(False)
        return model.to(dtype) if dtype is not None else model


def from_our_layout(cls, path, saved):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = LlavaConfig(**{f.name: saved[f.name] for f in fields(LlavaConfig) if f.name in saved})
    state = read_weights(path)
    present = {name.split(".", 1)[0] for name in state}
    if "multi_modal_projector" not in present:
        raise ValueError(f"{path} holds no projector weights (multi_modal_projector.*); is it a LLaVA checkpoint "
                         "written by save_pretrained?")

    def sub_config(key):
        d = dict(saved[key])
        return AutoConfig.for_model(d.pop("model_type"), **d)

    with quiet_transformers():
        if "vision_tower" in present:
            with params_on_meta():
                tower = AutoModel.from_config(sub_config("vision_config"))
        else:
            tower = load_vision_tower(config.vision_tower)
    if "language_model" in present:
        with params_on_meta():
            llm = AutoModelForCausalLM.from_config(sub_config("text_config"))
    else:
        llm = AutoModelForCausalLM.from_pretrained(config.llm)
    return assign_weights(cls(config, tower, llm), state, path)


def from_original_llava(cls, path, saved, model_base):
    """The original LLaVA layout (reference/llava.md 7): missing mm_* keys take the original's defaults; the tower is
    reloaded from mm_vision_tower (the checkpoint's own copy is ignored, as LLaVA ignores it); the LLM is the
    checkpoint's `model.*` + `lm_head` weights, or `model_base` for a stage-1 directory (mm_projector.bin).
    The released configs say model_type "llava" (transformers' own Llava type since 4.36): the mm_* keys, not the
    model type, identify the layout."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    aspect = saved.get("image_aspect_ratio", "square")
    config = LlavaConfig(vision_tower=saved["mm_vision_tower"], llm=model_base or path,
                         projector_type=saved.get("mm_projector_type", "linear"),
                         vision_feature_layer=saved.get("mm_vision_select_layer", -1),
                         vision_feature_select=saved.get("mm_vision_select_feature", "patch"), template="vicuna_v1",
                         image_aspect_ratio="pad" if aspect == "pad" else "crop",
                         max_length=saved.get("tokenizer_model_max_length") or 2048)
    with quiet_transformers():
        tower = load_vision_tower(config.vision_tower)
    if model_base is not None or not has_weights(path):
        if model_base is None:
            raise ValueError(f"{path} holds no LLM weights (pytorch_model*.bin or model*.safetensors), as LLaVA's "
                             "stage-1 output (config.json + mm_projector.bin) does not: pass the base LLM as model_base")
        model = cls(config, tower, AutoModelForCausalLM.from_pretrained(model_base))
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
    return assign_weights(cls(config, tower, llm), state, path)


def from_llava_hf(cls, path):
    """transformers' LlavaForConditionalGeneration (llava-hf), read by transformers itself (every on-disk layout)."""
    from transformers import LlavaForConditionalGeneration

    return from_transformers_llava(cls, LlavaForConditionalGeneration.from_pretrained(path), path)


def from_transformers_llava(cls, hf, source=""):
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
    model = cls(config, hf.model.vision_tower, llm)
    model.multi_modal_projector = hf.model.multi_modal_projector
    return model


def load_vision_tower(path, dtype="auto"):
    """Any transformers vision model; from a full CLIP/SigLIP checkpoint (openai/clip-vit-large-patch14-336 is one),
    its vision half."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path)
    return AutoModel.from_pretrained(path, config=getattr(config, "vision_config", config), dtype=dtype)


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


def projector_weights(path):
    """The projector's weights (our names) from any checkpoint that has one: ours, the original LLaVA's (a full
    model, or stage 1's mm_projector.bin: the file, its directory, or a hub repo holding it, as
    liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5 does), or llava-hf's. The .bin is read with
    weights_only=True: a pickle that carries anything but tensors is refused."""
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

    LLaVA's keys are model.mm_projector.{0,2,...}.* for mlpNx_gelu (the odd indices are the GELUs) and
    model.mm_projector.{weight,bias} for linear (reference/llava.md 1.3, 7.1); ours and llava-hf's hold
    multi_modal_projector.linear_N.* under some prefix."""
    if "multi_modal_projector." in key:
        return key.split("multi_modal_projector.", 1)[1]
    if "mm_projector." in key:
        index, _, param = key.split("mm_projector.", 1)[1].rpartition(".")
        return f"linear_{int(index) // 2 + 1 if index else 1}.{param}"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Helpers


def chunked_cross_entropy(hidden, targets, head, chunk_size=2048):
    """Summed cross-entropy of head(hidden) against targets, computed chunk by chunk.

    Only supervised positions reach this function (in LLaVA most positions are image tokens), and under autograd each
    chunk is checkpointed: its fp32 logits are rebuilt in backward instead of kept, so no B x T x V logits tensor
    ever exists. Returns a float32 scalar.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size)):
        if torch.is_grad_enabled():
            total = total + checkpoint(_cross_entropy_sum, h, t, head, use_reentrant=False)
        else:
            total = total + _cross_entropy_sum(h, t, head)
    return total


def _cross_entropy_sum(hidden, targets, head):
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


@contextmanager
def params_on_meta():
    """Build modules with their parameters on the meta device (no memory, no random init) and their buffers real.

    Weights are then loaded with load_state_dict(assign=True). Buffers stay real because models compute some of
    them at construction and never save them (rotary inv_freq, CLIP's position_ids).
    """
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@contextmanager
def quiet_transformers():
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


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
