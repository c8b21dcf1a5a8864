"""Stage 2 of LLaVA-1.5: visual instruction tuning. The projector and the whole LLM learn; the vision tower is frozen.

    python finetune.py --preset toy
    torchrun --nproc_per_node 8 finetune.py --preset llava-1.5-7b

Conversations in the `vicuna_v1` template, with only the assistant replies supervised; images padded to square with
the CLIP mean colour; batches grouped by modality and length; lr 2e-5, global batch 128, one epoch over
llava_v1_5_mix665k (docs/llava.md section 5.1; haotian-liu/LLaVA scripts/v1_5/finetune.sh). The projector starts
from stage 1's output (--init-from: our pretrain.py output directory, or the original LLaVA's mm_projector.bin).
The loop itself is train.py's.
"""

import train

STAGE_2 = dict(train_llm=True, template="vicuna_v1", image_aspect_ratio="pad", lr=2e-5, global_batch_size=128,
               micro_batch_size=16, group_by_modality_length=True, save_every=1000)

DATA = dict(data_path="playground/data/llava_v1_5_mix665k.json", image_folder="playground/data",
            needs="LLaVA's data in playground/data (the README's 'Reproducing LLaVA-1.5' shows the layout) and stage "
            "1's output (python pretrain.py --preset the same name)")

PRESETS = {
    "llava-1.5-7b": dict(**DATA, llm="lmsys/vicuna-7b-v1.5", init_from="checkpoints/llava-v1.5-7b-pretrain",
                         output_dir="checkpoints/llava-v1.5-7b"),
    "llava-1.5-13b": dict(**DATA, llm="lmsys/vicuna-13b-v1.5", init_from="checkpoints/llava-v1.5-13b-pretrain",
                          output_dir="checkpoints/llava-v1.5-13b"),
    # The toy world of tools/toy_world.py: tiny backbones and coloured shapes, minutes on a laptop CPU.
    "toy": dict(vision_tower="runs/toy/world/vision", llm="runs/toy/world/llm",
                data_path="runs/toy/world/conversations.json", image_folder="runs/toy/world/images",
                init_from="runs/toy/pretrain", output_dir="runs/toy/finetune", global_batch_size=16,
                micro_batch_size=16, lr=1.5e-3, precision="fp32", activation_checkpointing=False, num_workers=0,
                max_length=256, save_every=1000, epochs=4,
                needs="the toy world and its stage 1: python tools/toy_world.py --world-only, then python "
                "pretrain.py --preset toy"),
}

if __name__ == "__main__":
    train.main(stage_defaults=STAGE_2, presets=PRESETS, description=__doc__)
