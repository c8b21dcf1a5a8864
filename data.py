"""What the model is taught: LLaVA's data files, images, conversation templates, label masks, batches and the sampler.

    dataset = LazySupervisedDataset("llava_v1_5_mix665k.json", "playground/data", fmt, image_processor)
    sample = dataset[0]       # {"id", "input_ids", "labels", "pixel_values"}
    batch = collate([dataset[i] for i in range(4)], pad_id=fmt.pad_id)

The facts this file is faithful to are in docs/llava.md, sections 2-4 (haotian-liu/LLaVA llava/train/train.py,
llava/conversation.py, llava/mm_utils.py):
- the JSON schema (a list, or JSON lines) of {"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}]};
- `<image>` moves to the start of its turn, followed by "\n" (LLaVA's preprocess_multimodal);
- the templates: `plain` (stage 1), `vicuna_v1` (stage 2 and every LLaVA-1.5 benchmark), `llama_2` (llava_llama_2),
  `chat_template` (the LLM tokenizer's own Jinja template, for Llama-3- or Qwen-style LLMs), and `llava_v0` (the
  first paper's `###` conversations), with `<image>` optionally wrapped in `<im_start>`/`<im_end>`;
- tokenization in chunks around `<image>` (LLaVA's tokenizer_image_token): each chunk is tokenized on its own, so a
  SentencePiece tokenizer puts its dummy-prefix "▁" after every image, exactly as the released models saw it;
- each `<image>` becomes N copies of IMAGE_TOKEN_INDEX, N = the tokens the projector emits per image (576 for
  CLIP-L/14-336), so sequence lengths are exact here and model.py only fills those positions;
- labels supervise the assistant replies and their end token, nothing else.

Masks are built, never guessed. The original renders a conversation, splits it on separators and re-tokenizes the
pieces to count lengths; when its counts disagree it prints "tokenization mismatch" and silently zeroes the sample.
Here the supervised text is found by rendering: reply k is what the template adds to the generation prompt of the
history before it (render(history[:k] + reply) minus render(history[:k], generation prompt)). Tokens are then
labelled through the tokenizer's character offsets, and no token crosses the edge of a reply: where a tokenizer would
merge across one (Qwen2's newlines), the text is cut there, so each generation prompt's ids are a prefix of the
training ids. Data text is text: a turn that spells a control token ("</s>", "<|im_end|>") is an error, as is a
sample that cannot be aligned; errors name the sample's id.
"""

import bisect
import codecs
import itertools
import json
import logging
import os
import re
import warnings
from array import array
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

IGNORE_INDEX = -100  # label of a position that is not supervised (PyTorch's cross-entropy default)
IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id: one per image token, filled with image features by model.py
IMAGE_TOKEN = "<image>"

log = logging.getLogger(__name__)


class UserError(ValueError):
    """Input a user can get wrong (a flag, a data file, an image, a checkpoint, an answers file). The message says
    what is wrong, names the flag, file or sample, and says what to do; the command lines print it without a
    traceback (`error: ...`, exit status 2)."""


class DataError(UserError):
    """Something wrong with the user's data. The message names the file and the sample and says what to do."""


# ----------------------------------------------------------------------------------------------------------------------
# Conversations: LLaVA's {"from", "value"} turns -> [{"role", "content"}] messages


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def parse_conversation(turns, n_images, where):
    """Validate LLaVA turns and return messages, with each `<image>` moved to the start of its turn.

    `where` names the sample in errors ("data.json, sample 'abc'"). Rules: turns alternate human/gpt starting with
    human, end with a gpt reply, no reply is empty, and the `<image>` tags (all in human turns) match the images.
    A sample with images but no tag gets "<image>\\n" at the start of its first turn, as LLaVA does at inference.
    """
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns, got "
                        f"{json_type(turns)}; fix the sample or skip bad samples")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: turn {i} must be an object {{'from': 'human' or 'gpt', 'value': text}}, got "
                            f"{json_type(turn)}; fix the sample or skip bad samples")
        if not isinstance(turn.get("from"), str) or turn["from"] not in ROLES:
            raise DataError(f"{where}: turn {i}'s 'from' must be 'human' or 'gpt', got {turn.get('from')!r:.80}; "
                            "fix the sample or skip bad samples")
        if not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: turn {i}'s 'value' must be text, got {json_type(turn.get('value'))}; "
                            "fix the sample or skip bad samples")
        check_unicode(turn["value"], f"{where}: turn {i}'s 'value'")
        role = ROLES[turn["from"]]
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            first = " (a conversation must start with a human turn)" if i == 0 else ""
            raise DataError(f"{where}: turn {i} is from {turn['from']!r} but should be the {expected}'s{first}; "
                            "turns must alternate human, gpt, human, gpt, ...")
        if role == "assistant" and not turn["value"].strip():
            raise DataError(f"{where}: turn {i} is an empty reply; remove the sample or fill the reply")
        if role == "assistant" and IMAGE_TOKEN in turn["value"]:
            raise DataError(f"{where}: turn {i} is a gpt reply containing {IMAGE_TOKEN}; images go in human turns")
        messages.append({"role": role, "content": turn["value"]})
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last turn is from the human and has no reply; remove it or add the reply")

    n_tags = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if n_tags > n_images:
        raise DataError(f"{where}: {n_tags} {IMAGE_TOKEN} tags but {n_images} image(s); "
                        f"each {IMAGE_TOKEN} needs an image in the sample's 'image' field")
    if n_images and n_tags == 0:
        messages[0]["content"] = IMAGE_TOKEN * n_images + messages[0]["content"]
    elif n_tags < n_images:
        raise DataError(f"{where}: {n_images} images but only {n_tags} {IMAGE_TOKEN} tag(s); "
                        f"put one {IMAGE_TOKEN} where each image belongs")
    return [{"role": m["role"], "content": move_image_tags_first(m["content"])} for m in messages]


def json_type(value):
    """The JSON name of a parsed value's type, for messages ("a string", "null")."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


SURROGATE = re.compile("[\ud800-\udfff]")


def check_unicode(text, what):
    """JSON can spell an unpaired UTF-16 surrogate ("\\ud800"), which is not a character: no tokenizer or file system
    takes it. Such text is an error here, where we know whose it is."""
    bad = SURROGATE.search(text)
    if bad:
        raise DataError(f"{what} holds an unpaired surrogate {bad.group()!r} at character {bad.start()}, which is not "
                        "text (a broken \\u escape in the JSON); fix the text or skip bad samples")


def move_image_tags_first(text):
    """LLaVA's preprocess_multimodal: a turn with `<image>` becomes "<image>\\n" + the rest of the text, stripped."""
    n = text.count(IMAGE_TOKEN)
    if n == 0:
        return text
    return ((IMAGE_TOKEN + "\n") * n + text.replace(IMAGE_TOKEN, "").strip()).strip()


# ----------------------------------------------------------------------------------------------------------------------
# Templates: messages -> the exact prompt string of LLaVA's conversation.py

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAVA_LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                        "that the user provides, and assist the user with a variety of tasks using natural language.")
TEMPLATES = ("plain", "vicuna_v1", "llava_v1", "llama_2", "chat_template", "llava_v0", "instructblip")
# LLaVA v0 (the first paper's models) ends a reply with its separator "###", no EOS: generation stops at this text.
V0_SEPARATOR = "###"
# The first paper's --mm_use_im_start_end: each image wrapped in two tokens added to the tokenizer (the model side
# trains their embeddings); ChatFormat writes them around `<image>` when the tokenizer has them.
IM_START_TOKEN, IM_END_TOKEN = "<im_start>", "<im_end>"


