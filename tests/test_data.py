"""data.py: templates, masks, truncation, images, bad input, collation and the sampler."""

import json
import os

import pytest
import torch
from PIL import Image

from data import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, ChatFormat, DataError, LazySupervisedDataset,
                  ModalityLengthGroupedSampler, collate, load_image_processor, parse_conversation, process_image,
                  render)

N = 4  # image tokens per image in these tests


def conv(*pairs):
    """LLaVA turns from (human, gpt, human, gpt, ...) strings."""
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(pairs)]


def supervised_runs(ids, labels):
    """The supervised ids, as one list per contiguous run (one run per assistant reply)."""
    runs, previous = [], False
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == i
            if not previous:
                runs.append([])
            runs[-1].append(i)
        previous = label != IGNORE_INDEX
    return runs


CONVERSATIONS = {  # name: (turns, number of images)
    "one turn, image first": (conv("<image>\nWhat is in the image?", "A cat on a mat."), 1),
    "image after the text": (conv("What is in the image?\n<image>", "A cat on a mat."), 1),
    "multi-turn": (conv("<image>\nWhat is in the image?", "A cat on a mat.", "What color is it?", "It is orange.",
                        "Is there a dog?", "No, there is not."), 1),
    "non-ASCII": (conv("<image>\nWas ist das? ✓", "Das ist grün ✓ 猫 — ok.", "Und jetzt?", "Très bien."), 1),
    "text-only": (conv("How many shapes are there?", "Two.", "Describe them.", "A red circle\nand a blue square."), 0),
    "two images": (conv("<image> and <image>: which is red?", "The first one."), 2),
}


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("tokenizer,template,end", [("llama_tok", "vicuna_v1", "</s>"),
                                                    ("llama_tok", "llama_2", " </s>"),
                                                    ("chatml_tok", "chat_template", "<|im_end|>")])
def test_supervised_tokens_are_exactly_the_replies(name, tokenizer, template, end, request):
    tok = request.getfixturevalue(tokenizer)
    turns, n_images = CONVERSATIONS[name]
    messages = parse_conversation(turns, n_images, name)
    ids, labels = ChatFormat(tok, template, N).encode(messages, name)
    replies = [t["value"] for t in turns[1::2]]
    runs = supervised_runs(ids, labels)
    # leading space: the separator's space merges into the first reply token ("▁A"); nothing may trail the end token
    assert [tok.decode(r).lstrip() for r in runs] == [r + end for r in replies]
    assert ids.count(IMAGE_TOKEN_INDEX) == n_images * N
    assert all(label == IGNORE_INDEX for i, label in zip(ids, labels) if i == IMAGE_TOKEN_INDEX)


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("tokenizer,template", [("llama_tok", "vicuna_v1"), ("llama_tok", "llama_2"),
                                                ("chatml_tok", "chat_template")])
def test_history_ids_equal_the_generation_prompt(name, tokenizer, template, request):
    """What the model reads before reply k in training is exactly what generation feeds it for that history."""
    tok = request.getfixturevalue(tokenizer)
    turns, n_images = CONVERSATIONS[name]
    messages = parse_conversation(turns, n_images, name)
    fmt = ChatFormat(tok, template, N)
    ids, labels = fmt.encode(messages, name)
    starts = [i for i in range(len(ids)) if labels[i] != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)]
    for k, start in enumerate(starts):
        assert fmt.prompt(messages[:2 * k + 1]) == ids[:start]


def test_vicuna_v1_string_is_llavas(llama_tok):
    """The exact training string of docs/llava.md section 3.2."""
    messages = parse_conversation(conv("<image>\nWhat is in the image?", "A cat on a mat."), 1, "x")
    assert render("vicuna_v1", messages, llama_tok) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is in the image? ASSISTANT: "
        "A cat on a mat.</s>")
    assert render("vicuna_v1", messages[:1], llama_tok, add_generation_prompt=True).endswith(
        "? ASSISTANT:")


