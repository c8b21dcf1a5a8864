"""What LLaVA is: a vision tower, a projector, and an LLM that reads image features as if they were words.

    model = LlavaModel.from_config(LlavaConfig())          # CLIP-L/14-336 + Vicuna-7B + a fresh mlp2x_gelu projector
    logits = model(input_ids, attention_mask, pixel_values)
    loss_sum = model(input_ids, attention_mask, pixel_values, labels)   # summed over the supervised tokens

The wiring follows LLaVA-1.5 (docs/llava.md section 1; haotian-liu/LLaVA `llava/model/llava_arch.py`):
1. The vision tower (any transformers vision model with hidden states: CLIP, SigLIP, ...) encodes each image; the
   features are hidden_states[vision_feature_layer] (-2: the penultimate layer, without CLIP's post-layernorm), and
   `patch` drops the CLS token. CLIP-L/14-336 gives 24 x 24 = 576 features of width 1024 per image.
2. The projector maps them to the LLM's width: `linear`, or `mlp2x_gelu` = Linear, GELU (erf), Linear, one token
   per feature; or InstructBLIP's `qformer` (qformer.py), 32 tokens read from all features by queries that also read
   the instruction (each image's, in the Q-Former's own tokenizer: data.py builds instruction_ids / instruction_mask,
   which the other projectors ignore).
3. data.py has already written N = num_image_tokens placeholders (IMAGE_TOKEN_INDEX) per image into input_ids (it
   asks the model for N); the projected features are written into those positions of the token embeddings, images
   in order.
4. The LLM runs on the result. Training gets the summed cross-entropy over the supervised tokens (supervised_targets);
   the loop divides it by their count over the whole global batch.

Module names match transformers' LlavaForConditionalGeneration (vision_tower, multi_modal_projector.linear_1/linear_2,
language_model), which makes parity testable and export a renaming. Saving and loading, in our layout and in the
layouts other projects publish, is checkpoints.py's.
"""

import os
import re
import threading
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from data import IGNORE_INDEX, IM_END_TOKEN, IM_START_TOKEN, IMAGE_TOKEN_INDEX, TEMPLATES, ChatFormat, UserError, \
    load_tokenizer
from qformer import QFormerConfig, QFormerProjector

# Loading a hub repo that ships only .bin weights (Vicuna v1.5, LLaVA-1.5) makes transformers start a background
# thread that asks the hub to convert it and downloads the safetensors copy: another 13-26 GB, while the other ranks
# wait for rank 0. The weights this project reads are the ones it asks for.
os.environ.setdefault("DISABLE_SAFETENSORS_CONVERSION", "1")


