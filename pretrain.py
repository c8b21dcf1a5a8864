"""Stage 1 of LLaVA-1.5: feature alignment. Only the projector learns; the vision tower and the LLM are frozen.

    python pretrain.py --preset toy
    torchrun --nproc_per_node 8 pretrain.py --preset llava-1.5-7b
    torchrun --nproc_per_node 8 pretrain.py --preset llava-v0-13b        # the first paper's stage 1 (CC-595K)

The model reads an image and writes its caption: the `plain` template drops the instruction ("<image>" + caption +
"\\n"), images are centre-cropped (LLaVA-1.5's pretraining script passed no --image_aspect_ratio), lr 1e-3, global
batch 256, one epoch over LAION/CC/SBU-558K (docs/llava.md section 5.1; haotian-liu/LLaVA scripts/v1_5/pretrain.sh).
The output directory holds the projector (config.json + model.safetensors; the backbones are referenced by path),
which finetune.py starts from. The loop itself is train.py's.

The first paper's models (`-v0-` and `-v1-` presets, docs/llava.md section 5.2): CLIP ViT-L/14 at 224 px (256 image
tokens), a linear projector, lr 2e-3, global batch 128, one epoch. `llava-v0-13b` is the paper's recipe: CC-595K
(LLaVA-CC3M-Pretrain-595K's chat.json) in the `###` template with `<im_start>`/`<im_end>` around each image, whose
two embedding rows train with the projector (--mm-use-im-start-end), on Vicuna-13B v0 (released by lmsys as a delta
on LLaMA: apply it first; the path is yours). `llava-v1-7b` / `-13b` are LLaVA's v1 script (scripts/pretrain.sh):
`plain` on the 558K captions, both mm flags off, Vicuna v1.3.

InstructBLIP's Q-Former (`instructblip-vicuna-7b`, qformer.py): BLIP-2's second stage in LLaVA's first, the Q-Former
and its projection taught to caption into the frozen Vicuna. It starts from BLIP-2's first stage for CLIP-L (LAVIS's
blip2_pretrained_vitL.pth, --init-from; the projection to the LLM is new), with BLIP-2's optimizer (arXiv:2301.12597,
"Pre-training settings": peak lr 1e-4, weight decay 0.05, AdamW beta2 0.98) over LLaVA's 558K captions, one epoch at
batch 256 (BLIP-2 trained on 129M images; the authors' own Vicuna run of this stage was never released,
salesforce/LAVIS#292).
finetune.py's preset of the same name is InstructBLIP's instruction tuning.
"""

import train

STAGE_1 = dict(train_llm=False, template="plain", image_aspect_ratio="crop", lr=1e-3, global_batch_size=256,
               micro_batch_size=32, group_by_modality_length=False, save_every=500)

DATA = dict(data_path="playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",
            image_folder="playground/data/LLaVA-Pretrain/images", needs="LLaVA's data in playground/data (the README's "
            "'Reproducing LLaVA-1.5' shows the layout)")

# The first paper's models (haotian-liu/LLaVA scripts/pretrain.sh; the April-2023 README at 8959d5c for v0)
V1 = dict(vision_tower="openai/clip-vit-large-patch14", projector_type="linear", vision_feature_layer=-2, lr=2e-3,
          global_batch_size=128, micro_batch_size=16, image_aspect_ratio="crop")
CC595K = dict(data_path="playground/data/LLaVA-CC3M-Pretrain-595K/chat.json",
              image_folder="playground/data/LLaVA-CC3M-Pretrain-595K/images",
              needs="liuhaotian/LLaVA-CC3M-Pretrain-595K (chat.json, images.zip unpacked into images/) in "
              "playground/data and Vicuna v0 applied to LLaMA in checkpoints/vicuna-13b-v0 (the README's 'The first "
              "paper')")

# InstructBLIP's projector (qformer.py): the tower of BLIP-2's ViT-L Q-Former (CLIP-L/14 at 224 px, its 23rd layer's
# 257 features, CLS kept), the Q-Former at InstructBLIP's sizes with bert-base-uncased's tokenizer, Vicuna-7B v1.5.
QFORMER = dict(projector_type="qformer", qformer_tokenizer="google-bert/bert-base-uncased",
               vision_tower="openai/clip-vit-large-patch14", vision_feature_layer=-2, vision_feature_select="cls_patch",
               llm="lmsys/vicuna-7b-v1.5")
