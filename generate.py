"""How it answers: greedy and sampled generation over a KV cache, batched, and a streaming chat CLI.

    python generate.py --model runs/toy/finetune --image runs/toy/world/images/00000.png "What shape is on the left?"
    python generate.py --model runs/toy/finetune --image photo.jpg --chat      # multi-turn; /image PATH, /reset, /quit
    python generate.py --model DIR --image photo.jpg --compile "Describe it."  # static KV cache + torch.compile

generate() is one loop: a prefill runs the prompts (left-padded, image features spliced in) through the LLM and fills
its KV cache, then each step feeds one new token per sequence. A decoder does those two: Decoder over transformers'
DynamicCache, which grows a column per step; or, with --compile, StaticDecoder over a StaticCache preallocated for the
whole answer, so that every step has the same shapes and one compiled step serves them all (gpt-fast's recipe for
GPUs). Greedy when temperature is 0, else temperature, top-k and top-p sampling from a seeded generator. Each sequence
stops at EOS or at a stop string on its own. Prompts come from data.ChatFormat, the code that builds training samples,
so the generation prompt is exactly the training prefix (it ends with "ASSISTANT:" for vicuna_v1). LLaVA's defaults
(llava/serve/cli.py and llava/eval/run_llava.py in haotian-liu/LLaVA): temperature 0.2, 512 new tokens; benchmarks use
greedy.
"""

import argparse
import inspect
import math
import os
import sys

import torch
from huggingface_hub.errors import HFValidationError
from transformers import DynamicCache, StaticCache

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
    local = path if os.path.isdir(path) else resolve(path, weights=False)
    return model, model.chat_format(tokenizer, load_instruction_tokenizer(model.config, local)), processor


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
    called for every new token of sequence i (streaming). decoder: Decoder(model) unless given, e.g. a StaticDecoder(model)
    (--compile) built once for many calls.
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
    # Left padding: every prompt ends at the last column, so each step appends one column for all of them.
    ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((batch, width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, device=device)
        mask[i, width - len(p):] = 1
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None and temperature > 0 else None
    eos_ids = set(eos_ids)
    decoder = Decoder(model) if decoder is None else decoder

    image_inputs = {k: v if v is None else v.to(device) for k, v in pad_instructions(list(instructions)).items()}
    logits = decoder.prefill(model.embed(ids, pixel_values, **image_inputs), mask, width + max_new_tokens)
    new, finished = [[] for _ in range(batch)], [False] * batch
    for step in range(max_new_tokens):
        token = next_tokens(logits, temperature, top_k, top_p, generator)
        for i, t in enumerate(token.tolist()):
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
        if all(finished) or step == max_new_tokens - 1:
            break
        logits = decoder.step(token.masked_fill(torch.tensor(finished, device=device), pad_id))  # finished rows idle
    return [trim_at_stop(seq, stop_strings, tokenizer) for seq in new]


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
        self.mask, self.cache = mask, DynamicCache(config=self.llm.config)
        return self.logits(embeds, mask, positions(mask))

    def step(self, token):
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(token), 1))], dim=1)
        return self.logits(self.llm.get_input_embeddings()(token[:, None]), self.mask, positions(self.mask)[:, -1:])

    def logits(self, embeds, mask, position_ids):
        """`embeds` appended to what the cache holds -> the next-token logits of the last position."""
        out = self.llm.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=True,
                                  **{self.cache_name: self.cache})
        return self.llm.get_output_embeddings()(out.last_hidden_state[:, -1])


class StaticDecoder(Decoder):
    """--compile: a StaticCache preallocated for the whole answer and an attention mask as long, unfilled columns
    masked, so every step has the same shapes and one compiled step serves them all. Build one and pass it to every
    generate() call: the compiled step, and the cache while the batch and length stay, are kept from call to call.
    compile=False runs the same step eagerly (the CPU tests: compiling costs a minute there)."""

    def __init__(self, model, compile=True):
        super().__init__(model)
        self.cache, self.shape, self.one_token = None, None, self.token_logits
        if compile:  # mode="reduce-overhead": CUDA graphs on a GPU, the whole step replayed as one launch
            self.one_token = torch.compile(self.token_logits, mode="reduce-overhead", dynamic=False)

    def prefill(self, embeds, mask, length):
        batch, width = mask.shape
        length = -(-length // 128) * 128  # rounded up: prompts of similar length share one cache and compiled step
        if self.shape == (batch, length):
            self.cache.reset()  # in place: a CUDA graph holds the addresses of its tensors
        else:
            self.cache, self.shape = StaticCache(config=self.llm.config, max_cache_len=length), (batch, length)
        self.mask = mask.new_zeros((batch, length))
        self.mask[:, :width] = mask
        self.column, prompt_positions = width, positions(mask)
        self.position = prompt_positions[:, -1:]
        return self.logits(embeds, self.mask, prompt_positions)  # eager: prompts come in all lengths

    def step(self, token):
        self.mask[:, self.column] = 1
        self.column, self.position = self.column + 1, self.position + 1
        # clone: a CUDA graph writes its output into the same memory at every replay
        return self.one_token(token[:, None], self.position, self.mask).clone()

    def token_logits(self, token, position_ids, mask):
        return self.logits(self.llm.get_input_embeddings()(token), mask, position_ids)


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
        decoder = StaticDecoder(model) if args.compile else Decoder(model)
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