def original_preprocess_v1(text, tok):
    """LLaVA's preprocess_v1 label algorithm (docs/llava.md 3.4), non-legacy branch, one placeholder per image:
    render, split on "</s>" and " ASSISTANT: ", re-tokenize the pieces and mask by counted lengths."""
    def tokenize(s):  # tokenizer_image_token
        chunks = [tok(c).input_ids for c in s.split("<image>")]
        out = [chunks[0][0]]
        for i, c in enumerate(chunks):
            out += ([IMAGE_TOKEN_INDEX] if i else []) + c[1:]
        return out

    ids = tokenize(text)
    target = list(ids)
    cur = 1
    target[0] = IGNORE_INDEX
    for i, rou in enumerate(text.split("</s>")):
        parts = rou.split(" ASSISTANT: ")
        if rou == "" or len(parts) != 2:
            break
        round_len, instruction_len = len(tokenize(rou)), len(tokenize(parts[0] + " ASSISTANT: ")) - 2
        if i != 0:
            round_len, instruction_len = round_len - 1, instruction_len - 1
        target[cur:cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    target[cur:] = [IGNORE_INDEX] * (len(target) - cur)
    assert cur == len(ids), "tokenization mismatch"
    return ids, target


@pytest.mark.parametrize("name", [n for n in CONVERSATIONS if n != "two images"])
def test_vicuna_v1_labels_equal_llavas_algorithm(name, llama_tok):
    turns, n_images = CONVERSATIONS[name]
    messages = parse_conversation(turns, n_images, name)
    fmt = ChatFormat(llama_tok, "vicuna_v1", 1)
    ids, labels = fmt.encode(messages, name)
    assert (ids, labels) == original_preprocess_v1(render("vicuna_v1", messages, llama_tok), llama_tok)


def test_plain_template_is_image_then_caption(llama_tok):
    messages = parse_conversation(conv("Render a clear and concise summary of the photo.\n<image>", "a cat on a mat"),
                                  1, "x")
    ids, labels = ChatFormat(llama_tok, "plain", N).encode(messages)
    caption = llama_tok("a cat on a mat\n", add_special_tokens=False).input_ids  # first chunk after the image
    assert ids == [llama_tok.bos_token_id] + [IMAGE_TOKEN_INDEX] * N + caption
    assert labels == [IGNORE_INDEX] * (1 + N) + caption
    assert llama_tok.convert_ids_to_tokens(caption)[-1] == "<0x0A>"  # "\n" is supervised; there is no EOS


def test_image_tag_moves_to_the_start_of_its_turn():
    messages = parse_conversation(conv("What is this?\n<image>", "A cat."), 1, "x")
    assert messages[0]["content"] == "<image>\nWhat is this?"
    messages = parse_conversation(conv("What is this?", "A cat."), 1, "x")  # no tag: LLaVA's inference convention
    assert messages[0]["content"] == "<image>\nWhat is this?"


def test_truncation_counts_image_tokens_and_never_cuts_an_image(llama_tok):
    from data import truncate

    fmt = ChatFormat(llama_tok, "vicuna_v1", 50)
    ids, labels = fmt.encode(parse_conversation(conv("<image>\nWhat is it?", "A cat on a mat.", "Color?",
                                                     "It is orange."), 1, "x"), "x")
    image_end = max(i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX) + 1
    cut_ids, cut_labels = truncate(ids, labels, len(ids) - 3, "x")
    assert cut_ids == ids[:len(ids) - 3] and cut_labels == labels[:len(ids) - 3]
    with pytest.raises(DataError, match="image would be cut"):
        truncate(ids, labels, image_end - 1, "sample 'x'")
    with pytest.raises(DataError, match="no reply is left"):
        truncate(ids, labels, image_end + 3, "sample 'x'")


# ----------------------------------------------------------------------------------------------------------------------
# The dataset, images and bad input


@pytest.fixture()
def image_processor(backbones):
    return load_image_processor(backbones[0])


def write_dataset(tmp_path, samples, jsonl=False):
    path = tmp_path / ("data.jsonl" if jsonl else "data.json")
    path.write_text("\n".join(json.dumps(s) for s in samples) if jsonl else json.dumps(samples))
    return str(path)


def make_images(tmp_path):
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "blue.jpg")
    (tmp_path / "corrupt.jpg").write_bytes(b"not an image at all")


