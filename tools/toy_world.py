"""The toy world: the whole LLaVA recipe in miniature, from nothing, in a few minutes on a laptop CPU.

    python tools/toy_world.py                  # everything below, into runs/toy
    python tools/toy_world.py --world-only     # just the data and the pretrained backbones (what the presets read)

1. A synthetic visual world drawn with pillow: 1-3 coloured shapes (circle, square, triangle; six colours; two sizes;
   four positions) per picture; a caption for each (stage-1 data); multi-turn LLaVA-style conversations about colour,
   shape, count, position, existence and a description (stage-2 data, plus a few text-only samples); held-out test
   pictures with questions in LLaVA's evaluation format (short answer, multiple choice, yes/no).
2. "Pretrained" backbones, as the real recipe assumes them: a tokenizer trained on the world's text; a tiny CLIP
   (transformers' CLIPModel) trained contrastively on picture-caption pairs; a tiny Llama trained on the text alone.
   Both are saved as ordinary transformers directories and loaded by model.py like real ones.
3. Stage 1 (pretrain.py --preset toy) and stage 2 (finetune.py --preset toy): the code paths of the 7B recipe.
4. evaluate.py on the held-out questions for the finished model, the same model shown a blank picture (the blind
   baseline) and the model after stage 1 only; generate.py answers one question. A table of accuracy per question
   type, and both stages' loss curves in one PNG (tools/plot_loss.py), OUT/loss.png.
"""

import argparse
import json
import os
import random
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model import quiet_transformers  # noqa: E402

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 40),
          "purple": (140, 60, 190), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")
# 48-pixel pictures seen as a 3 x 3 grid of 16-pixel patches: each position is the centre of a cell and every shape
# fits inside its cell, so one patch token sees one whole shape (shapes cut across patches were hard to read).
POSITIONS = {"on the left": (1 / 6, 0.5), "on the right": (5 / 6, 0.5), "at the top": (0.5, 1 / 6),
             "at the bottom": (0.5, 5 / 6)}
WHERE = {"on the left": "left", "on the right": "right", "at the top": "top", "at the bottom": "bottom"}
CAPTION_PROMPTS = ("Describe the image briefly.", "What is in the picture?", "Give a short caption.",
                   "Summarize the image.")
NUMBERS = ("zero", "one", "two", "three")
SHORT = "\nAnswer the question using a single word or phrase."
CHOICE = "\nAnswer with the option's letter from the given choices directly."
SIZE = 48


# ----------------------------------------------------------------------------------------------------------------------
# 1. The world


def draw_scene(objects):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), "white")
    draw = ImageDraw.Draw(image)
    for obj in objects:
        cx, cy = (v * SIZE for v in POSITIONS[obj["position"]])
        r = obj["size"] * SIZE
        box = (cx - r, cy - r, cx + r, cy + r)
        if obj["shape"] == "circle":
            draw.ellipse(box, fill=COLORS[obj["color"]])
        elif obj["shape"] == "square":
            draw.rectangle(box, fill=COLORS[obj["color"]])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[obj["color"]])
    return image


def random_scene(rng):
    return [{"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)), "position": p,
             "size": rng.choice((0.10, 0.145))} for p in rng.sample(list(POSITIONS), rng.randint(1, 3))]