def render(template, messages, tokenizer, add_generation_prompt=False):
    """The prompt string for `messages`; with add_generation_prompt it ends where the assistant starts to write."""
    if template == "plain":
        # Stage 1: the instruction is dropped; the model reads the image and writes the caption, then "\n".
        images = IMAGE_TOKEN * messages[0]["content"].count(IMAGE_TOKEN)
        if len(messages) > 2 or not images:
            raise ValueError("the plain (stage-1) template takes one human turn with an image and one caption")
        return images + "".join(m["content"] + "\n" for m in messages[1:2])
    if template in ("vicuna_v1", "llava_v1"):
        # SeparatorStyle.TWO: system + " ", "USER: q ", "ASSISTANT: a</s>"; the empty generation slot is "ASSISTANT:".
        text = (VICUNA_SYSTEM if template == "vicuna_v1" else LLAVA_V1_SYSTEM) + " "
        for m in messages:
            text += f"USER: {m['content']} " if m["role"] == "user" else f"ASSISTANT: {m['content']}{tokenizer.eos_token}"
        return text + ("ASSISTANT:" if add_generation_prompt else "")
    if template == "llama_2":
        # SeparatorStyle.LLAMA_2 (llava_llama_2): the leading "<s>" is left to the tokenizer's own BOS.
        text = ""
        for i, m in enumerate(messages):
            if m["role"] == "user":
                content = f"<<SYS>>\n{LLAVA_LLAMA_2_SYSTEM}\n<</SYS>>\n\n{m['content']}" if i == 0 else m["content"]
                text += ("" if i == 0 else tokenizer.bos_token) + f"[INST] {content} [/INST]"
            else:
                text += f" {m['content']} {tokenizer.eos_token}"
        return text
    if template == "llava_v0":
        # LLaVA v0's `###` layout as its train.py renders it (_add_speaker_and_signal, FastChat's v0 code): system
        # + "\n\n", each turn "### Human: q\n" / "### Assistant: a\n", then "### ". The system and roles are
        # conv_vicuna_v0's. A reply is " a\n###": the model learns to end with the separator, where generation stops.
        text = LLAVA_V1_SYSTEM + "\n\n"
        for m in messages:
            text += f"{V0_SEPARATOR} {'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n"
        return text + (f"{V0_SEPARATOR} Assistant:" if add_generation_prompt else f"{V0_SEPARATOR} ")
    if template == "instructblip":
        # InstructBLIP's Vicuna models (salesforce/LAVIS blip2_vicuna_instruct.py): no chat template. The image
        # comes first, then the tokenizer's BOS (ChatFormat puts it after the image; InstructBLIP's tokenizer says
        # "</s>"), the instruction as it is, and the reply straight after it ("▁word": LAVIS tokenizes the reply on
        # its own, with SentencePiece's leading "▁"), ended by EOS. InstructBLIP has one turn; later ones follow on.
        text = ""
        for i, m in enumerate(messages):
            if m["role"] == "user":
                body = m["content"].replace(IMAGE_TOKEN, "").strip()
                text += (IMAGE_TOKEN * m["content"].count(IMAGE_TOKEN) if i == 0 else " ") + body
            else:
                text += f" {m['content']}{tokenizer.eos_token}"
        return text
    if template == "chat_template":
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")


def reply_spans(template, messages, tokenizer):
    """The full prompt of a conversation and the (start, end) character span of each assistant reply in it.

    A reply's span is exactly what the template adds after the generation prompt of the history before it, i.e. the
    text the model must write at inference, end token included (" A cat.</s>" for vicuna_v1, "caption\\n" for plain).
    Chat templates may add whitespace after the end token ("<|im_end|>\\n"), llava_v0 a space after its "###": it is
    never generated, so not supervised.
    """
    full = render(template, messages, tokenizer)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(template, messages[:k], tokenizer, add_generation_prompt=True)
        upto = render(template, messages[:k + 1], tokenizer)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise ValueError(f"template {template!r} does not render conversations incrementally (a prefix of the "
                             "history does not render to a prefix of the prompt), so reply masks cannot be derived")
        end = len(upto.rstrip()) if template in ("chat_template", "llava_v0") else len(upto)
        spans.append((len(prompt), end))
    return full, spans


# ----------------------------------------------------------------------------------------------------------------------
# Tokenization: prompt -> input ids with image placeholders, and labels


