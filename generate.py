"""How it answers: greedy and sampled generation over a KV cache, batched, and a streaming chat CLI.

    python generate.py --model runs/toy/finetune --image runs/toy/world/images/00000.png "What shape is on the left?"
    python generate.py --model runs/toy/finetune --image photo.jpg --chat      # multi-turn; /image PATH, /reset, /quit
    python generate.py --model DIR --image photo.jpg --compile "Describe it."  # static KV cache + torch.compile

generate() is one loop: a prefill runs the prompts (left-padded, image features spliced in) through the LLM and fills
its KV cache, then each step feeds one new token per sequence. A decoder does those two: Decoder over transformers'
DynamicCache, which grows a column per step; or, with --compile, StaticDecoder over one StaticCache per model,
allocated once and reset in place, so that every step of every call has the same shapes and one compiled step (one
CUDA graph) serves them all (gpt-fast's recipe for GPUs). The loop never waits for the device: the host reads each
step's tokens a step late (TokensToHost). Greedy when temperature is 0, else temperature, top-k and top-p sampling
from a seeded generator. Each sequence stops at EOS or at a stop string on its own. Prompts come from
data.ChatFormat, the code that builds training samples, so the generation prompt is exactly the training prefix (it
ends with "ASSISTANT:" for vicuna_v1). LLaVA's defaults (llava/serve/cli.py and llava/eval/run_llava.py in
haotian-liu/LLaVA): temperature 0.2, 512 new tokens; benchmarks use greedy.
"""

import argparse
import inspect
import math
import os
import sys

import torch
from huggingface_hub.errors import HFValidationError
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

import checkpoints
from data import IMAGE_TOKEN, V0_SEPARATOR, UserError, load_image, load_tokenizer_and_processor, pad_instructions, \
    process_image
from model import load_instruction_tokenizer, resolve


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def load(path, dtype=None, device="cpu"):
    """A LLaVA checkpoint of either stage: (model, ChatFormat, image processor). The tokenizer and image processor are
    the checkpoint's own when it has them, else those of the backbones its config names."""
    model = checkpoints.load(path, dtype=dtype).to(device).eval()
    tokenizer, processor = load_tokenizer_and_processor(path, model.config)
    # (resolve(path): the directory checkpoints.load found, from resolve's cache; the qformer's tokenizer is in it)
    return model, model.chat_format(tokenizer, load_instruction_tokenizer(model.config, resolve(path))), processor


def prepare_images(paths, processor, aspect_ratio):
    """Image files -> an (n, 3, H, W) tensor, preprocessed as the model was trained (pad or crop); None for none."""
    if not paths:
        return None
    return torch.stack([process_image(load_image(p, p), processor, aspect_ratio) for p in paths])


# ----------------------------------------------------------------------------------------------------------------------
# Sampling