def describe(objects):
    parts = [f"a {o['color']} {o['shape']} {o['position']}" for o in objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def questions(objects, rng):
    """(type, question, short answer, long answer) about a scene, one of each type."""
    obj = rng.choice(objects)
    asked = rng.choice(SHAPES)
    present = any(o["shape"] == asked for o in objects)
    options = rng.sample([c for c in COLORS if c != obj["color"]], 2) + [obj["color"]]
    rng.shuffle(options)
    letter = "ABC"[options.index(obj["color"])]
    choice_text = f"What color is the shape {obj['position']}?\n" + "\n".join(
        f"{'ABC'[i]}. {c}" for i, c in enumerate(options))
    return [
        ("color", f"What color is the shape {obj['position']}?", obj["color"].capitalize(),
         f"The shape {obj['position']} is {obj['color']}."),
        ("shape", f"What shape is {obj['position']}?", obj["shape"].capitalize(),
         f"It is a {obj['color']} {obj['shape']}."),
        ("count", "How many shapes are there?", str(len(objects)),
         f"There {'is' if len(objects) == 1 else 'are'} {NUMBERS[len(objects)]} shape{'s' * (len(objects) > 1)}."),
        ("position", f"Where is the {obj['color']} {obj['shape']}?", WHERE[obj["position"]].capitalize(),
         f"It is {obj['position']}."),
        ("yes/no", f"Is there a {asked} in the image?", "Yes" if present else "No",
         f"{'Yes' if present else 'No'}, there is {'a' if present else 'no'} {asked}."),
        ("choice", choice_text, letter, None),
    ]


def conversation(objects, rng):
    """2-4 turns mixing LLaVA-1.5's short-answer / multiple-choice formats with free answers and a description."""
    pool = []
    for kind, question, short, long in questions(objects, rng):
        if kind == "choice":
            pool.append((question + CHOICE, short))
        elif rng.random() < 0.6:
            pool.append((question + SHORT, short))
        else:
            pool.append((question, long))
    pool.append(("Describe the image.", f"The image shows {describe(objects)}."))
    turns = []
    for i, (question, answer) in enumerate(rng.sample(pool, rng.randint(2, 4))):
        turns += [{"from": "human", "value": f"<image>\n{question}" if i == 0 else question},
                  {"from": "gpt", "value": answer}]
    return turns


TEXT_ONLY = [("What colors can shapes have?", "Red, green, blue, yellow, purple or orange."),
             ("Name three shapes.", "A circle, a square and a triangle."), ("What comes after two?", "Three.")]


def build_data(root, n_images, n_test, rng):
    from PIL import Image

    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    captions, conversations, tests = [], [], []
    for i in range(n_images + n_test):
        objects = random_scene(rng)
        name = f"{i:05d}.png"
        draw_scene(objects).save(os.path.join(root, "images", name))
        if i >= n_images:  # held out: questions in LLaVA's evaluation format
            for kind, question, short, _ in questions(objects, rng):
                tests.append({"question_id": f"{i}-{kind}", "image": name, "category": kind,
                              "text": question + (CHOICE if kind == "choice" else SHORT), "answer": short})
            continue
        prompt = rng.choice(CAPTION_PROMPTS)
        captions.append({"id": f"cap{i}", "image": name, "conversations": [
            {"from": "human", "value": f"{prompt}\n<image>" if rng.random() < 0.5 else f"<image>\n{prompt}"},
            {"from": "gpt", "value": describe(objects)}]})
        conversations.append({"id": f"conv{i}", "image": name, "conversations": conversation(objects, rng)})
    for i in range(max(1, n_images // 20)):
        question, answer = TEXT_ONLY[i % len(TEXT_ONLY)]
        conversations.append({"id": f"text{i}", "conversations": [{"from": "human", "value": question},
                                                                   {"from": "gpt", "value": answer}]})
    Image.new("RGB", (SIZE, SIZE), "white").save(os.path.join(root, "images", "blank.png"))
    for name, data in (("captions.json", captions), ("conversations.json", conversations)):
        with open(os.path.join(root, name), "w") as f:
            json.dump(data, f, indent=1)
    with open(os.path.join(root, "test.jsonl"), "w") as f:
        f.writelines(json.dumps(t) + "\n" for t in tests)
    return captions, conversations


# ----------------------------------------------------------------------------------------------------------------------
# 2. Pretrained backbones


class FakeTokenizer:
    eos_token = "</s>"  # what the Llama-style tokenizer below will call its end token


def train_tokenizer(texts):
    from tools.tiny import llama_tokenizer

    words = set(" ".join(texts).replace("\n", " ").split())
    return llama_tokenizer(vocab_size=300 + 4 * len(words), corpus=texts)


def fit(model, steps, lr, lr_scale, batch_loss, name):
    """A plain AdamW loop for the backbones' pretraining: lr * lr_scale(step), batch_loss(step) the step's loss;
    returns the last loss. A progress bar named `name` shows the loss: this is the quiet minute before stage 1."""
    from tqdm import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc=name)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_scale(step)
        loss = batch_loss(step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()


def pretrain_clip(root, captions, tokenizer, steps, batch=64, lr=2e-3, seed=0):
    """A tiny CLIP trained contrastively on picture-caption pairs; its vision tower is what LLaVA will see with."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from data import load_image

    torch.manual_seed(seed)
    side = SIZE
    processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    pad = tokenizer.pad_token_id or tokenizer.unk_token_id
    config = CLIPConfig(
        vision_config=dict(image_size=side, patch_size=16, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4),
        # every special token from our tokenizer: CLIPTextConfig's defaults are OpenAI's (bos 49406, eos 49407), far
        # outside this vocabulary
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=pad, pad_token_id=pad),
        projection_dim=64)
    model = CLIPModel(config)
    # Where a patch is must be readable from its features, as it is in a real ViT's; at the default init (std 0.02)
    # the position embeddings are too faint next to the colours for 300 steps to make them so.
    torch.nn.init.normal_(model.vision_model.embeddings.position_embedding.weight, std=1.0)
    pixels = torch.stack([processor(images=load_image(os.path.join(root, "images", c["image"]), c["image"]),
                                    return_tensors="pt")["pixel_values"][0] for c in captions])
    texts = [c["conversations"][1]["value"] for c in captions]
    ids = [tokenizer(t, add_special_tokens=False).input_ids[:63] + [pad] for t in texts]  # pooled at the end marker
    width = max(map(len, ids))
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    g = torch.Generator().manual_seed(seed)

    def batch_loss(step):
        idx = torch.randperm(len(texts), generator=g)[:batch]
        return model(input_ids=input_ids[idx], attention_mask=mask[idx], pixel_values=pixels[idx],
                     return_loss=True).loss

    loss = fit(model, steps, lr, lambda step: min(1.0, (step + 1) / 20), batch_loss, "world: CLIP (contrastive)")
    with quiet_transformers():  # its "Writing model shards" bar
        model.save_pretrained(os.path.join(root, "vision"))
    processor.save_pretrained(os.path.join(root, "vision"))
    return loss


def pretrain_llm(root, texts, tokenizer, steps, batch=32, lr=3e-3, seed=0):
    """A tiny Llama trained as a plain language model on the world's text (no pictures)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=256,
                                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False))
    ids = [tokenizer(t).input_ids[:192] + [tokenizer.eos_token_id] for t in texts]
    g = torch.Generator().manual_seed(seed)

    def batch_loss(step):
        chosen = [ids[i] for i in torch.randperm(len(ids), generator=g)[:batch].tolist()]
        width = max(map(len, chosen))
        x = torch.tensor([c + [0] * (width - len(c)) for c in chosen])
        labels = torch.tensor([c + [-100] * (width - len(c)) for c in chosen])
        return model(input_ids=x, labels=labels).loss

    loss = fit(model, steps, lr, lambda step: min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / steps)), batch_loss,
               "world: LLM (text only)")
    with quiet_transformers():
        model.save_pretrained(os.path.join(root, "llm"))
    tokenizer.save_pretrained(os.path.join(root, "llm"))
    return loss


