"""InstructBLIP's projector: the instruction-aware Q-Former (Dai et al. 2023, arXiv:2305.06500).

    projector = QFormerProjector(QFormerConfig(), vision_hidden=1024, text_hidden=4096)
    tokens = projector(features, instruction_ids, instruction_mask)      # (images, 32, 4096)

LLaVA's projector turns each of an image's 576 patch features into one word of the LLM's input. The Q-Former reads
all of them with 32 learned queries instead, and hands the LLM 32 tokens: whatever the queries chose to extract.
InstructBLIP's change to BLIP-2's Q-Former is that the queries choose knowing the instruction: the instruction's
tokens (the Q-Former's own BERT tokenizer, `[CLS] instruction [SEP]`) sit next to the queries in every
self-attention, so the 32 tokens can carry what the question asks about. In order (salesforce/LAVIS
`lavis/models/blip2_models/blip2_vicuna_instruct.py` and `Qformer.py`; transformers' `models/instructblip`):
1. The image features through a LayerNorm computed in fp32 (BLIP-2's trainable `ln_vision`).
2. The sequence [32 queries ; instruction tokens]: the text gets word + position embeddings (positions 0..L-1; the
   queries take none), then one LayerNorm and dropout over the whole sequence, queries included.
3. N BERT layers (post-LayerNorm): self-attention over the whole sequence, bidirectional, the instruction's padding
   masked; in layers 0, f, 2f, ... (f = cross_attention_frequency, 2) the query slice alone then cross-attends to
   the image features, so the instruction reaches the image only through the queries; then the queries and the text
   go through separate feed-forward blocks.
4. The query slice of the last layer, through a Linear to the LLM's width.

Module and parameter names are transformers' (qformer.encoder.layer.0.crossattention.attention.key, ... and its
BERT-style `LayerNorm`), so that InstructBLIP checkpoints load by renaming prefixes (checkpoints.py). Attention is
PyTorch's scaled_dot_product_attention.
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from data import UserError


@dataclass
class QFormerConfig:
    """The Q-Former's sizes; the defaults are InstructBLIP's (BERT-base; transformers' InstructBlipQFormerConfig)."""

    num_hidden_layers: int = 12
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2  # layer i cross-attends to the image iff i % frequency == 0
    num_query_tokens: int = 32  # = the image's positions in the LLM's input
    vocab_size: int = 30523  # bert-base-uncased's 30522 and BLIP-2's added "[DEC]"
    max_position_embeddings: int = 512
    max_text_length: int = 128  # instruction tokens, [CLS] and [SEP] included; longer ones lose their start (LAVIS)
    pad_token_id: int = 0  # BERT's [PAD]
    layer_norm_eps: float = 1e-12
    vision_layer_norm_eps: float = 1e-5  # ln_vision's (torch's default in LAVIS; transformers' configs say 1e-6)
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    @classmethod
    def from_dict(cls, values, where="qformer"):
        """A QFormerConfig from a config.json's or a preset's dict: unknown keys and wrong types are a UserError."""
        if not isinstance(values, dict):
            raise UserError(f"{where}: the Q-Former's sizes must be an object (e.g. {{\"num_hidden_layers\": 12}}), "
                            f"got {type(values).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UserError(f"{where}: unknown Q-Former setting(s) {', '.join(unknown)}; the settings are "
                            f"{', '.join(known)}")
        for name, value in values.items():
            want = known[name].type
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) if want is float else \
                isinstance(value, int) and not isinstance(value, bool)
            if not ok:
                raise UserError(f"{where}: {name} {value!r} is not {'a number' if want is float else 'an integer'}")
        config = cls(**values)
        positive = [f.name for f in fields(cls) if f.type is int and f.name != "pad_token_id"]
        for name in positive:
            if getattr(config, name) < 1:
                raise UserError(f"{where}: {name} {getattr(config, name)} must be at least 1")
        if config.hidden_size % config.num_attention_heads:
            raise UserError(f"{where}: hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                            f"{config.num_attention_heads}")
        if config.max_text_length > config.max_position_embeddings:
            raise UserError(f"{where}: max_text_length {config.max_text_length} exceeds max_position_embeddings "
                            f"{config.max_position_embeddings}")
        if not 0 <= config.hidden_dropout_prob < 1 or not 0 <= config.attention_probs_dropout_prob < 1:
            raise UserError(f"{where}: dropout probabilities must be in [0, 1)")
        return config

    def to_dict(self):
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------------
# The projector


class QFormerProjector(nn.Module):
    """(image features, instruction ids, instruction mask) -> (images, num_query_tokens, LLM width)."""

    def __init__(self, config, vision_hidden, text_hidden):
        super().__init__()
        self.config = config
        self.vision_layernorm = FP32LayerNorm(vision_hidden, eps=config.vision_layer_norm_eps)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.hidden_size))
        self.qformer = QFormer(config, vision_hidden)
        self.language_projection = nn.Linear(config.hidden_size, text_hidden)
        self.apply(init_bert_weights)
        nn.init.normal_(self.query_tokens, std=0.02)

    def num_tokens(self, num_features):
        """Positions an image takes in the LLM's input: the queries, however many features the tower gives."""
        return self.config.num_query_tokens

    def forward(self, features, instruction_ids=None, instruction_mask=None):
        """features (images, T, vision width); instruction_ids and instruction_mask (images, L): each image's
        instruction in the Q-Former's tokenizer, right-padded, mask 1 on real tokens (None: the queries alone, as in
        BLIP-2). Returns (images, num_query_tokens, LLM width)."""
        image = self.vision_layernorm(features)
        queries = self.query_tokens.expand(len(features), -1, -1)
        hidden = self.qformer(queries, image, instruction_ids, instruction_mask)
        return self.language_projection(hidden[:, :queries.shape[1]])