def next_tokens(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """(B, V) logits of the last position -> (B,) token ids."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p  # tokens entirely beyond the nucleus (the first always stays)
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------------------
# The decoding loop


@torch.no_grad()
def generate(model, prompts, pixel_values=None, max_new_tokens=512, temperature=0.0, top_k=None, top_p=None,
             seed=None, eos_ids=(), pad_id=0, stop_strings=(), tokenizer=None, on_token=None, decoder=None,
             instructions=()):
    """New token ids for each prompt (lists of input ids with IMAGE_TOKEN_INDEX placeholders), EOS excluded.

    pixel_values holds the images of all prompts, in order; instructions, each image's instruction ids for a
    projector that reads them (ChatFormat.instructions; the qformer's). A sequence ends at an id in eos_ids, or when its
    decoded text contains a stop string (then the ids up to it are kept; needs `tokenizer`). on_token(i, token_id) is
    called for every new token of sequence i (streaming; on a GPU one step after it was drawn). decoder:
    Decoder(model) unless given, e.g. a StaticDecoder(model) (--compile) built once for many calls.
    """
    device = next(model.multi_modal_projector.parameters()).device
    batch, width = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("an empty prompt")
    context = model.language_model.config.max_position_embeddings
    if width >= context:
        raise ValueError(f"a prompt of {width} tokens (image tokens included) does not fit the LLM's context of "
                         f"{context}; shorten the conversation")
    max_new_tokens = min(max_new_tokens, context - width)
    # Left padding: every prompt ends at the last column, so each step appends one column for all of them. Built on
    # the host and moved in one copy each.
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = to_device(ids, device), to_device(mask, device)
    if pixel_values is not None:
        pixel_values = to_device(pixel_values, device)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None and temperature > 0 else None
    eos_ids = set(eos_ids)
    decoder = Decoder(model) if decoder is None else decoder

    image_inputs = {k: v if v is None else to_device(v, device)
                    for k, v in pad_instructions(list(instructions)).items()}
    logits = decoder.prefill(model.embed(ids, pixel_values, **image_inputs), mask, width + max_new_tokens)
    new, finished = [[] for _ in range(batch)], [False] * batch

    def take(tokens):
        """The host's part of a step: each unfinished sequence's new token, EOS and stop strings."""
        for i, t in enumerate(tokens):
            if finished[i]:
                continue
            if t in eos_ids:
                finished[i] = True
                continue
            new[i].append(t)
            if on_token is not None:
                on_token(i, t)
            if stop_strings and any(s in tokenizer.decode(new[i][-8:]) for s in stop_strings):
                finished[i] = True

    to_host = TokensToHost(device, batch)
    for step in range(max_new_tokens):
        token = next_tokens(logits, temperature, top_k, top_p, generator)
        for tokens in to_host.put(token):  # on a GPU the tokens of the step before: this one is still being computed
            take(tokens)
        if all(finished) or step == max_new_tokens - 1:
            break
        # A finished sequence goes on decoding whatever it drew (the host may learn of its end a step late); its
        # tokens are dropped, and a row of the batch never sees another.
        logits = decoder.step(token)
    for tokens in to_host.drain():
        take(tokens)
    return [trim_at_stop(seq, stop_strings, tokenizer) for seq in new]


def to_device(tensor, device):
    """A host tensor onto the device: from pinned memory without blocking on a GPU (the copy overlaps the work queued
    before it); as it is elsewhere."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class TokensToHost:
    """Each step's tokens to the host without making the GPU wait for it. A `.tolist()` per token is a sync: the host
    waits for the step to end, then decides, then queues the next, and the GPU idles meanwhile. Here each step's
    tokens go to pinned host memory by a non-blocking copy and an event marks when they are there; put() hands back
    the tokens of `lag` steps before, whose copy has long ended, while the step after them is already queued. The
    price: the loop learns that every sequence has ended `lag` steps late and queues that many steps for nothing. On
    a CPU there is nothing to overlap: put() hands back the tokens of its own step."""

    def __init__(self, device, batch, lag=None):
        cuda = device.type == "cuda"
        self.lag = (1 if cuda else 0) if lag is None else lag  # a lag on a CPU: only to test the bookkeeping
        self.slots = [torch.empty(batch, dtype=torch.long, pin_memory=cuda) for _ in range(self.lag + 1)]
        self.events = [torch.cuda.Event() if cuda else None for _ in range(self.lag + 1)]
        self.pending, self.count = [], 0

    def put(self, token):
        if not self.lag:
            return [token.tolist()]
        n = self.count % (self.lag + 1)
        self.slots[n].copy_(token, non_blocking=True)
        if self.events[n] is not None:
            self.events[n].record()
        self.pending.append(n)
        self.count += 1
        return self.drain(keep=self.lag)

    def drain(self, keep=0):
        ready = []
        while len(self.pending) > keep:
            n = self.pending.pop(0)
            if self.events[n] is not None:
                self.events[n].synchronize()
            ready.append(self.slots[n].tolist())
        return ready


def trim_at_stop(ids, stop_strings, tokenizer):
    """Drop the tokens from the one where a stop string begins onwards: a stop string may take several tokens
    ("###" as "##" "#"), and none of it belongs to the reply."""
    if not stop_strings:
        return ids
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n])
        begins = min((text.index(s) for s in stop_strings if s in text), default=None)
        if begins is not None:
            keep = n - 1
            while keep > 0 and len(tokenizer.decode(ids[:keep])) > begins:
                keep -= 1
            return ids[:keep]
    return ids


# ----------------------------------------------------------------------------------------------------------------------
# Decoders: the LLM over a KV cache, in the two steps the loop needs


