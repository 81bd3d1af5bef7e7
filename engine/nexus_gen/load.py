"""Loading Nexus-GenV2's files beside the FLUX ones (``FluxImagePipeline.from_pretrained`` routes them here through
``engine.step1x.load.load_components``; the studio loads role by role with ``load_role``).

``claims(item)`` tells the files by their keys: the AR weights (``vision_head.weight`` and
``image_prefill_embeds.weight`` beside Qwen2.5-VL's) from a safetensors header, a decoder from a pickle read with
``torch.load(weights_only=True)`` (memory-mapped: no tensor data is read). Every module is built on the meta device
and its tensors assigned one to one, shape-exact (``engine.loading.load.assemble``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..loading.errors import ModelFileError
from ..loading.files import add_group, read_state_dict, resolve_group
from ..loading.load import assemble
from ..loading.transformer import build_transformer, infer_transformer_config
from . import ar_model as ar
from . import decoders as dec

BIN_SUFFIXES = (".bin", ".pt", ".pth")
ROLES = (ar.ROLE, dec.GENERATION_ROLE, dec.EDITING_ROLE)
PROCESSOR_HINT = ('the Nexus-GenV2 processor folder (tokenizer, preprocessor_config.json, chat template): download '
                  'DiffSynth-Studio/Nexus-GenV2\'s processor/ beside model*.safetensors, or pass '
                  'nexus_gen_processor_config=ModelConfig(model_id="DiffSynth-Studio/Nexus-GenV2", '
                  'origin_file_pattern="processor/")')


def _tag(model, files, role, fmt, desc):
    model.flux_studio_files = [str(f) for f in files]
    model.flux_studio_format = fmt
    model.flux_studio_role = role
    model.flux_studio_description = desc
    return model


def read_bin(path) -> dict:
    """A decoder's tensors (``torch.load(weights_only=True)``, memory-mapped)."""
    from ..infiniteyou.model import read_bin as read_pickle
    return dec.unwrap(read_pickle(path))


def claims(item) -> str | None:
    """``nexus_gen`` (the AR weights), ``nexus_gen_decoder`` (a decoder .bin) or None."""
    p = Path(item)
    if p.is_file() and p.name.endswith(BIN_SUFFIXES):
        try:
            keys = read_bin(p).keys()
        except ModelFileError:
            return None
        return "nexus_gen_decoder" if any(str(k).startswith(dec.DIT_PREFIX) for k in keys) else None
    if p.is_dir() or p.name.endswith((".safetensors", ".safetensors.index.json")):
        try:
            keys = read_state_dict(resolve_group(p), device="meta").keys()
        except Exception:  # noqa: BLE001 - the generic loader names what is wrong with it
            return None
        return ar.ROLE if ar.is_nexus_gen_ar(keys) else None
    return None


def find_processor(weights_folder: Path, processor_folder=None):
    """The processor folder: the one given, else ``processor/`` beside the weights; None when neither exists."""
    if processor_folder is not None:
        return Path(processor_folder)
    candidate = Path(weights_folder) / "processor"
    return candidate if candidate.is_dir() else None


def folder_config(config):
    """The seed's generation example names the folder ``processor`` (no slash): a folder pattern here."""
    import dataclasses
    pattern = config.origin_file_pattern
    if isinstance(pattern, str) and pattern and not pattern.endswith("/") and not any(c in pattern for c in "*?["):
        return dataclasses.replace(config, origin_file_pattern=pattern + "/")
    return config


def attach_processor(model, folder) -> None:
    """``model.flux_studio_processor`` from ``folder`` (the folder's own pixel bounds, as the seed's processor)."""
    from ..step1x.encoder import load_processor
    try:
        model.flux_studio_processor = load_processor(folder, min_pixels=None, max_pixels=None)
    except Exception as e:
        raise ModelFileError(f"The Nexus-GenV2 processor could not be loaded from {folder}: {type(e).__name__}: "
                             f"{e}. It needs {PROCESSOR_HINT}.", folder) from e


def load_ar(group, torch_dtype=torch.bfloat16, device="cpu", processor_folder=None) -> torch.nn.Module:
    """The AR model from its weights (config.json beside them, else the published config)."""
    device = torch.device(device)
    config = ar.config_of(group.folder)
    sd = read_state_dict(group, device="meta" if device.type == "meta" else None)
    try:
        model = assemble(lambda: ar.build(config, device), ar.convert_keys(sd), torch_dtype, device)
    except ModelFileError as e:
        raise ModelFileError(f"{group.label} (Nexus-GenV2 AR model): {e}", group.label) from e
    _tag(model, group.files, ar.ROLE, "transformers", "Nexus-GenV2's autoregressive Qwen2.5-VL (4.49 key layout)")
    model.flux_studio_processor = None
    folder = find_processor(group.folder, processor_folder)
    if folder is not None and device.type != "meta":
        attach_processor(model, folder)
    return model


