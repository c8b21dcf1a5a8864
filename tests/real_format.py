"""Tiny backbones and LLaVA checkpoints saved the way the real hub repos ship them, for tests.

The configs are the real repos' own (tools/real_configs/) with only the sizes shrunk, and each repo holds the files,
formats and dtypes the real one does:

  lmsys/vicuna-7b-v1.5                fp16 weights in pytorch_model-0000{1,2}-of-00002.bin + index (config.json says
                                      "torch_dtype": "float16"), generation_config.json, and the tokenizer as
                                      SentencePiece's tokenizer.model + tokenizer_config.json (no tokenizer.json)
  openai/clip-vit-large-patch14-336  the whole CLIPModel, text tower included, in pytorch_model.bin; an old-style
                                      preprocessor_config.json (a "CLIPFeatureExtractor" with integer sizes)
  liuhaotian/llava-v1.5-7b            model_type "llava" with mm_* keys; fp16 .bin shards of model.* (a copy of the
                                      CLIP tower among them), lm_head and model.mm_projector.{0,2}; the tokenizer
                                      files; trainer_state.json; training_args.bin, a pickle no loader may open
  liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5     stage 1: config.json + a bf16 mm_projector.bin
  llava-hf/llava-1.5-7b-hf            the same weights as transformers' LlavaForConditionalGeneration, converted as
                                      transformers' convert_llava_weights_to_hf.py does (<image> and <pad> added,
                                      the vocabulary padded to a multiple of 64), in the v4 key layout, 3 safetensors
                                      shards, tokenizer.json, the processor's files
  Salesforce/instructblip-vicuna-7b  transformers' InstructBLIP (model_type "instructblip"), as its converter
                                      (convert_instructblip_original_to_pytorch.py) makes it: safetensors shards +
                                      index, the LLM tokenizer with LAVIS's quirks (BOS and UNK "</s>", "[PAD]"
                                      added; "<image>" too), the BERT tokenizer in qformer_tokenizer/ ("[DEC]" added),
                                      a BlipImageProcessor; written with transformers' classes (no copy of the real
                                      config.json is in tools/real_configs/)

Real repos hold more than that (safetensors copies, READMEs); a loader that works on these reads the real ones.
"""

import io
import json
import os

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
REAL = os.path.join(os.path.dirname(HERE), "tools", "real_configs")
VICUNA, CLIP = "lmsys/vicuna-7b-v1.5", "openai/clip-vit-large-patch14-336"
LLAVA, LLAVA_STAGE1, LLAVA_HF = ("liuhaotian/llava-v1.5-7b", "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5",
                                 "llava-hf/llava-1.5-7b-hf")
LLM_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4)
VISION_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
                    patch_size=14, projection_dim=16)  # 2 x 2 = 4 image tokens
TEXT_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=16,
                  vocab_size=100)
CORPUS = ["A chat between a curious user and an artificial intelligence assistant.",
          "The assistant gives helpful, detailed, and polite answers to the user's questions.",
          "USER: What is in the image? ASSISTANT: A cat on a mat.", "What color is it? It is orange.",
          "Describe the picture. There is a red circle and a blue square on the left.",
          "How many shapes are there? Two. Is there a triangle? No, there is not. 12 345 6789",
          "Render a clear and concise summary of the photo. select luxury furniture on a sunny day"]


