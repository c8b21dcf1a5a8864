"""Convert checkpoints: released LLaVA models into ours, and ours into transformers' Llava format.

    python tools/convert.py import liuhaotian/llava-v1.5-7b out/llava-v1.5-7b           # original LLaVA layout
    python tools/convert.py import DIR_WITH_mm_projector.bin out/stage1 --model-base lmsys/vicuna-7b-v1.5
    python tools/convert.py import llava-hf/llava-1.5-7b-hf out/llava-1.5-7b               # transformers' layout
    python tools/convert.py export runs/toy/finetune out/toy-hf                            # ours -> llava-hf
    python tools/convert.py export runs/instructblip-ft out/ib-hf      # a qformer model -> transformers' InstructBLIP
    python tools/convert.py merge runs/lora out/merged                 # a LoRA run's adapters folded into a full model
    python tools/convert.py apply-delta liuhaotian/LLaVA-13b-delta-v1-1 out/llava-13b-v1-1 --model-base LLAMA_13B_DIR

`import` writes our layout (config.json + safetensors + tokenizer + image processor), which generate.py, evaluate.py
and finetune.py --init-from read; checkpoints.load also reads the source layouts directly. `export` writes
a directory that transformers' LlavaForConditionalGeneration.from_pretrained and AutoProcessor.from_pretrained load:
`<image>` added to the tokenizer (and the embeddings grown by a row), image_token_index, image_seq_length,
vision_feature_layer and vision_feature_select_strategy set, LLaVA's pad-to-square kept in the image processor, and
a chat template (chat_template.jinja, read by the processor and the tokenizer) that renders the model's own prompt,
system prompt included, so apply_chat_template (lmms-eval's llava_hf, vLLM, other servers) prompts it as it was
trained. llava-hf's own template drops the system prompt. A qformer model whose tower is InstructBLIP's own (one
loaded or fine-tuned from Salesforce/instructblip-*) exports as InstructBlipForConditionalGeneration instead.
`merge` loads a LoRA run's output (PEFT's adapter files and the projector, on their base), adds each adapter's
(alpha / r) B A to its base weight and writes the whole model in our layout, which then exports like any other.
`apply-delta` turns the first paper's released delta weights into the model (target = base + delta,
checkpoints.apply_delta; LLaVA's `llava/model/apply_delta.py`), in the original layout with the delta's config and
tokenizer (its added <im_start>/<im_end>): load or `import` it like any other.
Nothing pickled is ever executed: safetensors, or torch.load(weights_only=True) for .bin files.
"""

import argparse
import copy
from dataclasses import replace
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from data import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, LLAVA_V1_SYSTEM, VICUNA_SYSTEM, ChatFormat  # noqa: E402
from data import UserError, load_tokenizer_and_processor, render  # noqa: E402
import checkpoints  # noqa: E402
import lora  # noqa: E402
from generate import USER_ERRORS, exit_with  # noqa: E402
from model import load_instruction_tokenizer, params_on_meta  # noqa: E402


def import_checkpoint(source, out, model_base=None, template=None):
    """Any layout checkpoints.load reads, written in ours; LoRA adapters (LLaVA's LoRA outputs) merged first.
    template: the conversation template to record, for a source whose config does not say it (the original layout's:
    llava_v0 for the first paper's v0 models; vicuna_v1 otherwise)."""
    model = checkpoints.load(source, model_base=model_base)
    if template:
        model.config = replace(model.config, template=template)
    lora.merge(model.language_model)
    write_with_tokenizer(model, source, out)
    return model


def write_with_tokenizer(model, source, out):
    """model in our layout at `out`, with the tokenizer and image processor of `source`."""
    tokenizer, processor = load_tokenizer_and_processor(source, model.config)
    checkpoints.save(model, out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)


