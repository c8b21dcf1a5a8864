"""transformers' InstructBLIP layout read into our model, checked against transformers' own InstructBLIP: the same
logits, the same greedy answers, the same input ids as its processor's; and `evaluate.py run` on such a repo fetched
from a loopback hub. Then BLIP-2's stage-1 Q-Former (a LAVIS .pth) as --init-from.

The reference is a tiny random InstructBlipForConditionalGeneration over a Llama, in the layout of
Salesforce/instructblip-vicuna-7b (tests/real_format.py), with its tokenizers' quirks (the LLM's BOS is "</s>")."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import checkpoints
import data
import generate
import tests.real_format as rf
from data import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["What is in the image?", "Describe the picture. How many shapes are there? Is there a triangle?"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """(folder, the transformers model it holds, the InstructBlipProcessor it was saved with, two images)."""
    root = tmp_path_factory.mktemp("instructblip")
    folder, hf, processor = rf.instructblip_repo(str(root / rf.INSTRUCTBLIP))
    images = []
    for i, size in enumerate([(40, 30), (28, 50)]):
        image = Image.new("RGB", size, (200, 40 + 90 * i, 40))
        image.paste((20, 20, 220), (5, 5, 20, 20))
        image.save(root / f"{i}.png")
        images.append(str(root / f"{i}.png"))
    return folder, hf, processor, images


@pytest.fixture(scope="module")
def ours(repo):
    folder = repo[0]
    model, fmt, processor = generate.load(folder)
    return model, fmt, processor


def conversation(question):
    return [{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}]


def test_the_layout_loads_as_an_instructblip(ours, repo):
    model, fmt, processor = ours
    c = model.config
    assert (c.projector_type, c.template, c.vision_feature_layer, c.vision_feature_select) == \
        ("qformer", "instructblip", -1, "cls_patch")
    assert model.num_features == 5 and model.num_image_tokens == 4
    assert type(processor).__name__ == "BlipImageProcessorPil"
    assert fmt.tokenizer.bos_token == "</s>" and fmt.instruction_tokenizer.cls_token == "[CLS]"
    # the post_layernorm transformers applies before the Q-Former is our projector's vision_layernorm
    hf = repo[1]
    torch.testing.assert_close(model.multi_modal_projector.vision_layernorm.weight,
                               hf.vision_model.post_layernorm.weight, rtol=0, atol=0)


def test_our_ids_are_its_processors(ours, repo):
    """Our ChatFormat's prompt and Q-Former instruction are InstructBlipProcessor's input_ids (its image token ->
    IMAGE_TOKEN_INDEX) and qformer_input_ids: the template, the BOS after the image, and the tokenizers' quirks."""
    model, fmt, _ = ours
    hf, processor, paths = repo[1], repo[2], repo[3]
    for question, path in zip(QUESTIONS, paths):
        theirs = processor(images=Image.open(path).convert("RGB"), text=question)
        ids = [IMAGE_TOKEN_INDEX if i == hf.config.image_token_index else i for i in theirs["input_ids"][0]]
        assert fmt.prompt(conversation(question)) == ids
        assert ids[model.num_image_tokens] == fmt.tokenizer.convert_tokens_to_ids("</s>")  # the quirk: BOS "</s>"
        assert fmt.instructions(conversation(question)) == [theirs["qformer_input_ids"][0]]
        # a training sample: LAVIS's (blip2_vicuna_instruct.py concat_text_input_output) the prompt's ids, then the
        # reply + "</s>" tokenized on its own without its BOS; only the reply supervised
        reply = "A cat on a mat."
        ids_, labels = fmt.encode(conversation(question) + [{"role": "assistant", "content": reply}])
        output = fmt.tokenizer(reply + fmt.tokenizer.eos_token).input_ids[1:]
        assert ids_ == ids + output
        assert labels == [data.IGNORE_INDEX] * len(ids) + output


