"""Our model and transformers' LlavaForConditionalGeneration built from the same tiny random weights."""

import torch

from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from model import LlavaConfig, LlavaModel
from tools.tiny import tiny_clip_vision_config, tiny_llama_config

VOCAB, HF_IMAGE_ID = 120, 119


def reference_and_ours(tmp_path, select="patch", projector="mlp2x_gelu"):
    """transformers' Llava with random weights, and our model built from the same backbones and projector."""
    from transformers import LlavaConfig as HFLlavaConfig
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(HFLlavaConfig(
        vision_config=tiny_clip_vision_config(image_size=16, patch_size=4), text_config=tiny_llama_config(VOCAB),
        image_token_index=HF_IMAGE_ID, vision_feature_layer=-2, projector_hidden_act="gelu",
        vision_feature_select_strategy={"patch": "default", "cls_patch": "full"}[select])).eval()
    with torch.no_grad():  # O(1) pre-activations, where GELU's erf and tanh forms differ visibly
        for p in hf.model.multi_modal_projector.parameters():
            p.normal_(0, 0.5)
    vision_dir, llm_dir = str(tmp_path / "vision"), str(tmp_path / "llm")
    hf.model.vision_tower.save_pretrained(vision_dir)
    llm = LlamaForCausalLM(hf.config.text_config)
    llm.model.load_state_dict(hf.model.language_model.state_dict())
    llm.lm_head.load_state_dict(hf.lm_head.state_dict())
    llm.save_pretrained(llm_dir)
    ours = LlavaModel.from_config(LlavaConfig(vision_tower=vision_dir, llm=llm_dir, projector_type=projector,
                                              vision_feature_select=select)).eval()
    ours.multi_modal_projector.load_state_dict(hf.model.multi_modal_projector.state_dict())
    return hf, ours


def mixed_batch(n_tokens, seed=1):
    """Three right-padded samples with 0, 1 and 2 images, as data.py builds them; labels on some text tokens."""
    g = torch.Generator().manual_seed(seed)
    text = lambda k: torch.randint(1, HF_IMAGE_ID, (k,), generator=g).tolist()  # noqa: E731
    image = [IMAGE_TOKEN_INDEX] * n_tokens
    rows = [text(9), text(3) + image + text(5), text(2) + image + text(3) + image + text(2)]
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = input_ids.masked_fill((attention_mask == 0) | (input_ids == IMAGE_TOKEN_INDEX), IGNORE_INDEX)
    labels = labels.masked_fill(torch.rand(labels.shape, generator=g) < 0.3, IGNORE_INDEX)
    pixel_values = torch.randn(3, 3, 16, 16, generator=g)
    return input_ids, attention_mask, labels, pixel_values