def apply_delta(delta, out, base):
    """The delta's config, tokenizer and other small files copied to `out`, then base + delta as safetensors;
    config.json last, so an interrupted run leaves no directory that loads."""
    import shutil

    if not base:
        raise UserError("apply-delta: --model-base is required: the LLM the delta was made from (the original LLaMA "
                        "weights, converted to transformers' layout)")
    target = checkpoints.apply_delta(base, delta)
    source = checkpoints.resolve(delta)
    os.makedirs(out, exist_ok=True)
    checkpoints.remove(os.path.join(out, "config.json"))
    small = [f for f in sorted(os.listdir(source)) if f.endswith((".json", ".model", ".txt", ".jinja"))
             and not f.endswith(".index.json") and f != "config.json"]
    for f in small:
        checkpoints.atomic_write(os.path.join(out, f), lambda tmp, f=f: shutil.copyfile(os.path.join(source, f), tmp))
    checkpoints.write_weights(out, target)
    checkpoints.atomic_write(os.path.join(out, "config.json"),
                             lambda tmp: shutil.copyfile(os.path.join(source, "config.json"), tmp))
    return target


def merge_lora(source, out):
    """A LoRA run's output as a full model: the adapters merged into their base weights (lora.merge), saved whole."""
    model = checkpoints.load(source)
    if not lora.adapted(model.language_model):
        raise UserError(f"source {source}: holds no LoRA adapters ({checkpoints.ADAPTER_CONFIG}); merge takes a LoRA "
                        "run's output (finetune.py --lora-r)")
    lora.merge(model.language_model)
    write_with_tokenizer(model, source, out)
    return model


# data.py's vicuna_v1 / llava_v1 (LLaVA's SeparatorStyle.TWO) as Jinja, for messages in transformers' format: content
# a string or a list of {"type": "text", "text"} and {"type": "image"} parts. Like data.py, every image of a turn goes
# to its start as "<image>\n" (LLaVA's preprocess_multimodal), also `<image>` tags written in the text; text parts are
# joined with "\n". A leading system message replaces the default system prompt (LLaVA's Conversation.system).
# No {% generation %} blocks: they are transformers' own Jinja extension, which other template engines may not know.
VICUNA_JINJA = """\
{%- macro turn(content, is_user) -%}
    {%- if content is string -%}
        {%- set text = content -%}
        {%- set n = 0 -%}
    {%- else -%}
        {%- set text = content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -%}
        {%- set n = content | selectattr('type', 'equalto', 'image') | list | length -%}
    {%- endif -%}
    {%- if not is_user -%}
        {%- if n or image in text -%}{{ raise_exception('images go in user turns') }}{%- endif -%}
        {{- text -}}
    {%- elif n + text.count(image) == 0 -%}
        {{- text -}}
    {%- else -%}
        {{- ((image + after_image) * (n + text.count(image)) + text.replace(image, '').strip()).strip() -}}
    {%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0]['role'] == 'system' -%}
    {{- turn(messages[0]['content'], false) + ' ' -}}
    {%- set messages = messages[1:] -%}
{%- else -%}
    {{- system + ' ' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}
        {{- 'USER: ' + turn(message['content'], true) + ' ' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- 'ASSISTANT: ' + turn(message['content'], false) + eos -}}
    {%- else -%}
        {{- raise_exception('roles are user and assistant, and system as the first message only') -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- 'ASSISTANT:' -}}
{%- endif -%}
"""