class ChatFormat:
    """Turns conversations into model inputs: the template, the tokenizer and the number of tokens per image.

    `encode` builds a training sample (ids + labels); `prompt` builds the ids generation starts from. Both go through
    the same code, so training and inference cannot drift: the prompt for a history is a prefix of the training ids.
    im_start_end: wrap each image in <im_start> ... <im_end> (the first paper's mm_use_im_start_end); None: exactly
    when the tokenizer has both tokens, which only a model trained with them adds (LLaVA-1.5's do not).
    instruction_tokenizer: the projector's own tokenizer when it reads the instruction (InstructBLIP's Q-Former: a
    BERT tokenizer); `instructions` then gives each image's instruction in it, at most instruction_length tokens.
    """

    def __init__(self, tokenizer, template, image_tokens, im_start_end=None, instruction_tokenizer=None,
                 instruction_length=128):
        if template not in TEMPLATES:
            raise UserError(f"--template: unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
        if template == "chat_template" and not getattr(tokenizer, "chat_template", None):
            raise UserError("--template chat_template: the tokenizer has no chat template (tokenizer_config.json or "
                            "chat_template.jinja); use vicuna_v1 for Vicuna/Llama-2 LLMs")
        if not getattr(tokenizer, "is_fast", False):
            raise UserError(f"the tokenizer: {type(tokenizer).__name__} is a slow tokenizer, which gives no character "
                            "offsets for the label masks; use a tokenizer directory with a tokenizer.json (a fast "
                            "tokenizer), or install sentencepiece so that transformers can convert tokenizer.model")
        if isinstance(image_tokens, bool) or not isinstance(image_tokens, int) or image_tokens <= 0:
            raise UserError(f"image tokens per image must be a positive integer, got {image_tokens!r}")
        self.tokenizer, self.template, self.image_tokens = tokenizer, template, image_tokens
        has_im_tokens = {IM_START_TOKEN, IM_END_TOKEN} <= tokenizer.get_vocab().keys()
        if im_start_end and not has_im_tokens:
            raise UserError(f"mm_use_im_start_end: the tokenizer has no {IM_START_TOKEN} and {IM_END_TOKEN} tokens; "
                            "add both to it (and rows to the LLM's embeddings), or train without them")
        self.im_start_end = has_im_tokens if im_start_end is None else im_start_end
        # LLaVA's own templates rely on the tokenizer's BOS (one, at the very front); chat templates write their own.
        # InstructBLIP's goes after the image (transformers' InstructBlipProcessor: "BLIP expects image tokens to be
        # at the beginning even before BOS").
        self.prefix = [] if template == "chat_template" else special_prefix(tokenizer)
        self.prefix_after_images = template == "instructblip"
        self.instruction_tokenizer, self.instruction_length = instruction_tokenizer, instruction_length
        if instruction_tokenizer is not None:
            instruction_tokenizer.truncation_side = "left"  # (LAVIS keeps an instruction's end)
        # Control tokens come from the template only (render writes them); data that spells one is rejected (check_text)
        self.control_ids = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items()
                                                             if t.special}
        self.control_names = {n for n in tokenizer.convert_ids_to_tokens(sorted(self.control_ids)) if n}
        self.pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id, 0)
                           if i is not None)

    def tokenize(self, text, cuts=()):
        """LLaVA's tokenizer_image_token: ids with image_tokens placeholders per `<image>`, and each id's char span.

        `cuts` are character positions no token may cross: the text between two cuts is tokenized on its own, as the
        text between two images is (history_ids says when a reply's edge needs one)."""
        front = [] if self.prefix_after_images else list(self.prefix)  # (instructblip's BOS: inserted below)
        ids, offsets = front, [(0, 0)] * len(front)
        bounds = [0, *cuts, len(text)]
        for begin, end in zip(bounds, bounds[1:]):
            start = begin
            for i, chunk in enumerate(text[begin:end].split(IMAGE_TOKEN)):
                if i > 0:
                    ids += [IMAGE_TOKEN_INDEX] * self.image_tokens
                    offsets += [(start - len(IMAGE_TOKEN), start)] * self.image_tokens
                enc = self.tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
                ids += enc["input_ids"]
                offsets += [(start + a, start + b) for a, b in enc["offset_mapping"]]
                start += len(chunk) + len(IMAGE_TOKEN)
        if self.prefix_after_images:
            k = next((i for i, t in enumerate(ids) if t != IMAGE_TOKEN_INDEX), len(ids))
            at = offsets[k - 1][1] if k else 0
            ids[k:k], offsets[k:k] = list(self.prefix), [(at, at)] * len(self.prefix)
        return ids, offsets

    def history_ids(self, text, spans, where):
        """Ids and offsets of `text`, a rendering whose assistant replies are at `spans`, such that no token crosses
        the edge of a reply and the generation prompt before each reply (text[:start]) tokenizes to a prefix of them.

        Normally that is the plain tokenization, LLaVA's ids. Some tokenizers merge across an edge: Qwen2's
        pre-tokenizer makes one token of the template's "\\n" and a reply's leading "\\n" (or " \\n"), so the
        template's newline would be supervised and the ids would not start with the prompt the model is later given.
        There the text is cut at the edge and each side tokenized on its own (as around an image), so the model learns
        to write the reply after exactly the prompt ids inference feeds it; we cut rather than reject because for
        byte-level tokenizers the cut ids spell the same text. Whether reply k's edges are cut is decided on the text up
        to the next generation prompt, which is what `prompt` tokenizes for that history, so both decide alike.
        """
        cuts = []
        ids, offsets = self.tokenize(text[:spans[0][0]] if spans else text)  # the first generation prompt, or all
        for k, (start, end) in enumerate(spans):
            stop, before = spans[k + 1][0] if k + 1 < len(spans) else len(text), ids  # before: the prompt's ids
            while True:
                ids, offsets = self.tokenize(text[:stop], cuts)
                if crosses(offsets, end) and end not in cuts:
                    edge = end
                elif (crosses(offsets, start) or ids[:len(before)] != before) and start not in cuts:
                    edge = start
                else:
                    break
                cuts = sorted(cuts + [edge])
                # Tokenized on its own, a side may read differently: a SentencePiece tokenizer puts its dummy-prefix
                # "▁" at the start of a text. Then no tokenization is both exact and prefix-consistent.
                if self.spelled(self.tokenize(text[:stop], cuts)[0]) != self.spelled(self.tokenize(text[:stop])[0]):
                    raise DataError(
                        f"{where}: the tokenizer merges the {'start' if edge == start else 'end'} of the reply in turn "
                        f"{2 * k + 1} with the template's text next to it ({text[max(0, edge - 20):edge]!r} | "
                        f"{text[edge:edge + 20]!r}), and the reply tokenized on its own reads differently; change the "
                        "reply's first or last characters (leading whitespace, usually), or skip bad samples")
        return ids, offsets

    def spelled(self, ids):
        """The text that ids (image placeholders left out) decode to, spaces as they are."""
        return self.tokenizer.decode([i for i in ids if i >= 0], clean_up_tokenization_spaces=False)

    def spellings(self, text):
        """The text, and what the tokenizer's normalizer makes of it (a special token may be matched after it)."""
        normalizer = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "normalizer", None)
        return (text,) if normalizer is None else (text, normalizer.normalize_str(text))

    def check_text(self, messages, where):
        """Data text is text. A turn that spells a control token ("</s>", "<s>", "<|im_end|>") would be read as that
        token: in a reply, the model learns to stop mid-answer. Such a turn is an error, not re-tokenized as plain
        characters (split_special_tokens): that needs data and template tokenized apart, which changes the ids at
        every edge between them (a SentencePiece dummy prefix), so the sample would not be tokenized as LLaVA does;
        and LLaVA zero-masks a sample with "</s>" in its text (its rounds split there: "tokenization mismatch"), so
        no released model learnt "</s>" as text. An error names the sample to fix. `<image>` is not text here."""
        chunks = [(i, c) for i, m in enumerate(messages) for c in m["content"].split(IMAGE_TOKEN) if c]
        if not any(name in spelling for _, c in chunks for spelling in self.spellings(c) for name in self.control_names):
            return  # the usual case, without tokenizing: a control token is matched by its spelling only
        enc = self.tokenizer([c for _, c in chunks], add_special_tokens=False, return_offsets_mapping=True)
        for (i, chunk), ids, offsets in zip(chunks, enc["input_ids"], enc["offset_mapping"]):
            for token, (a, b) in zip(ids, offsets):
                name = self.tokenizer.convert_ids_to_tokens(token) if token in self.control_ids else None
                if name and name in chunk[a:b]:  # spelled, not an unknown character mapped to <unk>
                    raise DataError(f"{where}: turn {i} spells the control token {name!r} in its text "
                                    f"({chunk[max(0, a - 30):b + 30]!r}), which the tokenizer would read as that "
                                    "token, not as text; remove or reword it, or skip bad samples")

    def wrap_images(self, messages):
        """LLaVA's preprocess_multimodal with mm_use_im_start_end: each `<image>` (already first in its turn) becomes
        <im_start><image><im_end>, so the image features sit between the two tokens whose embeddings are learnt.
        Done after check_text: data that spells either token itself is still refused."""
        if not self.im_start_end:
            return messages
        wrapped = IM_START_TOKEN + IMAGE_TOKEN + IM_END_TOKEN
        return [{**m, "content": m["content"].replace(IMAGE_TOKEN, wrapped)} for m in messages]

    def instructions(self, messages):
        """Each image's instruction in the projector's own tokenizer, images in order: the text of the user turn that
        holds the image, `<image>` left out; [] without an instruction tokenizer. `[CLS] text [SEP]`, and a text too
        long loses its start (LAVIS truncates the Q-Former's text from the left, at 128 tokens). Text that spells a
        special token ("[SEP]") is read as characters.

        InstructBLIP reads one instruction per image: its data has one turn. For LLaVA's multi-turn conversations the
        turn holding the image is its first question, as LAVIS's own LLaVA-Instruct loader (X-InstructBLIP's
        llava150k_dataset.py) takes it; the image is then read once for the whole conversation, in training and in a
        chat alike. InstructBLIP's code for its multi-turn data was never released (salesforce/LAVIS#327)."""
        if self.instruction_tokenizer is None:
            return []
        texts = [m["content"].replace(IMAGE_TOKEN, "").strip() for m in messages if m["role"] == "user"
                 for _ in range(m["content"].count(IMAGE_TOKEN))]
        if not texts:
            return []
        return self.instruction_tokenizer(texts, truncation=True, max_length=self.instruction_length,
                                          split_special_tokens=True).input_ids

    def prompt(self, messages, where="the prompt"):
        """Input ids for generating the next assistant reply after `messages` (which end with a user turn)."""
        self.check_text(messages, where)
        messages = self.wrap_images(messages)
        text = render(self.template, messages, self.tokenizer, add_generation_prompt=True)
        try:
            history, spans = reply_spans(self.template, messages, self.tokenizer)
        except ValueError:  # a template that is not incremental: no such history is a training sample (encode)
            history, spans = text, []
        if not text.startswith(history):
            spans = []  # likewise: the generation prompt does not continue the history
        return self.history_ids(text, spans, where)[0]

    def encode(self, messages, where="sample"):
        """(input_ids, labels) of a conversation; labels are IGNORE_INDEX except on the assistant replies."""
        self.check_text(messages, where)
        messages = self.wrap_images(messages)
        try:
            text, spans = reply_spans(self.template, messages, self.tokenizer)
        except DataError:
            raise
        except ValueError as e:
            raise DataError(f"{where}: {e}") from e
        ids, offsets = self.history_ids(text, spans, where)
        supervised = bytearray(len(text))
        for a, b in spans:
            supervised[a:b] = b"\x01" * (b - a)
        labels, seen = [IGNORE_INDEX] * len(ids), [0] * len(spans)
        for i, (tok, (a, b)) in enumerate(zip(ids, offsets)):
            if tok == IMAGE_TOKEN_INDEX or not any(supervised[a:b]):
                continue
            if not all(supervised[a:b]):  # history_ids cuts every such token; this guards the invariant
                raise DataError(f"{where}: token {self.tokenizer.convert_ids_to_tokens(tok)!r} spans both a reply "
                                f"and the text around it ({text[a:b]!r}); the template and tokenizer cannot be aligned")
            labels[i] = tok
            seen[next(k for k, (s, e) in enumerate(spans) if s < b and a < e)] += 1
        if not all(seen):
            raise DataError(f"{where}: reply {seen.index(0)} has no tokens of its own; the template and tokenizer "
                            "cannot be aligned")
        return ids, labels


