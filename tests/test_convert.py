"""Checkpoint interop: the original LLaVA layout, its stage-1 mm_projector.bin, llava-hf (both on-disk layouts) load
with logits equal to the source model; an export loads in transformers, its chat template prompts it with our ids,
and it answers like ours; pickles are refused."""

import json
import os

import pytest
import real_format as rf
import torch
from hf_reference import HF_IMAGE_ID, mixed_batch, reference_and_ours
from jinja2.exceptions import TemplateError
from PIL import Image
from safetensors.torch import save_file

import checkpoints
import generate
from data import IMAGE_TOKEN_INDEX, VICUNA_SYSTEM, ChatFormat, UserError, load_image_processor, \
    move_image_tags_first, process_image, render
from checkpoints import projector_weights
from model import LlavaConfig, LlavaModel
from tools.convert import export_llava_hf, import_checkpoint
from tools.tiny import llama_tokenizer, save_tiny_backbones, save_tiny_checkpoint


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    hf, _ = reference_and_ours(root)
    return hf, root


def hf_logits(hf, n_tokens=16):
    input_ids, attention_mask, _, pixel_values = mixed_batch(n_tokens)
    with torch.no_grad():
        hf_ids = input_ids.masked_fill(input_ids == IMAGE_TOKEN_INDEX, HF_IMAGE_ID)
        return hf(input_ids=hf_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits, attention_mask


def assert_same_logits(model, hf):
    expected, mask = hf_logits(hf)
    input_ids, attention_mask, _, pixel_values = mixed_batch(model.num_image_tokens)
    with torch.no_grad():
        logits = model.eval()(input_ids, attention_mask, pixel_values)
    assert (logits[mask.bool()] - expected[mask.bool()]).abs().max() < 1e-5


def original_llava_files(hf, root, out):
    """The reference model written as the original LLaVA writes a finetuned model: mm_* config keys, `model.*` and
    `lm_head` weights in sharded pytorch_model-*.bin files, and a copy of the tower that loaders ignore."""
    os.makedirs(out)
    config = {**hf.config.text_config.to_dict(), "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
              "mm_vision_tower": str(root / "vision"), "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu",
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
              "mm_use_im_start_end": False, "tokenizer_model_max_length": 2048}
    (out / "config.json").write_text(json.dumps(config))
    llm = {f"model.{k}": v.clone() for k, v in hf.model.language_model.state_dict().items()}
    llm["lm_head.weight"] = hf.lm_head.weight.detach().clone()
    projector = {f"model.mm_projector.{ {'linear_1': 0, 'linear_2': 2}[k.split('.')[0]] }.{k.split('.')[1]}": v.clone()
                 for k, v in hf.model.multi_modal_projector.state_dict().items()}
    tower = {f"model.vision_tower.vision_tower.vision_model.{k}": v.clone()
             for k, v in hf.model.vision_tower.state_dict().items()}
    shards = [dict(list(llm.items())[:10]), {**dict(list(llm.items())[10:]), **projector, **tower}]
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save(shard, out / name)
        weight_map.update({k: name for k in shard})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return projector


def test_original_llava_layout(reference, tmp_path):
    hf, root = reference
    original_llava_files(hf, root, tmp_path / "llava")
    model = checkpoints.load(str(tmp_path / "llava"))
    assert (model.config.projector_type, model.config.template, model.config.image_aspect_ratio) == \
        ("mlp2x_gelu", "vicuna_v1", "pad")
    assert_same_logits(model, hf)


def test_original_stage1_projector_with_its_base_llm(reference, tmp_path):
    hf, root = reference
    projector = original_llava_files(hf, root, tmp_path / "full")
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    (stage1 / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    torch.save(projector, stage1 / "mm_projector.bin")
    with pytest.raises(ValueError, match="pass the base LLM"):
        checkpoints.load(str(stage1))
    assert_same_logits(checkpoints.load(str(stage1), model_base=str(root / "llm")), hf)


def test_llava_hf_layouts(reference, tmp_path):
    hf, _ = reference
    hf.save_pretrained(tmp_path / "saved")  # transformers' own on-disk layout
    assert_same_logits(checkpoints.load(str(tmp_path / "saved")), hf)
    (tmp_path / "memory").mkdir()  # the in-memory key layout (model.language_model.*, lm_head) as a checkpoint
    hf.config.save_pretrained(tmp_path / "memory")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "memory" / "model.safetensors")
    assert_same_logits(checkpoints.load(str(tmp_path / "memory")), hf)
    from transformers import CLIPImageProcessorPil

    llama_tokenizer().save_pretrained(tmp_path / "saved")  # llava-hf directories carry their tokenizer and processor
    CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(
        tmp_path / "saved")
    imported = import_checkpoint(str(tmp_path / "saved"), str(tmp_path / "ours"))
    assert_same_logits(checkpoints.load(str(tmp_path / "ours")), hf)
    assert imported.config.vision_feature_select == "patch"


def test_export_loads_in_transformers_and_answers_like_ours(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    tokenizer = llama_tokenizer()
    vision, llm = save_tiny_backbones(str(tmp_path), tokenizer=tokenizer)
    ours = LlavaModel.from_config(LlavaConfig(vision_tower=vision, llm=llm)).eval()
    export_llava_hf(ours, tokenizer, load_image_processor(vision), str(tmp_path / "hf"))
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")

    image = Image.new("RGB", (30, 20), (200, 40, 40))
    fmt = ChatFormat(tokenizer, "vicuna_v1", ours.num_image_tokens)
    history = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    ids = fmt.prompt(history + [{"role": "user", "content": "<image>\nWhat color is it?"}])
    messages = history + [{"role": "user", "content": [{"type": "image", "image": image},
                                                       {"type": "text", "text": "What color is it?"}]}]
    pixel_values = process_image(image, load_image_processor(vision), "pad")[None]
    hf_ids = torch.tensor([[hf.config.image_token_index if t == IMAGE_TOKEN_INDEX else t for t in ids]])
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")  # as lmms-eval's llava_hf calls it
    assert torch.allclose(inputs["pixel_values"], pixel_values, atol=1e-5)  # padded to square like LLaVA
    assert (inputs["input_ids"] == hf.config.image_token_index).sum() == ours.num_image_tokens
    assert torch.equal(inputs["input_ids"], hf_ids)
    templated = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                              return_tensors="pt")
    assert torch.equal(templated["input_ids"], hf_ids) and torch.equal(templated["pixel_values"],
                                                                        inputs["pixel_values"])

    with torch.no_grad():
        expected = hf(input_ids=hf_ids, pixel_values=pixel_values).logits[0, :, :len(tokenizer)]
        logits = ours(torch.tensor([ids]), None, pixel_values)[0, :, :len(tokenizer)]
    assert (logits - expected).abs().max() < 1e-5
    greedy = hf.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    mine = generate.generate(ours, [ids], pixel_values, max_new_tokens=8, eos_ids={tokenizer.eos_token_id})[0]
    assert greedy[:len(mine)] == mine and len(mine) > 0


# The exported chat template against data.ChatFormat, for three Llama tokenizers: the tiny one (tokenizers' Metaspace)
# and Vicuna's SentencePiece tokenizer.model as transformers converts it, with tokenizer_config.json's legacy=False
# (Vicuna's and LLaVA-1.5's own setting) and legacy=True. Messages are in transformers' format.
RED, BLUE = Image.new("RGB", (30, 20), (200, 40, 40)), Image.new("RGB", (20, 30), (40, 40, 200))


def user(*parts):
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"}
                                        for p in parts]}