class QFormer(nn.Module):
    def __init__(self, config, vision_hidden):
        super().__init__()
        self.embeddings = QFormerEmbeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            QFormerLayer(config, vision_hidden, cross=i % config.cross_attention_frequency == 0)
            for i in range(config.num_hidden_layers))

    def forward(self, queries, image, input_ids=None, attention_mask=None):
        """[queries ; text] through every layer -> (images, queries + L, hidden)."""
        hidden = self.embeddings(queries, input_ids)
        n_queries = queries.shape[1]
        keep = None  # (images, 1, 1, queries + L): which positions each position may attend to
        if input_ids is not None and attention_mask is not None:
            text = attention_mask.to(device=hidden.device, dtype=torch.bool)
            keep = torch.cat([text.new_ones(len(text), n_queries), text], dim=1)[:, None, None, :]
        for layer in self.encoder.layer:
            hidden = layer(hidden, keep, image, n_queries)
        return hidden


class QFormerEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, queries, input_ids=None):
        if input_ids is None:
            hidden = queries
        else:
            if input_ids.shape[1] > self.position_embeddings.num_embeddings:
                raise ValueError(f"an instruction of {input_ids.shape[1]} Q-Former tokens; at most "
                                 f"{self.position_embeddings.num_embeddings}")
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            text = self.word_embeddings(input_ids) + self.position_embeddings(positions)
            hidden = torch.cat([queries, text.to(queries.dtype)], dim=1)
        return self.dropout(self.layernorm(hidden.to(self.layernorm.weight.dtype)))


class QFormerLayer(nn.Module):
    """One BERT layer with the Q-Former's two changes: the query slice's cross-attention (when `cross`) and its own
    feed-forward block."""

    def __init__(self, config, vision_hidden, cross):
        super().__init__()
        self.attention = AttentionBlock(config, config.hidden_size)
        if cross:
            self.crossattention = AttentionBlock(config, vision_hidden)
        self.intermediate, self.output = Intermediate(config), Output(config)  # the text's feed-forward
        self.intermediate_query, self.output_query = Intermediate(config), Output(config)  # the queries'

    def forward(self, hidden, keep, image, n_queries):
        hidden = self.attention(hidden, hidden, keep)
        queries, text = hidden[:, :n_queries], hidden[:, n_queries:]
        if hasattr(self, "crossattention"):
            queries = self.crossattention(queries, image, None)  # every image feature is attended to
        queries = self.output_query(self.intermediate_query(queries), queries)
        if text.shape[1] == 0:
            return queries
        return torch.cat([queries, self.output(self.intermediate(text), text)], dim=1)


class AttentionBlock(nn.Module):
    """Multi-head attention of `x` over `context` (itself, or the image features), then dense, dropout, residual,
    LayerNorm (BERT's post-LN: BertAttention + BertSelfOutput)."""

    def __init__(self, config, context_width):
        super().__init__()
        self.attention = MultiHeadAttention(config, context_width)
        self.output = Output(config, config.hidden_size)

    def forward(self, x, context, keep):
        return self.output(self.attention(x, context, keep), x)


class MultiHeadAttention(nn.Module):
    def __init__(self, config, context_width):
        super().__init__()
        self.heads, self.dropout = config.num_attention_heads, config.attention_probs_dropout_prob
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(context_width, config.hidden_size)
        self.value = nn.Linear(context_width, config.hidden_size)

    def forward(self, x, context, keep):
        def split(t):  # (B, T, hidden) -> (B, heads, T, head width)
            return t.view(*t.shape[:2], self.heads, t.shape[-1] // self.heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(context)), split(self.value(context))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0,
                                             scale=1 / math.sqrt(q.shape[-1]))
        return out.transpose(1, 2).flatten(2)


class Intermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))  # BERT's exact (erf) GELU


class Output(nn.Module):
    """dense, dropout, + residual, LayerNorm: BertOutput (from the feed-forward's width) and BertSelfOutput."""

    def __init__(self, config, width=None):
        super().__init__()
        self.dense = nn.Linear(width or config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # (BERT's name, kept for loading)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class FP32LayerNorm(nn.LayerNorm):
    """A LayerNorm computed in float32 whatever the dtype of its input and weights (BLIP-2's ln_vision), returned in
    the input's dtype: a bf16 image feature's statistics would otherwise be bf16's."""

    def forward(self, x):
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


def init_bert_weights(module):
    """BERT's initialisation (LAVIS and transformers alike): normal(0, 0.02) weights, zero biases, unit LayerNorms,
    the padding row zero. Pretrained Q-Formers (BLIP-2's, InstructBLIP's) overwrite all of it."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