def crosses(offsets, position):
    """Whether a token's character span (a, b) straddles `position`. Spans are in text order and do not overlap, so
    only the last token starting before it can."""
    i = bisect.bisect_left(offsets, position, key=lambda span: span[0])
    return i > 0 and offsets[i - 1][1] > position


def special_prefix(tokenizer):
    """The special tokens the tokenizer puts before a text (BOS), without those it puts after one (EOS, with Llama's
    add_eos_token=True): LLaVA's templates write each EOS where a reply ends, so a sequence starts with BOS only, and
    encoding the empty string (BOS + EOS there) is not the prefix."""
    text, full = tokenizer("a", add_special_tokens=False).input_ids, tokenizer("a").input_ids
    start = next((i for i in range(len(full) - len(text) + 1) if full[i:i + len(text)] == text), None)
    if start is None:
        raise UserError(f"the tokenizer: {type(tokenizer).__name__} changes a text's tokens when it adds its special "
                        "tokens, so the tokens it adds before a text cannot be told apart; use a Llama-style tokenizer "
                        "or --template chat_template")
    return full[:start]


def truncate(ids, labels, max_length, where):
    """Cut a sample to max_length tokens (image tokens count). Never inside an image; never to zero supervision."""
    if len(ids) <= max_length:
        return ids, labels
    if IMAGE_TOKEN_INDEX in ids[max_length:]:
        raise DataError(f"{where}: {len(ids)} tokens with its images, more than max_length={max_length}, and an "
                        "image would be cut; raise --max-length, shorten the sample or skip bad samples")
    if all(label == IGNORE_INDEX for label in labels[:max_length]):
        raise DataError(f"{where}: {len(ids)} tokens; cut to max_length={max_length} no reply is left to learn from; "
                        "raise --max-length, shorten the sample or skip bad samples")
    return ids[:max_length], labels[:max_length]


# ----------------------------------------------------------------------------------------------------------------------
# Images


def load_image_processor(path):
    """The vision tower's image processor, with the PIL backend: the numerics LLaVA-1.5 was trained with (the
    torchvision backend resizes slightly differently). The class is picked from preprocessor_config.json here rather
    than by AutoImageProcessor, which in some transformers 5 releases refuses to load at all without torchvision.
    Older configs (openai/clip-vit-large-patch14-336's) name a "CLIPFeatureExtractor"; that is the same processor.
    A processor is tried on a small image here, so that a config whose values do not work is an error naming the
    directory now rather than at the first sample; no code from the directory is ever run."""
    import transformers
    from transformers import AutoImageProcessor
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        saved, _ = ImageProcessingMixin.get_image_processor_dict(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: no readable preprocessor_config.json (the vision tower's image processor): {e}; "
                        "give the vision tower's directory or hub id") from None
    name = (saved.get("image_processor_type") or saved.get("feature_extractor_type", "")) if isinstance(saved, dict) \
        else None
    if not isinstance(name, str):
        raise UserError(f"{path}: preprocessor_config.json is not an image processor's config (an object with an "
                        "image_processor_type); give the vision tower's directory or hub id")
    pil = getattr(transformers, name.replace("FeatureExtractor", "ImageProcessor").removesuffix("Fast") + "Pil", None)
    if not (isinstance(pil, type) and issubclass(pil, ImageProcessingMixin)):
        pil = None
    try:
        processor = pil.from_pretrained(path) if pil else \
            AutoImageProcessor.from_pretrained(path, backend="pil", trust_remote_code=False)
        process_image(Image.new("RGB", (8, 4)), processor, "pad")
    except MemoryError:
        raise
    except Exception as e:
        raise UserError(f"{path}: cannot build an image processor from its preprocessor_config.json "
                        f"({type(e).__name__}: {e}); give the vision tower's directory or hub id") from e
    return processor


def load_tokenizer(path):
    """The LLM's tokenizer from a directory or hub id; a file that does not load is an error naming `path`. Code
    shipped with a tokenizer (trust_remote_code) is never run."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except MemoryError:
        raise
    except Exception as e:  # OSError, HFValidationError, a JSON or tokenizers error in its files, ...
        raise UserError(f"{path}: cannot load a tokenizer ({type(e).__name__}: {e}); give an LLM directory with "
                        "tokenizer.json (or tokenizer.model) and tokenizer_config.json, or a hub id") from e


def load_tokenizer_and_processor(checkpoint, config):
    """The tokenizer and image processor of a checkpoint directory: its own files when it has them (training writes
    them), else those of the backbones its config names (config.llm, config.vision_tower)."""
    def own(*names):
        return os.path.isdir(checkpoint) and any(os.path.exists(os.path.join(checkpoint, n)) for n in names)

    tokenizer = load_tokenizer(checkpoint if own("tokenizer.json", "tokenizer.model") else config.llm)
    processor = load_image_processor(checkpoint if own("preprocessor_config.json") else config.vision_tower)
    return tokenizer, processor


def expand_to_square(image, background):
    """LLaVA's expand2square: pad the short side, image centred, with the processor's mean colour."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return square


ASPECT_RATIOS = ("pad", "crop")


def process_image(image, image_processor, aspect_ratio, where="the image"):
    """A PIL image -> a (3, H, W) float tensor. `pad`: expand to square first (LLaVA-1.5 stage 2 and inference);
    `crop`: the processor alone, which resizes the short side and centre-crops (LLaVA-1.5 stage 1)."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise UserError(f"--image-aspect-ratio: unknown image aspect ratio {aspect_ratio!r}; choose pad or crop")
    check_working_size(image.size, image_processor, aspect_ratio, where)
    if aspect_ratio == "pad":
        background = tuple(int(255 * m) for m in image_processor.image_mean)  # (122, 116, 104) for CLIP
        image = expand_to_square(image, background)
    return image_processor(images=image, return_tensors="pt")["pixel_values"][0]


def check_working_size(size, image_processor, aspect_ratio, where):
    """A small file can still be a bomb after opening: a 60000x1 image pads to a 60000x60000 square (pad), or its
    short side is resized to 336 pixels, the long one to 20 million (crop). The largest image processing makes must
    stay within PIL's own limit for an image file (2 x Image.MAX_IMAGE_PIXELS, which can be raised)."""
    if not Image.MAX_IMAGE_PIXELS:
        return
    w, h = size
    if aspect_ratio == "pad":
        w = h = max(w, h)
    sizes = getattr(image_processor, "size", None)
    edge = sizes.get("shortest_edge") if hasattr(sizes, "get") else None
    scale = edge / min(w, h) if edge else 1
    pixels = max(w * h, round(w * scale) * round(h * scale))
    if pixels > 2 * Image.MAX_IMAGE_PIXELS:
        raise DataError(f"{where}: a {size[0]}x{size[1]} image; processing it ({aspect_ratio}) would make an image of "
                        f"{pixels} pixels, more than PIL's limit of {2 * Image.MAX_IMAGE_PIXELS}: its aspect ratio is "
                        "too extreme; crop or resize the image, or skip bad samples")


# Formats PIL can open but should not for data: EPS is rendered by running Ghostscript (a PostScript interpreter) on
# the file, WMF/EMF by the Windows graphics system; a data file's image is read, never run.
UNSAFE_FORMATS = ("EPS", "WMF")


def load_image(path, where):
    """An image file as an RGB image, as LLaVA reads it (Image.open(path).convert("RGB")), so that what a released
    model saw is what it sees here: alpha is dropped (RGBA, LA, and a palette's transparent colour), CMYK, YCbCr and
    LAB go through PIL's own conversion, a multi-frame file gives its first frame, and the EXIF orientation is not
    applied (LLaVA does not: a photo whose camera was turned is seen as stored). Only what convert("RGB") gets silently
    wrong is done otherwise: 16-bit, 32-bit and float gray (to_rgb). Anything PIL raises while opening or decoding
    the file (unknown format, truncated data, a decompression bomb) is the file's fault: a DataError naming it."""
    Image.init()
    try:
        with warnings.catch_warnings():  # PIL only warns between 1 and 2 x MAX_IMAGE_PIXELS: refuse those as well
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=[f for f in Image.OPEN if f not in UNSAFE_FORMATS]) as image:
                return to_rgb(image)
    except FileNotFoundError:
        raise DataError(f"{where}: image file {path} does not exist; check --image-folder and the sample's 'image'") \
            from None
    except MemoryError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{where}: image {path} is too large to open safely ({e}); shrink the image or skip bad "
                        "samples") from None
    except Exception as e:
        raise DataError(f"{where}: cannot read image {path} ({type(e).__name__}: {e}); replace the file or skip bad "
                        "samples") from None