def positions(mask):
    """Position ids from the attention mask: each row counts its own tokens, so left padding shifts nothing."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


class Decoder:
    """What generate() drives: prefill(embeds, mask, length) runs the prompts and returns the next-token logits (B, V)
    of their last position (`length`: prompt and new tokens, what the cache must hold); step(token) appends one token
    per sequence and returns the next logits. This one keeps the KV cache in transformers' DynamicCache, which grows a
    column per step: any shapes, eager."""

    def __init__(self, model):
        self.llm = model.language_model
        # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name warns, and goes in 5.40);
        # 5.17 to 5.23, which requirements.txt allows, know only the old name and would silently ignore `cache`.
        names = inspect.signature(self.llm.base_model.forward).parameters
        self.cache_name = "cache" if "cache" in names else "past_key_values"

    def prefill(self, embeds, mask, length):
        self.mask, self.cache, self.position = mask, DynamicCache(config=self.llm.config), positions(mask)[:, -1:]
        return self.logits(embeds, mask, positions(mask))

    def step(self, token):
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(token), 1))], dim=1)
        self.position = self.position + 1
        return self.logits(self.llm.get_input_embeddings()(token[:, None]), self.mask, self.position)

    def logits(self, embeds, mask, position_ids, cache=None):
        """`embeds` appended to what the cache holds -> the next-token logits of the last position."""
        out = self.llm.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=True,
                                  **{self.cache_name: self.cache if cache is None else cache})
        return self.llm.get_output_embeddings()(out.last_hidden_state[:, -1])


class StaticDecoder(Decoder):
    """--compile: one StaticCache for the model, allocated once, and a decoding step compiled once for it. Every step
    then has the same shapes whatever the prompts, so one compiled step (one CUDA graph on a GPU) serves every call:
    build one StaticDecoder and pass it to every generate() call, every turn of a chat, every batch of an evaluation.

    - The cache holds `batch` rows of `length` positions (None: the smallest power of two from 256 that the first
      call needs, up to the LLM's context). A call needing more grows it, never shrinks it: the one thing that
      compiles the step again, at most once per doubling. A smaller batch runs in the first rows; the other rows idle.
    - The prompts go through the LLM eagerly over a DynamicCache of their own length (prompts come in all lengths,
      and the prefill is one big matmul per weight, little launch overhead to save), and their keys and values are
      then copied into the static cache; the cache is reset in place, its tensors keep their addresses (a CUDA graph
      holds them). Positions past the filled ones keep stale values, never attended: the mask covers them.
    - The step itself updates, on the device, the attention mask (the column the cache writes to next, transformers'
      own on-device counter `cumulative_length`) and the position ids: the host passes in the token and nothing else.

    compile: True for torch.compile(mode="reduce-overhead") (inductor; CUDA graphs on a GPU), False to run the same
    step eagerly, or a torch.compile backend (the tests count compilations with a counting backend)."""

    MIN_LENGTH = 256

    def __init__(self, model, compile=True, batch=1, length=None):
        super().__init__(model)
        self.batch, self.length, self.cache, self.rows = batch, length, None, 0
        self.one_token = self.token_logits
        if compile is True:  # mode="reduce-overhead": CUDA graphs on a GPU, the whole step replayed as one launch
            self.one_token = torch.compile(self.token_logits, mode="reduce-overhead", dynamic=False)
        elif compile:
            self.one_token = torch.compile(self.token_logits, backend=compile, dynamic=False)

    def prefill(self, embeds, mask, length):
        batch, width = mask.shape
        prompt = DynamicCache(config=self.llm.config)
        logits = self.logits(embeds, mask, positions(mask), cache=prompt)
        if self.cache is None or batch > self.batch or length > self.length:
            self.allocate(max(batch, self.batch), length, prompt)
        for static, layer in zip(self.cache.layers, prompt.layers):
            static.keys[:batch, :, :width].copy_(layer.keys)
            static.values[:batch, :, :width].copy_(layer.values)
            static.cumulative_length.fill_(width)  # where the next token's keys go: the same column for every row
        self.mask.zero_()
        self.mask[:batch, :width] = mask.bool()
        self.mask[batch:, 0] = True  # idle rows attend to one (stale) position: a row that attends to none is NaN
        self.position.zero_()
        self.position[:batch] = positions(mask)[:, -1:]
        self.rows = batch
        return logits

    def allocate(self, batch, length, prompt):
        """A cache of `batch` rows and, unless a length was given, the next power of two >= `length` positions (at
        most the LLM's context); the mask and position ids the step updates in place."""
        context = self.llm.config.max_position_embeddings
        if self.length is None or length > self.length:
            length = min(max(self.MIN_LENGTH, 1 << (length - 1).bit_length()), context)
        else:
            length = self.length
        cache = StaticCache(config=self.llm.config, max_cache_len=length)
        for static, layer in zip(cache.layers, prompt.layers):
            if type(static) is not StaticLayer:  # e.g. a sliding-window layer: its own bookkeeping, not this one's
                raise UserError(f"--compile supports LLMs whose layers all attend to the whole context; this one has "
                                f"{type(static).__name__} layers; decode without --compile")
            static.lazy_initialization(layer.keys[:1].expand(batch, -1, -1, -1), layer.values[:1].expand(batch, -1,
                                                                                                        -1, -1))
        device = prompt.layers[0].keys.device
        self.cache, self.batch, self.length = cache, batch, length
        self.mask = torch.zeros((batch, length), dtype=torch.bool, device=device)
        self.position = torch.zeros((batch, 1), dtype=torch.long, device=device)
        torch._dynamo.mark_static_address(self.mask)  # mutated by the step: a CUDA graph needs them at fixed
        torch._dynamo.mark_static_address(self.position)  # addresses, as the cache's own tensors are

    def step(self, token):
        if self.rows < self.batch:
            token = torch.cat([token, token.new_zeros(self.batch - self.rows)])
        # clone: a CUDA graph writes its output into the same memory at every replay
        return self.one_token(token[:, None])[:self.rows].clone()

    def token_logits(self, token):
        """The compiled step: one token per row -> the next logits, with the mask and positions moved on in place."""
        self.mask.index_fill_(1, self.cache.layers[0].cumulative_length.view(1), True)
        self.position.add_(1)
        return self.logits(self.llm.get_input_embeddings()(token), self.mask, self.position)


# ----------------------------------------------------------------------------------------------------------------------
# Conversations in, text out


def stop_strings_for(template):
    """The plain (stage 1) template ends a caption with "\\n" and no EOS; the first paper's llava_v0 ends a reply with
    its "###" separator and no EOS (LLaVA's v0 stopping criterion); the chat templates end turns with EOS."""
    return {"plain": ("\n",), "llava_v0": (V0_SEPARATOR,)}.get(template, ())


def answer(model, fmt, conversations, pixel_values=None, **kwargs):
    """The next assistant reply for each conversation ([{"role", "content"}, ...] ending with the user's turn, with
    `<image>` where its images go); images of all conversations in order. Text as LLaVA decodes it: only the new tokens,
    special tokens skipped, stripped."""
    tokenizer = fmt.tokenizer
    prompts = [fmt.prompt(c) for c in conversations]
    config_eos = getattr(model.language_model.generation_config, "eos_token_id", None)
    eos = {tokenizer.eos_token_id, *(config_eos if isinstance(config_eos, list) else [config_eos])} - {None}
    kwargs = {"eos_ids": eos, "pad_id": fmt.pad_id, "stop_strings": stop_strings_for(fmt.template),
              "tokenizer": tokenizer, "instructions": [i for c in conversations for i in fmt.instructions(c)],
              **kwargs}
    outputs = generate(model, prompts, pixel_values, **kwargs)
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outputs]


def first_turn(question, n_images):
    """LLaVA's CLI: the image goes first in the user's turn, as "<image>\\n" (moved there if the text has the tag)."""
    question = question.strip()
    if not question:
        raise ValueError("an empty prompt: ask something")
    if n_images and IMAGE_TOKEN not in question:
        question = (IMAGE_TOKEN + "\n") * n_images + question
    return question


# ----------------------------------------------------------------------------------------------------------------------
# Command line: flag types and errors shared by generate.py, evaluate.py and tools/convert.py

# What a command line reports in one line instead of a traceback: what the user got wrong (UserError), and the errors
# of the files, folders and hub repos they named (OSError, the hub's HTTP errors among them; HFValidationError, a
# malformed repo id).
USER_ERRORS = (UserError, OSError, HFValidationError)


def exit_with(error):
    """How a command line stops on bad input: `error: ...` on stderr, exit status 2 (argparse's), no traceback."""
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2)


