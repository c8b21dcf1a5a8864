"""model.py against transformers' LlavaForConditionalGeneration, the projector formulas, and save/load."""

import os

import pytest
import torch
import torch.nn.functional as F
from hf_reference import HF_IMAGE_ID, VOCAB, mixed_batch, reference_and_ours
from tools.tiny import save_tiny_backbones, tiny_llama_config

import checkpoints
from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from model import LlavaConfig, LlavaModel, Projector, chunked_cross_entropy, supervised_targets

@pytest.mark.parametrize("select", ["patch", "cls_patch"])
def test_logits_and_loss_equal_transformers_llava(tmp_path, select):
    hf, ours = reference_and_ours(tmp_path, select)
    assert ours.num_image_tokens == 16 + (select == "cls_patch")
    input_ids, attention_mask, labels, pixel_values = mixed_batch(ours.num_image_tokens)
    hf_ids = input_ids.masked_fill(input_ids == IMAGE_TOKEN_INDEX, HF_IMAGE_ID)
    with torch.no_grad():
        expected = hf(input_ids=hf_ids, attention_mask=attention_mask, pixel_values=pixel_values, labels=labels)
        logits = ours(input_ids, attention_mask, pixel_values)
        loss_sum = ours(input_ids, attention_mask, pixel_values, labels)
    n_tokens = (supervised_targets(input_ids, labels) != IGNORE_INDEX).sum()
    real = attention_mask.bool()
    assert (logits[real] - expected.logits[real]).abs().max() < 1e-5
    assert n_tokens == (labels[:, 1:] != IGNORE_INDEX).sum()
    assert torch.allclose(loss_sum / n_tokens, expected.loss, atol=1e-6)


def test_text_only_batch_and_labels_on_image_positions_are_ignored(tmp_path):
    _, ours = reference_and_ours(tmp_path)
    input_ids, attention_mask, labels, pixel_values = mixed_batch(ours.num_image_tokens)
    with torch.no_grad():
        text_only = ours(input_ids[:1], attention_mask[:1])
        assert text_only.shape == (1, input_ids.shape[1], VOCAB)
        image_labels = torch.where(input_ids == IMAGE_TOKEN_INDEX, torch.zeros_like(labels), labels)
        assert torch.equal(ours(input_ids, attention_mask, pixel_values, image_labels),
                           ours(input_ids, attention_mask, pixel_values, labels))
    assert torch.equal(supervised_targets(input_ids, image_labels), supervised_targets(input_ids, labels))


def test_image_count_mismatch_is_a_clear_error(tmp_path):
    _, ours = reference_and_ours(tmp_path)
    input_ids, attention_mask, _, pixel_values = mixed_batch(ours.num_image_tokens)
    with pytest.raises(ValueError, match=r"48 image placeholders but 2 image\(s\) x 16 tokens"):
        ours(input_ids, attention_mask, pixel_values[:2])
    with pytest.raises(ValueError, match="image placeholders"):
        ours(input_ids, attention_mask)


def test_projector_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    linear = Projector("linear", 8, 6)
    assert torch.allclose(linear(x), x @ linear.linear_1.weight.T + linear.linear_1.bias)
    mlp = Projector("mlp3x_gelu", 8, 6)
    assert [n for n, _ in mlp.named_children()] == ["linear_1", "linear_2", "linear_3"]
    gelu = lambda t: 0.5 * t * (1 + torch.erf(t / 2 ** 0.5))  # noqa: E731  (the exact form, not tanh)
    h = gelu(x @ mlp.linear_1.weight.T + mlp.linear_1.bias)
    h = gelu(h @ mlp.linear_2.weight.T + mlp.linear_2.bias)
    assert torch.allclose(mlp(x), h @ mlp.linear_3.weight.T + mlp.linear_3.bias, atol=1e-6)
    with pytest.raises(ValueError, match="unknown projector type"):
        Projector("mlp2x_relu", 8, 6)


def test_chunked_cross_entropy_equals_the_plain_one():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    chunked = chunked_cross_entropy(hidden, targets, head, chunk_size=8)
    chunked.backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    plain = F.cross_entropy(head(hidden), targets, reduction="sum")
    plain.backward()
    assert torch.allclose(chunked, plain, atol=1e-5)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-6) and torch.allclose(grads[1], head.weight.grad, atol=1e-6)