def after_image(tokenizer, template):
    """What the exported template writes after each `<image>` where data.py writes "\n", so that the processor's ids
    (the whole prompt tokenized at once) are LLaVA's (the text around each image tokenized on its own,
    tokenizer_image_token). A SentencePiece-style tokenizer puts its dummy-prefix "▁" at the start of each chunk, so
    LLaVA's models saw "▁" "\n" after every image; a Llama tokenizer with legacy=False (Vicuna's, LLaVA-1.5's) adds it
    only at the start of the whole text, and " \n" gives that "▁" back. Which one holds is measured here."""
    fmt = ChatFormat(tokenizer, template, image_tokens=1)
    probe = render(template, [{"role": "user", "content": f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\nWhat is it?"}], tokenizer,
                   add_generation_prompt=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for text in ("\n", " \n"):
        ids = tokenizer(probe.replace(IMAGE_TOKEN + "\n", IMAGE_TOKEN + text)).input_ids
        if [IMAGE_TOKEN_INDEX if i == image_id else i for i in ids] == fmt.tokenize(probe)[0]:
            return text
    warnings.warn(f"{type(tokenizer).__name__} tokenizes the text after an image differently in one piece than "
                  "LLaVA does in chunks; the exported chat template renders LLaVA's text, the ids will differ")
    return "\n"


def chat_template(template, tokenizer):
    """The Jinja chat template rendering data.py's `template` for the export's processor and tokenizer."""
    if template not in ("vicuna_v1", "llava_v1"):
        return None
    constants = {"system": VICUNA_SYSTEM if template == "vicuna_v1" else LLAVA_V1_SYSTEM, "eos": tokenizer.eos_token,
                 "image": IMAGE_TOKEN, "after_image": after_image(tokenizer, template)}
    return "".join(f"{{%- set {k} = {json.dumps(v)} -%}}\n" for k, v in constants.items()) + VICUNA_JINJA


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
    template = chat_template(model.config.template, tokenizer)
    if template:
        tokenizer.chat_template = template  # lmms-eval's llava_hf renders with processor.tokenizer.apply_chat_template
    elif model.config.template != "chat_template":
        warnings.warn(f"no chat template is exported for the {model.config.template!r} template; write its prompts "
                      "yourself")
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
                   num_additional_image_tokens=int(model.has_cls), image_token=IMAGE_TOKEN,
                   chat_template=tokenizer.chat_template).save_pretrained(out)
    return hf


def export_instructblip_hf(model, tokenizer, image_processor, instruction_tokenizer, out):
    """Our qformer model as transformers' InstructBlipForConditionalGeneration + InstructBlipProcessor in `out` (the
    layout of Salesforce/instructblip-vicuna-7b): the tower must be InstructBLIP's own vision model read at its last
    layer with CLS (a model loaded from, or fine-tuned from, such a repo), since transformers' InstructBLIP feeds the
    Q-Former exactly that, through the vision model's post_layernorm: our projector's vision_layernorm goes there.
    `<image>` is added to the tokenizer (the embeddings grown by a row) as image_token_index; the Q-Former's tokenizer
    goes to qformer_tokenizer/. transformers' processor writes InstructBLIP's prompt ([image][BOS] text), which is
    the instructblip template's."""
    from transformers import AddedToken, InstructBlipConfig, InstructBlipForConditionalGeneration, \
        InstructBlipProcessor, InstructBlipQFormerConfig

    c, tower = model.config, model.vision_tower
    if c.projector_type != "qformer":
        raise ValueError(f"transformers' InstructBLIP has a Q-Former; a {c.projector_type} projector has no "
                         "equivalent there (export it as transformers' Llava: a mlp2x_gelu one)")
    q = model.multi_modal_projector.config
    last_layer = c.vision_feature_layer in (-1, tower.config.num_hidden_layers)
    if tower.config.model_type != "instructblip_vision_model" or not last_layer or \
            c.vision_feature_select != "cls_patch" or q.vision_layer_norm_eps != tower.config.layer_norm_eps:
        raise ValueError(f"transformers' InstructBLIP reads its own vision model's last layer with CLS, through a "
                         f"LayerNorm of the tower's eps; this model reads a {tower.config.model_type} at layer "
                         f"{c.vision_feature_layer} ({c.vision_feature_select}), LayerNorm eps "
                         f"{q.vision_layer_norm_eps}: it has no equivalent there")
    if c.template != "instructblip":
        warnings.warn(f"transformers' InstructBlipProcessor writes InstructBLIP's prompt, not the {c.template!r} "
                      "template's; write this model's prompts yourself")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    text_config = copy.deepcopy(model.language_model.config)
    text_config.vocab_size = max(text_config.vocab_size, len(tokenizer))
    qformer = InstructBlipQFormerConfig(
        vocab_size=q.vocab_size, hidden_size=q.hidden_size, num_hidden_layers=q.num_hidden_layers,
        num_attention_heads=q.num_attention_heads, intermediate_size=q.intermediate_size,
        hidden_dropout_prob=q.hidden_dropout_prob, attention_probs_dropout_prob=q.attention_probs_dropout_prob,
        max_position_embeddings=q.max_position_embeddings, layer_norm_eps=q.layer_norm_eps,
        pad_token_id=q.pad_token_id, cross_attention_frequency=q.cross_attention_frequency,
        encoder_hidden_size=tower.config.hidden_size)
    config = InstructBlipConfig(vision_config=tower.config.to_dict(), qformer_config=qformer.to_dict(),
                                text_config=text_config.to_dict(), num_query_tokens=q.num_query_tokens,
                                image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    with params_on_meta():
        hf = InstructBlipForConditionalGeneration(config)
    state = {f"vision_model.{k}": v for k, v in tower.state_dict().items()}
    for k, v in model.multi_modal_projector.state_dict().items():
        state[k.replace("vision_layernorm.", "vision_model.post_layernorm.")] = v
    state.update({f"language_model.{k}": v for k, v in model.language_model.state_dict().items()})
    for name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):  # <image>'s new row
        rows = text_config.vocab_size - state[name].shape[0]
        if rows:
            state[name] = torch.cat([state[name], state[name].mean(0, keepdim=True).expand(rows, -1)])
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and not [n for n, p in hf.named_parameters() if p.is_meta], (missing, unexpected)
    hf.save_pretrained(out)
    processor = InstructBlipProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                      qformer_tokenizer=instruction_tokenizer, num_query_tokens=q.num_query_tokens)
    processor.save_pretrained(out)
    image_processor.save_pretrained(out)  # preprocessor_config.json too, as the Salesforce repos have it
    return hf


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("direction", choices=["import", "export", "merge", "apply-delta"])
    p.add_argument("source", help="the checkpoint to convert (apply-delta: the delta)")
    p.add_argument("out")
    p.add_argument("--model-base", help="import: the base LLM of a stage-1 (mm_projector.bin) directory; "
                                        "apply-delta: the base LLM the delta was made from")
    p.add_argument("--template", help="import: the conversation template to record (the original layout does not "
                                      "say it: llava_v0 for the first paper's v0 models; default vicuna_v1)")
    args = p.parse_args(argv)
    try:
        if os.path.exists(args.out) and os.path.exists(args.source) and os.path.samefile(args.out, args.source):
            raise UserError(f"out {args.out}: it is the source, which the conversion would overwrite; name another "
                            "directory")
        if os.path.isfile(args.out):
            raise UserError(f"out {args.out}: a file; name a directory for the converted model")
        if args.direction == "import":
            import_checkpoint(args.source, args.out, args.model_base, args.template)
        elif args.direction == "merge":
            merge_lora(args.source, args.out)
        elif args.direction == "apply-delta":
            apply_delta(args.source, args.out, args.model_base)
        else:
            model = checkpoints.load(args.source)
            tokenizer, processor = load_tokenizer_and_processor(args.source, model.config)
            if model.config.projector_type == "qformer":
                local = args.source if os.path.isdir(args.source) else checkpoints.resolve(args.source, weights=False)
                export_instructblip_hf(model, tokenizer, processor, load_instruction_tokenizer(model.config, local),
                                       args.out)
            else:
                export_llava_hf(model, tokenizer, processor, args.out)
    except (*USER_ERRORS, ValueError) as e:  # ValueError: a model this conversion has no equivalent for
        exit_with(e)
    done = "applied delta" if args.direction == "apply-delta" else args.direction.removesuffix("e") + "ed"
    print(f"{done} {args.source} -> {args.out}")


if __name__ == "__main__":
    main()