def real(repo, name="config.json"):
    with open(os.path.join(REAL, repo, name)) as f:
        return json.load(f)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def save_bin_shards(state, folder, n_shards=2):
    """torch.save shards + pytorch_model.bin.index.json, as transformers 4.31 wrote them."""
    names = list(state)
    weight_map = {}
    for i in range(n_shards):
        file = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {k: state[k] for k in names[i * len(names) // n_shards:(i + 1) * len(names) // n_shards]}
        torch.save(part, os.path.join(folder, file))
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json(os.path.join(folder, "pytorch_model.bin.index.json"), {"metadata": {"total_size": total},
                                                                        "weight_map": weight_map})


# ----------------------------------------------------------------------------------------------------------------------
# The backbones


def sentencepiece_model(vocab_size=320):
    """A SentencePiece BPE model trained as Llama's was: byte fallback, digits split, whitespace-only pieces kept,
    no normalisation, <unk> <s> </s> as ids 0-2. Returns the serialized tokenizer.model."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        minloglevel=2)
    return model.getvalue()


def write_tokenizer(folder, repo=VICUNA):
    """tokenizer.model with the repo's tokenizer_config.json and special_tokens_map.json."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(sentencepiece_model())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        write_json(os.path.join(folder, name), real(repo, name))


def vicuna_config():
    """Vicuna's config.json with the sizes shrunk (the vocabulary: the tiny SentencePiece model's)."""
    return {**real(VICUNA), **LLM_SIZES, "vocab_size": 320}


def random_llm(seed):
    """A tiny Llama with Vicuna's config; weights as fp16, as Vicuna ships them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**vicuna_config())).half()


def with_inv_freq(state, n_layers, head_dim):
    """Rotary inv_freq buffers in the state dict, as checkpoints saved by transformers 4.31 and earlier can hold."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return {**state, **{f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq for i in range(n_layers)}}


def vicuna_repo(folder, seed=0):
    os.makedirs(folder, exist_ok=True)
    llm = random_llm(seed)
    write_json(os.path.join(folder, "config.json"), vicuna_config())
    write_json(os.path.join(folder, "generation_config.json"), real(VICUNA, "generation_config.json"))
    head_dim = LLM_SIZES["hidden_size"] // LLM_SIZES["num_attention_heads"]
    save_bin_shards(with_inv_freq(llm.state_dict(), LLM_SIZES["num_hidden_layers"], head_dim), folder)
    write_tokenizer(folder)
    return folder


def clip_repo(folder, seed=0):
    """The whole CLIPModel (both towers) in pytorch_model.bin, with the position_ids buffers old checkpoints hold."""
    from transformers import CLIPConfig, CLIPModel

    os.makedirs(folder, exist_ok=True)
    saved = real(CLIP)
    config = {**saved, "projection_dim": 16,
              "text_config": {**saved["text_config"], **TEXT_SIZES}, "vision_config": {**saved["vision_config"],
                                                                                     **VISION_SIZES},
              "text_config_dict": {**saved["text_config_dict"], **{k: TEXT_SIZES[k] for k in saved["text_config_dict"]}},
              "vision_config_dict": {**saved["vision_config_dict"],
                                     **{k: VISION_SIZES[k] for k in saved["vision_config_dict"]}}}
    write_json(os.path.join(folder, "config.json"), config)
    torch.manual_seed(seed)
    saved_config = CLIPConfig(text_config=config["text_config"], vision_config=config["vision_config"], projection_dim=16)
    model = CLIPModel(saved_config)
    state = dict(model.state_dict())
    n_patches = (VISION_SIZES["image_size"] // VISION_SIZES["patch_size"]) ** 2
    state["vision_model.embeddings.position_ids"] = torch.arange(n_patches + 1)[None]
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    write_json(os.path.join(folder, "preprocessor_config.json"),
               {**real(CLIP, "preprocessor_config.json"), "crop_size": 28, "size": 28})
    return folder


# ----------------------------------------------------------------------------------------------------------------------
# LLaVA checkpoints


def llava_weights(clip_folder, seed=1):
    """A "finetuned" LLaVA in the original layout's key names, fp16: model.* + lm_head from a fresh tiny Vicuna, the
    mlp2x_gelu projector as model.mm_projector.{0,2}, and the tower's copy under model.vision_tower.vision_tower."""
    state = dict(random_llm(seed).state_dict())
    torch.manual_seed(seed)
    d_v, d = VISION_SIZES["hidden_size"], LLM_SIZES["hidden_size"]
    projector = {"model.mm_projector.0.weight": torch.randn(d, d_v) * 0.2, "model.mm_projector.0.bias": torch.randn(d),
                 "model.mm_projector.2.weight": torch.randn(d, d) * 0.2, "model.mm_projector.2.bias": torch.randn(d)}
    tower = torch.load(os.path.join(clip_folder, "pytorch_model.bin"), weights_only=True)
    tower = {f"model.vision_tower.vision_tower.{k}": v for k, v in tower.items() if k.startswith("vision_model.")}
    return {**state, **{k: v.half() for k, v in {**projector, **tower}.items()}}


def llava_repo(folder, clip_id, clip_folder, seed=1):
    os.makedirs(folder, exist_ok=True)
    config = {**real(LLAVA), **LLM_SIZES, "vocab_size": 320, "mm_hidden_size": VISION_SIZES["hidden_size"],
              "mm_vision_tower": clip_id}
    write_json(os.path.join(folder, "config.json"), config)
    write_json(os.path.join(folder, "generation_config.json"), real(LLAVA, "generation_config.json"))
    head_dim = LLM_SIZES["hidden_size"] // LLM_SIZES["num_attention_heads"]
    save_bin_shards(with_inv_freq(llava_weights(clip_folder, seed), LLM_SIZES["num_hidden_layers"], head_dim), folder)
    write_tokenizer(folder, LLAVA)
    write_json(os.path.join(folder, "trainer_state.json"), {"global_step": 5198, "epoch": 1.0, "log_history": []})
    poison_pickle(os.path.join(folder, "training_args.bin"))
    return folder


def poison_pickle(path):
    """A pickle that, if anything ever unpickles it, creates the file `path + ".opened"`."""
    class Opens:
        def __reduce__(self):
            return (open, (path + ".opened", "w"))

    torch.save({"args": Opens()}, path)


def llava_stage1_repo(folder, clip_id, clip_folder, seed=1):
    os.makedirs(folder, exist_ok=True)
    config = {**real(LLAVA), **LLM_SIZES, "vocab_size": 320, "mm_hidden_size": VISION_SIZES["hidden_size"],
              "mm_vision_tower": clip_id, "_name_or_path": VICUNA, "tune_mm_mlp_adapter": True}
    config.pop("image_aspect_ratio")  # LLaVA-1.5's pretraining passed none
    write_json(os.path.join(folder, "config.json"), config)
    projector = {k: v.to(torch.bfloat16) for k, v in llava_weights(clip_folder, seed).items() if "mm_projector" in k}
    torch.save(projector, os.path.join(folder, "mm_projector.bin"))
    write_json(os.path.join(folder, "trainer_state.json"), {"global_step": 2180, "epoch": 1.0, "log_history": []})
    return folder


def llava_hf_repo(folder, llava_folder, clip_folder):
    """The LLaVA checkpoint of llava_repo as transformers' convert_llava_weights_to_hf.py converts it."""
    from transformers import AddedToken, AutoTokenizer, CLIPImageProcessor, LlavaConfig, LlavaProcessor

    from checkpoints import read_weights

    os.makedirs(folder, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(llava_folder)
    tokenizer.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    vocab = -(-len(tokenizer) // 64) * 64
    saved = real(LLAVA_HF)
    config = LlavaConfig(**{**saved, "text_config": {**saved["text_config"], **LLM_SIZES, "vocab_size": vocab},
                            "vision_config": {**saved["vision_config"], **VISION_SIZES}, "vocab_size": vocab,
                            "image_token_index": tokenizer.convert_tokens_to_ids("<image>"),
                            "pad_token_id": tokenizer.pad_token_id,
                            "image_seq_length": (VISION_SIZES["image_size"] // VISION_SIZES["patch_size"]) ** 2})
    state = {}
    for key, value in read_weights(llava_folder).items():  # the conversion's ordered substring replacements
        if key.endswith("inv_freq"):
            continue
        key = key.replace("model.vision_tower.", "").replace("model.mm_projector", "multi_modal_projector")
        key = key.replace("multi_modal_projector.0", "multi_modal_projector.linear_1")
        key = key.replace("multi_modal_projector.2", "multi_modal_projector.linear_2")
        if key.startswith("model."):
            key = "language_model." + key
        state[key.replace("lm_head", "language_model.lm_head")] = value
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        rows = state[key]
        state[key] = torch.cat([rows, rows.float().mean(0, keepdim=True).half().expand(vocab - len(rows), -1)])
    config.save_pretrained(folder)
    names = sorted(state)
    weight_map = {}
    for i in range(3):  # v4 key layout (vision_tower.vision_model.*, language_model.model.*), 3 shards
        file = f"model-{i + 1:05d}-of-00003.safetensors"
        part = {k: state[k].contiguous() for k in names[i * len(names) // 3:(i + 1) * len(names) // 3]}
        save_file(part, os.path.join(folder, file), {"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    write_json(os.path.join(folder, "model.safetensors.index.json"), {"metadata": {}, "weight_map": weight_map})
    side = VISION_SIZES["image_size"]
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    LlavaProcessor(image_processor=processor, tokenizer=tokenizer, patch_size=VISION_SIZES["patch_size"],
                   vision_feature_select_strategy="default").save_pretrained(folder)
    return folder


def hub_repos(root, clip_id=CLIP):
    """Every repo above under root/<owner>/<name>; returns {repo id: folder} (for tests/hub.py's serve)."""
    folders = {repo: os.path.join(str(root), repo) for repo in (VICUNA, CLIP, LLAVA, LLAVA_STAGE1, LLAVA_HF)}
    vicuna_repo(folders[VICUNA])
    clip_repo(folders[CLIP])
    llava_repo(folders[LLAVA], clip_id, folders[CLIP])
    llava_stage1_repo(folders[LLAVA_STAGE1], clip_id, folders[CLIP])
    llava_hf_repo(folders[LLAVA_HF], folders[LLAVA], folders[CLIP])
    return folders


# ----------------------------------------------------------------------------------------------------------------------
# Data shaped like LLaVA's


def images(folder):
    """Pictures in the modes real data has: RGB JPEG, RGBA and palette PNG, grayscale JPEG; paths relative to folder."""
    from PIL import Image, ImageDraw

    made = {}
    for i, (mode, ext) in enumerate([("RGB", "jpg"), ("RGBA", "png"), ("P", "png"), ("L", "jpg")]):
        image = Image.new("RGB", (40 + 20 * i, 30), (200, 40 + 50 * i, 40))
        ImageDraw.Draw(image).ellipse((5, 5, 25, 25), fill=(20, 20, 220))
        image = image.convert(mode)
        rel = f"coco/train2017/{i:012d}.{ext}"
        os.makedirs(os.path.dirname(os.path.join(folder, rel)), exist_ok=True)
        image.save(os.path.join(folder, rel))
        made[mode] = rel
    return made


def pretrain_data(folder):
    """blip_laion_cc_sbu_558k.json-style: a brief-caption instruction with <image> before or after it, a caption."""
    pics = images(folder)
    samples = [{"id": f"00453{i:04d}", "image": path, "conversations": [
        {"from": "human", "value": ("Render a clear and concise summary of the photo.\n<image>" if i % 2 else
                                    "<image>\nDescribe the picture.")},
        {"from": "gpt", "value": "a red circle and a blue square on the left"}]} for i, path in enumerate(pics.values())]
    write_json(os.path.join(folder, "pretrain.json"), samples)
    return os.path.join(folder, "pretrain.json")


def finetune_data(folder):
    """llava_v1_5_mix665k.json-style: two image conversations and two text-only (ShareGPT: no "image", "model": "")
    ones, of lengths chosen so that with 2 ranks x micro-batch 1 x 2 accumulation steps and modality grouping the
    one global batch (the leftovers of both modalities, longest first) puts a text-only micro-batch on rank 0 and an
    image one on rank 1 in the first step, and the other way round in the second (tests check this premise)."""
    pics = list(images(folder).values())
    long_reply = " ".join(["There is a red circle and a blue square on the left."] * 6)
    samples = [
        {"id": "i6IyJda_0", "model": "", "conversations": [  # text-only, longest
            {"from": "human", "value": "Describe the picture. " * 8}, {"from": "gpt", "value": long_reply}]},
        {"id": "000000033471", "image": pics[0], "conversations": [
            {"from": "human", "value": "What is in the image?\n<image>"}, {"from": "gpt", "value": long_reply[:200]},
            {"from": "human", "value": "What color is it?"}, {"from": "gpt", "value": "It is orange."}]},
        {"id": "000000052846", "image": pics[1], "conversations": [
            {"from": "human", "value": "<image>\nHow many shapes are there?\nAnswer the question using a single word "
                                       "or phrase."}, {"from": "gpt", "value": "Two"}]},
        {"id": "QWJ3fsa_2", "model": "", "conversations": [  # text-only, shortest
            {"from": "human", "value": "Is there a triangle?"}, {"from": "gpt", "value": "No."}]},
    ]
    write_json(os.path.join(folder, "finetune.json"), samples)
    return os.path.join(folder, "finetune.json")


# ----------------------------------------------------------------------------------------------------------------------
# InstructBLIP in transformers' layout


INSTRUCTBLIP = "Salesforce/instructblip-vicuna-7b"
IB_VISION_SIZES = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                       patch_size=14)  # 2 x 2 patches + CLS = 5 features
IB_QFORMER_SIZES = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                        encoder_hidden_size=24)  # 3 layers: cross-attention in 0 and 2


def instructblip_tokenizers(folder):
    """The two tokenizers as transformers' convert_instructblip_original_to_pytorch.py makes them, on the tiny
    SentencePiece model: the LLM's a Llama tokenizer with bos and unk "</s>" (LAVIS's blip2_vicuna_instruct.py
    overrides them so), pad "[PAD]" added, and the "<image>" token InstructBlipProcessor adds; the Q-Former's a BERT
    tokenizer (tools/tiny.py's, uncased) with "[DEC]" added as its bos, truncating from the left as LAVIS does."""
    from transformers import AddedToken, AutoTokenizer

    from tools.tiny import bert_tokenizer

    sp = os.path.join(folder, "sentencepiece")
    write_tokenizer(sp)
    tokenizer = AutoTokenizer.from_pretrained(sp, bos_token="</s>", unk_token="</s>", truncation_side="left")
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    tokenizer.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    qformer = bert_tokenizer(extra=CORPUS)
    qformer.truncation_side = "left"
    qformer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer, qformer, os.path.join(sp, "tokenizer.model")


def instructblip_model(tokenizer, qformer_tokenizer, num_query_tokens=4, seed=2, std=0.3):
    """A tiny random InstructBlipForConditionalGeneration over a Llama, fp32, every weight drawn from N(0, std): at
    BERT's 0.02 initialisation the Q-Former barely mixes anything, and differences would not show."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipQFormerConfig, \
        InstructBlipVisionConfig, LlamaConfig

    text = {k: v for k, v in vicuna_config().items() if k not in ("torch_dtype", "dtype")}  # (fp32, not Vicuna's fp16)
    text = LlamaConfig(**{**text, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id})
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(**IB_VISION_SIZES).to_dict(),
        qformer_config=InstructBlipQFormerConfig(**IB_QFORMER_SIZES, vocab_size=len(qformer_tokenizer)).to_dict(),
        text_config=text.to_dict(), num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, std)
    return model


def instructblip_repo(folder, seed=2):
    """A tiny Salesforce/instructblip-vicuna-7b: config.json (model_type "instructblip": vision_config,
    qformer_config, text_config, num_query_tokens, image_token_index), safetensors shards + index,
    generation_config.json, the LLM tokenizer at the top (tokenizer.json, tokenizer.model, tokenizer_config.json,
    special_tokens_map.json), qformer_tokenizer/, preprocessor_config.json (BlipImageProcessor, OpenAI-CLIP's mean
    and std) and processor_config.json. Returns (folder, the model, its processor)."""
    import shutil

    from transformers import BlipImageProcessor, InstructBlipProcessor
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    os.makedirs(folder, exist_ok=True)
    sources = os.path.join(os.path.dirname(folder), os.path.basename(folder) + "-src")  # (not in the repo)
    tokenizer, qformer, sp_model = instructblip_tokenizers(sources)
    model = instructblip_model(tokenizer, qformer, seed=seed)
    model.save_pretrained(folder, max_shard_size="200KB")
    tokenizer.save_pretrained(folder)
    shutil.copy(sp_model, os.path.join(folder, "tokenizer.model"))
    write_json(os.path.join(folder, "special_tokens_map.json"), {"bos_token": "</s>", "eos_token": "</s>",
                                                                  "pad_token": "[PAD]", "unk_token": "</s>"})
    qformer.save_pretrained(os.path.join(folder, "qformer_tokenizer"))
    side = IB_VISION_SIZES["image_size"]
    images = BlipImageProcessor(size={"height": side, "width": side}, image_mean=OPENAI_CLIP_MEAN,
                                image_std=OPENAI_CLIP_STD)
    images.save_pretrained(folder)
    write_json(os.path.join(folder, "processor_config.json"),
               {"num_query_tokens": model.config.num_query_tokens, "processor_class": "InstructBlipProcessor"})
    processor = InstructBlipProcessor(image_processor=images, tokenizer=tokenizer, qformer_tokenizer=qformer,
                                      num_query_tokens=model.config.num_query_tokens)
    return folder, model, processor
