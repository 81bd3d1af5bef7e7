"""Train a FLUX.1 or FLUX.2 LoRA or full weights with DiffSynth-Studio's arguments (see engine/training/); the
family is read from the model files.

    python train.py --dataset_base_path data/x --dataset_metadata_path data/x/metadata.csv \
        --model_id_with_origin_paths "black-forest-labs/FLUX.1-dev:flux1-dev.safetensors,..." \
        --lora_base_model dit --lora_target_modules "a_to_qkv,b_to_qkv,..." --lora_rank 32 \
        --output_path ./models/train/FLUX.1-dev_lora --align_to_opensource_format
    python train.py --dataset_base_path data/y --dataset_metadata_path data/y/metadata.csv \
        --model_id_with_origin_paths "black-forest-labs/FLUX.2-klein-4B:text_encoder/*.safetensors,..." \
        --tokenizer_path "black-forest-labs/FLUX.2-klein-4B:tokenizer/" --lora_base_model dit \
        --lora_target_modules "to_q,to_k,to_v,to_out.0,...,to_qkv_mlp_proj" --output_path ./models/train/klein_lora
    accelerate launch train.py ...            # several GPUs (DDP, or DeepSpeed from an accelerate config)
    python train.py --resume ./models/train/FLUX.1-dev_lora    # continue a stopped or killed run
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from engine.training.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
