"""Convert checkpoints: released LLaVA models into ours, and ours into transformers' Llava format.

    python tools/convert.py import liuhaotian/llava-v1.5-7b out/llava-v1.5-7b           # original LLaVA layout
    python tools/convert.py import DIR_WITH_mm_projector.bin out/stage1 --model-base lmsys/vicuna-7b-v1.5
    python tools/convert.py import llava-hf/llava-1.5-7b-hf out/llava-1.5-7b               # transformers' layout
    python tools/convert.py export runs/toy/finetune out/toy-hf                            # ours -> llava-hf

`import` writes our layout (config.json + safetensors + tokenizer + image processor), which generate.py, evaluate.py
and finetune.py --init-from read; checkpoints.load also reads the source layouts directly. `export` writes
a directory that transformers' LlavaForConditionalGeneration.from_pretrained and AutoProcessor.from_pretrained load:
`<image>` added to the tokenizer (and the embeddings grown by a row), image_token_index, image_seq_length,
vision_feature_layer and vision_feature_select_strategy set, and LLaVA's pad-to-square kept in the image processor.
Nothing pickled is ever executed: safetensors, or torch.load(weights_only=True) for .bin files.
"""

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from data import load_tokenizer_and_processor  # noqa: E402
import checkpoints  # noqa: E402
from model import params_on_meta  # noqa: E402


def import_checkpoint(source, out, model_base=None):
    model = checkpoints.load(source, model_base=model_base)
    tokenizer, processor = load_tokenizer_and_processor(source, model.config)
    checkpoints.save(model, out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    return model


def export_llava_hf(model, tokenizer, image_processor, out):
    """Our model as transformers' LlavaForConditionalGeneration + LlavaProcessor in `out`."""
    from transformers import AddedToken, LlavaConfig, LlavaForConditionalGeneration, LlavaImageProcessorPil, \
        LlavaProcessor

    if model.config.projector_type != "mlp2x_gelu":
        raise ValueError(f"transformers' Llava has a 2-layer GELU projector; {model.config.projector_type} has no "
                         "equivalent there")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    text_config = copy.deepcopy(model.language_model.config)
    text_config.vocab_size = max(text_config.vocab_size, len(tokenizer))
    vision = model.vision_tower.config
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text_config.to_dict(),
                         image_token_index=image_id, image_seq_length=model.num_image_tokens,
                         vision_feature_layer=model.config.vision_feature_layer, projector_hidden_act="gelu",
                         vision_feature_select_strategy="full" if model.config.vision_feature_select == "cls_patch"
                         else "default")
    with params_on_meta():
        hf = LlavaForConditionalGeneration(config)
    state = {f"model.vision_tower.{k}": v for k, v in model.vision_tower.state_dict().items()}
    state.update({f"model.multi_modal_projector.{k}": v for k, v in model.multi_modal_projector.state_dict().items()})
    prefix = model.language_model.base_model_prefix + "."
    for k, v in model.language_model.state_dict().items():
        state[f"model.language_model.{k[len(prefix):]}" if k.startswith(prefix) else k] = v
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):  # new rows (<image>): the mean row
        rows = config.text_config.vocab_size - state[name].shape[0]
        state[name] = torch.cat([state[name], state[name].mean(0, keepdim=True).expand(rows, -1)]) if rows else \
            state[name]
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and not [n for n, p in hf.named_parameters() if p.is_meta], (missing, unexpected)
    hf.save_pretrained(out)
    side = vision.image_size
    pil = LlavaImageProcessorPil(do_pad=model.config.image_aspect_ratio == "pad", size={"shortest_edge": side},
                                 crop_size={"height": side, "width": side}, image_mean=image_processor.image_mean,
                                 image_std=image_processor.image_std)
    LlavaProcessor(image_processor=pil, tokenizer=tokenizer, patch_size=vision.patch_size,
                   vision_feature_select_strategy=config.vision_feature_select_strategy,
                   num_additional_image_tokens=int(model.has_cls)).save_pretrained(out)
    return hf


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("direction", choices=["import", "export"])
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--model-base", help="import: the base LLM of a stage-1 (mm_projector.bin) directory")
    args = p.parse_args(argv)
    if args.direction == "import":
        import_checkpoint(args.source, args.out, args.model_base)
    else:
        model = checkpoints.load(args.source)
        tokenizer, processor = load_tokenizer_and_processor(args.source, model.config)
        export_llava_hf(model, tokenizer, processor, args.out)
    print(f"{args.direction}ed {args.source} -> {args.out}")


if __name__ == "__main__":
    main()
