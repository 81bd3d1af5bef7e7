"""A tiny random-weight FLUX.1-Redux in its official file layout, for the offline demo and the tests.

``write_redux_demo(models_dir)`` writes, under ``<models_dir>/FLUX-Studio/FLUX.1-Redux-dev-random-demo/``:

    image_encoder/model.safetensors                      SigLIP vision tower, ``vision_model.*`` keys incl. the MAP
                                                         head ``vision_model.head.*`` (BF16, as the real file)
    image_embedder/diffusion_pytorch_model.safetensors   ``redux_up`` / ``redux_down`` (BF16)

The tower keeps the real input: 384x384 in patches of 14 (729 positions, so 729 tokens per image) at a small width
with SigLIP's head width of 72 (the loader infers the heads from it); the embedder writes tokens as wide as the
FLUX.1 demo's T5 (``flux1.T5["d_model"]``), so they run with that demo's transformer. Each file carries its stamp
(demo, version, seed) and is written once (``files.write_safetensors_once``).
"""
from __future__ import annotations

import pathlib

from . import flux1
from .files import demo_stamp, write_safetensors_once
from .siglip import SIGLIP, siglip_vision
from .weights import RandomWeights

VERSION = 1
MODEL_ID = "FLUX-Studio/FLUX.1-Redux-dev-random-demo"      # engine.registry.adapter_demo_id("FLUX.1-Redux-dev")
ENCODER_FILE = "image_encoder/model.safetensors"
EMBEDDER_FILE = "image_embedder/diffusion_pytorch_model.safetensors"



def demo_folder(models_dir) -> pathlib.Path:
    return pathlib.Path(models_dir) / MODEL_ID


def encoder_state_dict(seed: int = 0) -> dict:
    """The SigLIP vision tower's tensors under the real file's names (``vision_model.*``), BF16."""
    import torch

    w = RandomWeights(seed, "redux-siglip", torch.bfloat16)
    siglip_vision(w)
    return w.sd


def embedder_state_dict(seed: int = 0) -> dict:
    """``redux_up`` (width -> 3 x T5 width) and ``redux_down`` (-> T5 width), BF16."""
    import torch

    t5 = flux1.T5["d_model"]
    w = RandomWeights(seed, "redux-embedder", torch.bfloat16)
    w.linear("redux_up", 3 * t5, SIGLIP["hidden_size"])
    w.linear("redux_down", t5, 3 * t5)
    return w.sd


def write_redux_demo(models_dir, seed: int = 0) -> pathlib.Path:
    """Write (once) the two demo files; returns the demo's folder (``<models_dir>/<MODEL_ID>``)."""
    folder = demo_folder(models_dir)
    readme = (f"# {MODEL_ID}\n\nRandom weights: an image prompt made with these files is noise. The files have the "
              f"key layout of black-forest-labs/FLUX.1-Redux-dev's {ENCODER_FILE} and {EMBEDDER_FILE} at tiny widths "
              f"({SIGLIP['num_hidden_layers']} SigLIP layers, {SIGLIP['hidden_size']} wide, 729 tokens per image); "
              f"they run with {flux1.DEMO_MODEL_ID}. Written by FLUX Studio (engine/demo/redux.py).\n")
    write_safetensors_once(folder / ENCODER_FILE, lambda: encoder_state_dict(seed),
                           demo_stamp("redux-image-encoder", VERSION, seed))
    write_safetensors_once(folder / EMBEDDER_FILE, lambda: embedder_state_dict(seed),
                           demo_stamp("redux-image-embedder", VERSION, seed))
    if not (folder / "README.md").exists():
        (folder / "README.md").write_text(readme)
    return folder


__all__ = ["MODEL_ID", "ENCODER_FILE", "EMBEDDER_FILE", "SIGLIP", "demo_folder", "encoder_state_dict",
           "embedder_state_dict", "write_redux_demo"]