def batch(fmt, processor, paths, questions, side="right"):
    """Our inputs for one image and question per sample, padded on `side`, and the same for transformers (its image
    token in place of IMAGE_TOKEN_INDEX, its processor's pixel values)."""
    prompts = [fmt.prompt(conversation(q)) for q in questions]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), fmt.pad_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        span = slice(0, len(p)) if side == "right" else slice(width - len(p), width)
        ids[i, span], mask[i, span] = torch.tensor(p), 1
    instructions = data.pad_instructions([i for q in questions for i in fmt.instructions(conversation(q))])
    pixels = generate.prepare_images(paths, processor, "crop")
    return ids, mask, pixels, instructions


def test_the_same_logits_as_transformers(ours, repo):
    """A batch of two: prompts and instructions of different lengths, padding in both, fp32 within 1e-5."""
    model, fmt, processor = ours
    hf, hf_processor, paths = repo[1], repo[2], repo[3]
    ids, mask, pixels, inst = batch(fmt, processor, paths, QUESTIONS)
    assert inst["instruction_mask"].sum(1).tolist()[0] < inst["instruction_mask"].shape[1]  # padded Q-Former text
    theirs = hf_processor(images=[Image.open(p).convert("RGB") for p in paths], text=QUESTIONS, return_tensors="pt",
                          padding=True)
    torch.testing.assert_close(pixels, theirs["pixel_values"], rtol=0, atol=0)
    hf_ids = ids.masked_fill(ids == IMAGE_TOKEN_INDEX, hf.config.image_token_index)
    with torch.no_grad():
        reference = hf(pixel_values=theirs["pixel_values"], qformer_input_ids=inst["instruction_ids"],
                       qformer_attention_mask=inst["instruction_mask"], input_ids=hf_ids,
                       attention_mask=mask).logits
        logits = model(ids, mask, pixels, instruction_ids=inst["instruction_ids"],
                       instruction_mask=inst["instruction_mask"])
    real = mask.bool()
    assert reference[real].abs().max() > 1  # weights of a scale where differences show
    torch.testing.assert_close(logits[real], reference[real], rtol=0, atol=1e-5)
    # and saved in our layout, read back: the same model
    out = os.path.join(os.path.dirname(repo[0]), "ours")
    checkpoints.save(model, out)
    again = checkpoints.load(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids, mask, pixels, instruction_ids=inst["instruction_ids"],
                                         instruction_mask=inst["instruction_mask"]), logits, rtol=0, atol=0)


def test_the_same_greedy_answers_as_transformers(ours, repo):
    model, fmt, processor = ours
    hf, paths = repo[1], repo[3]
    ids, mask, pixels, inst = batch(fmt, processor, paths, QUESTIONS, side="left")
    eos = fmt.tokenizer.eos_token_id
    with torch.no_grad():
        out = hf.generate(pixel_values=pixels, qformer_input_ids=inst["instruction_ids"],
                          qformer_attention_mask=inst["instruction_mask"],
                          input_ids=ids.masked_fill(ids == IMAGE_TOKEN_INDEX, hf.config.image_token_index),
                          attention_mask=mask, do_sample=False, max_new_tokens=8, eos_token_id=eos,
                          pad_token_id=fmt.pad_id)
    theirs = [row.tolist() for row in out[:, ids.shape[1]:]]
    theirs = [row[:row.index(eos)] if eos in row else row for row in theirs]
    convs = [conversation(q) for q in QUESTIONS]
    mine = generate.generate(model, [fmt.prompt(c) for c in convs], pixels, max_new_tokens=8, eos_ids={eos},
                             pad_id=fmt.pad_id, instructions=[i for c in convs for i in fmt.instructions(c)])
    assert mine == theirs and any(len(row) > 2 for row in mine)
    texts = generate.answer(model, fmt, convs, pixels, max_new_tokens=8)
    assert texts == [fmt.tokenizer.decode(row, skip_special_tokens=True).strip() for row in theirs]


