"""Stage 1 of LLaVA-1.5: feature alignment. Only the projector learns; the vision tower and the LLM are frozen.

    python pretrain.py --preset toy
    torchrun --nproc_per_node 8 pretrain.py --preset llava-1.5-7b

The model reads an image and writes its caption: the `plain` template drops the instruction ("<image>" + caption +
"\\n"), images are centre-cropped (LLaVA-1.5's pretraining script passed no --image_aspect_ratio), lr 1e-3, global
batch 256, one epoch over LAION/CC/SBU-558K (docs/llava.md section 5.1; haotian-liu/LLaVA scripts/v1_5/pretrain.sh).
The output directory holds the projector (config.json + model.safetensors; the backbones are referenced by path),
which finetune.py starts from. The loop itself is train.py's.
"""

import train

STAGE_1 = dict(train_llm=False, template="plain", image_aspect_ratio="crop", lr=1e-3, global_batch_size=256,
               micro_batch_size=32, group_by_modality_length=False, save_every=500)

DATA = dict(data_path="playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",
            image_folder="playground/data/LLaVA-Pretrain/images", needs="LLaVA's data in playground/data (the README's "
            "'Reproducing LLaVA-1.5' shows the layout)")

PRESETS = {
    "llava-1.5-7b": dict(**DATA, llm="lmsys/vicuna-7b-v1.5", output_dir="checkpoints/llava-v1.5-7b-pretrain"),
    "llava-1.5-13b": dict(**DATA, llm="lmsys/vicuna-13b-v1.5", output_dir="checkpoints/llava-v1.5-13b-pretrain"),
    # The toy world of tools/toy_world.py: tiny backbones and coloured shapes, minutes on a laptop CPU.
    "toy": dict(vision_tower="runs/toy/world/vision", llm="runs/toy/world/llm", data_path="runs/toy/world/captions.json",
                image_folder="runs/toy/world/images", output_dir="runs/toy/pretrain", global_batch_size=32,
                micro_batch_size=16, lr=3e-3, precision="fp32", activation_checkpointing=False, num_workers=0,
                max_length=256, save_every=1000, epochs=1,
                needs="the toy world: build it with python tools/toy_world.py --world-only"),
}

if __name__ == "__main__":
    train.main(stage_defaults=STAGE_1, presets=PRESETS, description=__doc__)