def reply(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


CONVERSATIONS = {  # name: (messages, add_generation_prompt, the images in order)
    "text": ([user("What is a cat?")], True, []),
    "text, two turns": ([user("What is a cat?"), reply("An animal."), user("And a dog?"), reply("One too.")], False,
                        []),
    "one image": ([user(RED, "What color is it?")], True, [RED]),
    "one image, answered": ([user(RED, "What color is it?"), reply("Red.")], False, [RED]),
    "an image in a later turn": ([user("Hi."), reply("Hello."), user("What color is it?", RED), reply("Red.")], False,
                                 [RED]),
    "two images in one turn": ([user("Compare them.", RED, BLUE)], True, [RED, BLUE]),
    "two images in two turns": ([user(RED, "This?"), reply("Red."), user(BLUE, "And this?")], True, [RED, BLUE]),
    "an image alone": ([user(RED), reply("A red picture."), user("Sure?")], True, [RED]),
    "two text parts": ([user(RED, "What color is it?", "Answer with one word.")], True, [RED]),
    "string content, lmms-eval's": ([{"role": "user", "content": "<image> <image>\nSame color?"}], True, [RED, BLUE]),
    "a system message": ([{"role": "system", "content": "Answer briefly."}, user(RED, "Color?"), reply("Red.")], False,
                         [RED]),
}


def as_llava(messages):
    """data.py's view of the same conversation: string content, a turn's images at its start as "<image>\\n"."""
    out = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = "<image>" * sum(p["type"] == "image" for p in content) + "\n".join(
                p["text"] for p in content if p["type"] == "text")
        out.append({"role": m["role"], "content": move_image_tags_first(content) if m["role"] == "user" else content})
    return out


@pytest.fixture(scope="module", params=["tiny", "vicuna", "vicuna legacy"])
def exported(request, tmp_path_factory):
    """(our tokenizer, tokens per image, the export's AutoProcessor, what the template writes after an image)."""
    from transformers import AutoProcessor, AutoTokenizer

    root = tmp_path_factory.mktemp("export")
    if request.param == "tiny":
        tokenizer = llama_tokenizer()
    else:
        rf.write_tokenizer(str(root / "tokenizer"))
        config = json.loads((root / "tokenizer" / "tokenizer_config.json").read_text())
        (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": "legacy" in
                                                                               request.param}))
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    vision, llm = save_tiny_backbones(str(root), tokenizer=tokenizer)
    ours = LlavaModel.from_config(LlavaConfig(vision_tower=vision, llm=llm))
    export_llava_hf(ours, tokenizer, load_image_processor(vision), str(root / "hf"))
    processor = AutoProcessor.from_pretrained(root / "hf")
    assert AutoTokenizer.from_pretrained(root / "hf").chat_template == processor.chat_template  # lmms-eval reads this
    # A legacy tokenizer puts a dummy-prefix "▁" after every special token, as LLaVA's chunks had after every image;
    # the others only at the start of the text, so the template writes "<image> \n" to give it back.
    return tokenizer, ours.num_image_tokens, processor, "\n" if request.param == "vicuna legacy" else " \n"


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_the_exported_chat_template_prompts_with_our_ids(exported, name):
    tokenizer, image_tokens, processor, after_image = exported
    messages, add_generation_prompt, images = CONVERSATIONS[name]
    fmt, image_id = ChatFormat(tokenizer, "vicuna_v1", image_tokens), processor.image_token_id
    if messages[0]["role"] == "system":  # ChatFormat has no system message; LLaVA's Conversation.system is replaced
        text = render("vicuna_v1", as_llava(messages[1:]), tokenizer, add_generation_prompt).replace(
            VICUNA_SYSTEM, messages[0]["content"])
    else:
        text = render("vicuna_v1", as_llava(messages), tokenizer, add_generation_prompt)
    ours = [image_id if t == IMAGE_TOKEN_INDEX else t for t in fmt.tokenize(text)[0]]
    assert ours.count(image_id) == len(images) * image_tokens
    kwargs = {"processor_kwargs": {"images": images}} if images else {}

    rendered = processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert rendered == text.replace("<image>\n", "<image>" + after_image)
    ids = processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, **kwargs)
    assert ids[0] == ours
    assert processor(text=rendered, images=images or None).input_ids[0] == ours

    # LLaVA's own text ("<image>\n", as llava-hf's template and hand-written prompts have it) loses, with these
    # tokenizers, the "▁" that LLaVA's chunked tokenization put between each image and its "\n".
    by_hand = processor(text=text, images=images or None).input_ids[0]
    if after_image == "\n":
        assert by_hand == ours
    else:
        space, newline = tokenizer.convert_tokens_to_ids(["▁", "<0x0A>"])
        lost = [i for i in range(1, len(ours) - 1) if ours[i - 1:i + 2] == [image_id, space, newline]]
        assert len(lost) == text.count("<image>\n") and by_hand == [t for i, t in enumerate(ours) if i not in lost]


