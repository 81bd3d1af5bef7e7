"""Tiny random-weight ControlNets in the three official file layouts, for the offline demo and the tests.

``write_controlnet_demo(models_dir, kind)`` writes ``<models_dir>/FLUX-Studio/ControlNet-<name>-random-demo/
diffusion_pytorch_model.safetensors`` with the key names of the real file (diffusers ``FluxControlNetModel``, BF16)
at the widths of the FLUX.1-dev random-weight demo (``engine.demo.TRANSFORMER``: 64 wide, heads of 32, 32 text and
64 pooled features), so they run with that demo's transformer, text encoders and VAE. Fewer blocks than the real
ones (real values in ``KINDS``); the block counts differ from the demo transformer's two and from each other so
that the spreading of fewer residuals over more blocks is exercised.

Like ``engine.demo.inpaint``: written by ``engine.demo.files.write_safetensors_once`` (atomically, once; version and
seed in the safetensors metadata, a file with the same ones is kept).
"""
from __future__ import annotations

import pathlib

from . import flux1 as base
from .files import demo_stamp, write_safetensors_once
from .weights import RandomWeights

VERSION = 1
FILE = "diffusion_pytorch_model.safetensors"

# kind -> (studio name, real repository, double blocks, single blocks, union modes, control features per token)
KINDS = {
    "union": ("Union-alpha", "InstantX/FLUX.1-dev-Controlnet-Union-alpha", 2, 1, 10, 64),      # real: 5, 10, 10, 64
    "upscaler": ("Upscaler", "jasperai/Flux.1-dev-Controlnet-Upscaler", 2, 0, None, 64),        # real: 5, 0
    "inpaint": ("Inpainting-Beta", "alimama-creative/FLUX.1-dev-Controlnet-Inpainting-Beta", 1, 0, None, 68),  # 6, 0
}


def demo_model_id(kind: str) -> str:
    return f"FLUX-Studio/ControlNet-{_kind(kind)[0]}-random-demo"


def demo_file(models_dir, kind: str, model_id: str | None = None) -> pathlib.Path:
    return pathlib.Path(models_dir) / (model_id or demo_model_id(kind)) / FILE


def _kind(kind: str):
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown ControlNet demo kind {kind!r}; expected one of {', '.join(KINDS)}") from None


def controlnet_blocks(it: RandomWeights, h: int, hd: int, mlp: int, depth: int, single: int) -> None:
    """The blocks of a diffusers ``FluxControlNetModel`` (``depth`` double, ``single`` single, each with its
    output projection ``controlnet_[single_]blocks.<i>``): ControlNets and InfuseNet."""
    for i in range(depth):
        p = f"transformer_blocks.{i}"
        it.linear(f"{p}.norm1.linear", 6 * h, h, gain=0.5)
        it.linear(f"{p}.norm1_context.linear", 6 * h, h, gain=0.5)
        for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            it.linear(f"{p}.attn.{proj}", h, h)
        for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            it.norm(f"{p}.attn.{norm}.weight", hd)
        for ff in ("ff", "ff_context"):
            it.linear(f"{p}.{ff}.net.0.proj", mlp, h)
            it.linear(f"{p}.{ff}.net.2", h, mlp)
        it.linear(f"controlnet_blocks.{i}", h, h, gain=0.5)
    for i in range(single):
        p = f"single_transformer_blocks.{i}"
        it.linear(f"{p}.norm.linear", 3 * h, h, gain=0.5)
        for proj in ("to_q", "to_k", "to_v"):
            it.linear(f"{p}.attn.{proj}", h, h)
        it.norm(f"{p}.attn.norm_q.weight", hd)
        it.norm(f"{p}.attn.norm_k.weight", hd)
        it.linear(f"{p}.proj_mlp", mlp, h)
        it.linear(f"{p}.proj_out", h, h + mlp)
        it.linear(f"controlnet_single_blocks.{i}", h, h, gain=0.5)


def controlnet_state_dict(kind: str, seed: int = 0) -> dict:
    """The demo ControlNet's state dict (keys of the real file, BF16)."""
    import torch

    name, _repo, depth, single, modes, cond = _kind(kind)
    c = base.TRANSFORMER
    h, hd, mlp = c["hidden_size"], c["head_dim"], int(c["hidden_size"] * c["mlp_ratio"])
    it = RandomWeights(seed, f"controlnet-{name}", torch.bfloat16)
    for emb, width in (("timestep_embedder", c["time_embed_dim"]), ("guidance_embedder", c["time_embed_dim"]),
                       ("text_embedder", c["vec_in_dim"])):
        it.linear(f"time_text_embed.{emb}.linear_1", h, width)
        it.linear(f"time_text_embed.{emb}.linear_2", h, h)
    it.linear("context_embedder", h, c["context_in_dim"])
    it.linear("x_embedder", h, c["in_channels"])
    it.linear("controlnet_x_embedder", h, cond)
    if modes:
        it.normal("controlnet_mode_embedder.weight", (modes, h), 1.0)
    controlnet_blocks(it, h, hd, mlp, depth, single)
    return it.sd


def write_controlnet_demo(models_dir, kind: str, model_id: str | None = None, seed: int = 0) -> pathlib.Path:
    """Write (once) the ``kind`` ("union", "upscaler" or "inpaint") demo ControlNet; returns its file.
    ``model_id`` places it elsewhere under ``models_dir`` (default ``FLUX-Studio/ControlNet-<name>-random-demo``)."""
    return write_safetensors_once(demo_file(models_dir, kind, model_id), lambda: controlnet_state_dict(kind, seed),
                                  demo_stamp(f"controlnet-{kind}", VERSION, seed), readme=_readme(kind))


def write_controlnet_demos(models_dir, seed: int = 0) -> dict:
    """All three: {"union": path, "upscaler": path, "inpaint": path}."""
    return {kind: write_controlnet_demo(models_dir, kind, seed=seed) for kind in KINDS}


def _readme(kind: str) -> str:
    name, repo, depth, single, modes, cond = _kind(kind)
    return (f"# {demo_model_id(kind)}\n\nRandom weights: images made with this ControlNet are noise. `{FILE}` has "
            f"the key layout of {repo}'s file at tiny widths ({depth} double + {single} single blocks, "
            f"{cond} control features{f', {modes} union modes' if modes else ''}); it runs with "
            f"{base.DEMO_MODEL_ID}. Written by FLUX Studio (engine/demo/controlnet.py).\n")
