"""``--lora_target_modules`` onto this engine's transformer (diffusers' ``FluxTransformer2DModel``).

The seed's scripts name DiffSynth-Studio's own FluxDiT modules (``a_to_qkv,b_to_qkv,ff_a.0,ff_a.2,ff_b.0,ff_b.2,
a_to_out,b_to_out,proj_out,norm.linear,norm1_a.linear,norm1_b.linear,to_qkv_mlp``); diffusers' names (``to_q``,
``attn.to_out.0``, ``proj_mlp`` ...) work too. A name matches as PEFT matches it: the whole module path, or its
end after a dot. Each name is first read as DiffSynth's (its modules mapped through the same table the LoRA reader
uses, ``engine.lora.formats``), and only when it names no DiffSynth module as diffusers'. So ``proj_out`` means the
single blocks' output projection (DiffSynth's final layer is ``final_proj_out``), not diffusers' top-level one.

DiffSynth's fused projections are separate layers in diffusers: ``a_to_qkv`` becomes LoRAs on ``to_q``, ``to_k`` and
``to_v`` (each of the given rank; the fused LoRA's shared down matrix becomes three), ``to_qkv_mlp`` on ``to_q``,
``to_k``, ``to_v`` and ``proj_mlp``. Exported in kohya format they are fused back with block-diagonal up matrices,
which every reader splits exactly (see ``engine.training.export``).
"""
from __future__ import annotations

import difflib
import functools
import re

from torch import nn

from ..errors import EngineError
from ..lora.formats import DIFFSYNTH_DOUBLE, DIFFSYNTH_SINGLE, DIFFSYNTH_TOP

DIFFSYNTH_FLUX_TARGETS = ("a_to_qkv,b_to_qkv,ff_a.0,ff_a.2,ff_b.0,ff_b.2,a_to_out,b_to_out,proj_out,norm.linear,"
                          "norm1_a.linear,norm1_b.linear,to_qkv_mlp")


# The transformers' block lists (FLUX.1 / FLUX.2: double and single; FLUX 3: its per-mode streams and single blocks)
BLOCK_LISTS = ("transformer_blocks.", "single_transformer_blocks.", "mode_blocks.", "txt_mode_blocks.")


def diffsynth_names(dit) -> dict[str, tuple[str, ...]]:
    """{DiffSynth module path: the diffusers module paths it corresponds to} for this transformer."""
    out = {}
    for i in range(len(dit.transformer_blocks)):
        for key, (_kind, targets) in DIFFSYNTH_DOUBLE.items():
            out[f"blocks.{i}.{key}"] = tuple(f"transformer_blocks.{i}.{t}" for t in targets)
    for i in range(len(dit.single_transformer_blocks)):
        for key, (_kind, targets) in DIFFSYNTH_SINGLE.items():
            out[f"single_blocks.{i}.{key}"] = tuple(f"single_transformer_blocks.{i}.{t}" for t in targets)
    for key, (_kind, targets) in DIFFSYNTH_TOP.items():
        out[key] = tuple(targets)
    return out