def test_frozen_tower_gets_no_gradient_and_projector_does(tmp_path):
    _, ours = reference_and_ours(tmp_path)
    input_ids, attention_mask, labels, pixel_values = mixed_batch(ours.num_image_tokens)
    ours(input_ids, attention_mask, pixel_values, labels).backward()
    assert all(p.grad is None for p in ours.vision_tower.parameters())
    assert ours.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def logits_of(model, n_tokens):
    input_ids, attention_mask, _, pixel_values = mixed_batch(n_tokens)
    with torch.no_grad():
        return model(input_ids, attention_mask, pixel_values)


@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 40_000])
def test_save_load_gives_identical_logits(tmp_path, max_shard_bytes):
    _, ours = reference_and_ours(tmp_path)
    out = str(tmp_path / "out")
    checkpoints.save(ours, out, max_shard_bytes=max_shard_bytes)
    files = sorted(os.listdir(out))
    if max_shard_bytes < 2**20:
        assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    loaded = checkpoints.load(out).eval()
    assert loaded.config == ours.config
    assert torch.equal(logits_of(loaded, 16), logits_of(ours, 16))
    checkpoints.save(ours, out)  # again, unsharded, into the same directory: no stale shard may survive
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert torch.equal(logits_of(checkpoints.load(out), 16), logits_of(ours, 16))


def test_projector_only_checkpoint_takes_backbones_from_the_config(tmp_path):
    _, ours = reference_and_ours(tmp_path)
    out = str(tmp_path / "stage1")
    checkpoints.save(ours, out, modules=("multi_modal_projector",))
    from safetensors.torch import load_file

    assert all(k.startswith("multi_modal_projector.") for k in load_file(os.path.join(out, "model.safetensors")))
    assert torch.equal(logits_of(checkpoints.load(out), 16), logits_of(ours, 16))


def test_tied_embeddings_and_siglip_tower(tmp_path):
    """A SigLIP tower (no CLS: `patch` keeps every token) and an LLM whose lm_head is its embedding matrix."""
    from transformers import LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4)).save_pretrained(tmp_path / "v")
    LlamaForCausalLM(tiny_llama_config(VOCAB, tie_word_embeddings=True)).save_pretrained(tmp_path / "l")
    model = LlavaModel.from_config(LlavaConfig(vision_tower=str(tmp_path / "v"), llm=str(tmp_path / "l")))
    assert model.num_image_tokens == 16 and not model.has_cls
    with pytest.raises(ValueError, match="no CLS token"):
        LlavaModel.from_config(LlavaConfig(vision_tower=str(tmp_path / "v"), llm=str(tmp_path / "l"),
                                           vision_feature_select="cls_patch"))
    checkpoints.save(model, tmp_path / "out")
    loaded = checkpoints.load(str(tmp_path / "out"))
    head, embed = loaded.language_model.get_output_embeddings(), loaded.language_model.get_input_embeddings()
    assert head.weight.data_ptr() == embed.weight.data_ptr()
    assert torch.equal(logits_of(loaded, 16), logits_of(model, 16))


def test_loading_a_directory_without_a_projector_fails_clearly(tmp_path):
    vision_dir, llm_dir = save_tiny_backbones(str(tmp_path))
    model = LlavaModel.from_config(LlavaConfig(vision_tower=vision_dir, llm=llm_dir))
    checkpoints.save(model, tmp_path / "out", modules=("language_model",))
    with pytest.raises(ValueError, match="no projector weights"):
        checkpoints.load(str(tmp_path / "out"))


def test_a_backbone_checkpoint_missing_weights_is_an_error_not_random_values(tmp_path):
    """transformers fills weights a checkpoint lacks with random values and only reports it (quietly, here); a
    truncated LLM download must stop the run instead."""
    from safetensors.torch import load_file, save_file

    vision_dir, llm_dir = save_tiny_backbones(str(tmp_path))
    weights = load_file(os.path.join(llm_dir, "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, os.path.join(llm_dir, "model.safetensors"), {"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks the weights of 1 .*lm_head\.weight"):
        LlavaModel.from_config(LlavaConfig(vision_tower=vision_dir, llm=llm_dir))