def to_rgb(image):
    """convert("RGB") clips gray deeper than 8 bits to 255 (a 16-bit PNG comes out white): such images are scaled to
    8 bits first. I;16 holds 0..65535 (x / 257); I holds what PIL opens 16-bit PNG and PPM files as, the same range
    (32-bit values beyond it are clipped); F is a float TIFF's gray, 0..1 by that format's convention (clipped, NaN
    black). Every other mode PIL converts correctly."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        pixels = np.asarray(image, dtype=np.float32) * (255 if image.mode == "F" else 1 / 257)
        image = Image.fromarray(np.clip(np.nan_to_num(pixels).round(), 0, 255).astype(np.uint8))
    return image.convert("RGB")


# ----------------------------------------------------------------------------------------------------------------------
# The dataset


def read_samples(path):
    """LLaVA's data file: a JSON list of samples, or one JSON object per line (.jsonl). Returns the samples and, for
    each, where it is in the file ("data.json, sample #3 (id 'abc')"), for error messages. Each must be an object."""
    samples, places = [], []
    for position, _, sample in iter_data_file(path):
        place = sample_place(path, position, sample)
        if not isinstance(sample, dict):
            raise DataError(f"{place}: expected a JSON object, got {json_type(sample)}; fix the file")
        samples.append(sample)
        places.append(place)
    return samples, places


def read_text(path):
    """A data file's text. It must be UTF-8 (JSON's encoding; a BOM is allowed): another encoding is an error naming
    the byte, never text decoded wrongly."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file; check the path") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a data file; give the .json or .jsonl file in it") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the data file ({e.strerror or e}); check the path and its "
                        "permissions") from None
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at, line = bom + e.start, data.count(b"\n", 0, bom + e.start) + 1
        raise DataError(f"{path}: not UTF-8 text: byte {at} (line {line}) is "
                        f"{data[at:at + 1]!r} ({e.reason}); re-encode the file as UTF-8 (JSON files are UTF-8)") \
            from None


def iter_data_file(path):
    """(position, JSON text, parsed sample) for each sample of a data file, one at a time: a position is (True, index)
    in a JSON list, (False, line number) in JSON lines. Malformed JSON is an error naming the line and column; a
    sample is whatever JSON value is there (the reader checks it: a bad sample can be skipped, a bad file cannot)."""
    text = read_text(path)
    if not text.lstrip().startswith("["):
        # Lines end at "\n" only: str.splitlines() also splits at U+2028 and other characters a JSON string may hold
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    sample = json.loads(line)
                except RecursionError:
                    raise DataError(f"{path}: line {n} is nested too deeply to read; fix or remove it") from None
                except json.JSONDecodeError as e:
                    if is_one_object(text):
                        raise DataError(f"{path}: one JSON object, not a list of samples; a data file is a JSON list "
                                        "[{...}, ...] of samples, or one sample per line (JSON lines)") from None
                    raise DataError(f"{path}: malformed JSON on line {n}: {e.msg}") from None
                yield (False, n), line, sample
        return
    decoder, blank = json.JSONDecoder(), re.compile(r"\s*")
    i, n = blank.match(text, text.index("[") + 1).end(), 0
    try:
        while text[i:i + 1] != "]":
            sample, end = decoder.raw_decode(text, i)
            yield (True, n), text[i:end], sample
            i, n = blank.match(text, end).end(), n + 1
            if text[i:i + 1] == ",":
                i = blank.match(text, i + 1).end()
                if text[i:i + 1] == "]":
                    raise json.JSONDecodeError("a trailing comma", text, i)
            elif text[i:i + 1] != "]":
                raise json.JSONDecodeError("expected ',' or ']' after a sample", text, i)
        if text[i + 1:].strip():
            raise json.JSONDecodeError("extra data after the list", text, i + 1)
    except RecursionError:
        raise DataError(f"{path}: sample #{n} is nested too deeply to read; fix or remove it") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def is_one_object(text):
    """Whether a file that fails to read as JSON lines is one JSON object over many lines (a sample, or a wrapper)."""
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


def sample_place(path, position, sample=None):
    """Where a sample is, for messages: "data.json, sample #3 (id 'abc')", or "data.jsonl, line 4"."""
    in_list, n = position
    text = f"{path}, sample #{n}" if in_list else f"{path}, line {n}"
    sample_id = sample.get("id") if isinstance(sample, dict) else None
    return f"{text} (id {sample_id!r:.80})" if is_id(sample_id) else text


