"""VRAM presets for the Train tab: one click sets the training plan for a card of 12, 16, 20 or 24 GB (the LoRA rank,
the resolution, gradient checkpointing and its offload, fp8 storage of the frozen base, the batch); every setting
stays editable afterwards.

The plans trade detail for memory in the order that costs the least quality: fp8 storage of the frozen base first
(it halves the transformer's 24 GB and a LoRA learns as well over it), gradient checkpointing next (~30% slower), then a
smaller resolution and rank, and on 12 GB the checkpointed activations go to CPU memory. The trainer takes one image
per step (as DiffSynth-Studio's does), so the batch is 1 in every plan.

Each preset also sets the run's VRAM limit ("Train within"), so the trainer's memory plan
(``engine.training.memory``) fits the rest: the text encoders and the VAE leave the card after encoding, and frozen
transformer blocks stream from CPU memory where the card is still too small. Not measured on a card yet
(``benchmarks/train_vram.py`` is the check).
"""
from __future__ import annotations

import dataclasses

from engine.errors import EngineError


@dataclasses.dataclass(frozen=True)
class VramPreset:
    """One card size's training plan, in the Train form's own keys."""

    gb: int
    lora_rank: int
    resolution: int
    gradient_checkpointing: bool
    checkpointing_offload: bool
    fp8_base: bool
    batch: int = 1

    @property
    def key(self) -> str:
        return f"{self.gb} GB"

    def settings(self, kind: str = "lora") -> dict:
        """The form values this preset sets; a full-weights run keeps fp8 off (it trains the base itself)."""
        return {"lora_rank": self.lora_rank, "resolution": self.resolution,
                "gradient_checkpointing": self.gradient_checkpointing,
                "gradient_checkpointing_offload": self.checkpointing_offload,
                "fp8_base": self.fp8_base and kind == "lora", "batch": self.batch, "vram_limit": self.gb}

    def describe(self, kind: str = "lora") -> str:
        """One line: what the preset sets."""
        s = self.settings(kind)
        bits = [f"LoRA rank {s['lora_rank']}" if kind == "lora" else "full weights",
                f"{s['resolution']} px",
                ("gradient checkpointing, activations offloaded to CPU memory" if s["gradient_checkpointing_offload"]
                 else "gradient checkpointing" if s["gradient_checkpointing"] else "no gradient checkpointing"),
                "fp8 base" if s["fp8_base"] else "bf16 base", f"batch {s['batch']}"]
        line = f"{self.key}: " + " · ".join(bits) + "."
        if kind != "lora":
            line += " Full training of FLUX.1 needs far more memory than this; a LoRA fits these cards."
        return line


PRESETS = (
    VramPreset(12, lora_rank=4, resolution=512, gradient_checkpointing=True, checkpointing_offload=True, fp8_base=True),
    VramPreset(16, lora_rank=8, resolution=512, gradient_checkpointing=True, checkpointing_offload=False,
               fp8_base=True),
    VramPreset(20, lora_rank=16, resolution=768, gradient_checkpointing=True, checkpointing_offload=False,
               fp8_base=True),
    VramPreset(24, lora_rank=16, resolution=1024, gradient_checkpointing=True, checkpointing_offload=False,
               fp8_base=True),
)


def preset_keys() -> list[str]:
    return [p.key for p in PRESETS]


def vram_preset(key: str) -> VramPreset:
    """The preset named ``key`` ("12 GB" ...), or an EngineError listing them."""
    for preset in PRESETS:
        if preset.key == str(key).strip():
            return preset
    raise EngineError(f"There is no {key!r} VRAM preset; choose one of {', '.join(preset_keys())}.")
