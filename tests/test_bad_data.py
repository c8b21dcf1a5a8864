"""data.py on input a user can get wrong: every image mode, hostile image files, wrongly typed fields, undecodable
and malformed data files, paths out of the image folder, skipped-sample bookkeeping, bad flags and backbone files.
Each case is a clear error (UserError / DataError naming the file, sample or flag) or correct behaviour."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from data import (ChatFormat, DataError, LazySupervisedDataset, UserError, collate, load_image, load_image_processor,
                  load_tokenizer, process_image, read_samples)

N = 4  # image tokens per image


def conv(*pairs):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(pairs)]


GOOD = {"id": "good", "image": "red.png", "conversations": conv("<image>\nQ?", "A.")}


@pytest.fixture()
def image_processor(backbones):
    return load_image_processor(backbones[0])


@pytest.fixture()
def fmt(llama_tok):
    return ChatFormat(llama_tok, "vicuna_v1", N)


def write(tmp_path, samples, name="data.json"):
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "red.png")
    path = tmp_path / name
    path.write_text(json.dumps(samples))
    return str(path)


# ----------------------------------------------------------------------------------------------------------------------
# Images of every mode, as files of the formats that hold them


def save(image, tmp_path, name, **kw):
    image.save(tmp_path / name, **kw)
    return str(tmp_path / name)


def palette_with_transparency():
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 1
    return image


IMAGES = {  # name: (file name, its image, the RGB pixels load_image must give)
    "16-bit gray PNG (I;16)": ("g16.png", lambda: Image.fromarray(np.array([[32896, 65535]], np.uint16)),
                               [(128,) * 3, (255,) * 3]),
    "16-bit big-endian TIFF (I;16B)": ("g16b.tif", lambda: Image.frombytes("I;16B", (2, 1), bytes([0x80, 0x80, 0, 0])),
                                       [(128,) * 3, (0,) * 3]),
    "32-bit integer TIFF (I)": ("i32.tif", lambda: Image.fromarray(np.array([[32896, 70000, -5]], np.int32)),
                                [(128,) * 3, (255,) * 3, (0,) * 3]),
    "float TIFF (F)": ("f.tif", lambda: Image.fromarray(np.array([[0.25, 2.0, -1, np.nan]], np.float32)),
                       [(64,) * 3, (255,) * 3, (0,) * 3, (0,) * 3]),
    "1-bit PNG": ("bw.png", lambda: Image.frombytes("1", (2, 1), bytes([0b01000000])), [(0,) * 3, (255,) * 3]),
    "gray + alpha PNG (LA), alpha dropped as LLaVA does": ("la.png", lambda: Image.new("LA", (1, 1), (90, 0)),
                                                           [(90,) * 3]),
    "RGBA PNG, alpha dropped as LLaVA does": ("rgba.png", lambda: Image.new("RGBA", (1, 1), (10, 20, 30, 0)),
                                              [(10, 20, 30)]),
    "palette with transparency: the palette colour": ("p.png", palette_with_transparency, [(255, 0, 0), (0, 255, 0)]),
    "CMYK TIFF": ("cmyk.tif", lambda: Image.new("CMYK", (1, 1), (255, 0, 0, 0)), [(0, 255, 255)]),
}


@pytest.mark.parametrize("name", IMAGES)
def test_every_image_mode_loads_as_the_right_rgb(name, tmp_path):
    file, make, expected = IMAGES[name]
    path = save(make(), tmp_path, file)
    image = load_image(path, "x")
    assert image.mode == "RGB"
    assert [image.getpixel((i, 0)) for i in range(image.width)] == expected


def test_16_bit_pgm_opens_as_I_and_loads_scaled(tmp_path):
    """A PGM with maxval 1000 is opened by PIL as mode I, scaled to 0..65535; 500 is half of it."""
    (tmp_path / "g.pgm").write_bytes(b"P5 2 1 1000\n" + bytes([0x01, 0xF4, 0x03, 0xE8]))
    image = load_image(str(tmp_path / "g.pgm"), "x")
    assert [image.getpixel((i, 0)) for i in range(2)] == [(128,) * 3, (255,) * 3]


def test_exif_orientation_is_not_applied_as_in_llava(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to view"
    path = save(Image.new("RGB", (30, 10), (0, 0, 255)), tmp_path, "turned.jpg", exif=exif)
    assert load_image(path, "x").size == (30, 10)


# ----------------------------------------------------------------------------------------------------------------------
# Hostile image files: bombs, truncated data, formats that would run a program


@pytest.fixture()
def small_pixel_limit(monkeypatch):
    """PIL warns above MAX_IMAGE_PIXELS and refuses above twice that: 150 pixels here, so a 13x13 image warns and a
    20x20 one is refused (and the tiny processor's 16x16 output is allowed)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)


def truncated(tmp_path, name):
    Image.effect_noise((12, 12), 50).convert("RGB").save(tmp_path / "whole" / name)
    data = (tmp_path / "whole" / name).read_bytes()
    (tmp_path / name).write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("name,make,pattern", [
    ("bomb.png", lambda p: Image.new("RGB", (20, 20)).save(p / "bomb.png"), "too large to open safely"),
    ("big.png", lambda p: Image.new("RGB", (13, 13)).save(p / "big.png"), "too large to open safely"),
    ("cut.png", lambda p: truncated(p, "cut.png"), "cannot read image"),
    ("cut.jpg", lambda p: truncated(p, "cut.jpg"), "cannot read image"),
    ("dir.png", lambda p: (p / "dir.png").mkdir(), "cannot read image"),
    ("text.png", lambda p: (p / "text.png").write_text("hello"), "cannot read image"),
])
def test_hostile_images_are_data_errors_and_skipped(name, make, pattern, tmp_path, fmt, image_processor,
                                                    small_pixel_limit):
    (tmp_path / "whole").mkdir()
    make(tmp_path)
    with pytest.raises(DataError, match=pattern) as error:
        load_image(str(tmp_path / name), "sample 'x'")
    assert name in str(error.value) and "sample 'x'" in str(error.value)
    good = {**GOOD, "image": "ok.png"}
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    path = write(tmp_path, [good, {"id": "bad", "image": name, "conversations": conv("<image>\nQ?", "A.")}])
    dataset = LazySupervisedDataset(path, str(tmp_path), fmt, image_processor, skip_bad=True)
    item = dataset[1]
    assert item["id"] == "good" and item["skipped"] == [1]


def test_eps_is_not_rendered(tmp_path, monkeypatch):
    """PIL renders EPS by running Ghostscript on the file: a data file's image is read, never run."""
    from PIL import EpsImagePlugin

    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a) or Image.new("RGB", (8, 8)))
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    (tmp_path / "x.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n")
    with pytest.raises(DataError, match="cannot read image"):
        load_image(str(tmp_path / "x.eps"), "x")
    assert not calls


