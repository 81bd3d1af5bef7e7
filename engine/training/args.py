"""The ``train.py`` argument set: the seed's (DiffSynth-Studio's FLUX and FLUX.2 ``train.py``) names, defaults and
meanings, plus a few of ours (sampling during training, resuming, the run's seed and dtype). FLUX.2's script adds
``--tokenizer_path`` and ``--initialize_model_on_cpu`` to the FLUX.1 set; which family a run trains is read from its
model files (``engine.training.families``; FLUX 3 takes FLUX.2's flags).

``TrainConfig`` is the same set as a dataclass, so the studio's Train tab builds one in Python with the same names
the command line uses, and ``run.json`` in each run folder is exactly this dataclass (which is what a resume reads).
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
from dataclasses import dataclass, field
from typing import Optional, Sequence


@dataclass
class TrainConfig:
    # ---- the seed's dataset arguments
    dataset_base_path: str = ""
    dataset_metadata_path: Optional[str] = None   # CSV / JSON / JSONL; None = the folder form (image + same-named .txt)
    dataset_repeat: int = 1
    dataset_num_workers: int = 0
    data_file_keys: str = "image,video"           # the seed's default; only image-like keys are loaded here
    # ---- models
    model_paths: Optional[str] = None             # JSON list of paths
    model_id_with_origin_paths: Optional[str] = None
    extra_inputs: Optional[str] = None
    fp8_models: Optional[str] = None
    offload_models: Optional[str] = None          # the seed's split training only: accepted, rejected when set
    resume_from_checkpoint: Optional[str] = None  # the seed's: initial weights of the trained model from a file
    tokenizer_1_path: Optional[str] = None
    tokenizer_2_path: Optional[str] = None
    tokenizer_path: Optional[str] = None          # FLUX.2: model_id:pattern or a folder (default: beside the encoder)
    initialize_model_on_cpu: bool = False         # FLUX.2's script: accepted (models load straight to the device)
    # ---- training
    learning_rate: float = 1e-4
    num_epochs: int = 1
    trainable_models: Optional[str] = None
    find_unused_parameters: bool = False
    weight_decay: float = 0.01
    task: str = "sft"
    customized_optimizer: Optional[str] = None
    # ---- output
    output_path: str = "./models"
    remove_prefix_in_ckpt: Optional[str] = "pipe.dit."
    save_steps: Optional[int] = None
    align_to_opensource_format: bool = False
    # ---- LoRA
    lora_base_model: Optional[str] = None
    lora_target_modules: str = "q,k,v,o,ffn.0,ffn.2"   # the seed's generic default (Wan's names)
    lora_rank: int = 32
    lora_checkpoint: Optional[str] = None
    preset_lora_path: Optional[str] = None
    preset_lora_model: Optional[str] = None
    # ---- gradients
    use_gradient_checkpointing: bool = False
    use_gradient_checkpointing_offload: bool = False
    gradient_accumulation_steps: int = 1
    # ---- image size
    height: Optional[int] = None
    width: Optional[int] = None
    max_pixels: int = 1024 * 1024
    # ---- ours
    opensource_format: str = "kohya"              # --align_to_opensource_format: kohya (the seed's) or diffusers
    seed: int = 0                                 # data order, noise and timesteps: a run is reproducible and resumable
    torch_dtype: str = "auto"                     # auto: bfloat16 on CUDA, float32 on CPU
    lora_dtype: str = "float32"                   # the trained LoRA matrices (the seed keeps them in torch_dtype)
    max_steps: Optional[int] = None               # stop after this many steps (whatever num_epochs says)
    validate_prompts: list = field(default_factory=list)
    validate_steps: Optional[int] = None          # sample every N steps (and at the end); None: only at the end
    validate_seed: int = 0
    validate_height: int = 512
    validate_width: int = 512
    validate_num_inference_steps: int = 30
    validate_embedded_guidance: float = 3.5
    validate_kontext_images: list = field(default_factory=list)
    validate_cfg_scale: float = 1.0               # FLUX.2 samples: the base models want 4, klein's distilled 1
    validate_edit_images: list = field(default_factory=list)   # FLUX.2 samples: reference images (edit LoRAs)
    edit_image_auto_resize: bool = True           # FLUX.2 edit LoRAs: references resized to ~1 MP, as the seed
    keep_states: int = 2                          # resume states kept in <run>/state/ (older ones deleted)
    publish_to: Optional[str] = None              # a models folder: the final LoRA is copied to <it>/loras/trained/
    run_name: Optional[str] = None                # the run folder's name under output_path (the Train tab's runs)
    trigger_word: Optional[str] = None            # put before every caption ("sks, a dog"); .txt files untouched
    vram_limit: Optional[float] = None            # GB of VRAM training may use: engine.training.memory plans the rest
    enable_model_cpu_offload: bool = False        # the seed's: frozen transformer blocks stream from CPU RAM
    enable_optimizer_cpu_offload: bool = False    # the seed's: the optimizer and its state on the CPU
    cache_dir: Optional[str] = None               # split training in one command: the cache folder (ours)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    # -- helpers over the comma-separated strings, as the seed splits them
    def extra_input_names(self) -> list[str]:
        return [s.strip() for s in (self.extra_inputs or "").split(",") if s.strip()]

    def data_keys(self) -> list[str]:
        return [s.strip() for s in (self.data_file_keys or "").split(",") if s.strip()]

    def trainable(self) -> list[str]:
        return [s.strip() for s in (self.trainable_models or "").split(",") if s.strip()]

    @property
    def is_lora(self) -> bool:
        return bool(self.lora_base_model)


def _optional_int(value):
    return None if value in (None, "", "None", "none") else int(value)


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="train.py", description="Train a LoRA or full weights of a FLUX.1 or FLUX.2 model (DiffSynth-Studio's "
                                     "arguments; the family is read from the model files).")
    g = p.add_argument_group("dataset (the seed's)")
    g.add_argument("--dataset_base_path", type=str, default=d.dataset_base_path,
                   help="Folder of the dataset (the metadata's paths are relative to it; without metadata, the "
                        "images and their same-named .txt captions).")
    g.add_argument("--dataset_metadata_path", type=str, default=None,
                   help="Metadata file: CSV, JSON or JSONL with an image column, a prompt column and extra inputs.")
    g.add_argument("--dataset_repeat", type=int, default=d.dataset_repeat, help="Repeats of the dataset per epoch.")
    g.add_argument("--dataset_num_workers", type=int, default=d.dataset_num_workers, help="Data loader processes.")
    g.add_argument("--data_file_keys", type=str, default=d.data_file_keys,
                   help="Metadata columns holding files to load (images), comma-separated.")
    g = p.add_argument_group("models (the seed's)")
    g.add_argument("--model_paths", type=str, default=None, help="Model files to load, a JSON list.")
    g.add_argument("--model_id_with_origin_paths", type=str, default=None,
                   help='Model id and file pattern, e.g. "black-forest-labs/FLUX.1-dev:flux1-dev.safetensors"; '
                        "comma-separated.")
    g.add_argument("--extra_inputs", type=str, default=None, help="Extra pipeline inputs, e.g. kontext_images.")
    g.add_argument("--fp8_models", type=str, default=None,
                   help="Entries of --model_paths / --model_id_with_origin_paths stored in fp8 (frozen models only).")
    g.add_argument("--offload_models", type=str, default=None,
                   help="The seed's split training: accepted with --task ...:data_process / ...:train (each stage "
                        "loads only the models it uses).")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="The seed's: load the trained model's weights from this file before training.")
    g.add_argument("--tokenizer_1_path", type=str, default=None, help="CLIP tokenizer folder (default: FLUX.1-dev's).")
    g.add_argument("--tokenizer_2_path", type=str, default=None, help="T5 tokenizer folder (default: FLUX.1-dev's).")
    g.add_argument("--tokenizer_path", type=str, default=None,
                   help="FLUX.2: the tokenizer, model_id:pattern (black-forest-labs/FLUX.2-klein-4B:tokenizer/) or a "
                        "folder; default: the tokenizer/ folder beside text_encoder/.")
    g.add_argument("--initialize_model_on_cpu", action="store_true",
                   help="FLUX.2's script: build the models on the CPU first (accepted; they load to the device).")
    g.add_argument("--quant_options", type=str, default=None, help="The seed's dynamic quantization (not supported).")
    g = p.add_argument_group("training (the seed's)")
    g.add_argument("--learning_rate", type=float, default=d.learning_rate)
    g.add_argument("--num_epochs", type=int, default=d.num_epochs)
    g.add_argument("--trainable_models", type=str, default=None, help="Models trained in full, e.g. dit.")
    g.add_argument("--find_unused_parameters", action="store_true", help="DDP: some parameters get no gradient.")
    g.add_argument("--weight_decay", type=float, default=d.weight_decay, help="AdamW weight decay.")
    g.add_argument("--task", type=str, default=d.task,
                   help="sft (supervised), direct_distill (few-step distillation from the metadata's seed, "
                        "num_inference_steps, cfg_scale); split in two stages: sft:data_process / "
                        "direct_distill:data_process (text encoders + VAE: write the cache to --output_path), then "
                        "sft:train / direct_distill:train (DiT only, --dataset_base_path <the cache>).")
    g.add_argument("--customized_optimizer", type=str, default=None,
                   help="An optimizer class, e.g. torch.optim.Adam (default torch.optim.AdamW).")
    g = p.add_argument_group("output (the seed's)")
    g.add_argument("--output_path", type=str, default=d.output_path,
                   help="The run's folder (a new one beside it if it already holds a run).")
    g.add_argument("--remove_prefix_in_ckpt", type=str, default=d.remove_prefix_in_ckpt)
    g.add_argument("--save_steps", type=_optional_int, default=None,
                   help="Save (and make resumable) every N steps; empty: every epoch.")
    g.add_argument("--align_to_opensource_format", action="store_true",
                   help="Write the LoRA in the community's format (kohya, read by ComfyUI, diffusers, Forge).")
    g = p.add_argument_group("LoRA (the seed's)")
    g.add_argument("--lora_base_model", type=str, default=None, help="The model LoRA is added to: dit.")
    g.add_argument("--lora_target_modules", type=str, default=d.lora_target_modules,
                   help="Layers LoRA is added to: DiffSynth's names (a_to_qkv, to_qkv_mlp, ...) or diffusers' "
                        "(to_q, proj_mlp, ...), comma-separated; empty: every linear layer of the blocks.")
    g.add_argument("--lora_rank", type=int, default=d.lora_rank)
    g.add_argument("--lora_checkpoint", type=str, default=None, help="Start from this LoRA (any common format).")
    g.add_argument("--preset_lora_path", type=str, default=None,
                   help="A LoRA fused into the base model first (differential LoRA training).")
    g.add_argument("--preset_lora_model", type=str, default=None, help="The model the preset LoRA is fused into: dit.")
    g = p.add_argument_group("gradients (the seed's)")
    g.add_argument("--use_gradient_checkpointing", action="store_true")
    g.add_argument("--use_gradient_checkpointing_offload", action="store_true",
                   help="Gradient checkpointing with the saved activations kept in CPU memory.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=d.gradient_accumulation_steps)
    g = p.add_argument_group("image size (the seed's)")
    g.add_argument("--height", type=_optional_int, default=None, help="Leave height and width empty for dynamic size.")
    g.add_argument("--width", type=_optional_int, default=None)
    g.add_argument("--max_pixels", type=int, default=d.max_pixels, help="Dynamic size: larger images are scaled down.")
    g = p.add_argument_group("the seed's loggers and offload training (accepted; only the CSV loss log is written)")
    for flag in ("--enable_tensorboard_log", "--enable_swanlab_log", "--enable_wandb_log", "--enable_csv_log",
                 "--enable_lora_hot_loading"):
        g.add_argument(flag, action="store_true")
    g.add_argument("--enable_model_cpu_offload", action="store_true",
                   help="The seed's layer-offload training: the transformer's frozen blocks rest in CPU RAM and are "
                        "copied to the GPU one at a time (the LoRA stays on the GPU).")
    g.add_argument("--enable_optimizer_cpu_offload", action="store_true",
                   help="The seed's: the optimizer's state (and its step) on the CPU.")
    for flag in ("--swanlab_project", "--wandb_project", "--template_model_id_or_path"):
        g.add_argument(flag, type=str, default=None)
    g.add_argument("--cpu_offload_split_threshold", type=int, default=None)
    g = p.add_argument_group("FLUX Studio")
    g.add_argument("--opensource_format", choices=("kohya", "diffusers"), default=d.opensource_format,
                   help="With --align_to_opensource_format: kohya (the seed's) or diffusers' own LoRA keys.")
    g.add_argument("--seed", type=int, default=d.seed, help="Seed of the data order, noise and timesteps.")
    g.add_argument("--torch_dtype", choices=("auto", "bfloat16", "float16", "float32"), default=d.torch_dtype)
    g.add_argument("--lora_dtype", choices=("float32", "bfloat16", "float16"), default=d.lora_dtype)
    g.add_argument("--max_steps", type=_optional_int, default=None, help="Stop after this many steps.")
    g.add_argument("--validate_prompt", dest="validate_prompts", action="append", default=[],
                   help="A prompt sampled with the trained weights (repeat the flag for several).")
    g.add_argument("--validate_steps", type=_optional_int, default=None,
                   help="Sample the validation prompts every N steps (always at the end).")
    g.add_argument("--validate_seed", type=int, default=d.validate_seed)
    g.add_argument("--validate_height", type=int, default=d.validate_height)
    g.add_argument("--validate_width", type=int, default=d.validate_width)
    g.add_argument("--validate_num_inference_steps", type=int, default=d.validate_num_inference_steps)
    g.add_argument("--validate_embedded_guidance", type=float, default=d.validate_embedded_guidance)
    g.add_argument("--validate_kontext_image", dest="validate_kontext_images", action="append", default=[],
                   help="A Kontext reference image for the validation samples.")
    g.add_argument("--validate_cfg_scale", type=float, default=d.validate_cfg_scale,
                   help="FLUX.2 samples: CFG scale (4 for the base models, 1 for klein's distilled ones).")
    g.add_argument("--validate_edit_image", dest="validate_edit_images", action="append", default=[],
                   help="FLUX.2 samples: a reference image (edit LoRAs; repeat for several).")
    g.add_argument("--no_edit_image_auto_resize", dest="edit_image_auto_resize", action="store_false",
                   help="FLUX.2 edit LoRAs: keep each reference's size (cropped to multiples of 16) instead of the "
                        "seed's resize to about 1024x1024.")
    g.add_argument("--keep_states", type=int, default=d.keep_states, help="Resume states kept (older deleted).")
    g.add_argument("--publish_to", type=str, default=None,
                   help="A models folder: the final LoRA is copied into its loras/trained/ folder.")
    g.add_argument("--run_name", type=str, default=None, help="The run folder's name under --output_path.")
    g.add_argument("--trigger_word", type=str, default=None,
                   help="A word put before every caption while training (\"sks, <caption>\"; a caption that already "
                        "starts with it is left as is), so prompts with it call up what was trained.")
    g.add_argument("--vram_limit", type=float, default=None, metavar="GB",
                   help="Train within this much VRAM: the plan (shown before the first step) streams frozen "
                        "transformer blocks, offloads the text encoders and VAE after encoding, turns on gradient "
                        "checkpointing and CPU offload of activations / optimizer state, fp8 storage, as needed.")
    g.add_argument("--cache_dir", type=str, default=None, metavar="DIR",
                   help="Split training in one command (--task sft / direct_distill): encode the dataset into DIR "
                        "first (text encoders and VAE, then released; a complete cache of the same data, models and "
                        "sizes already there is reused), then train the transformer alone from it.")
    g.add_argument("--resume", type=str, default=None, metavar="RUN_DIR",
                   help="Resume a stopped or killed run from its last saved state (other arguments are read from "
                        "its run.json).")
    return p


# The seed's flags we accept for compatibility but do not act on (beyond the message).
_IGNORED = ("enable_tensorboard_log", "enable_swanlab_log", "enable_wandb_log", "enable_lora_hot_loading",
            "swanlab_project", "wandb_project", "cpu_offload_split_threshold", "initialize_model_on_cpu")
_UNSUPPORTED = {
    "offload_models": "the seed's split (two-stage) training is not supported",
    "quant_options": "dynamic quantization is not supported; use --fp8_models for frozen models",
    "template_model_id_or_path": "template models are not part of FLUX training",
}


def parse_args(argv: Optional[Sequence[str]] = None):
    """``(TrainConfig, resume_dir or None, notes)`` from a command line (a list, or a string split like a shell)."""
    if isinstance(argv, str):
        argv = shlex.split(argv)
    ns = build_parser().parse_args(argv)
    values = vars(ns)
    resume = values.pop("resume", None)
    notes = []
    for name, why in _UNSUPPORTED.items():
        if values.get(name):
            if name == "offload_models":
                continue   # kept in the config: the trainer refuses it with the same message
            raise SystemExit(f"--{name}: {why}.")
    for name in _IGNORED:
        if values.get(name):
            why = ("" if name == "initialize_model_on_cpu" else
                   " (losses go to events.jsonl and loss.csv in the run folder)")
            notes.append(f"--{name} is accepted for compatibility and has no effect here{why}.")
    config = TrainConfig.from_json(values)
    return config, resume, notes