@dataclass
class LlavaConfig:
    vision_tower: str = "openai/clip-vit-large-patch14-336"  # hub id or local dir of a transformers vision model
    llm: str = "lmsys/vicuna-7b-v1.5"  # hub id or local dir of a transformers causal LM (and its tokenizer)
    projector_type: str = "mlp2x_gelu"  # "linear", "mlp{N}x_gelu" (LLaVA's regex ^mlp(\d+)x_gelu$) or "qformer"
    vision_feature_layer: int = -2  # index into the tower's hidden_states
    vision_feature_select: str = "patch"  # "patch" drops the CLS token, "cls_patch" keeps it
    # How the model talks and sees, saved with it so that inference uses what training used (data.py):
    template: str = "vicuna_v1"
    image_aspect_ratio: str = "pad"
    max_length: int = 2048
    # The first paper's mm_use_im_start_end: each image between <im_start> and <im_end>, two tokens added to the
    # tokenizer whose embedding rows stage 1 trains (add_im_start_end).
    mm_use_im_start_end: bool = False
    # projector_type "qformer": its sizes (qformer.QFormerConfig's fields; those not given take InstructBLIP's) and
    # its tokenizer (a BERT tokenizer's hub id or directory, e.g. google-bert/bert-base-uncased; a saved model keeps
    # its own copy).
    qformer: dict = field(default_factory=dict)
    qformer_tokenizer: str = ""

    def __post_init__(self):
        """The one check of a model's settings, wherever they come from (flags, a checkpoint's config.json, code): a
        wrong type or value is a UserError naming the field here, not a TypeError deep in the forward pass or a
        model that silently reads the wrong hidden layer. A checkpoint's loader adds which file it came from."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) != (f.type is bool) or not isinstance(value, f.type):
                kind = {int: "an integer", bool: "true or false", dict: "an object"}.get(f.type, "a string")
                example = f.default_factory() if f.default is MISSING else f.default
                raise UserError(f"{f.name} {value!r}: not {kind}; use e.g. {example!r}")
        choices = {"vision_feature_select": ("patch", "cls_patch"), "template": TEMPLATES,
                   "image_aspect_ratio": ("pad", "crop")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} {getattr(self, name)!r}: not one of {', '.join(allowed)}")
        if self.projector_type == "qformer":
            QFormerConfig.from_dict(self.qformer)
            if not self.qformer_tokenizer:
                raise UserError("qformer_tokenizer: the qformer projector reads the instruction with a tokenizer of "
                                "its own; give a BERT tokenizer's hub id or directory (google-bert/bert-base-uncased)")
        else:
            projector_depth(self.projector_type)
        if self.max_length < 1:
            raise UserError(f"max_length {self.max_length}: must be at least 1")
        if not (self.vision_tower and self.llm):
            raise UserError("vision_tower and llm: a hub id or a local directory each, not an empty string")


# ----------------------------------------------------------------------------------------------------------------------
# The projector


class Projector(nn.Module):
    """LLaVA's projector: `linear` is Linear(vision, text); `mlp{N}x_gelu` is Linear(vision, text) followed by N-1 x
    (GELU, Linear(text, text)). The layers are named linear_1 ... linear_N, as in transformers' Llava."""

    def __init__(self, projector_type, vision_hidden, text_hidden):
        super().__init__()
        depth = projector_depth(projector_type)
        self.linear_1 = nn.Linear(vision_hidden, text_hidden)
        for i in range(2, depth + 1):
            self.add_module(f"linear_{i}", nn.Linear(text_hidden, text_hidden))


    def num_tokens(self, num_features):
        """Positions an image takes in the LLM's input: one per feature."""
        return num_features

    def forward(self, features, instruction_ids=None, instruction_mask=None):
        """(images, T, vision width) -> (images, T, LLM width); LLaVA's projector does not read the instruction."""
        layers = list(self.children())
        x = layers[0](features)
        for layer in layers[1:]:
            x = layer(F.gelu(x))  # nn.GELU's default: the exact erf form, as in LLaVA
        return x


def projector_depth(projector_type):
    """The number of Linear layers of a LLaVA projector type: 1 for linear, N for mlpNx_gelu."""
    mlp = re.fullmatch(r"mlp(\d+)x_gelu", projector_type) if isinstance(projector_type, str) else None
    if projector_type != "linear" and not (mlp and 1 <= int(mlp.group(1)) <= 64):
        raise UserError(f"unknown projector type {projector_type!r}; use 'linear', 'mlp2x_gelu' (mlpNx_gelu, N from "
                        "1 to 64) or 'qformer'")
    return int(mlp.group(1)) if mlp else 1


def build_projector(config, vision_hidden, text_hidden):
    """The projector a config names: LLaVA's (Projector) or InstructBLIP's Q-Former (qformer.QFormerProjector). Both
    take (features, instruction_ids, instruction_mask) and say how many tokens an image becomes (num_tokens)."""
    if config.projector_type == "qformer":
        return QFormerProjector(QFormerConfig.from_dict(config.qformer), vision_hidden, text_hidden)
    return Projector(config.projector_type, vision_hidden, text_hidden)


# ----------------------------------------------------------------------------------------------------------------------
# The model


