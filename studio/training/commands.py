"""A run's settings as the equivalent ``train.py`` command, so a run made in the tab can be repeated in a script."""
from __future__ import annotations

import shlex

from engine.training.args import TrainConfig


def command_line(config: TrainConfig, gpus: int = 1) -> str:
    """The same run as a ``train.py`` command (every setting that differs from the defaults); on several GPUs under
    ``accelerate launch``, as the seed runs it."""
    default = TrainConfig()
    gpus = int(gpus or 1)
    parts = [f"accelerate launch --multi_gpu --num_processes {gpus} train.py" if gpus > 1 else "python train.py"]
    for key, value in config.to_json().items():
        if value == getattr(default, key) or key in ("publish_to",):
            continue
        if key == "validate_prompts":
            parts += [f"--validate_prompt {shlex.quote(p)}" for p in value]
        elif key == "validate_kontext_images":
            parts += [f"--validate_kontext_image {shlex.quote(p)}" for p in value]
        elif key == "validate_edit_images":
            parts += [f"--validate_edit_image {shlex.quote(p)}" for p in value]
        elif key == "edit_image_auto_resize":
            parts.append("--no_edit_image_auto_resize")      # (differs from the default: off)
        elif isinstance(value, bool):
            if value:
                parts.append(f"--{key}")
        elif value is not None:
            parts.append(f"--{key} {shlex.quote(str(value))}")
    if config.publish_to:
        parts.append(f"--publish_to {shlex.quote(config.publish_to)}")
    return " \\\n  ".join(parts)