def _matches(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def linear_layers(dit) -> dict[str, nn.Linear]:
    return {n: m for n, m in dit.named_modules() if isinstance(m, nn.Linear)}


def auto_targets(dit) -> list[str]:
    """The seed's automatic choice for an empty list: the linear layers of the block lists whose smaller side is at
    least 512 (every block linear of a small demo model, where none is that wide)."""
    layers = {n: m for n, m in linear_layers(dit).items() if n.startswith(BLOCK_LISTS)}
    wide = [n for n, m in layers.items() if min(m.in_features, m.out_features) >= 512]
    return wide or list(layers)


def resolve_targets(dit, spec) -> tuple[list[str], list[str]]:
    """``(diffusers module paths, one line per requested name saying what it became)`` for ``spec`` (a
    comma-separated string or a list). Raises EngineError naming any name that matches no linear layer."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s and s.strip()]
    layers = linear_layers(dit)
    if not names:
        targets = auto_targets(dit)
        return targets, [f"(automatic) {len(targets)} linear layers of the transformer blocks"]
    table = diffsynth_names(dit)
    chosen: list[str] = []
    report, unknown = [], []
    for name in names:
        hits = [t for path, ts in table.items() if _matches(path, name) for t in ts if t in layers]
        how = "DiffSynth"
        if not hits:
            hits = [path for path in layers if _matches(path, name) and not path.startswith("flux_studio_lora")]
            how = "diffusers"
        if not hits:
            unknown.append(name)
            continue
        kinds = sorted({h.split(".", 2)[-1] if h.split(".")[0].endswith("blocks") else h for h in hits})
        report.append(f"{name} ({how}) -> {', '.join(kinds)} ({len(hits)} layers)")
        chosen += [h for h in hits if h not in chosen]
    if unknown:
        raise EngineError(
            f"--lora_target_modules: {', '.join(unknown)} match no linear layer of the FLUX transformer. Use "
            f"DiffSynth's FLUX names (as the seed's scripts: {DIFFSYNTH_FLUX_TARGETS}) or diffusers' "
            f"(to_q, to_k, to_v, add_q_proj, to_out.0, to_add_out, ff.net.0.proj, proj_mlp, norm1.linear, ...).")
    return chosen, report


# ------------------------------------------------------------------------------ names checked before any model loads
_BLOCK_INDEX = re.compile(r"(^|\.)(blocks|single_blocks|transformer_blocks|single_transformer_blocks|txt_mode_blocks|"
                          r"mode_blocks\.image_cond|mode_blocks\.image)\.\d+(?=\.|$)")


def _one_block(path: str) -> str:
    """``transformer_blocks.17.attn.to_q`` -> ``transformer_blocks.0.attn.to_q`` (the layer names, any block)."""
    return _BLOCK_INDEX.sub(r"\1\2.0", path)


# Transformer classes (diffusers) and example names per family, for checking target names before a model loads
_CLASSES = {"FLUX.1": ("FluxTransformer2DModel", {"pooled_projection_dim": 16, "guidance_embeds": True}),
            "FLUX.2": ("Flux2Transformer2DModel", {}), "FLUX 3": ("Flux3Transformer2DModel", {})}
_EXAMPLES = {"FLUX.1": f"{DIFFSYNTH_FLUX_TARGETS} or diffusers' to_q, ...",
             "FLUX.2": "to_q, to_qkv_mlp_proj, linear_in, ...",
             "FLUX 3": "to_q, to_k, to_v, to_out.0, linear_in, linear_out (mode_blocks.image.N.attn.to_q, ...)"}


@functools.lru_cache(maxsize=3)
def known_layer_paths(family: str = "FLUX.1") -> tuple[str, ...]:
    """Every module path a ``--lora_target_modules`` name may match, with one block of each kind: diffusers' linear
    layers of the family's transformer (built on the meta device from a one-block config: the names do not depend on
    the sizes or the weights) and, for FLUX.1, DiffSynth's module names (``blocks.0.attn.a_to_qkv`` ...)."""
    import diffusers
    import torch
    name, kwargs = _CLASSES[family]
    with torch.device("meta"):
        dit = getattr(diffusers, name)(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                                       joint_attention_dim=16, **kwargs)
    paths = set(linear_layers(dit))
    if family == "FLUX.1":
        paths |= set(diffsynth_names(dit))
    return tuple(sorted(paths))


def _suffixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[i:]) for i in range(len(parts)) if not parts[i].isdigit()]


def check_target_names(spec, family: str = "FLUX.1") -> None:
    """Raise EngineError for any ``--lora_target_modules`` name that can match no layer of the family's
    transformer, naming the closest valid names -- before any model is loaded, so a typo costs seconds, not the
    minutes of loading a 12B model. (Which block indices exist is checked later, on the loaded model.)"""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec or []) if s and s.strip()]
    if not names:
        return
    paths = known_layer_paths(family)
    unknown = [n for n in names if not any(_matches(p, _one_block(n)) for p in paths)]
    if not unknown:
        return
    valid = sorted({s for p in paths for s in _suffixes(p)}, key=lambda s: (s.count("."), s))
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(_one_block(name), valid, n=3, cutoff=0.6)
        hints.append(f"'{name}'" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    examples = _EXAMPLES[family]
    raise EngineError(f"--lora_target_modules: {'; '.join(hints)} match{'es' if len(unknown) == 1 else ''} no layer of "
                      f"the {family} transformer. Valid names: {examples}")