class LlavaModel(nn.Module):
    def __init__(self, config, vision_tower, language_model):
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower
        self.multi_modal_projector = build_projector(config, vision_tower.config.hidden_size,
                                                     language_model.config.hidden_size)
        self.language_model = language_model
        # Token ids whose input embeddings train while the rest stay fixed (stage 1 with mm_use_im_start_end); None:
        # every row the embedding's requires_grad allows.
        self.trainable_token_ids = None
        self.vision_tower.requires_grad_(False)  # LLaVA never trains the tower; unfreezing it is the caller's choice
        layers = getattr(vision_tower.config, "num_hidden_layers", None)  # hidden_states: embeddings, each layer's
        if layers is not None and not -(layers + 1) <= config.vision_feature_layer <= layers:
            raise UserError(f"vision_feature_layer {config.vision_feature_layer}: {config.vision_tower} has "
                            f"{layers} layers, so hidden states {-(layers + 1)}..{layers}; LLaVA-1.5 uses -2")
        # CLIP-like towers put a CLS token before the patches; SigLIP-like ones have none.
        self.has_cls = any(n.endswith(("class_embedding", "cls_token")) for n, _ in vision_tower.named_parameters())
        if config.vision_feature_select == "cls_patch" and not self.has_cls:
            raise UserError(f"{config.vision_tower} has no CLS token; use vision_feature_select='patch'")

    @property
    def num_features(self):
        """Features the tower gives per image: its patches (576 for CLIP-L/14-336), with CLS for cls_patch."""
        c = self.vision_tower.config
        return (c.image_size // c.patch_size) ** 2 + (self.config.vision_feature_select == "cls_patch")

    @property
    def num_image_tokens(self):
        """Placeholders per image in input_ids = the tokens the projector makes of an image's features (576 for
        LLaVA-1.5's mlp2x_gelu, 32 for the qformer)."""
        return self.multi_modal_projector.num_tokens(self.num_features)

    # --- forward ---

    def image_features(self, pixel_values, instruction_ids=None, instruction_mask=None):
        """(images, 3, H, W) -> (images, num_image_tokens, LLM width). instruction_ids / instruction_mask (images, L):
        each image's instruction for a projector that reads it (data.ChatFormat.instructions builds them)."""
        frozen = not any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            dtype = next(self.vision_tower.parameters()).dtype
            hidden = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True).hidden_states
        features = hidden[self.config.vision_feature_layer]
        if self.has_cls and self.config.vision_feature_select == "patch":
            features = features[:, 1:]
        assert features.shape[1] == self.num_features, (features.shape, self.num_features)
        projector_dtype = next(self.multi_modal_projector.parameters()).dtype
        return self.multi_modal_projector(features.to(projector_dtype), instruction_ids, instruction_mask)

    def embed(self, input_ids, pixel_values=None, instruction_ids=None, instruction_mask=None):
        """Token embeddings with the projected image features written into the IMAGE_TOKEN_INDEX positions."""
        is_image = input_ids == IMAGE_TOKEN_INDEX
        embeds = self.language_model.get_input_embeddings()(input_ids.clamp(min=0))
        if self.trainable_token_ids is not None and embeds.requires_grad:  # other rows get no gradient at all
            own = torch.isin(input_ids, torch.tensor(self.trainable_token_ids, device=input_ids.device))
            embeds = torch.where(own.unsqueeze(-1), embeds, embeds.detach())
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if is_image.sum() != n_images * self.num_image_tokens:
            raise ValueError(f"input_ids hold {int(is_image.sum())} image placeholders but {n_images} image(s) x "
                             f"{self.num_image_tokens} tokens were given; build inputs with data.ChatFormat")
        if n_images == 0:
            return self.keep_projector_in_graph(embeds)
        features = self.image_features(pixel_values, instruction_ids, instruction_mask).to(embeds.dtype)
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
        no_ids = torch.zeros((0, 1), dtype=torch.long, device=weight.device)  # an empty instruction (the qformer's
        nothing = projector(weight.new_zeros(0, 1, self.vision_tower.config.hidden_size), no_ids, no_ids)  # text side)
        return torch.cat([embeds.flatten(0, 1), nothing.flatten(0, 1).to(embeds.dtype)]).view_as(embeds)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, labels=None, instruction_ids=None,
                instruction_mask=None, position_ids=None):
        """Logits (B, T, V) without labels; with labels, the cross-entropy summed over the supervised tokens.
        instruction_ids / instruction_mask: each image's instruction, for a projector that reads it (the qformer).
        position_ids (B, T): a packed batch's (data.collate_packed), restarting at 0 where each sample starts; with no
        attention_mask, transformers then confines attention to each sample (masking_utils'
        find_packed_sequence_indices builds the block-diagonal causal mask).

        Training passes attention_mask=None: its batches are right-padded, so causal attention alone keeps padding out
        of every real token's view, and the padding's losses are masked. Without a mask, SDPA can take its causal
        flash kernel; a padding mask would send it to a slower kernel that materialises the mask.
        """
        embeds = self.embed(input_ids, pixel_values, instruction_ids, instruction_mask)
        hidden = self.language_model.base_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                                position_ids=position_ids, use_cache=False).last_hidden_state
        head = self.language_model.get_output_embeddings()
        if labels is None:
            return head(hidden)
        targets = supervised_targets(input_ids, labels)
        supervised = targets != IGNORE_INDEX
        return chunked_cross_entropy(hidden[:, :-1][supervised], targets[supervised], head)

    def chat_format(self, tokenizer, instruction_tokenizer=None):
        """The ChatFormat that builds this model's inputs: its template, as many placeholders per image as the
        projector makes tokens, <im_start>/<im_end> as configured, and each image's instruction in the projector's
        own tokenizer when it reads one (load_instruction_tokenizer)."""
        instruction = {}
        if instruction_tokenizer is not None:
            sizes = self.multi_modal_projector.config
            if len(instruction_tokenizer) > sizes.vocab_size:
                raise UserError(f"qformer_tokenizer {self.config.qformer_tokenizer}: {len(instruction_tokenizer)} "
                                f"tokens, more than the Q-Former's vocab_size {sizes.vocab_size}; give the tokenizer "
                                "the Q-Former was built for, or a larger vocab_size")
            instruction = dict(instruction_tokenizer=instruction_tokenizer, instruction_length=sizes.max_text_length)
        return ChatFormat(tokenizer, self.config.template, self.num_image_tokens,
                          im_start_end=self.config.mm_use_im_start_end, **instruction)

    # --- building ---

    @classmethod
    def from_config(cls, config, dtype=torch.float32, empty=False, added_token_ids=None):
        """The backbones with their pretrained weights (from config.vision_tower and config.llm), a fresh projector.

        dtype is every parameter's, float32 by default whatever dtype a backbone was saved in (Vicuna's config says
        float16): training keeps fp32 master weights. dtype="auto" keeps each backbone's saved dtype (a sharded run's
        rank 0 loads so, in half the memory; copying into the fp32 shards is exact). empty=True builds the model with
        every parameter on the meta device, reading only the backbones' configs: sharded training builds it so on
        each rank and lets rank 0 load and broadcast the weights. Reading a saved LLaVA model is checkpoints.load.
        added_token_ids: ids a tokenizer just added (add_im_start_end), given rows by grow_vocab.
        """
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        with quiet_transformers():
            if empty:
                vision, llm = resolve(config.vision_tower, weights=False), resolve(config.llm, weights=False)
                with reading(vision, "vision tower"):
                    vision_config = AutoConfig.from_pretrained(vision)
                with reading(llm, "LLM"):
                    text_config = AutoConfig.from_pretrained(llm)
                with params_on_meta():
                    tower = AutoModel.from_config(vision_part(vision_config, vision), dtype=dtype)
                    with reading(llm, "LLM"):  # (a config of another kind of model)
                        language_model = AutoModelForCausalLM.from_config(text_config, dtype=dtype)
                    grow_vocab(language_model, added_token_ids or ())
                    return cls(config, tower, language_model)
            language_model = from_pretrained_complete(AutoModelForCausalLM, config.llm, dtype=dtype)
            grow_vocab(language_model, added_token_ids or ())
            model = cls(config, load_vision_tower(config.vision_tower, dtype), language_model)
        return model if dtype == "auto" else model.to(dtype)


