"""Loading Step1X-Edit's files beside the FLUX ones.

``load_components(files, torch_dtype, device)`` is ``engine.loading.load_models`` plus two roles:

- ``step1x_connector``: the ``connector.*`` tensors of a DiT file (step1x-edit-i1258.safetensors keeps them beside
  the DiT; ``load_models`` loads the DiT part and leaves them out) onto ``Step1XConnector``, one to one and
  shape-exact;
- ``qwen_vl``: a Qwen2.5-VL folder (weights in the published ``model.*``/``visual.*`` layout, config.json beside
  them) onto transformers' ``Qwen2_5_VLForConditionalGeneration``, with its processor (same folder, or
  ``processor_folder``) attached as ``module.flux_studio_processor``.

ControlNet files (of any base model: FLUX ones load, others are refused by name) go to
``engine.controlnet.load_controlnet`` and come back as one ``controlnet`` role, a ``MultiControlNet`` in the order
given. Nexus-GenV2's AR weights and decoder .bin files go to ``engine.nexus_gen.load`` (``nexus_gen``, ``dit`` + its
adapter). Everything else goes to ``load_models`` unchanged.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..loading import load_models
from ..loading.errors import ModelFileError
from ..loading.files import add_group, read_state_dict, resolve_group
from ..loading.load import assemble
from ..roles import roles_of
from .connector import PREFIX, build_connector, infer_connector_config, split_connector
from .encoder import is_qwen_vl, load_processor, load_qwen_vl

STEP1X_ROLES = roles_of("step1x")      # the slots Step1X-Edit adds (engine.roles)
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


def _tag(model, group, role, fmt, desc):
    model.flux_studio_files = [str(p) for p in group.files]
    model.flux_studio_format = fmt
    model.flux_studio_role = role
    model.flux_studio_description = desc
    return model


def load_connector(group, dtype, device) -> torch.nn.Module:
    sd = split_connector(read_state_dict(group, device="meta" if torch.device(device).type == "meta" else None))
    if not sd:
        raise ModelFileError(f"{group.label} has no connector.* tensors: it is not the Step1X-Edit file.", group.label)
    cfg = infer_connector_config(sd)
    try:
        model = assemble(lambda: build_connector(cfg), sd, dtype, torch.device(device))
    except ModelFileError as e:
        raise ModelFileError(f"{group.label} (Step1X connector): {e}", group.label) from e
    return _tag(model, group, "step1x_connector", "bfl", "the Step1X-Edit connector (connector.* keys)")


def load_components(files, torch_dtype=torch.bfloat16, device="cpu", processor_folder=None) -> dict:
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    from ..controlnet import MultiControlNet, load_controlnet, looks_like_controlnet
    from ..ipadapter import load as ipadapter_load
    from ..infiniteyou.load import load_claimed, split_files
    infiniteyou, files = split_files(files)      # InfiniteYou's projector (.bin) and InfuseNet, by their contents
    qwen_groups, connector_groups, controlnet_groups, rest = [], [], [], []
    ipadapter_items = [item for item in files if ipadapter_load.claims(item)]   # ip-adapter.bin, a whole SigLIP
    files = [item for item in files if item not in ipadapter_items]
    from ..lora_encoder import load as lora_encoder_load
    lora_encoder_items = [item for item in files if lora_encoder_load.claims(item)]   # DiffSynth's LoRA Encoder
    files = [item for item in files if item not in lora_encoder_items]
    from ..nexus_gen import load as nexus_gen_load
    nexus_items = [item for item in files if nexus_gen_load.claims(item)]   # before Qwen: the AR model is one too
    files = [item for item in files if item not in nexus_items]
    for item in files:
        p = Path(item)
        if not (p.is_dir() or p.name.endswith(WEIGHT_SUFFIXES)):
            rest.append(item)            # config.json etc.: load_models knows what to do with them
            continue
        g = resolve_group(item)
        keys = read_state_dict(g, device="meta").keys()
        if is_qwen_vl(keys):
            add_group(qwen_groups, g)
            continue
        if looks_like_controlnet(keys):
            add_group(controlnet_groups, g)
            continue
        if any(k.startswith(PREFIX) for k in keys):
            add_group(connector_groups, g)
        rest.append(item)
    own_dirs = {g.folder.resolve() for g in qwen_groups + controlnet_groups}
    rest = [i for i in rest if Path(i).is_dir() or Path(i).name.endswith(WEIGHT_SUFFIXES)
            or Path(i).resolve().parent not in own_dirs]     # the Qwen / ControlNet folder's own json files
    out = load_models(rest, torch_dtype=torch_dtype, device=device) if rest else {}
    out.update(load_claimed(infiniteyou, torch_dtype, device))
    out.update(ipadapter_load.load_components(ipadapter_items, torch_dtype, device) if ipadapter_items else {})
    out.update(lora_encoder_load.load_components(lora_encoder_items, torch_dtype, device))
    if nexus_items:
        nexus = nexus_gen_load.load_components(nexus_items, torch_dtype, device)
        if "dit" in nexus and "dit" in out:
            raise ModelFileError("A Nexus-GenV2 decoder holds its own DiT: pass it without another FLUX transformer.")
        out.update(nexus)
    if controlnet_groups:
        out["controlnet"] = MultiControlNet([load_controlnet(g, torch_dtype, device) for g in controlnet_groups])
    if len(connector_groups) > 1 or len(qwen_groups) > 1:
        raise ModelFileError("Two Step1X connector files or two Qwen2.5-VL models were given: pass only one.")
    for g in connector_groups:
        out["step1x_connector"] = load_connector(g, torch_dtype, device)
    for g in qwen_groups:
        try:
            model = load_qwen_vl(g, torch_dtype, device)
        except ModelFileError:
            raise
        except Exception as e:
            raise ModelFileError(f"{g.label} (Qwen2.5-VL) could not be loaded: {type(e).__name__}: {e}", g.label) from e
        _tag(model, g, "qwen_vl", "transformers", "Qwen2.5-VL (published model.*/visual.* layout)")
        folder = Path(processor_folder) if processor_folder else g.folder
        try:
            model.flux_studio_processor = load_processor(folder)
        except Exception as e:
            raise ModelFileError(f"The Qwen2.5-VL processor (tokenizer, preprocessor_config.json, chat template) "
                                 f"could not be loaded from {folder}: {type(e).__name__}: {e}. Download the whole "
                                 f"Qwen/Qwen2.5-VL-7B-Instruct folder.", folder) from e
        out["qwen_vl"] = model
    return out


def load_role(role: str, files, torch_dtype=torch.bfloat16, device="cpu") -> torch.nn.Module:
    """One Step1X role from its files, for a caller that loads role by role (the studio's engine): the connector
    from the DiT file (its ``connector.*`` tensors only) or Qwen2.5-VL from its weight files (processor from their
    folder)."""
    if role == "step1x_connector":
        return load_connector(resolve_group(files[0]), torch_dtype, device)
    if role == "qwen_vl":
        loaded = load_components(files, torch_dtype=torch_dtype, device=device)
        if "qwen_vl" not in loaded:
            raise ModelFileError(f"{files[0]} is not a Qwen2.5-VL model (model.*/visual.* weights).", files[0])
        return loaded["qwen_vl"]
    raise ValueError(f"{role!r} is not a Step1X role; expected one of {STEP1X_ROLES}.")