def is_id(value):
    """A sample's id names it in messages: a string or a number (LLaVA's are both), null meaning none."""
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def image_paths(sample, where="the sample"):
    """The sample's image files, as written in its "image" field: none, one path, or a list of paths."""
    image = sample.get("image")
    paths = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise DataError(f"{where}: 'image' must be a file name or a list of file names, got {image!r:.100}; fix "
                        "the sample or skip bad samples")
    for p in paths:
        check_unicode(p, f"{where}: image {p!r:.100}")
        if "\0" in p:
            raise DataError(f"{where}: image {p!r:.100} holds a NUL character, which no file name does; fix the "
                            "sample or skip bad samples")
    return paths


def image_file(folder, path, where):
    """The file of an image path, which must lie inside the image folder when there is one: a data file says which
    images to read, not which files. The test is on the path as written (no ".." out of the folder, no absolute path
    elsewhere); symbolic links inside the folder are the folder owner's choice and are followed."""
    if not folder:
        return path
    full = os.path.normpath(os.path.join(folder, path))
    if os.path.relpath(full, folder).split(os.sep)[0] == "..":
        raise DataError(f"{where}: image {path!r} is outside the image folder {folder}; a data file may only name "
                        "images inside --image-folder: fix the path (relative to the folder) or skip bad samples")
    return full


class LazySupervisedDataset(torch.utils.data.Dataset):
    """LLaVA's data file as training samples. Conversations are checked up front; images are opened in __getitem__.

    Samples are kept as their JSON text, all in one bytes buffer, and parsed again when read: 665K parsed samples
    would take gigabytes of Python objects in every rank and every loader worker (reference counting makes each
    forked worker copy the pages it reads), the buffer a few hundred MB that forked workers share.

    With skip_bad=True a bad sample is replaced by the next good one (deterministically): one rejected when the file
    is read is counted in `num_bad` and its place kept in `bad_places`; one found bad when read (an image) is passed
    over, and the item returned says which: its "skipped" lists the dataset indices passed over to reach it (a run
    counts the distinct ones; `where(i)` names them). Each bad sample is logged once per process. Otherwise the first
    bad sample raises DataError.
    """

    def __init__(self, data_path, image_folder, fmt, image_processor=None, aspect_ratio="pad", max_length=2048,
                 skip_bad=False):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
            raise UserError(f"--max-length: must be a positive number of tokens, got {max_length!r}")
        if aspect_ratio not in ASPECT_RATIOS:
            raise UserError(f"--image-aspect-ratio: unknown image aspect ratio {aspect_ratio!r}; choose pad or crop")
        if not data_path:
            raise UserError("--data-path: no data file given; give LLaVA's data file (.json list or .jsonl)")
        self.data_path, self.fmt, self.image_processor, self.image_folder = data_path, fmt, image_processor, image_folder
        self.aspect_ratio, self.max_length, self.skip_bad = aspect_ratio, max_length, skip_bad
        blob, self.offsets, self.positions, self.lengths = bytearray(), array("q", [0]), array("q"), array("q")
        self.num_bad, self.bad_places, self.warned = 0, [], set()
        self.in_list, first_error, seen = True, None, 0
        for position, text, sample in iter_data_file(data_path):  # malformed JSON anywhere raises first
            self.in_list, seen = position[0], seen + 1
            place = sample_place(data_path, position, sample)
            try:
                self.check(sample, place)
            except DataError as e:
                if not skip_bad:
                    first_error = first_error or e
                    continue
                log.warning("skipping bad sample: %s", e)
                self.num_bad += 1
                self.bad_places.append(place)
                continue
            blob += text.encode()
            self.offsets.append(len(blob))
            self.positions.append(position[1])
            words = sum(len(t["value"].split()) for t in sample["conversations"])
            self.lengths.append(words if image_paths(sample) else -words)
        if first_error:
            raise first_error
        self.blob = bytes(blob)
        if not seen:
            raise DataError(f"{data_path}: no samples (an empty file or list); a data file is a JSON list of samples "
                            "or one sample per line (JSON lines)")
        if not len(self):
            raise DataError(f"{data_path}: no usable samples: all {seen} are bad (see the warnings above)")
        if image_folder and not os.path.isdir(image_folder) and any(n > 0 for n in self.lengths):
            problem = "is not a directory" if os.path.exists(image_folder) else "does not exist"
            raise UserError(f"--image-folder {image_folder}: {problem}, and the samples' images are read from it; "
                            "give the folder the samples' image paths are relative to")

    def check(self, sample, where):
        """A sample's messages and image files, or a DataError saying which field is wrong. No file is opened."""
        if not isinstance(sample, dict):
            raise DataError(f"{where}: a sample must be an object {{'id', 'image', 'conversations'}}, got "
                            f"{json_type(sample)}; fix the sample or skip bad samples")
        if not (sample.get("id") is None or is_id(sample["id"])):
            raise DataError(f"{where}: 'id' must be a string or a number, got {json_type(sample['id'])}; fix the "
                            "sample or skip bad samples")
        paths = image_paths(sample, where)
        if paths and self.image_processor is None:
            raise UserError(f"{where}: has an image but no image processor was given (the vision tower); give one, "
                            "or use a text-only data file")
        messages = parse_conversation(sample.get("conversations"), len(paths), where)
        return messages, [image_file(self.image_folder, p, where) for p in paths]

    def __len__(self):
        return len(self.offsets) - 1

    def sample(self, i):
        return json.loads(self.blob[self.offsets[i]:self.offsets[i + 1]])

    def where(self, i, sample=None):
        """Where sample i (any index of the dataset, a skipped one too) is in the data file, with its id."""
        return sample_place(self.data_path, (self.in_list, self.positions[i]),
                            self.sample(i) if sample is None else sample)

    @property
    def modality_lengths(self):
        """LLaVA's grouping key: words over all turns, positive for samples with images, negative for text-only."""
        return self.lengths.tolist()

    def load(self, i):
        sample = self.sample(i)
        here = self.where(i, sample)
        messages, files = self.check(sample, here)
        ids, labels = self.fmt.encode(messages, here)
        ids, labels = truncate(ids, labels, self.max_length, here)
        images = [process_image(load_image(f, here), self.image_processor, self.aspect_ratio, f"{here}: image {f}")
                  for f in files]
        return {"id": sample.get("id"), "input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "pixel_values": torch.stack(images) if images else None,
                "instructions": self.fmt.instructions(messages)}

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} of a dataset of {len(self)}")
        skipped = []
        for k in range(len(self)):
            j = (i + k) % len(self)
            try:
                return {**self.load(j), "skipped": skipped}
            except DataError as e:
                if not self.skip_bad:
                    raise
                if j not in self.warned:
                    self.warned.add(j)
                    log.warning("skipping bad sample: %s", e)
                skipped.append(j)
                error = e
        raise DataError(f"{self.data_path}: every sample is bad; the last error: {error}")


def collate(samples, pad_id):
    """Right-padded batch: input_ids (pad_id), labels (IGNORE_INDEX), attention_mask, and the images of all samples
    concatenated in order (None when the batch has none), with each image's instruction for a projector that reads it
    (pad_instructions). `skipped`: the dataset indices of the bad samples passed over to reach the batch's samples
    (LazySupervisedDataset.__getitem__)."""
    n = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), n), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), n), dtype=torch.long)
    for row, s in enumerate(samples):
        k = len(s["input_ids"])
        input_ids[row, :k], labels[row, :k], attention_mask[row, :k] = s["input_ids"], s["labels"], 1
    images = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "pixel_values": torch.cat(images) if images else None,
            **pad_instructions([i for s in samples for i in s.get("instructions", [])]),
            "skipped": [i for s in samples for i in s.get("skipped", [])]}