QFORMER_TOKENIZER = "qformer_tokenizer"  # a saved model's copy of it, in a folder of that name (as transformers'
                                        # InstructBLIP repos keep it)


def load_instruction_tokenizer(config, checkpoint=None):
    """The projector's own tokenizer for a projector that reads the instruction (the qformer's BERT tokenizer), else
    None: a saved model's copy (checkpoint/qformer_tokenizer) when it has one, else config.qformer_tokenizer."""
    if config.projector_type != "qformer":
        return None
    own = os.path.join(checkpoint, QFORMER_TOKENIZER) if checkpoint else None
    path = own if own and os.path.isdir(own) else resolve(config.qformer_tokenizer, weights=False)
    try:
        return load_tokenizer(path)
    except UserError as e:
        raise UserError(f"qformer_tokenizer {e}") from None


def add_im_start_end(tokenizer):
    """LLaVA's initialize_vision_tokenizer, the tokenizer's half (haotian-liu/LLaVA `llava/model/llava_arch.py`):
    <im_start> and <im_end> added as special tokens. Returns their ids, and whether they were added: not when the
    tokenizer had them (a model's trained with them), whose rows must then be kept as they are."""
    added = tokenizer.add_tokens([IM_START_TOKEN, IM_END_TOKEN], special_tokens=True)
    return tuple(tokenizer.convert_tokens_to_ids([IM_START_TOKEN, IM_END_TOKEN])), bool(added)


