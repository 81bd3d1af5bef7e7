"""Small random-weight FLUX.1-Fill-dev and Flex.2-preview transformers in their official key layouts.

``write_inpaint_demos(models_dir)`` writes::

    <models_dir>/FLUX-Studio/FLUX.1-Fill-dev-random-demo/flux1-fill-dev.safetensors    img_in [h, 384]
    <models_dir>/FLUX-Studio/Flex.2-preview-random-demo/Flex.2-preview.safetensors     img_in [h, 196]

Both are BFL ``Flux`` state dicts (the keys of the real files, guidance_in included, BF16) at the widths of the
FLUX.1-dev random-weight demo (``engine.demo.TRANSFORMER``), so they run with that demo's text encoders and VAE.
The output projection stays at 64 features in both, as in the real files. Flex.2 has fewer double blocks than
FLUX.1-dev (8, not 19): the demo keeps one double block fewer than the FLUX.1-dev demo to mirror it.

Each file is written by ``engine.demo.files.write_safetensors_once``: atomically, once, with its version and seed in
the safetensors metadata (a file already there with the same ones is kept).
"""
from __future__ import annotations

import pathlib

from . import flux1 as base
from .files import demo_stamp, write_safetensors_once
from ..registry import FILL_DEMO_ID, FLEX_DEMO_ID

VERSION = 1
FILL_FILE = "flux1-fill-dev.safetensors"
FLEX_FILE = "Flex.2-preview.safetensors"

# Overrides of engine.demo.TRANSFORMER; the real values are in the comments.
FILL_CONFIG = dict(in_channels=384, out_channels=64)                  # 384, 64; 19 double, 38 single blocks
FLEX_CONFIG = dict(in_channels=196, out_channels=64, depth=1)         # 196, 64; 8 double, 38 single blocks

DEMOS = {
    "fill": (FILL_DEMO_ID, FILL_FILE, FILL_CONFIG, "flux1-fill-dev"),
    "flex": (FLEX_DEMO_ID, FLEX_FILE, FLEX_CONFIG, "flex2-preview"),
}


def demo_file(models_dir, kind: str) -> pathlib.Path:
    """Where the ``kind`` ("fill" or "flex") demo transformer lives."""
    model_id, name, _, _ = DEMOS[kind]
    return pathlib.Path(models_dir) / model_id / name


def transformer_state_dict(kind: str, seed: int = 0) -> dict:
    """The demo transformer's BFL state dict (BF16)."""
    _, _, config, name = DEMOS[kind]
    return base.bfl_transformer_state_dict(seed, config=config, name=name)


def write_inpaint_demo(models_dir, kind: str, seed: int = 0) -> pathlib.Path:
    """Write (once) one demo transformer; returns its path."""
    return write_safetensors_once(demo_file(models_dir, kind), lambda: transformer_state_dict(kind, seed),
                                  demo_stamp(DEMOS[kind][0], VERSION, seed), readme=_readme(kind))


def write_inpaint_demos(models_dir, seed: int = 0) -> dict:
    """Write (once) both demo transformers: {"fill": path, "flex": path}."""
    return {kind: write_inpaint_demo(models_dir, kind, seed) for kind in DEMOS}


def _readme(kind: str) -> str:
    model_id, name, config, _ = DEMOS[kind]
    real = {"fill": "black-forest-labs/FLUX.1-Fill-dev", "flex": "ostris/Flex.2-preview"}[kind]
    return (f"# {model_id}\n\nRandom weights: images made with this model are noise. `{name}` has the key layout "
            f"of {real}'s file at tiny widths ({config}); it runs with the text encoders and VAE of "
            f"{base.DEMO_MODEL_ID}. Written by FLUX Studio (engine/demo/inpaint.py).\n")