def write_qformer_data(root, captions, conversations):
    """What the qformer projector needs besides the backbones: its own BERT tokenizer, a WordPiece vocabulary of the
    world's words (as InstructBLIP's Q-Former reads instructions with bert-base-uncased's, not the LLM's), and the
    conversations one turn per sample (conversations_split.json: the same data as LAVIS reads LLaVA-Instruct, so that
    the Q-Former reads every question, not only the first turn's). Neither draws a random number: the LLaVA run's
    world is the same with or without them."""
    from tools.instructblip_data import split_turns
    from tools.tiny import bert_tokenizer

    said = [t["value"].replace("<image>", "") for c in captions + conversations for t in c["conversations"]]
    bert_tokenizer(said, extra=[SHORT, CHOICE]).save_pretrained(os.path.join(root, "qformer_tokenizer"))
    records, _ = split_turns(os.path.join(root, "conversations.json"), skip_bad=False)
    with open(os.path.join(root, "conversations_split.json"), "w") as f:
        json.dump(records.samples, f, indent=1)


def build_world(root, n_images=5000, n_test=100, clip_steps=300, llm_steps=400, seed=0):
    """Data and pretrained backbones in `root`; returns {"root", "vision", "llm"} and prints what it did."""
    from data import render

    rng = random.Random(seed)
    start = time.time()
    captions, conversations = build_data(root, n_images, n_test, rng)
    texts = [c["conversations"][1]["value"] for c in captions]
    # The LLM's "pretraining text" puts each scene's caption where its picture will go: like a real LLM, it arrives
    # knowing how to answer from what it is shown before the question, a skill the image tokens can then reuse.
    describe_scene = {c["image"]: c["conversations"][1]["value"] for c in captions}
    turns = [[{"role": "user" if t["from"] == "human" else "assistant",
               "content": t["value"].replace("<image>", describe_scene.get(c.get("image"), "") + ".")}
              for t in c["conversations"]] for c in conversations]
    # The tokenizer learns from the dialogues as the LLM will read them, system prompt and all, so its merges cover
    # the template too (a tiny vocabulary would otherwise spell the system prompt out in ~120 tokens).
    tokenizer = train_tokenizer(texts + [render("vicuna_v1", t, FakeTokenizer) for t in turns[:500]])
    clip_loss = pretrain_clip(root, captions, tokenizer, clip_steps, seed=seed)
    dialogues = [render("vicuna_v1", t, tokenizer) for t in turns]
    llm_loss = pretrain_llm(root, texts + dialogues, tokenizer, llm_steps, seed=seed)
    write_qformer_data(root, captions, conversations)
    print(f"world: {n_images} training + {n_test} test pictures, tokenizer of {len(tokenizer)}; CLIP contrastive loss "
          f"{clip_loss:.3f}, LLM loss {llm_loss:.3f} ({time.time() - start:.0f} s)", flush=True)
    return {"root": root, "vision": os.path.join(root, "vision"), "llm": os.path.join(root, "llm")}