def grow_vocab(llm, token_ids):
    """The LLM's half: rows for `token_ids` in the input embeddings and the output head (resized when an id is past
    the last row; LLaVA resizes to len(tokenizer), which never shrinks here), each new row set to the mean of the rows
    before the first new id, input and output alike, as LLaVA initialises them. On the meta device: the shapes only."""
    if not token_ids:
        return
    rows = max(token_ids) + 1
    if rows > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        for layer in {id(m): m for m in (llm.get_input_embeddings(), llm.get_output_embeddings())}.values():
            w = layer.weight
            if not w.is_meta:
                w[list(token_ids)] = w[:min(token_ids)].float().mean(0).to(w.dtype)


def supervised_targets(input_ids, labels):
    """The next-token targets, IGNORE_INDEX where nothing is supervised: the one definition of what the loss counts
    (the training loop counts these to normalise). Image positions are never targets, whatever the labels say
    (LLaVA's splice does the same)."""
    return labels.masked_fill(input_ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX)[:, 1:]


def load_vision_tower(path, dtype="auto"):
    """Any transformers vision model; from a full CLIP/SigLIP checkpoint (openai/clip-vit-large-patch14-336 is one),
    its vision half (transformers then reports the unused text tower's weights: quiet_transformers hides that)."""
    from transformers import AutoConfig, AutoModel

    path = resolve(path)
    with reading(path, "vision tower"):
        config = AutoConfig.from_pretrained(path)
    return from_pretrained_complete(AutoModel, path, config=vision_part(config, path), dtype=dtype,
                                    what="vision tower")


def vision_part(config, path):
    """The vision model's config in a vision tower's (a whole CLIP's has one); an LLM's, say, is a UserError."""
    config = getattr(config, "vision_config", config)
    if not all(hasattr(config, k) for k in ("image_size", "patch_size", "hidden_size")):
        raise UserError(f"vision tower {path}: a {config.model_type} model, not a vision model (its config.json has "
                        "no image_size and patch_size); pass a CLIP or SigLIP checkpoint")
    return config


def from_pretrained_complete(model_class, path, what="LLM", **kwargs):
    """model_class.from_pretrained(path), where a checkpoint lacking weights the model has, or holding them in
    another shape than its config.json gives, is an error: transformers only reports them (quiet_transformers hides
    the report) and fills them with random values, which a truncated download or the wrong directory would then
    train on. Files it cannot read are a UserError naming the directory (reading)."""
    path = resolve(path)
    with reading(path, what):
        model, info = model_class.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True,
                                                  **kwargs)
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        name, saved, built = mismatched[0]
        raise UserError(f"{what} {path}: tensor {name} has shape {tuple(saved)} in the weight files but "
                        f"{tuple(built)} in the model its config.json describes ({len(mismatched)} tensors differ); "
                        "the weights and config.json are not of one model: re-download it")
    missing = sorted(info["missing_keys"])
    if missing:
        raise UserError(f"{what} {path} lacks the weights of {len(missing)} of its model's parameters ({missing[:5]}), "
                        "which would start from random values; is the download complete, and is it the right "
                        "directory?")
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Finding and reading what a user names: local directories, the hub, files that may be cut or corrupt

# What a LLaVA checkpoint or a backbone needs from a hub repo: configs, the tokenizer (tokenizer.json, or
# SentencePiece's tokenizer.model as Vicuna and liuhaotian/llava-v1.5-* ship it), stage 1's mm_projector.bin, and the
# weights in one format. Never training_args.bin or optimizer states (pickles), nor a second copy of the weights.
# (huggingface_hub matches these with fnmatch, whose * crosses "/": InstructBLIP repos' qformer_tokenizer/ comes too.)
HUB_FILES = ["*.json", "*.jinja", "*.model", "*.txt", "mm_projector.bin"]
HUB_WEIGHTS = ["*.safetensors", "pytorch_model*.bin"]  # in order of preference
_snapshots = {}  # (repo id, revision, weights) -> the snapshot resolve() found, once per process