def test_the_exported_chat_template_refuses_what_llava_has_no_prompt_for(exported):
    processor = exported[2]
    with pytest.raises(TemplateError, match="images go in user turns"):
        processor.apply_chat_template([user("Draw a cat."), {"role": "assistant", "content": [{"type": "image"}]}])
    with pytest.raises(TemplateError, match="roles are user and assistant"):
        processor.apply_chat_template([user("Hi."), {"role": "tool", "content": "42"}])
    assert (processor.patch_size, processor.vision_feature_select_strategy, processor.num_additional_image_tokens,
            processor.image_token) == (8, "default", 1, "<image>")


class Payload:
    def __reduce__(self):
        return (os.system, (f"echo pwned > {Payload.target}",))


def test_a_pickle_carrying_code_is_refused(tmp_path):
    Payload.target = tmp_path / "pwned"
    torch.save({"model.mm_projector.weight": torch.zeros(2, 2), "evil": Payload()}, tmp_path / "mm_projector.bin")
    with pytest.raises(ValueError, match="refusing to load .*mm_projector.bin"):
        projector_weights(str(tmp_path / "mm_projector.bin"))
    assert not Payload.target.exists()


# Damaged files in the original LLaVA layout and llava-hf's: a UserError naming the file, never a raw library error.
ORIGINAL_DAMAGE = {  # name: (what is done to the LLaVA directory, the error)
    "a .bin of junk": (lambda d: (d / "pytorch_model-00001-of-00002.bin").write_bytes(b"not a zip, not a pickle"),
                       r"pytorch_model-00001-of-00002.bin: not a PyTorch weights file \(torch.save's zip\), or cut "
                       r"short \(.*\); fetch it again"),
    "a cut .bin": (lambda d: (d / "pytorch_model-00002-of-00002.bin").write_bytes(
        (d / "pytorch_model-00002-of-00002.bin").read_bytes()[:3000]), "00002.bin: not a PyTorch weights file"),
    "an empty .bin": (lambda d: (d / "pytorch_model-00002-of-00002.bin").write_bytes(b""), "not a PyTorch weights"),
    "a .bin holding a list": (lambda d: torch.save([torch.zeros(2)], d / "pytorch_model-00001-of-00002.bin"),
                              "00001-of-00002.bin holds a list rather than named tensors"),
    "a missing .bin shard": (lambda d: (d / "pytorch_model-00002-of-00002.bin").unlink(),
                             "pytorch_model.bin.index.json names pytorch_model-00002-of-00002.bin, which is not in"),
    "an index of junk": (lambda d: (d / "pytorch_model.bin.index.json").write_text("[]"), "a JSON list, not an object"),
    "mm_vision_select_layer 'x'": (lambda d: (d / "config.json").write_text(json.dumps(
        {**json.loads((d / "config.json").read_text()), "mm_vision_select_layer": "x"})),
        r"config.json \(the original LLaVA's mm_\* keys\): vision_feature_layer 'x': not an integer"),
    "mm_vision_tower gone": (lambda d: (d / "config.json").write_text(json.dumps(
        {**json.loads((d / "config.json").read_text()), "mm_vision_tower": "/nowhere/clip"})),
        r"llava was trained with the vision tower at /nowhere/clip, which is not there now.*\(\"mm_vision_tower\"\)"),
}


