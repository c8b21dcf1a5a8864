"""The toy world: pictures of coloured shapes, their captions and conversations, and tiny backbones to learn them.

    python tools/toy_world.py                 # writes runs/toy/world (what the `toy` presets read)

Files, in LLaVA's formats:
- images/NNNN.png: 1-3 shapes (circle, square, triangle) of several colours and sizes at several positions;
- captions.json: stage-1 data, one brief caption per image ("a red circle on the left and a blue square");
- conversations.json: stage-2 data, multi-turn conversations about colour, shape, count, position, existence (yes/no)
  and a short description, plus some text-only samples;
- vision/ and llm/: a tiny CLIP vision tower (+ image processor) and a tiny Llama (+ tokenizer), ordinary
  transformers directories built from configs (tools/tiny.py). They start untrained.
"""

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 40),
          "purple": (140, 60, 190), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"on the left": (0.25, 0.5), "on the right": (0.75, 0.5), "at the top": (0.5, 0.22),
             "at the bottom": (0.5, 0.78), "in the middle": (0.5, 0.5)}
CAPTION_PROMPTS = ("Describe the image briefly.", "What is in the picture?", "Give a short caption.",
                   "Summarize the image.")
NUMBERS = ("zero", "one", "two", "three")


def draw_scene(objects, size=64):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for obj in objects:
        cx, cy = (v * size for v in POSITIONS[obj["position"]])
        r = obj["size"] * size
        box = (cx - r, cy - r, cx + r, cy + r)
        if obj["shape"] == "circle":
            draw.ellipse(box, fill=COLORS[obj["color"]])
        elif obj["shape"] == "square":
            draw.rectangle(box, fill=COLORS[obj["color"]])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[obj["color"]])
    return image


def random_scene(rng):
    positions = rng.sample(list(POSITIONS), rng.randint(1, 3))
    return [{"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)), "position": p,
             "size": rng.choice((0.1, 0.14))} for p in positions]


def describe(objects):
    parts = [f"a {o['color']} {o['shape']} {o['position']}" for o in objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def conversation(objects, rng):
    """Two or three question-answer turns about the scene; the first turn carries the image."""
    first = objects[0]
    absent_shape = rng.choice([s for s in SHAPES if all(o["shape"] != s for o in objects)] or list(SHAPES))
    present = rng.random() < 0.5
    asked = first["shape"] if present else absent_shape
    pool = [
        (f"What color is the {first['shape']} {first['position']}?", f"{first['color'].capitalize()}."),
        (f"What shape is {first['position']}?", f"A {first['shape']}."),
        ("How many shapes are there?", f"{NUMBERS[len(objects)].capitalize()}."),
        (f"Where is the {first['color']} {first['shape']}?", f"It is {first['position']}."),
        (f"Is there a {asked}?", "Yes." if any(o["shape"] == asked for o in objects) else "No."),
        ("Describe the image.", f"The image shows {describe(objects)}."),
    ]
    turns = []
    for i, (question, answer) in enumerate(rng.sample(pool, rng.randint(2, 3))):
        turns.append({"from": "human", "value": f"<image>\n{question}" if i == 0 else question})
        turns.append({"from": "gpt", "value": answer})
    return turns


TEXT_ONLY = [("What colors can shapes have?", "Red, green, blue, yellow, purple or orange."),
             ("Name three shapes.", "A circle, a square and a triangle."),
             ("What comes after two?", "Three.")]


def build_world(root, n_images=400, seed=0):
    """Write the world into `root`; returns {"root", "vision", "llm"}."""
    from data import VICUNA_SYSTEM
    from tools.tiny import llama_tokenizer, save_tiny_backbones, tiny_clip_vision_config

    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    captions, conversations = [], []
    for i in range(n_images):
        objects = random_scene(rng)
        name = f"{i:04d}.png"
        draw_scene(objects).save(os.path.join(root, "images", name))
        prompt = rng.choice(CAPTION_PROMPTS)
        captions.append({"id": f"cap{i}", "image": name, "conversations": [
            {"from": "human", "value": f"{prompt}\n<image>" if rng.random() < 0.5 else f"<image>\n{prompt}"},
            {"from": "gpt", "value": describe(objects)}]})
        conversations.append({"id": f"conv{i}", "image": name, "conversations": conversation(objects, rng)})
    for i in range(max(1, n_images // 10)):
        question, answer = TEXT_ONLY[i % len(TEXT_ONLY)]
        conversations.append({"id": f"text{i}", "conversations": [{"from": "human", "value": question},
                                                                   {"from": "gpt", "value": answer}]})
    for name, data in (("captions.json", captions), ("conversations.json", conversations)):
        with open(os.path.join(root, name), "w") as f:
            json.dump(data, f, indent=1)
    texts = [VICUNA_SYSTEM] + [t["value"] for s in captions + conversations for t in s["conversations"]]
    vision, llm = save_tiny_backbones(root, tiny_clip_vision_config(image_size=32, patch_size=8),
                                      tokenizer=llama_tokenizer(corpus=texts), seed=seed)
    return {"root": root, "vision": vision, "llm": llm}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/toy/world")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    build_world(args.out, args.images, args.seed)
    print(f"toy world written to {args.out}")


if __name__ == "__main__":
    main()
