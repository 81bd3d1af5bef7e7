"""``load_models``: files in -> ready modules out, one per role, each detected from its keys.

Memory: modules are built on the meta device (``with torch.device("meta")``, which is thread-local) and the
converted tensors are assigned into them (``load_state_dict(assign=True)``). Tensors come memory-mapped from the
files and are cast one by one, so a file already in ``torch_dtype`` on the CPU is used in place (page cache, no
private copy) and a 24 GB checkpoint is never held twice.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from . import quantized
from .detect import detect_component, split_side_keys
from .. import roles as role_table
from ..redux import model as redux_model
from .errors import ANY_MODEL, ROLE_NAMES, ROLES, ModelFileError, check_fits, few
from .files import FileGroup, add_group, read_state_dict, resolve_group
from .text_encoders import (build_clip, build_t5, check_no_decoder, convert_clip, convert_t5, infer_clip_config,
                            infer_t5_config)
from .transformer import build_transformer, convert_bfl_transformer, infer_transformer_config
from .vae import build_vae, convert_bfl_vae, convert_diffusers_vae, infer_vae_config, vae_config_from_json


# What load_models builds: FLUX.1's four components and FLUX.1-Redux's two (each told from its keys).
REDUX_ROLES = ("flux_redux_image_encoder", "flux_redux_image_embedder")
LOADED_ROLES = tuple(ROLES) + REDUX_ROLES


def role_name(role: str) -> str:
    """How a person calls a role in the loader's messages (the Role table's ``loader_name``)."""
    return role_table.ROLES[role].loader_name if role in role_table.ROLES else ROLE_NAMES.get(role, role)


def _norm(p) -> Path:
    return Path(p).expanduser().resolve()


def _expects(what: str | None) -> str:
    return f" This slot expects {role_name(what)}." if what else f" Expected {ANY_MODEL}."


def _in_context(e: ModelFileError, label: str, expected: str | None) -> ModelFileError:
    """The same error, made sure to name the file and what was expected."""
    msg = str(e)
    if label not in msg and (e.path is None or e.path not in msg):
        msg = f"{label}: {msg}"
    if "expects" not in msg and "Expected" not in msg:
        msg += _expects(expected)
    return ModelFileError(msg, e.path or label)


class _Expect:
    """``expect`` ({path: role}) matched against whatever the caller named: a file, a shard, the index or the folder."""

    def __init__(self, expect):
        self.by_path = {}
        for p, role in (expect or {}).items():
            if role not in LOADED_ROLES:
                raise ValueError(f"expect[{p!r}] = {role!r}: the role must be one of {', '.join(LOADED_ROLES)}")
            self.by_path[_norm(p)] = (str(p), role)

    def role_for(self, paths) -> str | None:
        roles = {}
        for p in paths:
            hit = self.by_path.get(_norm(p))
            if hit:
                roles[hit[1]] = hit[0]
        if len(roles) > 1:
            raise ModelFileError(f"{few(roles.values())} are one model but `expect` gives them different roles "
                                 f"({few(roles)}).")
        return next(iter(roles), None)


def _group_paths(g: FileGroup) -> list:
    shard_set = g.index is not None or len(g.files) > 1
    return [*g.inputs, g.label, *g.files, *([g.index, g.folder] if shard_set else [])]


def load_models(files, torch_dtype=torch.bfloat16, device="cpu", expect=None) -> dict[str, torch.nn.Module]:
    """Load FLUX.1 components from files, shard sets, index jsons or folders.

    Returns {role: module} with roles ``dit`` (diffusers FluxTransformer2DModel), ``vae`` (AutoencoderKL),
    ``text_encoder_1`` (transformers CLIPTextModel), ``text_encoder_2`` (T5EncoderModel), and FLUX.1-Redux's
    ``flux_redux_image_encoder`` (SiglipVisionModel) and ``flux_redux_image_embedder`` (diffusers'
    ReduxImageEncoder; see ``engine.redux.model``); each module is in eval
    mode, without gradients, in ``torch_dtype`` on ``device``, and carries ``flux_studio_files`` (its weight files),
    ``flux_studio_format`` ("bfl", "diffusers" or "transformers"), ``flux_studio_role`` and
    ``flux_studio_description``. ``expect`` = {path: role} turns a file holding another component into an error.
    Every problem with a file raises ``ModelFileError`` naming it.
    """
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    device = torch.device(device)
    exp = _Expect(expect)

    groups: list[FileGroup] = []
    configs = []  # config.json files named among the weights (e.g. from a "folder/*" pattern): fine beside them
    for item in files:
        if Path(item).name == "config.json" and Path(item).is_file():
            configs.append(item)
            continue
        try:
            g = resolve_group(item)
        except ModelFileError as e:
            raise _in_context(e, str(item), exp.role_for([item])) from e
        add_group(groups, g)

    for item in configs:
        if not any(g.folder.resolve() == _norm(item).parent for g in groups):
            err = ModelFileError(f"{item} is a JSON file (a model config), not a .safetensors weights file.", item)
            raise _in_context(err, str(item), exp.role_for([item]))

    found = []  # (group, role, format, description, expected role)
    for g in groups:
        expected = exp.role_for(_group_paths(g))
        try:
            qkind = quantized.file_kind(g)  # GGUF / bitsandbytes 4-bit / fp8: its logical shapes, side tensors folded
            qdesc = quantized.describe(g, qkind) if qkind else None
            header_sd = quantized.logical_meta(qdesc) if qkind else read_state_dict(g, device="meta")  # headers only
            role, fmt, desc = detect_component(header_sd)
            if qkind:
                desc += f", {quantized.storage_note(qkind, qdesc)}"
        except ModelFileError as e:
            raise _in_context(e, g.label, expected) from e
        if expected and role != expected:
            raise ModelFileError(f"{g.label} holds {desc}, but this slot expects {role_name(expected)}. Check the "
                                 f"file name / download it again.", g.label)
        if role not in LOADED_ROLES:
            raise ModelFileError(f"{g.label} holds {desc}; it is none of the FLUX.1 base components "
                                 f"({', '.join(ROLE_NAMES.values())}) nor a FLUX.1-Redux file."
                                 f"{_expects(expected)}", g.label)
        for other in found:
            if other[1] == role:
                raise ModelFileError(f"{other[0].label} and {g.label} both hold {role_name(role)} ({other[3]}; "
                                     f"{desc}): pass only one of them.", g.label)
        found.append((g, role, fmt, desc, expected))
    out = {}
    for g, role, fmt, desc, expected in found:
        try:
            model = _load_group(g, role, fmt, torch_dtype, device)
        except ModelFileError as e:
            raise _in_context(e, g.label, expected or role) from e
        except (MemoryError, torch.OutOfMemoryError):
            raise  # not the file's fault
        except Exception as e:  # never a bare traceback: name the file and what it was loaded as
            raise ModelFileError(f"{g.label} ({desc}) could not be loaded as {role_name(role)}: "
                                 f"{type(e).__name__}: {e}", g.label) from e
        model.flux_studio_files = [str(p) for p in g.files]
        model.flux_studio_format = fmt
        model.flux_studio_role = role
        model.flux_studio_description = desc
        out[role] = model
    return out


def _load_group(g: FileGroup, role: str, fmt: str, dtype, device: torch.device) -> torch.nn.Module:
    # memory-mapped (safetensors prefetches a little of each tensor); for the meta device, the headers alone
    qkind = quantized.file_kind(g)
    if qkind and (role == "dit" or quantized.refuse_role(g, qkind, role_name(role))):
        return quantized.load_quantized_transformer(g, qkind, fmt, dtype, device)
    sd = read_state_dict(g, device="meta" if device.type == "meta" else None)
    if role == "dit":
        main, _side = split_side_keys(sd)  # Step1X keeps its connector in the DiT file; it is not the DiT
        sd = {k: sd[k] for k in main}
        cfg = infer_transformer_config(sd)
        tensors = convert_bfl_transformer(sd) if fmt == "bfl" else sd
        return assemble(lambda: build_transformer(cfg), tensors, dtype, device)
    config_json = g.config()
    try:
        if role == "vae":
            cfg = vae_config_from_json(config_json or {}) if fmt == "diffusers" else None
            if cfg is None:
                config_json = None
                cfg = infer_vae_config(sd)
            tensors = convert_bfl_vae(sd) if fmt == "bfl" else convert_diffusers_vae(sd)
            return assemble(lambda: build_vae(cfg), tensors, dtype, device)
        if role == "text_encoder_1":
            cfg = infer_clip_config(sd, config_json)
            return assemble(lambda: build_clip(cfg), convert_clip(sd), dtype, device)
        if role == "text_encoder_2":
            check_no_decoder(sd)
            cfg = infer_t5_config(sd, config_json)
            return assemble(lambda: build_t5(cfg), convert_t5(sd), dtype, device)
        if role == "flux_redux_image_encoder":
            cfg = redux_model.infer_siglip_config(sd, config_json)
            return assemble(lambda: redux_model.build_siglip(cfg), redux_model.convert_siglip(sd), dtype, device)
        if role == "flux_redux_image_embedder":
            cfg = redux_model.infer_embedder_config(sd)
            return assemble(lambda: redux_model.build_embedder(cfg), dict(sd), dtype, device)
    except ModelFileError as e:
        if config_json is not None and "does not fit" in str(e):  # the architecture came from config.json
            raise ModelFileError(f"{e} The architecture was read from {g.folder / 'config.json'}: it does not "
                                 f"describe these weights (fix or delete it).", e.path) from e
        raise
    raise ModelFileError(f"no loader for role {role!r}")


def _get_param(model, path):
    mod_path, _, name = path.rpartition(".")
    return model.get_submodule(mod_path) if mod_path else model, name


def _materialise_buffers(model, device):
    """Give the buffers built on the meta device their values: the file holds none of them (they are not
    persistent). The four models have one kind, ``position_ids`` (CLIP): 0..n-1 along the last axis."""
    for name, buf in list(model.named_buffers()):
        if not buf.is_meta:
            continue
        mod, attr = _get_param(model, name)
        if attr == "position_ids":
            value = torch.arange(buf.shape[-1], dtype=buf.dtype, device=device).expand(buf.shape).contiguous()
        else:
            raise ModelFileError(f"the model's buffer {name} is not stored in the file and has no known value.")
        persistent = attr not in mod._non_persistent_buffers_set
        mod.register_buffer(attr, value, persistent=persistent)


def assemble(build, tensors: dict, dtype, device) -> torch.nn.Module:
    """Build a module on the meta device, check ``tensors`` match it one to one and shape-exact, assign them
    (cast per tensor to ``dtype`` on ``device``), re-tie tied weights the file leaves out; eval, no grad."""
    with torch.device("meta"):  # thread-local, unlike patching nn.Module: other threads keep building real modules
        model = build()
    want = model.state_dict(keep_vars=True)
    tied = getattr(model, "_tied_weights_keys", None)
    tied = tied if isinstance(tied, dict) else {}
    aliases = {t: s for t, s in tied.items() if t in want and t not in tensors and s in tensors}
    check_fits(tensors, want, set(aliases))

    def cast(t):
        return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype)

    model.load_state_dict({k: cast(v) for k, v in tensors.items()}, strict=False, assign=True)
    for target, source in aliases.items():
        mod, name = _get_param(model, target)
        smod, sname = _get_param(model, source)
        setattr(mod, name, getattr(smod, sname))
    if device.type != "meta":
        _materialise_buffers(model, device)
        left = [n for n, p in model.named_parameters() if p.is_meta]
        if left:
            raise ModelFileError(f"{len(left)} parameter(s) were not loaded ({few(left)}).")
    model.eval()
    model.requires_grad_(False)
    return model