def collate_packed(samples, pad_id, row_length=0):
    """A packed batch (train.py --pack): the samples laid end to end in as few rows of row_length positions as hold
    them (first-fit, longest first; 0 or less than the longest sample: the longest sample's length, so that no row is
    longer than the unpacked batch's), each row right-padded.

    Every sample keeps its own positions: position_ids restart at 0 at its first token (a row's padding continues its
    last sample's; no real token attends to it). Given position_ids and no attention mask, an LLM then attends within
    each sample only (transformers' masking_utils.find_packed_sequence_indices: a new sequence starts where positions
    do not go up by one). The first label of each sample is IGNORE_INDEX: it would be the target of the previous
    sample's last token, and unpacked it is never a target either. So the loss, summed over supervised tokens, is the
    unpacked batch's. When no row would hold two samples this is collate's batch: nothing to pack, and the LLM keeps
    its plain causal attention.

    Images (and their instructions) are concatenated in the order their samples appear in the rows, row by row, the
    order model.LlavaModel.embed fills placeholders in. `lengths` and `has_image` give each sample's (in that order)
    for the step's counts; position_ids is what tells the model the batch is packed."""
    lengths = [len(s["input_ids"]) for s in samples]
    capacity, rows, free = max(max(lengths), row_length), [], []
    for i in sorted(range(len(samples)), key=lambda i: -lengths[i]):
        r = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if r is None:
            rows.append([])
            free.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= lengths[i]
    if len(rows) == len(samples):
        return collate(samples, pad_id)
    input_ids = torch.full((len(rows), capacity), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), capacity), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), capacity), dtype=torch.long)
    position_ids = torch.zeros((len(rows), capacity), dtype=torch.long)
    for row, members in enumerate(rows):
        start = 0
        for i in members:
            k, s = lengths[i], samples[i]
            input_ids[row, start:start + k], labels[row, start:start + k] = s["input_ids"], s["labels"]
            labels[row, start] = IGNORE_INDEX
            attention_mask[row, start:start + k] = 1
            position_ids[row, start:start + k] = torch.arange(k)
            start += k
        position_ids[row, start:] = torch.arange(k, k + capacity - start)
    order = [samples[i] for members in rows for i in members]
    images = [s["pixel_values"] for s in order if s["pixel_values"] is not None]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids,
            "pixel_values": torch.cat(images) if images else None,
            **pad_instructions([i for s in order for i in s.get("instructions", [])]),
            "lengths": torch.tensor([len(s["input_ids"]) for s in order]),
            "has_image": torch.tensor([s["pixel_values"] is not None for s in order]),
            "skipped": [i for s in samples for i in s.get("skipped", [])]}