QFORMER_NEEDS = ("LLaVA's data in playground/data and BLIP-2's stage-1 Q-Former for CLIP-L (LAVIS's "
                 "blip2_pretrained_vitL.pth) in checkpoints/: the README's 'InstructBLIP'")

# The toy world's Q-Former (tools/toy_world.py --projector qformer), shared with finetune.py's toy-qformer: a tiny
# BERT (2 layers, 96 wide, both cross-attending) whose 8 queries read the tiny CLIP's 9 patch features, with its own
# WordPiece tokenizer of the world's words (vocab_size: room for it). Dropout 0: the world is exact and small, and
# 0.1 of 9 attention weights is a lot to drop (with or without it, the runs of docs/toy_world_log.md's 2026-12-02
# entry came out the same). Stage 1 here is BLIP-2's second, generative, stage: the Q-Former learns to write the
# captions into the frozen LLM, 3 epochs (471 steps, ~70 s on an idle 2-core machine: it and stage 2 together take
# less than LLaVA's toy run). There is no BLIP-2 first stage (ITC/ITM/ITG): the Q-Former starts from BERT's init.
TOY_QFORMER = dict(
    vision_tower="runs/toy-qformer/world/vision", llm="runs/toy-qformer/world/llm",
    image_folder="runs/toy-qformer/world/images", projector_type="qformer",
    qformer=dict(num_hidden_layers=2, hidden_size=96, num_attention_heads=4, intermediate_size=192,
                 cross_attention_frequency=1, num_query_tokens=8, vocab_size=256, max_position_embeddings=64,
                 max_text_length=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    qformer_tokenizer="runs/toy-qformer/world/qformer_tokenizer", global_batch_size=32, micro_batch_size=16,
    precision="fp32", activation_checkpointing=False, num_workers=0, max_length=256, save_every=1000,
    needs="the toy world: build it with python tools/toy_world.py --projector qformer --world-only")

PRESETS = {
    "llava-1.5-7b": dict(**DATA, llm="lmsys/vicuna-7b-v1.5", output_dir="checkpoints/llava-v1.5-7b-pretrain"),
    "llava-1.5-13b": dict(**DATA, llm="lmsys/vicuna-13b-v1.5", output_dir="checkpoints/llava-v1.5-13b-pretrain"),
    "llava-v0-13b": dict(**V1, **CC595K, llm="checkpoints/vicuna-13b-v0", template="llava_v0",
                         mm_use_im_start_end=True, output_dir="checkpoints/llava-13b-v0-pretrain"),
    **{f"llava-v1-{size}": dict(**V1, **DATA, template="plain", llm=f"lmsys/vicuna-{size}-v1.3",
                                output_dir=f"checkpoints/llava-vicuna-{size}-v1.3-pretrain") for size in ("7b", "13b")},
    # InstructBLIP's Q-Former (qformer.py) on LLaVA's captions: see the docstring.
    "instructblip-vicuna-7b": dict(**QFORMER, **{**DATA, "needs": QFORMER_NEEDS}, lr=1e-4, weight_decay=0.05,
                                   adam_beta2=0.98, init_from="checkpoints/blip2_pretrained_vitL.pth",
                                   output_dir="checkpoints/instructblip-vicuna-7b-pretrain"),
    # The toy world of tools/toy_world.py: tiny backbones and coloured shapes, minutes on a laptop CPU.
    "toy": dict(vision_tower="runs/toy/world/vision", llm="runs/toy/world/llm", data_path="runs/toy/world/captions.json",
                image_folder="runs/toy/world/images", output_dir="runs/toy/pretrain", global_batch_size=32,
                micro_batch_size=16, lr=3e-3, precision="fp32", activation_checkpointing=False, num_workers=0,
                max_length=256, save_every=1000, epochs=1,
                needs="the toy world: build it with python tools/toy_world.py --world-only"),
    # The same world with InstructBLIP's projector (tools/toy_world.py --projector qformer): TOY_QFORMER above.
    "toy-qformer": dict(TOY_QFORMER, data_path="runs/toy-qformer/world/captions.json",
                        output_dir="runs/toy-qformer/pretrain", lr=3e-3, epochs=3),
}

if __name__ == "__main__":
    train.main(stage_defaults=STAGE_1, presets=PRESETS, description=__doc__)