def test_dataset_and_collate(tmp_path, llama_tok, image_processor):
    make_images(tmp_path)
    path = write_dataset(tmp_path, [
        {"id": "a", "image": "red.png", "conversations": conv("<image>\nWhat color?", "Red.")},
        {"id": "b", "conversations": conv("Hi?", "Hello there.", "Bye?", "Bye.")},
        {"id": "c", "image": ["red.png", "blue.jpg"], "conversations": conv("<image><image>\nSame?", "No.")},
    ], jsonl=True)
    fmt = ChatFormat(llama_tok, "vicuna_v1", N)
    ds = LazySupervisedDataset(path, str(tmp_path), fmt, image_processor, max_length=200)
    assert ds.modality_lengths == [4, -5, 3]  # words, "<image>" included, as LLaVA counts
    items = [ds[i] for i in range(3)]
    assert items[0]["pixel_values"].shape == (1, 3, 16, 16) and items[1]["pixel_values"] is None
    batch = collate(items, pad_id=fmt.pad_id)
    lengths = [len(x["input_ids"]) for x in items]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["pixel_values"].shape == (3, 3, 16, 16)  # a's image, then c's two
    assert torch.equal(batch["pixel_values"][0], items[0]["pixel_values"][0])
    for row, n in enumerate(lengths):
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all() and (batch["input_ids"][row, n:] == fmt.pad_id).all()
    assert (batch["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 3 * N


def test_pad_and_crop_preprocessing(image_processor):
    """pad: LLaVA's expand2square with the CLIP mean colour (122, 116, 104), then the processor; crop: the processor."""
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    padded = process_image(image, image_processor, "pad")
    mean, std = torch.tensor(image_processor.image_mean), torch.tensor(image_processor.image_std)
    background = (torch.tensor([122, 116, 104]) / 255 - mean) / std
    red = (torch.tensor([1.0, 0, 0]) - mean) / std
    assert torch.allclose(padded[:, 0, 0], background, atol=1e-4)  # top rows: padding
    assert torch.allclose(padded[:, 8, 8], red, atol=1e-4)  # centre: the image
    cropped = process_image(image, image_processor, "crop")
    assert torch.allclose(cropped, red[:, None, None].expand_as(cropped), atol=1e-4)  # all image, sides cut
    reference = image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(cropped, reference)


BAD = {  # name: (sample, error pattern); every message must name the sample id
    "missing image": ({"image": "nope.jpg", "conversations": conv("<image>\nQ?", "A.")}, "does not exist"),
    "corrupt image": ({"image": "corrupt.jpg", "conversations": conv("<image>\nQ?", "A.")}, "cannot read image"),
    "not alternating": ({"conversations": conv("Q?", "A.")[:1] * 2 + conv("Q", "A.")[1:]}, "must alternate"),
    "starts with gpt": ({"conversations": [{"from": "gpt", "value": "Hi."}, {"from": "human", "value": "Q?"}]},
                        "start with a human"),
    "more tags than images": ({"image": "red.png", "conversations": conv("<image><image>\nQ?", "A.")},
                              "2 <image> tags but 1 image"),
    "empty reply": ({"conversations": conv("Q?", "  ")}, "empty reply"),
    "no reply": ({"conversations": conv("Q?", "A.", "Q2?")}, "has no reply"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_samples_are_named(name, tmp_path, llama_tok, image_processor):
    make_images(tmp_path)
    sample, pattern = BAD[name]
    good = {"id": "good", "image": "red.png", "conversations": conv("<image>\nQ?", "A.")}
    path = write_dataset(tmp_path, [good, {"id": "bad-7", **sample}])
    fmt = ChatFormat(llama_tok, "vicuna_v1", N)
    with pytest.raises(DataError, match=pattern) as error:
        ds = LazySupervisedDataset(path, str(tmp_path), fmt, image_processor)
        ds[1]
    assert "bad-7" in str(error.value) and "data.json" in str(error.value)
    skipping = LazySupervisedDataset(path, str(tmp_path), fmt, image_processor, skip_bad=True)
    items = [skipping[i] for i in range(len(skipping))]
    skipped = {i for item in items for i in item["skipped"]}  # bad images: dataset indices passed over
    assert skipping.num_bad + len(skipped) == 1 and len(skipping.bad_places) == skipping.num_bad
    assert all("bad-7" in place for place in skipping.bad_places + [skipping.where(i) for i in skipped])
    assert all(item["id"] == "good" for item in items)


@pytest.mark.parametrize("text", [
    '[{"id": 1}, {"id": 2}]', " \n [ {\"id\": 1} ,\n{\"id\": 2} ]\n", "[]", "[ ]", '[{"id": 1},]', '[{"id": 1} {"id": 2}]',
    '[{"id": 1}] [', '[{"id": 1}', '[{"id": 1},', '[{"id": }]', '[{"id": "x\u00e9"}, {"a": [1, {"b": "]"}]}]',
    '[{"id": 1}]\n\n', '[{"id": 1}] {"id": 2}', '[,{"id": 1}]', '[\n{"id": 1},\n{"id": 2}\n\n{"id": 3}]'])
def test_a_json_list_reads_as_json_loads_reads_it(tmp_path, text):
    """The data file is read one sample at a time (so that 665K parsed samples never exist at once): what it accepts,
    rejects and reads must be what json.loads does with the whole file, and errors must name the line."""
    from data import read_samples

    path = tmp_path / "data.json"
    path.write_text(text)
    try:
        expected = json.loads(text)
    except json.JSONDecodeError as e:
        with pytest.raises(DataError, match=r"data.json: malformed JSON at line \d+, column \d+") as error:
            read_samples(str(path))
        assert f"line {e.lineno}," in str(error.value)
        return
    assert read_samples(str(path))[0] == expected


def test_the_dataset_holds_its_samples_compactly(tmp_path, llama_tok, image_processor):
    """Every rank and every loader worker holds the dataset: 665K samples as parsed Python objects take several times
    the file's size in each (2.7 GB for a 0.55 GB file); their JSON text takes about the file's size, and reads back
    the same samples."""
    import gc
    import tracemalloc

    samples = [{"id": f"{i:09d}", "image": f"coco/train2017/{i:012d}.jpg", "conversations": conv(
        "<image>\nWhat is on the table?", "A cat sits on a red mat next to two cups.", "And the colour?", "Red.")}
        for i in range(3000)]
    path = write_dataset(tmp_path, samples)
    gc.collect()
    tracemalloc.start()
    ds = LazySupervisedDataset(path, str(tmp_path), ChatFormat(llama_tok, "vicuna_v1", N), image_processor)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert held < 1.3 * os.path.getsize(path), (held, os.path.getsize(path))
    assert [ds.sample(i) for i in (0, 1234, 2999)] == [samples[0], samples[1234], samples[2999]]
    assert ds.where(1234, samples[1234]).endswith("sample #1234 (id '000001234')")


def test_malformed_json_names_the_position(tmp_path, llama_tok):
    fmt = ChatFormat(llama_tok, "vicuna_v1", N)
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"id": "a", "conversations": conv("Q?", "A.")}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"data.jsonl: malformed JSON on line 2"):
        LazySupervisedDataset(str(path), None, fmt)
    path = tmp_path / "data.json"
    path.write_text('[\n{"id": "a", "conversations": []},\n{"id": }\n]')
    with pytest.raises(DataError, match=r"data.json: malformed JSON at line 3"):
        LazySupervisedDataset(str(path), None, fmt)


# ----------------------------------------------------------------------------------------------------------------------
# The sampler


def sampler_streams(lengths, world, accum, micro, **kw):
    samplers = [ModalityLengthGroupedSampler(lengths, micro, world, r, accum, **kw) for r in range(world)]
    return samplers, [list(s) for s in samplers]


def test_sampler_covers_everything_once_with_single_modality_batches():
    lengths = [(i % 7 + 1) * (1 if i % 3 else -1) for i in range(203)]  # 135 image, 68 text-only samples
    world, accum, micro = 2, 3, 4
    samplers, streams = sampler_streams(lengths, world, accum, micro, seed=5)
    global_batch = world * accum * micro
    steps = samplers[0].steps_per_epoch()
    assert all(len(s) == steps * accum * micro for s in streams)
    batches = [[i for r in range(world) for i in streams[r][k * accum * micro:(k + 1) * accum * micro]]
               for k in range(steps)]
    everything = [i for b in batches for i in b]
    assert set(everything) == set(range(len(lengths)))
    assert len(everything) - len(set(everything)) < global_batch  # only the last batch is filled up
    full = 135 // global_batch + 68 // global_batch
    assert sum(len({lengths[i] > 0 for i in b}) == 1 for b in batches) >= full
    assert all(len({lengths[i] > 0 for i in b}) == 1 for b in batches[:-2])


def test_sampler_is_deterministic_resumable_and_balanced():
    lengths = [((i * 37) % 101 + 1) for i in range(256)]
    _, a = sampler_streams(lengths, 2, 2, 4, seed=1)
    _, b = sampler_streams(lengths, 2, 2, 4, seed=1)
    _, c = sampler_streams(lengths, 2, 2, 4, seed=2)
    assert a == b and a != c
    epoch1 = ModalityLengthGroupedSampler(lengths, 4, 2, 0, 2, seed=1)
    epoch1.set_epoch(1)
    assert list(epoch1) != a[0]
    resumed = ModalityLengthGroupedSampler(lengths, 4, 2, 0, 2, seed=1)
    resumed.set_epoch(0, start_step=5)
    assert list(resumed) == a[0][5 * 2 * 4:]
    # each micro-batch of a global batch has a similar total length (LLaVA's split_to_even_chunks)
    sampler = ModalityLengthGroupedSampler(lengths, 4, 2, 0, 2, seed=1)
    for batch in sampler.megabatches():
        totals = [sum(lengths[i] for i in chunk) for chunk in batch]
        assert max(totals) - min(totals) <= max(lengths)


def test_sampler_smaller_than_a_global_batch():
    lengths = [3, -2, 5]
    _, streams = sampler_streams(lengths, 2, 2, 2, seed=0)
    assert all(len(s) == 4 for s in streams)
    assert set(streams[0] + streams[1]) == {0, 1, 2}


def test_sampler_without_grouping_is_a_shuffle():
    lengths = [1] * 50
    _, streams = sampler_streams(lengths, 2, 1, 5, group_by_length=False, seed=3)
    assert sorted(streams[0] + streams[1]) == list(range(50))