# ----------------------------------------------------------------------------------------------------------------------
# 4. Evaluation


def accuracy_by_type(test_path, answers_path):
    """Per question type: short answers by GQA's rule (lower-cased, trailing "." stripped), letters by ScienceQA's
    extraction, yes/no by POPE's."""
    import benchmarks

    tests = {t["question_id"]: t for t in benchmarks.read_jsonl(test_path)}
    answers = {a["question_id"]: a["text"] for a in benchmarks.read_jsonl(answers_path)}
    right, total = {}, {}
    for qid, t in tests.items():
        text = answers.get(qid, "")
        if t["category"] == "choice":
            ok = benchmarks.sqa_letter(text) == t["answer"]
        elif t["category"] == "yes/no":
            ok = benchmarks.pope_says_yes(text) == (t["answer"] == "Yes")
        else:
            ok = text.rstrip(".").lower() == t["answer"].lower()
        right[t["category"]] = right.get(t["category"], 0) + ok
        total[t["category"]] = total.get(t["category"], 0) + 1
    return {k: 100 * right[k] / total[k] for k in total}


def blind_questions(test_path, out_path):
    """The same questions, every picture replaced by a blank one."""
    with open(test_path) as f, open(out_path, "w") as out:
        for line in f:
            out.write(json.dumps({**json.loads(line), "image": "blank.png"}) + "\n")


# What --projector runs: the presets of pretrain.py and finetune.py, each stage's data file in the world, the --quick
# overrides, where it writes and how its table rows are named.
PIPELINES = {
    "mlp2x_gelu": dict(preset="toy", data=dict(pretrain="captions.json", finetune="conversations.json"),
                       quick=dict(pretrain=["--epochs", "1"], finetune=["--epochs", "6"]), out="runs/toy", row=""),
    "qformer": dict(preset="toy-qformer", data=dict(pretrain="captions.json", finetune="conversations_split.json"),
                    quick=dict(pretrain=["--epochs", "1"], finetune=["--epochs", "1"]), out="runs/toy-qformer",
                    row="qformer: "),
}
CHANCE = {"color": 100 / 6, "shape": 100 / 3, "count": 100 / 3, "position": 25.0, "yes/no": 50.0, "choice": 100 / 3}