@pytest.mark.parametrize("name", ORIGINAL_DAMAGE)
def test_damaged_files_of_the_original_layout_are_named(reference, tmp_path, name):
    hf, root = reference
    original_llava_files(hf, root, tmp_path / "llava")
    damage, error = ORIGINAL_DAMAGE[name]
    damage(tmp_path / "llava")
    with pytest.raises(UserError, match=error):
        checkpoints.load(str(tmp_path / "llava"))


def test_a_damaged_stage1_projector_and_llava_hf_shard_are_named(reference, tmp_path):
    hf, root = reference
    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "config.json").write_text(json.dumps({"mm_vision_tower": str(root / "vision"),
                                                                 "mm_projector_type": "mlp2x_gelu"}))
    (tmp_path / "stage1" / "mm_projector.bin").write_bytes(b"\x80\x04junk")
    with pytest.raises(UserError, match="mm_projector.bin: not a PyTorch weights file"):
        checkpoints.load(str(tmp_path / "stage1"), model_base=str(root / "llm"))
    torch.save({"model.mm_projector.weight": torch.zeros(48, 32), "model.mm_projector.bias": torch.zeros(48)},
               tmp_path / "stage1" / "mm_projector.bin")  # a linear projector where the config says mlp2x_gelu
    with pytest.raises(UserError, match=r"mm_projector.bin holds a linear projector \(linear_1 32→48\); this model's "
                                        r"projector type is mlp2x_gelu"):
        checkpoints.load(str(tmp_path / "stage1"), model_base=str(root / "llm"))
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"checkpoint .*hf: its files cannot be read \(SafetensorError: "):
        checkpoints.load(str(tmp_path / "hf"))


def test_the_command_line_says_what_is_wrong_in_one_line(tmp_path, capsys):
    """A source that does not exist, a checkpoint whose backbone folders have gone, an output that is the source: one
    `error:` line and status 2, no traceback, nothing overwritten."""
    from tools.convert import main

    model = save_tiny_checkpoint(tmp_path)
    config = (tmp_path / "model" / "config.json").read_bytes()
    capsys.readouterr()  # the progress bars of saving it
    gone = tmp_path / "moved"
    (tmp_path / "vision").rename(gone)  # the tower the checkpoint names by path

    def refused(*argv):
        with pytest.raises(SystemExit) as exit_:
            main(list(argv))
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        return err

    assert "nowhere" in refused("export", str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert "vision" in refused("export", model, str(tmp_path / "out"))
    gone.rename(tmp_path / "vision")
    assert "it is the source" in refused("export", model, model)
    assert "it is the source" in refused("import", model, model + "/")
    assert (tmp_path / "model" / "config.json").read_bytes() == config and not (tmp_path / "out").exists()