def pad_instructions(instructions):
    """Each image's instruction ids (ChatFormat.instructions) as the model takes them: instruction_ids right-padded
    with 0 (BERT's [PAD]) and instruction_mask, (images, longest); both None when there are none."""
    if not instructions:
        return {"instruction_ids": None, "instruction_mask": None}
    ids = torch.zeros((len(instructions), max(len(i) for i in instructions)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, i in enumerate(instructions):
        ids[row, :len(i)], mask[row, :len(i)] = torch.tensor(i, dtype=torch.long), 1
    return {"instruction_ids": ids, "instruction_mask": mask}


# ----------------------------------------------------------------------------------------------------------------------
# The sampler: LLaVA-1.5's group_by_modality_length, over ranks and gradient-accumulation steps


def split_to_even_chunks(indices, lengths, num_chunks):
    """Deal indices (longest first) into equally many chunks, each time to the chunk with the least total length."""
    size = len(indices) // num_chunks
    chunks, totals = [[] for _ in range(num_chunks)], [0] * num_chunks
    for i in indices:
        c = totals.index(min(totals))
        chunks[c].append(i)
        totals[c] = totals[c] + lengths[i] if len(chunks[c]) < size else float("inf")
    return chunks


# How a global batch is dealt into micro-batches (train.py --micro-batch-order; ModalityLengthGroupedSampler.deal).
MICRO_BATCH_ORDERS = ("llava", "contiguous")


@dataclass
class ModalityLengthGroupedSampler(torch.utils.data.Sampler):
    """The sample indices one rank reads, in order, for one epoch.

    A global batch (a "megabatch") is micro_batch_size x world_size x grad_accum samples; it is cut into
    world_size x grad_accum micro-batches of similar total length, and rank r takes micro-batches r, r + world_size,
    ... as its accumulation steps. With group_by_length (LLaVA-1.5 stage 2), as in LLaVA's LengthGroupedSampler:
    samples are shuffled within each modality (image / text-only, from the sign of `lengths`), cut into megabatches,
    each sorted by length; the full megabatches of both modalities are shuffled together and the leftovers of both
    go last. So every full global batch holds one modality. Without it: one shuffle of everything.

    The order depends only on (seed, epoch); set_epoch(epoch, start_step) resumes mid-epoch. The last megabatch is
    filled up with samples from the start of the epoch's order, so every rank takes the same number of full steps.

    micro_batch_order "contiguous" deals a global batch otherwise (deal): sorted by length, cut into runs of
    micro_batch_size, so each micro-batch pads to a length close to its own samples'. The global batch's samples are
    the same, so is the update; only which rank and accumulation step gets which sample changes.
    """

    lengths: list = field(repr=False)
    micro_batch_size: int
    world_size: int = 1
    rank: int = 0
    grad_accum: int = 1
    group_by_length: bool = True
    seed: int = 0
    epoch: int = 0
    start_step: int = 0
    micro_batch_order: str = "llava"

    def __post_init__(self):
        assert 0 <= self.rank < self.world_size and all(n != 0 for n in self.lengths)
        assert self.micro_batch_order in MICRO_BATCH_ORDERS, self.micro_batch_order
        self.length = [abs(n) for n in self.lengths]

    @property
    def global_batch(self):
        return self.micro_batch_size * self.world_size * self.grad_accum

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def megabatches(self):
        """This epoch's global batches, each a list of world_size x grad_accum micro-batches."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        n, size = len(self.lengths), self.global_batch
        if self.group_by_length:
            groups = [[i for i in range(n) if self.lengths[i] > 0], [i for i in range(n) if self.lengths[i] < 0]]
        else:
            groups = [list(range(n))]
        full, leftover = [], []
        for group in groups:
            order = [group[j] for j in torch.randperm(len(group), generator=g).tolist()]
            cut = len(order) - len(order) % size
            full += [order[j:j + size] for j in range(0, cut, size)]
            leftover += order[cut:]
        full = [full[j] for j in torch.randperm(len(full), generator=g).tolist()]
        if leftover:
            order = itertools.cycle([i for batch in full for i in batch] + leftover)
            leftover += list(itertools.islice(order, (-len(leftover)) % size))
            full += [leftover[j:j + size] for j in range(0, len(leftover), size)]
        return [self.deal(b) for b in full]

    def deal(self, batch):
        """A global batch as its world_size x grad_accum micro-batches, micro-batch m going to rank m % world_size at
        accumulation step m // world_size (__iter__). llava: with group_by_length sorted longest first and split into
        micro-batches of similar total length (LLaVA's split_to_even_chunks: each spans the batch's whole range of
        lengths), else cut in order. contiguous: sorted longest first and cut into consecutive runs; accumulation step
        s takes runs s x world_size ... (s + 1) x world_size - 1, so the ranks of a step hold similar lengths, dealt
        to ranks in a snake order (reversed at odd steps) so that no rank always gets the longest run of its step."""
        if self.micro_batch_order == "contiguous":
            batch = sorted(batch, key=lambda i: self.length[i], reverse=True)
            runs = [batch[j:j + self.micro_batch_size] for j in range(0, len(batch), self.micro_batch_size)]
            w = self.world_size
            return [run for s in range(self.grad_accum) for run in runs[s * w:(s + 1) * w][::1 if s % 2 == 0 else -1]]
        if self.group_by_length:
            batch = sorted(batch, key=lambda i: self.length[i], reverse=True)
            return split_to_even_chunks(batch, self.length, self.world_size * self.grad_accum)
        return [batch[j:j + self.micro_batch_size] for j in range(0, len(batch), self.micro_batch_size)]

    def __len__(self):
        return (self.steps_per_epoch() - self.start_step) * self.micro_batch_size * self.grad_accum

    def steps_per_epoch(self):
        if not self.group_by_length:
            return -(-len(self.lengths) // self.global_batch)
        image = sum(1 for x in self.lengths if x > 0)
        text = len(self.lengths) - image
        leftover = image % self.global_batch + text % self.global_batch
        return image // self.global_batch + text // self.global_batch + -(-leftover // self.global_batch)

    def __iter__(self):
        for batch in self.megabatches()[self.start_step:]:
            for step in range(self.grad_accum):
                yield from batch[step * self.world_size + self.rank]


# ----------------------------------------------------------------------------------------------------------------------
# Several data files, and InstructBLIP's balanced sampling over them
#
# --data-path a.json,b.jsonl trains on several datasets at once, one per file. --dataset-balance concat (the default)
# concatenates them, and the sampler above runs over all; sqrt draws each global batch from ONE dataset, dataset d
# with probability sqrt(S_d) / sum_i sqrt(S_i) for sizes S_1..S_D (InstructBLIP, arXiv:2305.06500, "Balancing Training
# Datasets"; salesforce/LAVIS lavis/runners/runner_base.py and lavis/datasets/datasets/dataloader_utils.py
# MultiIterLoader):
# small datasets are seen more often than in proportion to their size, without the large ones being lost.

DATASET_BALANCES = ("concat", "sqrt")


def data_files(data_path):
    """The files of --data-path: one, or several separated by commas. Each is one dataset; none may be empty or
    given twice (it would be two datasets, with twice its share under sqrt)."""
    if not data_path:
        raise UserError("--data-path: no data file given; give LLaVA's data file (.json list or .jsonl)")
    paths = data_path.split(",")
    for n, path in enumerate(paths, 1):
        if not path.strip():
            raise UserError(f"--data-path {data_path}: file {n} of {len(paths)} is empty; separate the data files "
                            "by single commas, without spaces")
        if paths.index(path) != n - 1:
            raise UserError(f"--data-path {data_path}: {path} is given twice; give each data file once")
    return paths


class DataFiles(torch.utils.data.Dataset):
    """Several LazySupervisedDatasets as one: index i of the whole is sample i - starts[d] of file d, in the order the
    files were given, so one file is exactly that file's dataset. `sizes` gives each file's number of samples (the
    sampler's datasets); where(i), modality_lengths, num_bad and bad_places are those of the files, concatenated. A
    bad sample is replaced by the next good one of its own file (so a batch drawn from one file stays in it)."""

    def __init__(self, datasets):
        self.datasets = list(datasets)
        self.sizes = [len(d) for d in self.datasets]
        self.starts = [0] + list(itertools.accumulate(self.sizes))
        self.data_path = ",".join(d.data_path for d in self.datasets)
        self.num_bad = sum(d.num_bad for d in self.datasets)
        self.bad_places = [p for d in self.datasets for p in d.bad_places]

    def __len__(self):
        return self.starts[-1]

    def locate(self, i):
        """(file number, index in that file) of index i."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of a dataset of {len(self)}")
        d = bisect.bisect_right(self.starts, i) - 1
        return d, i - self.starts[d]

    def where(self, i, sample=None):
        d, j = self.locate(i)
        return self.datasets[d].where(j, sample)

    @property
    def modality_lengths(self):
        return [n for d in self.datasets for n in d.modality_lengths]

    def __getitem__(self, i):
        d, j = self.locate(i)
        item = self.datasets[d][j]
        return {**item, "skipped": [self.starts[d] + k for k in item["skipped"]]}


@dataclass
class BalancedSampler(ModalityLengthGroupedSampler):
    """InstructBLIP's balanced sampling: each global batch from one dataset, dataset d with probability proportional
    to sqrt(sizes[d]). `lengths` are those of all datasets concatenated (DataFiles.modality_lengths), `sizes` says
    where each dataset's indices are.

    Global step t's dataset is the t-th draw of a sequence seeded from (seed, epoch); its samples are that dataset's
    next global batch. Each dataset has batches of its own: a shuffle of it, cut into global batches, the last one
    filled up from the start of the same shuffle (as the sampler above fills its last), then another shuffle, and so
    on. So no sample comes twice before all of its dataset were seen, and a global batch holds no sample twice
    unless its dataset is smaller than it. The datasets' batches run on across epochs. An epoch is
    ceil(sum(sizes) / global_batch) steps, as many as concat takes to see every sample once (--epochs and the
    learning-rate schedule keep their meaning); it is not a pass over each dataset. A global batch is dealt to ranks
    and accumulation steps as the sampler above deals it (deal: micro_batch_order); image and text-only samples are not
    kept apart.

    The order depends only on (seed, global step): set_epoch(epoch, start_step) counts the draws before that epoch to
    know where each dataset is, so a resumed run reads exactly what the uninterrupted one would have.
    """

    sizes: list = field(kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        assert sum(self.sizes) == len(self.lengths) and all(n > 0 for n in self.sizes)
        self.starts = [0] + list(itertools.accumulate(self.sizes))
        roots = np.sqrt(np.array(self.sizes, dtype=np.float64))
        self.probabilities = roots / roots.sum()

    def steps_per_epoch(self):
        return -(-len(self.lengths) // self.global_batch)

    def rng(self, *key):
        """A generator of its own for each purpose: key (0, epoch) draws an epoch's datasets, (1 + d, k) gives
        dataset d's k-th shuffle (numpy's SeedSequence mixes the whole key, so no two share a stream)."""
        return np.random.default_rng([self.seed % 2 ** 64, *key])

    def choices(self, epoch):
        """The dataset of each global step of an epoch."""
        return self.rng(0, epoch).choice(len(self.sizes), size=self.steps_per_epoch(), p=self.probabilities).tolist()

    def megabatches(self):
        """This epoch's global batches, each a list of world_size x grad_accum micro-batches."""
        taken = [0] * len(self.sizes)  # global batches each dataset gave before this epoch
        for epoch in range(self.epoch):
            for d in self.choices(epoch):
                taken[d] += 1
        batches, shuffles, size = [], {}, self.global_batch  # shuffles: dataset d -> (k, its k-th shuffle)
        for d in self.choices(self.epoch):
            k, j = divmod(taken[d], -(-self.sizes[d] // size))  # the k-th shuffle's j-th batch
            if shuffles.get(d, (None,))[0] != k:
                shuffles[d] = k, (self.starts[d] + self.rng(1 + d, k).permutation(self.sizes[d])).tolist()
            order = shuffles[d][1]
            batch = order[j * size:(j + 1) * size]
            batch += itertools.islice(itertools.cycle(order), size - len(batch))
            batches.append(self.deal(batch))
            taken[d] += 1
        return batches