def main(argv=None):
    from generate import positive_int, seed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--projector", choices=sorted(PIPELINES), default="mlp2x_gelu",
                   help="LLaVA's (mlp2x_gelu, the presets `toy`) or InstructBLIP's Q-Former (qformer, `toy-qformer`)")
    p.add_argument("--out", help="output directory (runs/toy; runs/toy-qformer for --projector qformer)")
    p.add_argument("--images", type=positive_int, default=5000)
    p.add_argument("--test-images", type=positive_int, default=100)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--world-only", action="store_true")
    p.add_argument("--quick", action="store_true", help="a much shorter run (CI): a looser bar, still far above blind")
    args = p.parse_args(argv)
    pipeline = PIPELINES[args.projector]
    args.out = args.out or pipeline["out"]

    import evaluate
    import finetune
    import generate
    import pretrain
    import train
    from tools.plot_loss import plot_loss, read_metrics

    quick = dict(images=1000, clip_steps=150, llm_steps=100) if args.quick else {}
    world = os.path.join(args.out, "world")
    start = time.time()
    build_world(world, quick.get("images", args.images), args.test_images, quick.get("clip_steps", 300),
                quick.get("llm_steps", 400), args.seed)
    if args.world_only:
        return
    for stage, module, defaults in (("pretrain", pretrain, pretrain.STAGE_1), ("finetune", finetune, finetune.STAGE_2)):
        overrides = pipeline["quick"][stage] if args.quick else []
        paths = ["--vision-tower", f"{world}/vision", "--llm", f"{world}/llm", "--image-folder", f"{world}/images",
                 "--data-path", f"{world}/{pipeline['data'][stage]}", "--output-dir", f"{args.out}/{stage}"]
        if args.projector == "qformer":
            paths += ["--qformer-tokenizer", f"{world}/qformer_tokenizer"]
        if stage == "finetune":
            paths += ["--init-from", f"{args.out}/pretrain"]
        shutil.rmtree(f"{args.out}/{stage}", ignore_errors=True)  # a rerun starts afresh (train.py won't overwrite)
        began = time.time()
        train.main(["--preset", pipeline["preset"], *paths, *overrides], defaults, module.PRESETS, module.__doc__)
        print(f"{stage}: done ({time.time() - began:.0f} s)", flush=True)
    chart = plot_loss([(f"stage {i}: {stage}", read_metrics(f"{args.out}/{stage}"))
                       for i, stage in ((1, "pretrain"), (2, "finetune"))], f"{args.out}/loss.png")

    rows = {}
    test = f"{world}/test.jsonl"
    blind_questions(test, f"{args.out}/test-blind.jsonl")
    for name, model, questions in (("finished model", "finetune", test), ("blind (blank picture)", "finetune",
                                                                           f"{args.out}/test-blind.jsonl"),
                                   ("after stage 1 only", "pretrain", test)):
        answers = f"{args.out}/answers-{name.split()[0]}-{model}.jsonl"
        if os.path.exists(answers):
            os.remove(answers)
        evaluate.main(["run", "--model", f"{args.out}/{model}", "--questions", questions, "--image-folder",
                       f"{world}/images", "--answers", answers, "--batch-size", "32", "--max-new-tokens", "8"])
        rows[pipeline["row"] + name] = accuracy_by_type(test, answers)
    kinds, width = list(CHANCE), max(22, *(len(name) + 1 for name in rows))
    print(f"\nheld-out accuracy (%), {sum(1 for _ in open(test))} questions on {args.test_images} new pictures")
    print(f"  {'':<{width}}" + "".join(f"{k:>10}" for k in kinds))
    for name, scores in list(rows.items()) + [("chance", CHANCE)]:
        print(f"  {name:<{width}}" + "".join(f"{scores[k]:>10.1f}" for k in kinds))
    with open(f"{args.out}/results.json", "w") as f:
        json.dump(rows, f, indent=2)

    first = json.loads(open(test).readline())
    print(f"\n$ python generate.py --model {args.out}/finetune --image {world}/images/{first['image']} "
          f"\"{first['text'].split(chr(10))[0]}\" --temperature 0")
    generate.main(["--model", f"{args.out}/finetune", "--image", f"{world}/images/{first['image']}",
                   first["text"].split("\n")[0], "--temperature", "0", "--max-new-tokens", "24"])
    print(f"\nloss curves of both stages: {chart}; total {time.time() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
