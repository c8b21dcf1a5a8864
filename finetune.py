"""Stage 2 of LLaVA-1.5: visual instruction tuning. The projector and the whole LLM learn; the vision tower is frozen.

    python finetune.py --preset toy
    torchrun --nproc_per_node 8 finetune.py --preset llava-1.5-7b
    torchrun --nproc_per_node 8 finetune.py --preset llava-1.5-7b-lora               # LoRA: adapters + projector
    python finetune.py --preset llava-1.5-7b-task-lora --data-path mine.json --image-folder images   # one GPU

Conversations in the `vicuna_v1` template, with only the assistant replies supervised; images padded to square with
the CLIP mean colour; batches grouped by modality and length; lr 2e-5, global batch 128, one epoch over
llava_v1_5_mix665k (docs/llava.md section 5.1; haotian-liu/LLaVA scripts/v1_5/finetune.sh). The projector starts
from stage 1's output (--init-from: our pretrain.py output directory, or the original LLaVA's mm_projector.bin).

LoRA (`-lora` presets; scripts/v1_5/finetune_lora.sh): the LLM frozen (in bf16) under adapters of rank 128, alpha
256, dropout 0.05 on all its linear layers, lr 2e-4, the projector at 2e-5 (--mm-projector-lr). Fine-tuning a
released model on one's own data (`-task` presets; finetune_task.sh, finetune_task_lora.sh, which start from
liuhaotian/llava-v1.5-13b): --init-from the whole LLaVA-1.5 model, its LLM and projector; pass --data-path and
--image-folder. The loop itself is train.py's.
"""

import train

STAGE_2 = dict(train_llm=True, template="vicuna_v1", image_aspect_ratio="pad", lr=2e-5, global_batch_size=128,
               micro_batch_size=16, group_by_modality_length=True, save_every=1000)

DATA = dict(data_path="playground/data/llava_v1_5_mix665k.json", image_folder="playground/data",
            needs="LLaVA's data in playground/data (the README's 'Reproducing LLaVA-1.5' shows the layout) and stage "
            "1's output (python pretrain.py --preset the same name)")

LORA = dict(lora_r=128, lora_alpha=256, lora_dropout=0.05, lr=2e-4, mm_projector_lr=2e-5)
TASK = dict(needs="your data: --data-path (LLaVA's JSON format) and --image-folder")

PRESETS = {
    "llava-1.5-7b": dict(**DATA, llm="lmsys/vicuna-7b-v1.5", init_from="checkpoints/llava-v1.5-7b-pretrain",
                         output_dir="checkpoints/llava-v1.5-7b"),
    "llava-1.5-13b": dict(**DATA, llm="lmsys/vicuna-13b-v1.5", init_from="checkpoints/llava-v1.5-13b-pretrain",
                          output_dir="checkpoints/llava-v1.5-13b"),
    "llava-1.5-7b-lora": dict(**DATA, **LORA, llm="lmsys/vicuna-7b-v1.5",
                              init_from="checkpoints/llava-v1.5-7b-pretrain",
                              output_dir="checkpoints/llava-v1.5-7b-lora"),
    "llava-1.5-13b-lora": dict(**DATA, **LORA, llm="lmsys/vicuna-13b-v1.5",
                               init_from="checkpoints/llava-v1.5-13b-pretrain",
                               output_dir="checkpoints/llava-v1.5-13b-lora"),
    # A released LLaVA-1.5 fine-tuned on your data, fully or with LoRA (pass --data-path and --image-folder)
    **{f"llava-1.5-{size}-task{'-lora' if lo else ''}": dict(
        **TASK, **(LORA if lo else {}), llm=f"lmsys/vicuna-{size}-v1.5", init_from=f"liuhaotian/llava-v1.5-{size}",
        output_dir=f"checkpoints/llava-v1.5-{size}-task{'-lora' if lo else ''}") for size in ("7b", "13b")
       for lo in (False, True)},
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
