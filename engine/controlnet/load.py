"""Loading ControlNet files onto diffusers' ``FluxControlNetModel``, and checking one fits the FLUX transformer.

The model is built on the meta device from the shapes (``config.infer_controlnet_config``) and the file's tensors
are assigned one to one and shape-exact by ``engine.loading.load.assemble``: memory-mapped, cast per tensor, never
held twice. Every problem raises ``ModelFileError`` naming the file and what was expected.
"""
from __future__ import annotations

import os

import torch

from ..loading.errors import ModelFileError
from ..loading.files import FileGroup, read_state_dict, resolve_groups
from ..loading.load import assemble
from .config import SUPPORTED, build_controlnet, classify, infer_controlnet_config


def _group(files) -> FileGroup:
    if isinstance(files, FileGroup):
        return files
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    files = [f for f in files if os.path.basename(str(f)) != "config.json"]   # shapes, not config.json, decide
    groups = resolve_groups(files)
    if len(groups) != 1:
        raise ModelFileError(f"{', '.join(g.label for g in groups)} are {len(groups)} models: load one ControlNet "
                             f"at a time.", groups[0].label if groups else None)
    return groups[0]


def load_controlnet(files, torch_dtype=torch.bfloat16, device="cpu") -> torch.nn.Module:
    """One ControlNet (a file, its shards, their index or folder) -> ``FluxControlNetModel`` in eval mode, without
    gradients, in ``torch_dtype`` on ``device``, tagged like every loaded component (``flux_studio_files``,
    ``flux_studio_role`` = "controlnet", ``flux_studio_description``)."""
    g = _group(files)
    device = torch.device(device)
    header = read_state_dict(g, device="meta")           # headers only: checks every file, reads no data
    kind, desc = classify(header)
    if kind != "flux":
        raise ModelFileError(f"{g.label} holds {desc}. Expected {SUPPORTED}.", g.label)
    try:
        cfg = infer_controlnet_config(header)
        sd = read_state_dict(g, device="meta" if device.type == "meta" else None)
        model = assemble(lambda: build_controlnet(cfg), sd, torch_dtype, device)
    except ModelFileError as e:
        raise ModelFileError(f"{g.label} (a FLUX ControlNet): {e}", g.label) from e
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # never a bare traceback: name the file
        raise ModelFileError(f"{g.label} could not be loaded as a FLUX ControlNet: {type(e).__name__}: {e}",
                             g.label) from e
    model.flux_studio_files = [str(p) for p in g.files]
    model.flux_studio_format = "diffusers"
    model.flux_studio_role = "controlnet"
    model.flux_studio_description = _describe(cfg)
    return model


def _describe(cfg) -> str:
    k = cfg["kwargs"]
    bits = [f"{k['num_layers']} double + {k['num_single_layers']} single blocks"]
    if k["num_mode"]:
        bits.append(f"{k['num_mode']} union modes")
    if cfg["cond_channels"] != k["in_channels"]:
        bits.append("image + mask input (inpainting)")
    return f"a FLUX.1 ControlNet ({', '.join(bits)})"


def _label(module) -> str:
    files = getattr(module, "flux_studio_files", None)
    return ", ".join(files) if files else "the ControlNet"


def check_compatible(controlnets, dit) -> None:
    """Raise ``ModelFileError`` naming the file when a ControlNet cannot feed this FLUX transformer (another width,
    head width or text width: a ControlNet for another base model)."""
    if dit is None or controlnets is None:
        return
    nets = list(getattr(controlnets, "nets", [controlnets]))
    d = dit.config
    want = {"width": d.num_attention_heads * d.attention_head_dim, "head width": d.attention_head_dim,
            "text features": d.joint_attention_dim, "pooled text features": d.pooled_projection_dim}
    for net in nets:
        c = net.config
        have = {"width": net.inner_dim, "head width": c.attention_head_dim, "text features": c.joint_attention_dim,
                "pooled text features": c.pooled_projection_dim}
        wrong = [f"{k} {have[k]} (the transformer's: {want[k]})" for k in want if have[k] != want[k]]
        if wrong:
            raise ModelFileError(
                f"The ControlNet {_label(net)} does not fit the loaded FLUX transformer "
                f"({', '.join(getattr(dit, 'flux_studio_files', []) or ['loaded'])}): {'; '.join(wrong)}. It was made "
                f"for another base model; use a ControlNet for this FLUX.1 model (for FLUX.1-dev: width 3072, "
                f"4096 text features).", _label(net))