def test_evaluate_run_on_the_repo_from_a_hub(repo, tmp_path):
    """`evaluate.py run --model Salesforce/instructblip-vicuna-7b`, the repo downloaded through huggingface_hub from
    a loopback hub (qformer_tokenizer/ included); its answer is transformers' greedy one."""
    from hub import serve

    folder, hf, processor, paths = repo
    question = {"question_id": 3, "image": os.path.basename(paths[0]), "text": QUESTIONS[0]}
    (tmp_path / "questions.jsonl").write_text(json.dumps(question) + "\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # (fp32 on the CPU, as the reference: a GPU runs bf16)
    with serve({rf.INSTRUCTBLIP: folder}) as hub:
        env["HF_ENDPOINT"] = hub.url
        result = subprocess.run([sys.executable, "evaluate.py", "run", "--model", rf.INSTRUCTBLIP, "--questions",
                                 str(tmp_path / "questions.jsonl"), "--image-folder", os.path.dirname(paths[0]),
                                 "--answers", str(tmp_path / "answers.jsonl"), "--max-new-tokens", "6"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        downloaded = set(hub.downloaded(rf.INSTRUCTBLIP))
    assert {"qformer_tokenizer/tokenizer.json", "preprocessor_config.json", "tokenizer.json"} <= downloaded
    answer = json.loads((tmp_path / "answers.jsonl").read_text())
    inputs = processor(images=Image.open(paths[0]).convert("RGB"), text=QUESTIONS[0], return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, do_sample=False, max_new_tokens=6, eos_token_id=processor.tokenizer.eos_token_id,
                          pad_token_id=processor.tokenizer.pad_token_id)
    expected = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer["question_id"] == 3 and answer["text"] == expected


# ----------------------------------------------------------------------------------------------------------------------
# BLIP-2's stage-1 Q-Former (LAVIS's blip2_pretrained_vitL.pth) as --init-from

LAVIS_EXTRAS = {  # what a LAVIS stage-1 checkpoint holds besides the Q-Former: none of it has a place in ours
    "visual_encoder.blocks.0.attn.qkv.weight": torch.randn(6, 2), "vision_proj.weight": torch.randn(4, 32),
    "text_proj.weight": torch.randn(4, 32), "itm_head.weight": torch.randn(2, 32), "temp": torch.tensor(0.07),
    "Qformer.cls.predictions.bias": torch.randn(8), "Qformer.cls.predictions.transform.dense.weight": torch.randn(4, 4),
    "Qformer.bert.embeddings.position_ids": torch.arange(512)[None]}


def lavis_names(state):
    """LAVIS's names for transformers' InstructBLIP weights (or our projector's, which are transformers' names):
    the renames of transformers' convert_instructblip_original_to_pytorch.py undone, llm_proj left out (stage 1 has
    no LLM)."""
    out = {}
    for k, v in state.items():
        if k == "query_tokens":
            out[k] = v
        elif k.startswith(("vision_model.post_layernorm.", "vision_layernorm.")):
            out["ln_vision." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("qformer.") and "position_ids" not in k:
            k = "Qformer.bert." + k[len("qformer."):].replace("embeddings.layernorm.", "embeddings.LayerNorm.")
            out[k.replace("attention.attention.", "attention.self.")] = v
    return out


def fresh_projector(model, vision_hidden=24, seed=5):
    from qformer import QFormerProjector

    torch.manual_seed(seed)
    return QFormerProjector(model.multi_modal_projector.config, vision_hidden,
                            model.language_model.config.hidden_size).eval()


def test_blip2_stage1_qformer_as_init_from(ours, repo, tmp_path, capsys):
    """The Q-Former of a LAVIS checkpoint ({"model": state dict}) in our projector computes what transformers'
    InstructBLIP with those weights computes; only language_projection is not in it, and stays as initialised."""
    hf = repo[1]
    file = tmp_path / "blip2_pretrained_vitL.pth"
    keys = lavis_names(hf.state_dict())
    assert "Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in keys  # (LAVIS's names, Qformer.py)
    torch.save({"model": {**keys, **LAVIS_EXTRAS}}, file)
    projector = fresh_projector(ours[0])
    weights = checkpoints.projector_weights(str(file), expected=projector)
    assert "freshly initialised" in capsys.readouterr().out
    assert weights.keys() == projector.state_dict().keys() - {"language_projection.weight", "language_projection.bias"}
    before = projector.language_projection.weight.clone()
    missing = projector.load_state_dict(weights, strict=False).missing_keys
    assert sorted(missing) == ["language_projection.bias", "language_projection.weight"]
    assert torch.equal(projector.language_projection.weight, before)
    projector.language_projection.load_state_dict(hf.language_projection.state_dict())
    pixels, q = torch.randn(2, 3, 28, 28), torch.tensor([[2, 30, 31, 3], [2, 40, 3, 0]])
    with torch.no_grad():
        features = hf.vision_model(pixels, output_hidden_states=True).hidden_states[-1]
        expected = hf.get_image_features(pixels, qformer_input_ids=q, qformer_attention_mask=(q != 0).long(),
                                         return_dict=True).pooler_output
        torch.testing.assert_close(projector(features, q, (q != 0).long()), expected, rtol=0, atol=1e-5)


def test_blip2_checkpoints_that_do_not_fit_are_refused(ours, repo, tmp_path):
    from model import Projector

    keys = lavis_names(repo[1].state_dict())
    # a pickle carrying code: refused before anything in it runs
    opened = tmp_path / "opened"

    class Opens:
        def __reduce__(self):
            return (open, (str(opened), "w"))

    torch.save({"model": keys, "args": Opens()}, tmp_path / "poisoned.pth")
    with pytest.raises(UserError, match="refusing to load .*poisoned.pth: it holds pickled objects"):
        checkpoints.projector_weights(str(tmp_path / "poisoned.pth"), expected=fresh_projector(ours[0]))
    assert not opened.exists()
    # EVA-CLIP-g's Q-Former (1408 wide) into a CLIP-L model (1024), and the other way round
    for have, want, fits in [(1408, 1024, "blip2_pretrained_vitL.pth"), (1024, 1408, "blip2_pretrained.pth")]:
        torch.save({"model": lavis_names(fresh_projector(ours[0], have).state_dict())}, tmp_path / f"{have}.pth")
        with pytest.raises(UserError, match=f"vision tower {have} wide.*features {want} wide.*LAVIS's {fits}"):
            checkpoints.projector_weights(str(tmp_path / f"{have}.pth"), expected=fresh_projector(ours[0], want))
    # a stage-2 checkpoint, whose Q-Former lost its text side (LAVIS's blip2_opt.py deletes it)
    textless = {k: v for k, v in keys.items() if "word_embeddings" not in k and not
                any(f".{n}.dense" in k and "attention" not in k for n in ("intermediate", "output"))}
    torch.save({"model": textless}, tmp_path / "stage2.pth")
    with pytest.raises(UserError, match="without its text side.*pass the stage-1 checkpoint"):
        checkpoints.projector_weights(str(tmp_path / "stage2.pth"), expected=fresh_projector(ours[0]))
    # other Q-Former sizes than --qformer's, and a LLaVA projector
    torch.save({"model": {k: v for k, v in keys.items() if ".layer.2." not in k}}, tmp_path / "two_layers.pth")
    with pytest.raises(UserError, match="layer.2.* not there.*not those of --qformer"):
        checkpoints.projector_weights(str(tmp_path / "two_layers.pth"), expected=fresh_projector(ours[0]))
    torch.save({"model": keys}, tmp_path / "ok.pth")
    with pytest.raises(UserError, match="BLIP-2's Q-Former.*pass --projector-type qformer"):
        checkpoints.projector_weights(str(tmp_path / "ok.pth"), expected=Projector("mlp2x_gelu", 24, 32))


def test_a_run_starts_from_the_blip2_qformer(backbones, tmp_path, capsys):
    """--init-from blip2_pretrained_vitL.pth in train.py: the run's initial projector is the checkpoint's Q-Former,
    with a fresh language_projection of the run's LLM width."""
    import finetune
    import train
    from model import LlavaModel
    from qformer import QFormerConfig, QFormerProjector
    from tools.tiny import bert_tokenizer

    vision, llm = backbones
    sizes = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_query_tokens=4,
                 vocab_size=200)
    torch.manual_seed(7)
    source = QFormerProjector(QFormerConfig(**sizes), vision_hidden=32, text_hidden=8)  # (CLIP's width; any LLM)
    lavis = lavis_names(source.state_dict())
    torch.save({"model": {**lavis, **LAVIS_EXTRAS}}, tmp_path / "blip2_pretrained_vitL.pth")
    bert_tokenizer().save_pretrained(tmp_path / "bert")
    (tmp_path / "data.json").write_text("[]")
    cfg = train.parse_config(["--vision-tower", vision, "--llm", llm, "--data-path", str(tmp_path / "data.json"),
                              "--output-dir", str(tmp_path / "out"), "--projector-type", "qformer", "--qformer",
                              json.dumps(sizes), "--qformer-tokenizer", str(tmp_path / "bert"), "--init-from",
                              str(tmp_path / "blip2_pretrained_vitL.pth")], finetune.STAGE_2, {}, "")
    model = LlavaModel.from_config(cfg.model_config(), empty=True)
    full = train.initial_weights(cfg, model)
    assert "freshly initialised" in capsys.readouterr().out
    for name, tensor in source.state_dict().items():
        if not name.startswith("language_projection."):
            assert torch.equal(full[f"multi_modal_projector.{name}"], tensor), name
    assert full["multi_modal_projector.language_projection.weight"].shape == (48, 32)  # the run's LLM is 48 wide


# ----------------------------------------------------------------------------------------------------------------------
# The other direction: tools/convert.py export of a qformer model to transformers' InstructBLIP


def test_export_to_transformers_instructblip(repo, tmp_path):
    """A qformer model (the repo's, its Q-Former and LLM changed as fine-tuning would, saved in our layout) exported:
    transformers' InstructBlipForConditionalGeneration loads it and computes our logits, and the exported
    InstructBlipProcessor gives our ids."""
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    from tools.convert import main as convert, write_with_tokenizer

    folder, _, _, paths = repo
    model, fmt, processor = generate.load(folder)
    torch.manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("vision_tower."):
                p.add_(torch.randn_like(p) * 0.05)
    write_with_tokenizer(model, folder, str(tmp_path / "tuned"))
    convert(["export", str(tmp_path / "tuned"), str(tmp_path / "hf")])
    hf = InstructBlipForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    hf_processor = InstructBlipProcessor.from_pretrained(str(tmp_path / "hf"))
    images = [Image.open(p).convert("RGB") for p in paths]
    theirs = hf_processor(images=images, text=QUESTIONS, return_tensors="pt", padding=True)
    ids, mask, pixels, inst = batch(fmt, processor, paths, QUESTIONS)
    hf_ids = ids.masked_fill(ids == IMAGE_TOKEN_INDEX, hf.config.image_token_index)
    assert torch.equal(theirs["input_ids"], hf_ids) and torch.equal(theirs["attention_mask"], mask)
    assert torch.equal(theirs["qformer_input_ids"], inst["instruction_ids"])
    with torch.no_grad():
        reference = hf(**theirs).logits
        logits = model(ids, mask, pixels, instruction_ids=inst["instruction_ids"],
                       instruction_mask=inst["instruction_mask"])
    torch.testing.assert_close(logits[mask.bool()], reference[mask.bool()], rtol=0, atol=1e-5)


def test_a_qformer_on_a_clip_tower_does_not_export_as_instructblip(backbones, tmp_path):
    """transformers' InstructBLIP has no CLIP tower read at layer -2: such a model is refused, not exported wrong."""
    from model import LlavaConfig, LlavaModel
    from tools.convert import export_instructblip_hf
    from tools.tiny import bert_tokenizer

    vision, llm = backbones
    bert = bert_tokenizer()
    bert.save_pretrained(tmp_path / "bert")
    sizes = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_query_tokens=4,
                 vocab_size=200)
    model = LlavaModel.from_config(LlavaConfig(vision_tower=vision, llm=llm, projector_type="qformer", qformer=sizes,
                                               qformer_tokenizer=str(tmp_path / "bert")))
    with pytest.raises(ValueError, match="reads a clip_vision_model at layer -2 .*no equivalent there"):
        export_instructblip_hf(model, data.load_tokenizer(llm), data.load_image_processor(vision), bert,
                               str(tmp_path / "out"))