def flag_type(convert, ok, wanted):
    """An argparse type: convert(text), refused unless ok(value), in argparse's words ("argument --top-k: must be a
    positive integer, got '0'", exit status 2)."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value
    return parse


positive_int = flag_type(int, lambda v: v >= 1, "a positive integer")
non_negative_int = flag_type(int, lambda v: v >= 0, "an integer >= 0")
non_negative_float = flag_type(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
probability = flag_type(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
seed = flag_type(int, lambda v: 0 <= v < 2**63, "an integer from 0 to 2**63 - 1")  # what torch.Generator takes


def check_image(path, where):
    """Read an image the user named now, so that a wrong path is said before the model loads (or, in the chat, when
    the command is given), not at the next question. `where` names the flag or command. The file is read as the
    model will read it, by data.load_image (which refuses formats whose decoders run other programs)."""
    if not os.path.isfile(path):
        raise UserError(f"{where} {path}: no such file; check the path")
    load_image(path, where)


COMMANDS = "commands: /image PATH, /reset, /quit"


def about(images):
    return f" about {images[0]}" if images else ""


def chat(model, fmt, processor, decoder, args):
    """A multi-turn conversation on stdin/stdout, streaming each reply as it is generated. A line starting with "/" is
    a command; "//" sends a message that starts with "/"."""
    images, messages = [args.image] if args.image else [], []
    print("Chat with the model. /image PATH starts over with another image, /reset forgets, /quit ends; a message "
          "starting with / is typed //.", flush=True)
    while True:
        try:
            line = input("USER: ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt ends the chat
            print(flush=True)
            break
        if not line:
            continue
        if line.startswith("/") and not line.startswith("//"):
            name, _, path = line.partition(" ")
            path = path.strip()
            if name in ("/quit", "/exit"):
                break
            if name == "/image" and path:
                try:
                    check_image(path, "/image")
                except UserError as e:  # the conversation goes on as it was
                    print(f"error: {e} (the conversation goes on{about(images)})", flush=True)
                    continue
                images = [path]
            elif name != "/reset":
                problem = "/image needs a PATH" if name == "/image" else f"unknown command {name}"
                print(f"{problem}; {COMMANDS} (type // to send a message starting with /)", flush=True)
                continue
            messages = []
            print(f"(new conversation{about(images)})", flush=True)
            continue
        line = line[1:] if line.startswith("//") else line
        pixel_values = prepare_images(images, processor, model.config.image_aspect_ratio)
        messages.append({"role": "user", "content": first_turn(line, len(images)) if not messages else line})
        print("ASSISTANT: ", end="", flush=True)
        shown = [""]
        new_ids = []

        def stream(_, token):
            new_ids.append(token)
            text = fmt.tokenizer.decode(new_ids, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                print(text[len(shown[0]):], end="", flush=True)
                shown[0] = text

        try:
            reply = answer(model, fmt, [messages], pixel_values, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                           on_token=stream, decoder=decoder)[0]
        except ValueError as e:  # the conversation has outgrown the LLM's context: say so, keep the chat
            messages.pop()
            print(f"\nerror: {e}; or /reset to start over", flush=True)
            continue
        print(flush=True)
        messages.append({"role": "assistant", "content": reply})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="the question (omit with --chat)")
    p.add_argument("--model", required=True, help="a checkpoint directory of pretrain.py or finetune.py")
    p.add_argument("--image", help="an image file")
    p.add_argument("--chat", action="store_true", help="hold a multi-turn conversation")
    p.add_argument("--temperature", type=non_negative_float, default=0.2, help="0 = greedy")
    p.add_argument("--top-p", type=probability, default=None)
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--max-new-tokens", type=positive_int, default=512)
    p.add_argument("--seed", type=seed, default=None)
    p.add_argument("--compile", action="store_true",
                   help="static KV cache + torch.compile of the decoding step (CUDA graphs on a GPU): slow to start, "
                        "fast per token")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, bfloat16 on GPU")
    args = p.parse_args(argv)
    if args.chat and args.prompt is not None:
        p.error("--chat reads its questions from the terminal: drop the question, or drop --chat")
    if not args.chat and not (args.prompt or "").strip():
        p.error("an empty prompt: pass a question, or --chat")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    try:
        if args.image:
            check_image(args.image, "--image")  # before the model loads, which takes a while
        model, fmt, processor = load(args.model, dtype, device)
        # a chat's conversation grows turn by turn: its cache holds the whole context from the start, so that the
        # step compiles once for the whole chat
        length = model.language_model.config.max_position_embeddings if args.chat else None
        decoder = StaticDecoder(model, length=length) if args.compile else Decoder(model)
        if args.chat:
            return chat(model, fmt, processor, decoder, args)
        pixel_values = prepare_images([args.image] if args.image else [], processor, model.config.image_aspect_ratio)
        messages = [{"role": "user", "content": first_turn(args.prompt, 0 if pixel_values is None else 1)}]
        print(answer(model, fmt, [messages], pixel_values, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                     decoder=decoder)[0])
    except (*USER_ERRORS, ValueError) as e:  # ValueError: a prompt longer than the LLM's context
        exit_with(e)


if __name__ == "__main__":
    main()