def resolve(path, revision=None, weights=True):
    """The local directory of a checkpoint, backbone or tokenizer a user names: every such path goes through here.

    A local directory is returned as is; anything else must be a hub repo id (owner/name), fetched into (or found in)
    huggingface_hub's cache, at `revision` (a commit) when given, with its weights unless weights=False. Without a
    reachable hub (HF_HUB_OFFLINE=1, no network, the hub down) the cached snapshot is used. A path that is neither is
    a UserError that says which, never transformers' "Repo id must be in the form ..." or a wait for the network.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise UserError(f"{path!r}: not a path or a hub repo id")
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise UserError(f"{path} is a file, not a directory: pass the directory that holds it")
    if not looks_like_hub_id(path):
        raise UserError(f"{path or repr(path)} is not a directory here, and not a hub repo id (owner/name); check the "
                        f"path (a relative one is relative to {os.getcwd()})")
    key = (path, revision, weights)
    if key not in _snapshots:
        _snapshots[key] = download(path, revision, weights)
    return _snapshots[key]


def looks_like_hub_id(path):
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return path.count("/") == 1 and not path.startswith((".", "~"))


def download(repo, revision, weights):
    """resolve() for a hub repo id: its snapshot directory in the cache, downloaded if the hub can be reached."""
    from fnmatch import filter as matching

    from huggingface_hub import model_info, snapshot_download
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError, \
        RevisionNotFoundError

    at = f" at revision {revision}" if revision else ""
    try:  # the repo's file list, in one request (list_repo_files retries an unreachable hub for half a minute)
        files = [f.rfilename for f in model_info(repo, revision=revision).siblings or []]
    except GatedRepoError:  # (a kind of RepositoryNotFoundError)
        raise UserError(f"{repo}: a gated hub repo; accept its terms on its hub page and log in (hf auth login), or "
                        "pass a local directory") from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo} is not a directory here, and no hub repo of that name exists (or it is private: log "
                        "in with hf auth login); check the name or the path") from None
    except RevisionNotFoundError:
        raise UserError(f"{repo}: the hub repo has no revision {revision}, which a checkpoint names; restore it or "
                        "pass a local copy of what it was") from None
    except Exception as unreachable:  # the client's transport errors differ between huggingface_hub versions
        try:
            return snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES, local_files_only=True)
        except Exception as e:  # not cached, or known to be incomplete (IncompleteSnapshotError)
            cached = "incomplete in" if "incomplete" in str(e) else "not in"
            why = ("HF_HUB_OFFLINE=1" if isinstance(unreachable, OfflineModeIsEnabled) else
                   f"no network, or the hub is down: {first_line(unreachable)}")
            raise UserError(f"{repo} is not a directory here, and as a hub repo id it is {cached} the local hub "
                            f"cache{at} and the hub cannot be reached ({why}); download it first (hf download "
                            f"{repo}), or pass a local directory") from None
    chosen = [w for w in HUB_WEIGHTS if matching(files, w)][:1] if weights else []
    try:
        return snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES + chosen)
    except Exception as e:
        raise UserError(f"{repo}: downloading from the hub failed ({type(e).__name__}: {first_line(e)}); run again "
                        "(a download resumes), or pass a local directory") from e


@contextmanager
def reading(path, what):
    """Reading `what` (a checkpoint, a vision tower, an LLM, a tokenizer) from `path` with a library: its errors for
    files that are cut, corrupt, of another model or version (json, safetensors, torch.load, tokenizers, transformers'
    configs raise dozens of kinds, some naming no file) become one UserError naming the directory, with the library's
    own message. Our own UserErrors pass as they are."""
    try:
        yield
    except UserError:
        raise
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:
        raise UserError(f"{what} {path}: its files cannot be read ({type(e).__name__}: {first_line(e)}); is it "
                        "complete (an interrupted download or copy?) and the right directory? Fetch or save it again"
                        ) from e


def first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else repr(error)


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
    them at construction and never save them (rotary inv_freq, CLIP's position_ids), which `with torch.device("meta")`
    would leave empty. The technique is accelerate's init_empty_weights(include_buffers=False): nn.Module's
    register_parameter is swapped for the block's duration, for modules built by this thread only.
    """
    register, thread = nn.Module.register_parameter, threading.get_ident()

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and threading.get_ident() == thread:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@contextmanager
def quiet_transformers():
    """Loading backbones without transformers' chatter: its per-file "Loading weights" bars and its load report (a
    full CLIP checkpoint's unused text tower is expected: LLaVA takes the vision half; missing weights are an error
    of from_pretrained_complete instead). Errors still show, and so do the hub's download bars, which a first run of
    a 7B model needs."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging

    level, bars, hub_bars = logging.get_verbosity(), logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()  # (it turns the hub's bars off too)
    if hub_bars:
        enable_progress_bars()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()  # (and the hub's on)
        if not hub_bars:
            disable_progress_bars()