def decoder_from_tensors(sd: dict, torch_dtype=torch.bfloat16, device="cpu", label="the decoder file") -> dict:
    """{"dit": FluxTransformer2DModel, adapter role: module} from a decoder's tensors (e.g. a manifest on meta)."""
    device = torch.device(device)
    dit_sd, adapter_sd, merger_sd, role = dec.split_decoder(sd, label)
    tensors = dec.convert_dit(dit_sd)
    cfg = infer_transformer_config(tensors)
    out = {"dit": assemble(lambda: build_transformer(cfg), tensors, torch_dtype, device)}
    if role == dec.GENERATION_ROLE:
        acfg = dec.adapter_config(adapter_sd)
        out[role] = assemble(lambda: dec.NexusGenAdapter(**acfg), adapter_sd, torch_dtype, device)
    else:
        mcfg = dec.merger_config(merger_sd)
        out[role] = assemble(lambda: dec.NexusGenEmbeddingMerger(**mcfg), merger_sd, torch_dtype, device)
    return out


def load_decoder(path, torch_dtype=torch.bfloat16, device="cpu") -> dict:
    path = Path(path)
    try:
        out = decoder_from_tensors(read_bin(path), torch_dtype, device, label=str(path))
    except ModelFileError as e:
        raise ModelFileError(f"{path} (Nexus-GenV2 decoder): {e}" if str(path) not in str(e) else str(e),
                             str(path)) from e
    _tag(out["dit"], [path], "dit", "DiffSynth", "FLUX.1 DiT of a Nexus-GenV2 decoder (pipe.dit.*, DiffSynth names)")
    for role in (dec.GENERATION_ROLE, dec.EDITING_ROLE):
        if role in out:
            what = "generation adapter" if role == dec.GENERATION_ROLE else "embedding merger"
            _tag(out[role], [path], role, "DiffSynth", f"Nexus-GenV2's {what}")
    return out


def load_components(items, torch_dtype=torch.bfloat16, device="cpu", processor_folder=None) -> dict:
    """The roles of the files ``claims`` took: ``nexus_gen`` (one AR model) and ``dit`` + one adapter per decoder
    (one decoder at most: each holds a DiT)."""
    if isinstance(items, (str, os.PathLike)):
        items = [items]
    ar_groups, decoders = [], []
    for item in items:
        if claims(item) == ar.ROLE:
            add_group(ar_groups, resolve_group(item))
        else:
            decoders.append(item)
    if len(ar_groups) > 1 or len(decoders) > 1:
        raise ModelFileError("Two Nexus-GenV2 AR models or two decoder files were given: pass one model*.safetensors "
                             "set and one of generation_decoder.bin / edit_decoder.bin.")
    out = {}
    for item in decoders:
        out.update(load_decoder(item, torch_dtype, device))
    for g in ar_groups:
        out[ar.ROLE] = load_ar(g, torch_dtype, device, processor_folder)
    return out


def load_role(role: str, files, torch_dtype=torch.bfloat16, device="cpu", processor_folder=None) -> torch.nn.Module:
    """One role from its files, for a caller that loads role by role (the studio): ``nexus_gen`` from the AR
    weights, ``dit`` / an adapter from a decoder .bin."""
    files = list(files) if isinstance(files, (list, tuple)) else [files]
    if role == ar.ROLE:
        groups = []
        for f in files:
            if Path(f).name.endswith((".safetensors", ".safetensors.index.json")) or Path(f).is_dir():
                add_group(groups, resolve_group(f))
        if len(groups) != 1:
            raise ModelFileError(f"Nexus-GenV2's AR model is one set of model*.safetensors; got {files}.")
        return load_ar(groups[0], torch_dtype, device, processor_folder)
    bins = [f for f in files if Path(f).name.endswith(BIN_SUFFIXES)]
    if role in ("dit", dec.GENERATION_ROLE, dec.EDITING_ROLE) and len(bins) == 1:
        loaded = load_decoder(bins[0], torch_dtype, device)
        if role not in loaded:
            other = next(r for r in loaded if r != "dit")
            raise ModelFileError(f"{bins[0]} holds the {other}, not the {role}: generation_decoder.bin has the "
                                 f"generation adapter, edit_decoder.bin the editing merger.", bins[0])
        return loaded[role]
    raise ValueError(f"{role!r} from {files} is not a Nexus-GenV2 role; expected one of {ROLES} or the dit of a "
                     f"decoder .bin.")


__all__ = ["ROLES", "attach_processor", "claims", "folder_config", "decoder_from_tensors", "find_processor", "load_ar",
           "load_components", "load_decoder", "load_role", "read_bin"]