@pytest.mark.parametrize("aspect_ratio", ["pad", "crop"])
def test_an_extreme_aspect_ratio_is_an_error_not_a_huge_image(aspect_ratio, image_processor, monkeypatch):
    """A 3000x1 image pads to 9M pixels (pad), or resizes its short side to 16 and the long one to 48000 (crop)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    with pytest.raises(DataError, match=r"sample 'x': a 3000x1 image; processing it .* aspect ratio is too extreme"):
        process_image(Image.new("RGB", (3000, 1)), image_processor, aspect_ratio, "sample 'x'")
    assert process_image(Image.new("RGB", (300, 100)), image_processor, aspect_ratio).shape == (3, 16, 16)


# ----------------------------------------------------------------------------------------------------------------------
# Samples with wrongly typed fields


BAD_SAMPLES = {  # name: (sample, what the message must say)
    "image is a number": ({**GOOD, "image": 7}, "'image' must be a file name"),
    "image list holds a number": ({**GOOD, "image": ["red.png", 3]}, "'image' must be a file name"),
    "image is empty": ({**GOOD, "image": ""}, "'image' must be a file name"),
    "image is an object": ({**GOOD, "image": {"a": 1}}, "'image' must be a file name"),
    "image holds a NUL": ({**GOOD, "image": "red.png\u0000x"}, "NUL"),
    "image holds a lone surrogate": ({**GOOD, "image": "red\ud800.png"}, "unpaired surrogate"),
    "from is a list": ({**GOOD, "conversations": [{"from": ["human"], "value": "<image>\nQ?"},
                                                  {"from": "gpt", "value": "A."}]}, "turn 0's 'from'"),
    "from is an object": ({**GOOD, "conversations": [{"from": {"a": 1}, "value": "<image>\nQ?"},
                                                     {"from": "gpt", "value": "A."}]}, "turn 0's 'from'"),
    "value is a number": ({**GOOD, "conversations": conv("<image>\nQ?", 5)}, "turn 1's 'value' must be text"),
    "value is a lone surrogate": ({**GOOD, "conversations": conv("<image>\nQ?", "A\udc00.")}, "unpaired surrogate"),
    "a turn is a string": ({**GOOD, "conversations": ["<image>\nQ?", "A."]}, "turn 0 must be an object"),
    "conversations is text": ({**GOOD, "conversations": "text"}, "'conversations' must be a non-empty list"),
    "conversations is missing": ({"id": "good"}, "'conversations' must be a non-empty list"),
    "id is an object": ({**GOOD, "id": {"a": 1}}, "'id' must be a string or a number"),
    "id is a boolean": ({**GOOD, "id": True}, "'id' must be a string or a number"),
    "id is a list": ({**GOOD, "id": [1]}, "'id' must be a string or a number"),
    "a string sample": ("text", "a sample must be an object"),
    "a list sample": ([GOOD], "a sample must be an object"),
    "a null sample": (None, "a sample must be an object"),
    "a number sample": (3, "a sample must be an object"),
}


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
@pytest.mark.parametrize("name", BAD_SAMPLES)
def test_wrongly_typed_fields_are_named_and_skippable(name, jsonl, tmp_path, fmt, image_processor):
    sample, pattern = BAD_SAMPLES[name]
    path = write(tmp_path, [GOOD, sample])
    if jsonl:
        path = str(tmp_path / "data.jsonl")
        with open(path, "w") as f:
            f.write("\n".join(json.dumps(s) for s in [GOOD, sample]))
    place = "data.jsonl, line 2" if jsonl else "data.json, sample #1"
    with pytest.raises(DataError, match=pattern) as error:
        LazySupervisedDataset(path, str(tmp_path), fmt, image_processor)
    assert place in str(error.value)
    skipping = LazySupervisedDataset(path, str(tmp_path), fmt, image_processor, skip_bad=True)
    assert len(skipping) == 1 and skipping.num_bad == 1 and place in skipping.bad_places[0]
    assert skipping[0]["id"] == "good"


def test_ids_of_every_json_kind_that_names_a_sample(tmp_path, fmt, image_processor):
    path = write(tmp_path, [{**GOOD, "id": 7}, {**GOOD, "id": 2.5}, {**GOOD, "id": None}, {**GOOD, "id": "x" * 500}])
    dataset = LazySupervisedDataset(path, str(tmp_path), fmt, image_processor)
    assert [dataset.where(i)[len(path):] for i in range(3)] == [", sample #0 (id 7)", ", sample #1 (id 2.5)",
                                                                ", sample #2"]
    assert len(dataset.where(3)) < len(path) + 100  # a long id is cut short in messages


def test_read_samples_names_a_sample_that_is_not_an_object(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"question_id": 1}\n"text"\n')
    with pytest.raises(DataError, match=r"answers.jsonl, line 2: expected a JSON object, got a string"):
        read_samples(str(path))


# ----------------------------------------------------------------------------------------------------------------------
# Data files that cannot be read, or not as samples


def data_file(tmp_path, content, name="data.json"):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif content != "missing":
        path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize("content,pattern", [
    (b'[{"id": "caf\xe9"}]', r"data.json: not UTF-8 text: byte 12 \(line 1\) is b'\\xe9'.*re-encode the file as UTF-8"),
    (b'{"id": 1}\n{"id": "\x80"}\n', r"data.json: not UTF-8 text: byte 18 \(line 2\)"),
    ('[{"id": 1}]'.encode("utf-16"), r"data.json: not UTF-8 text: byte 0 \(line 1\)"),
    (b"", r"data.json: no samples \(an empty file or list\)"),
    (b" \n\n", r"data.json: no samples"),
    (b"[]", r"data.json: no samples"),
    (b'{\n  "id": "a",\n  "conversations": []\n}\n', r"data.json: one JSON object, not a list of samples"),
    (None, r"data.json: is a directory, not a data file"),
    ("missing", r"data.json: no such data file"),
    (b"[" * 100_000 + b"]" * 100_000, r"data.json: sample #0 is nested too deeply"),
])
def test_unreadable_data_files_are_named(content, pattern, tmp_path, fmt):
    path = data_file(tmp_path, content)
    with pytest.raises(DataError, match=pattern):
        LazySupervisedDataset(path, None, fmt)


def test_deeply_nested_json_lines(tmp_path):
    path = data_file(tmp_path, b'{"id": 1}\n' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "data.jsonl")
    with pytest.raises(DataError, match=r"data.jsonl: line 2 is nested too deeply"):
        read_samples(path)


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_a_utf8_bom_is_accepted(jsonl, tmp_path):
    samples = [{"id": "é", "conversations": conv("Q?", "A.")}] * 2
    text = "\n".join(map(json.dumps, samples)) if jsonl else json.dumps(samples)
    path = data_file(tmp_path, b"\xef\xbb\xbf" + text.encode(), "data.jsonl" if jsonl else "data.json")
    assert read_samples(path)[0] == samples


def test_json_lines_split_at_newlines_only(tmp_path):
    """A JSON string may hold U+2028 (or U+0085, \\x1c...) as is; str.splitlines() would cut the line there."""
    samples = [{"id": "a", "conversations": conv("Q\u2028?", "A\x85\x1c.")}, {"id": "b"}]
    path = data_file(tmp_path, "\r\n".join(json.dumps(s, ensure_ascii=False) for s in samples).encode(),
                     "data.jsonl")
    assert read_samples(path) == (samples, [f"{path}, line 1 (id 'a')", f"{path}, line 2 (id 'b')"])


# ----------------------------------------------------------------------------------------------------------------------
# Image paths out of the image folder


@pytest.mark.parametrize("image", ["../red.png", "sub/../../red.png", "ABS"])
def test_an_image_path_out_of_the_image_folder_is_refused(image, tmp_path, fmt, image_processor):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "ok.png")
    image = str(tmp_path / "red.png") if image == "ABS" else image
    path = write(tmp_path, [{**GOOD, "image": "ok.png"}, {**GOOD, "id": "out", "image": image}])
    with pytest.raises(DataError, match=r"sample #1 \(id 'out'\): image .* is outside the image folder"):
        LazySupervisedDataset(path, str(folder), fmt, image_processor)
    skipping = LazySupervisedDataset(path, str(folder), fmt, image_processor, skip_bad=True)
    assert len(skipping) == 1 and skipping.num_bad == 1


def test_image_paths_inside_the_folder_are_read(tmp_path, fmt, image_processor):
    """A ".." that stays inside, an absolute path inside, and a symbolic link inside the folder (to anywhere: the
    folder's owner made it) are all fine; without an image folder, paths are the user's own (relative to the cwd)."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "ok.png")
    os.symlink(tmp_path / "red.png", folder / "link.png")
    path = write(tmp_path, [{**GOOD, "image": "sub/../ok.png"}, {**GOOD, "image": str(folder / "ok.png")},
                            {**GOOD, "image": "link.png"}])
    dataset = LazySupervisedDataset(path, str(folder), fmt, image_processor)
    assert all(dataset[i]["pixel_values"] is not None for i in range(3))
    path = write(tmp_path, [{**GOOD, "image": str(tmp_path / "red.png")}])
    assert LazySupervisedDataset(path, "", fmt, image_processor)[0]["pixel_values"] is not None


# ----------------------------------------------------------------------------------------------------------------------
# --skip-bad-samples bookkeeping


def test_skipped_lists_the_indices_passed_over(tmp_path, fmt, image_processor, caplog):
    samples = [GOOD, {**GOOD, "id": "gone", "image": "nope.png"}, {**GOOD, "id": "cut", "image": "nope2.png"},
               {**GOOD, "id": "c"}, {"id": "bad", "conversations": conv("Q?", "  ")}]
    path = write(tmp_path, samples)
    dataset = LazySupervisedDataset(path, str(tmp_path), fmt, image_processor, skip_bad=True)
    assert len(dataset) == 4 and dataset.num_bad == 1 and dataset.bad_places == [f"{path}, sample #4 (id 'bad')"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data"):
        items = [dataset[i] for i in (0, 1, 2, 1, 2)]
    assert [item["id"] for item in items] == ["good", "c", "c", "c", "c"]
    assert [item["skipped"] for item in items] == [[], [1, 2], [2], [1, 2], [2]]
    assert collate(items, fmt.pad_id)["skipped"] == [1, 2, 2, 1, 2, 2]
    assert [dataset.where(i) for i in (1, 2)] == [f"{path}, sample #1 (id 'gone')", f"{path}, sample #2 (id 'cut')"]
    warned = [r.getMessage() for r in caplog.records if "skipping bad sample" in r.getMessage()]
    assert len(warned) == 2 and "'gone'" in warned[0] and "'cut'" in warned[1]  # once each, not each time met


def test_indices_out_of_range_are_index_errors(tmp_path, fmt, image_processor):
    dataset = LazySupervisedDataset(write(tmp_path, [GOOD, {**GOOD, "id": "b"}]), str(tmp_path), fmt, image_processor)
    assert dataset[-1]["id"] == "b"
    with pytest.raises(IndexError):
        dataset[2]


# ----------------------------------------------------------------------------------------------------------------------
# Flags and backbone files


def test_bad_dataset_arguments_are_user_errors(tmp_path, fmt, image_processor):
    path = write(tmp_path, [GOOD])
    with pytest.raises(UserError, match="--data-path: no data file given"):
        LazySupervisedDataset("", str(tmp_path), fmt, image_processor)
    for kwargs, pattern in [({"max_length": 0}, "--max-length: must be a positive"),
                            ({"max_length": -5}, "--max-length"),
                            ({"aspect_ratio": "square"}, "--image-aspect-ratio: unknown .* choose pad or crop")]:
        with pytest.raises(UserError, match=pattern):
            LazySupervisedDataset(path, str(tmp_path), fmt, image_processor, **kwargs)
    with pytest.raises(UserError, match=r"--image-folder .*nowhere: does not exist"):
        LazySupervisedDataset(path, str(tmp_path / "nowhere"), fmt, image_processor)
    with pytest.raises(UserError, match=r"--image-folder .*red.png: is not a directory"):
        LazySupervisedDataset(path, str(tmp_path / "red.png"), fmt, image_processor)
    text_only = write(tmp_path, [{"id": "t", "conversations": conv("Q?", "A.")}])
    assert len(LazySupervisedDataset(text_only, str(tmp_path / "nowhere"), fmt, image_processor)) == 1


def test_an_image_without_an_image_processor_is_not_skipped(tmp_path, fmt):
    """Skipping every image sample would train on the text-only ones without a word: it is a UserError."""
    path = write(tmp_path, [{"id": "t", "conversations": conv("Q?", "A.")}, GOOD])
    with pytest.raises(UserError, match=r"sample #1 \(id 'good'\): has an image but no image processor"):
        LazySupervisedDataset(path, str(tmp_path), fmt, None, skip_bad=True)


class SlowTokenizer:
    is_fast = False
    chat_template = None


@pytest.mark.parametrize("template,tokenizer,image_tokens,pattern", [
    ("vicuna", "llama_tok", N, r"--template: unknown template 'vicuna'; choose one of plain, vicuna_v1"),
    ("chat_template", "llama_tok", N, r"--template chat_template: the tokenizer has no chat template"),
    ("vicuna_v1", "slow", N, r"SlowTokenizer is a slow tokenizer.*tokenizer.json"),
    ("vicuna_v1", "llama_tok", 0, r"image tokens per image must be a positive integer, got 0"),
])
def test_chat_format_arguments_are_user_errors(template, tokenizer, image_tokens, pattern, request):
    tok = SlowTokenizer() if tokenizer == "slow" else request.getfixturevalue(tokenizer)
    with pytest.raises(UserError, match=pattern):
        ChatFormat(tok, template, image_tokens)


@pytest.mark.parametrize("config,pattern", [
    (None, "no readable preprocessor_config.json"),
    ("{oops", "no readable preprocessor_config.json"),
    ("[1, 2]", "not an image processor's config"),
    ('{"image_processor_type": 5}', "not an image processor's config"),
    ('{"image_processor_type": "CLIPImageProcessor", "image_mean": "grey"}', "cannot build an image processor"),
    ('{"image_processor_type": "NoSuchImageProcessor"}', "cannot build an image processor"),
])
def test_a_bad_preprocessor_config_names_the_directory(config, pattern, tmp_path):
    folder = tmp_path / "tower"
    folder.mkdir()
    if config is not None:
        (folder / "preprocessor_config.json").write_text(config)
    with pytest.raises(UserError, match=pattern) as error:
        load_image_processor(str(folder))
    assert str(folder) in str(error.value)


def test_a_directory_without_a_tokenizer_is_named(tmp_path):
    (tmp_path / "llm").mkdir()
    with pytest.raises(UserError, match=r"llm: cannot load a tokenizer"):
        load_tokenizer(str(tmp_path / "llm"))


def test_show_sample_reports_user_errors_without_a_traceback(tmp_path, backbones, capsys):
    from tools.show_sample import main

    vision, llm = backbones
    path = write(tmp_path, [GOOD])
    for args, message in [(["--data", str(tmp_path / "none.json"), "--tokenizer", llm], "none.json: no such data file"),
                          (["--data", path], "--tokenizer: needed with --data"),
                          (["--data", path, "--tokenizer", str(tmp_path)], "cannot load a tokenizer"),
                          (["--data", path, "--tokenizer", llm, "--vision-tower", vision, "--image-folder",
                            str(tmp_path), "--index", "3"], "--index 3: "),
                          (["--data", path, "--tokenizer", llm, "--image-tokens", "-1"], "image tokens per image")]:
        with pytest.raises(SystemExit) as exit:
            main(args)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.startswith("error: ") and message in err, (args, err)
