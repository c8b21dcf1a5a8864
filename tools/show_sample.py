"""Show what the model is taught: a sample's prompt and tokens, with the supervised ones highlighted.

    python tools/show_sample.py                      # a built-in toy sample, tiny tokenizer and image processor
    python tools/show_sample.py --data llava_v1_5_mix665k.json --image-folder playground/data \\
        --tokenizer lmsys/vicuna-7b-v1.5 --vision-tower openai/clip-vit-large-patch14-336 --index 0 3 17

Supervised tokens (the ones the loss sees) print in green and between [[ ]]; a run of image placeholders prints as
<image x N>, N read from the vision tower's config as model.py counts it ((image_size // patch_size)^2 patches, 576
for CLIP-L/14-336), or --image-tokens N. Use it to check a custom data file and template before training: the green
text must be exactly the replies and their end token.
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, TEMPLATES, ChatFormat, LazySupervisedDataset,  # noqa: E402
                  UserError, load_image_processor, load_tokenizer)

TOY_SAMPLE = {"id": "toy-0", "image": "toy.png", "conversations": [
    {"from": "human", "value": "What is in the image?\n<image>"}, {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "Is there a triangle?"}, {"from": "gpt", "value": "No, there is not."}]}


def toy_inputs(folder):
    """A one-sample data file with its image, and tiny backbones (tools/tiny.py) to read it with."""
    from PIL import Image, ImageDraw

    from tools.tiny import llama_tokenizer, save_tiny_backbones

    image = Image.new("RGB", (48, 32), "white")
    ImageDraw.Draw(image).ellipse((14, 6, 34, 26), fill="red")
    image.save(os.path.join(folder, "toy.png"))
    with open(os.path.join(folder, "toy.json"), "w") as f:
        json.dump([TOY_SAMPLE], f)
    vision_dir, llm_dir = save_tiny_backbones(folder, tokenizer=llama_tokenizer())
    return os.path.join(folder, "toy.json"), folder, llm_dir, vision_dir


def image_tokens_of(vision_tower):
    """Placeholders per image for a CLIP-like tower: one per patch, as LlavaModel.num_image_tokens counts them with
    its default vision_feature_select="patch" (the CLS token dropped). Only config.json is read (or fetched from the
    hub), never the weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(vision_tower, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"--vision-tower {vision_tower}: cannot read its config.json ({e}); give a vision tower's "
                        "directory or hub id, or pass --image-tokens") from None
    config = getattr(config, "vision_config", config)  # a full CLIP checkpoint: its vision half
    size, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if not (isinstance(size, int) and isinstance(patch, int) and 0 < patch <= size):
        raise UserError(f"--vision-tower {vision_tower}: its config has no usable image_size and patch_size to count "
                        "patches from; pass --image-tokens")
    return (size // patch) ** 2


def show(tokenizer, ids, labels, color):
    green, reset = ("\033[32m", "\033[0m") if color else ("", "")
    out, i = [], 0
    while i < len(ids):
        if ids[i] == IMAGE_TOKEN_INDEX:
            j = i
            while j < len(ids) and ids[j] == IMAGE_TOKEN_INDEX:
                j += 1
            out.append(f"<image x {j - i}>")
            i = j
            continue
        piece = repr(tokenizer.convert_ids_to_tokens(ids[i]))[1:-1]
        out.append(f"{green}[[{piece}]]{reset}" if labels[i] != IGNORE_INDEX else piece)
        i += 1
    return " ".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="LLaVA data file (.json list or .jsonl); default: a built-in toy sample")
    p.add_argument("--image-folder", default=None)
    p.add_argument("--tokenizer", help="the LLM's directory or hub id")
    p.add_argument("--vision-tower", help="the vision tower's directory or hub id (for its image processor)")
    p.add_argument("--template", default="vicuna_v1", choices=TEMPLATES)
    p.add_argument("--image-aspect-ratio", default="pad", choices=["pad", "crop"])
    p.add_argument("--image-tokens", type=int, default=None, help="placeholders per image (default: the vision "
                   "tower's patch count, 576 for CLIP-L/14-336; 576 without --vision-tower)")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--index", type=int, nargs="+", default=[0])
    p.add_argument("--no-color", action="store_true")
    args = p.parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(args):
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            args.data, args.image_folder, args.tokenizer, args.vision_tower = toy_inputs(tmp)
        if args.tokenizer is None:
            raise UserError("--tokenizer: needed with --data (the LLM's directory or hub id)")
        if args.image_tokens is None:
            args.image_tokens = image_tokens_of(args.vision_tower) if args.vision_tower else 576
        tokenizer = load_tokenizer(args.tokenizer)
        processor = load_image_processor(args.vision_tower) if args.vision_tower else None
        fmt = ChatFormat(tokenizer, args.template, args.image_tokens)
        dataset = LazySupervisedDataset(args.data, args.image_folder, fmt, processor, args.image_aspect_ratio,
                                        args.max_length)
        outside = [i for i in args.index if not 0 <= i < len(dataset)]
        if outside:
            raise UserError(f"--index {outside[0]}: {args.data} has samples 0 to {len(dataset) - 1}")
        for i in args.index:
            sample = dataset[i]
            ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
            images = sample["pixel_values"]
            print(f"--- {dataset.where(i)}: {len(ids)} tokens, {sum(x != IGNORE_INDEX for x in labels)} supervised, "
                  f"images {tuple(images.shape) if images is not None else 'none'}")
            print(show(tokenizer, ids, labels, color=not args.no_color and sys.stdout.isatty()))


if __name__ == "__main__":
    main()
