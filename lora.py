"""LoRA, hand-written: low-rank adapters on the LLM's linear layers, as LLaVA-1.5's LoRA recipe trains them.

    targets = lora.add_adapters(model.language_model, r=128, alpha=256, dropout=0.05)   # B = 0: the same model
    y = base(x) + (alpha / r) * B(A(dropout(x)))          # what each adapted layer computes
    lora.merge(model.language_model)                      # W += (alpha / r) * B @ A: plain nn.Linear layers again

The adapters go on every nn.Linear of the LLM except its output head, which is what LLaVA's
`find_all_linear_names` picks (haotian-liu/LLaVA `llava/train/train.py`: every Linear of the model but the vision
tower, the projector and lm_head; for a Llama: q/k/v/o_proj and gate/up/down_proj). A is initialised as PEFT does
(kaiming-uniform, a = sqrt(5), as nn.Linear's own weights), B at zero, so an adapted model starts as exactly its
base. The recipe (scripts/v1_5/finetune_lora.sh, docs/llava.md section 5): r 128, alpha 256, dropout 0.05, lr 2e-4,
the projector at 2e-5 (`mm_projector_lr`).

Saved, the adapters use PEFT's layout (its `LoraModel`, huggingface/peft `src/peft/tuners/lora/`): the base layer
sits under `base_layer`, the factors under `lora_A` / `lora_B`, and the file's keys are
`base_model.model.<module path>.lora_A.weight`, without PEFT's adapter name ("default"), which PEFT drops on saving
and adds back on loading. checkpoints.py writes and reads those files (adapter_config.json + adapter_model.safetensors)
next to the projector; this file holds the layers, the key names and the config.
"""

import math

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."


class LoraLinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: base(x) + scaling * lora_B(lora_A(dropout(x)))."""

    def __init__(self, base_layer, r, alpha, dropout):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=base_layer.weight.device)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=base_layer.weight.device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r  # PEFT's default (use_rslora=False)
        self.reset_adapter()

    def reset_adapter(self):
        """PEFT's init_lora_weights=True: A as nn.Linear's kaiming-uniform, B zero (so the update starts at zero)."""
        if self.lora_A.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        update = self.lora_B(self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype)))
        return self.base_layer(x) + (self.scaling * update).to(x.dtype)

    def delta_weight(self):
        """scaling * B @ A, in fp32: what merging adds to the base weight."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())


def target_modules(llm):
    """The module names (last component) of the LLM's linear layers that get adapters: all but the output head."""
    head = llm.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in llm.named_modules()
                   if isinstance(m, nn.Linear) and m is not head})


def add_adapters(llm, r, alpha, dropout, targets=None):
    """Wrap each target nn.Linear of `llm` in a LoraLinear (in place); returns the target names. Every base weight is
    frozen; only lora_A and lora_B are trainable. The adapters are fp32 whatever dtype the base is in."""
    if r < 1:
        raise ValueError(f"LoRA rank must be at least 1, not {r}")
    targets = targets or target_modules(llm)
    llm.requires_grad_(False)
    for name, module in list(llm.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            parent, _, child = name.rpartition(".")
            setattr(llm.get_submodule(parent) if parent else llm, child, LoraLinear(module, r, alpha, dropout))
    return targets


def adapted(llm):
    """(name, LoraLinear) of every adapted layer of `llm`."""
    return [(name, m) for name, m in llm.named_modules() if isinstance(m, LoraLinear)]


@torch.no_grad()
def merge(llm):
    """Fold each adapter into its base weight (in fp32, then the base's dtype) and put the plain nn.Linear back: the
    merged LLM is an ordinary transformers model again, with the module names and weights of a full model."""
    for name, m in adapted(llm):
        base = m.base_layer
        base.weight.copy_((base.weight.float() + m.delta_weight()).to(base.weight.dtype))
        parent, _, child = name.rpartition(".")
        setattr(llm.get_submodule(parent) if parent else llm, child, base)


def peft_key(name):
    """Our parameter name inside the LLM (model.layers.0.self_attn.q_proj.lora_A.weight) -> PEFT's saved key."""
    return PEFT_PREFIX + name


def from_peft_key(key):
    """PEFT's saved key -> our name inside the LLM; older PEFT files (and some tools) keep the adapter name
    ("lora_A.default.weight"), which is dropped."""
    if not key.startswith(PEFT_PREFIX):
        raise ValueError(f"{key}: not a PEFT adapter key (base_model.model.<module>.lora_A.weight)")
    return key[len(PEFT_PREFIX):].replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def adapter_state(state):
    """The adapter tensors of an LLM state dict (names inside the LLM), under PEFT's keys."""
    return {peft_key(k): v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}


def peft_config(r, alpha, dropout, targets, base):
    """adapter_config.json as PEFT writes it for a causal LM's LoRA (the fields PEFT's LoraConfig reads; the rest
    take PEFT's defaults)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": r,
            "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(targets), "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "modules_to_save": None, "inference_mode": True, "revision": None}
