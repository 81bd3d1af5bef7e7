"""Runtime LoRA adapters on a diffusers ``FluxTransformer2DModel``: attached once, kept, removed exactly.

Each targeted ``nn.Linear`` gets ONE forward hook, whatever the number of LoRAs on it; the hook adds
``sum_i weight_i * scale_i * (x @ A_i^T) @ B_i^T`` (plus ``B_i``'s bias for the few LoRAs that have one) to the
layer's output. The base weight is never touched, so:

- removing a LoRA is exact (the last one removed also removes the hook: the layer is as it was);
- it works unchanged when the base weight is stored in fp8 through diffusers' layer-wise casting hooks, or moved by
  offloading hooks (those act on the layer's own ``forward``; this hook only reads its input and output);
- changing a LoRA's weight is one number (no reload, no re-patching); a weight of 0 skips its matrices.

Where the matrices live: in one child module of the transformer per attached LoRA (``dit.flux_studio_lora_<n>``),
as non-persistent buffers: ``dit.to(device)`` moves them, diffusers' group offloading applied after attaching
onloads them with the transformer's top-level group, and ``dit.state_dict()`` does not change. They are deliberately
NOT children of the ``nn.Linear`` layers, nor added to a module that exists already: layer-wise casting calls
``layer.to(fp8)`` around every call, which would store the LoRA in fp8 too, and group offloading with CUDA streams
keeps a fixed list of each group's tensors, which tensors added to a grouped module later would break. A cast of
the whole transformer to fp8 leaves them in their dtype (they follow device moves and other float casts). The hook
computes in the input's dtype and device; matrices on another device (group offloading applied before attaching,
so their module is in no group) are copied there for the call. The bookkeeping (names, weights, hooks) is a plain
attribute of the transformer, ``_flux_studio_lora_state``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LoraError, few
from .family import mismatch_message, model_family
from .formats import LoraFile, article

CHILD = "flux_studio_lora_"     # + a number: one child module of the transformer per attached LoRA
STATE = "_flux_studio_lora_state"
FP8 = tuple(t for t in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None),
                        getattr(torch, "float8_e4m3fnuz", None), getattr(torch, "float8_e5m2fnuz", None)) if t)


@dataclass
class _Record:
    name: str
    path: str
    format: str
    weight: float
    child: str                    # the transformer's child module holding this LoRA's matrices
    report: dict
    slots: list = field(default_factory=list)
    stamp: tuple | None = None    # (size, mtime) of the file, to tell a re-attach of the same file


class _Pair(nn.Module):
    """One LoRA's matrices on one layer. Buffers follow device moves; a cast to fp8 leaves their dtype alone."""

    def __init__(self, down, up, bias, scale: float, record: _Record):
        super().__init__()
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)
        self.register_buffer("up_bias", bias, persistent=False)
        self.scale = float(scale)
        self.record = record

    def _apply(self, fn, recurse=True):
        for key, buf in self._buffers.items():
            if buf is not None:
                new = fn(buf)
                if new.dtype in FP8 or not new.is_floating_point():
                    new = buf.to(device=new.device)
                self._buffers[key] = new
        return self

    def extra_repr(self):
        return f"{self.record.name!r}, rank={self.down.shape[0]}, scale={self.scale:g}"


class _LoraModule(nn.Module):
    """One attached LoRA's matrices: a direct child of the transformer, {layer (dots as '__'): _Pair}."""

    def __init__(self):
        super().__init__()
        self.pairs = nn.ModuleDict()


class _Slot:
    """All LoRAs on one ``nn.Linear``, and the one forward hook that applies them (a plain object, so that the
    modules holding the matrices are only ever the per-LoRA children)."""

    def __init__(self, target: str):
        self.target = target
        self.pairs: dict[str, _Pair] = {}   # record child name -> pair
        self.handle = None

    def hook(self, module, args, kwargs, output):
        x = args[0] if args else kwargs["input"]
        fused = module.__dict__.get("_flux_studio_lora_fusion")   # engine.lora.fusion: a gate merges the LoRAs
        if fused is not None:
            return fused(module, x, output)
        delta = None
        for pair in self.pairs.values():
            w = pair.record.weight * pair.scale
            if w == 0:
                continue
            A, B, b = pair.down, pair.up, pair.up_bias
            if A.device != x.device or A.dtype != x.dtype:
                A = A.to(device=x.device, dtype=x.dtype, non_blocking=True)
                B = B.to(device=x.device, dtype=x.dtype, non_blocking=True)
                b = None if b is None else b.to(device=x.device, dtype=x.dtype, non_blocking=True)
            d = F.linear(F.linear(x, A), B, b) * w
            delta = d if delta is None else delta + d
        if delta is None:
            return output
        return output + delta.to(output.dtype)


class _State:
    """The LoRAs attached to one transformer (kept as a plain attribute of it): records by name, slots by layer."""

    def __init__(self):
        self.records: dict[str, _Record] = {}
        self.slots: dict[str, _Slot] = {}
        self.counter = 0


def _state(dit, create=False) -> _State | None:
    st = dit.__dict__.get(STATE)
    if st is None and create:
        st = _State()
        setattr(dit, STATE, st)
    return st


def _compute_dtype(module: nn.Linear) -> torch.dtype:
    w = module.weight
    if w.dtype in FP8 or not w.is_floating_point():
        reg = getattr(module, "_diffusers_hook", None)
        hook = reg.get_hook("layerwise_casting") if reg is not None else None
        return getattr(hook, "compute_dtype", torch.bfloat16)
    return w.dtype


def _stamp(path) -> tuple | None:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None


def bind(dit, lora: LoraFile) -> tuple[dict, dict]:
    """({layer name: (module, A, B, bias, scale)}, report) of a LoRA on this transformer; raises LoraError when it
    binds to nothing or to under half of its targets. Attaches nothing (works on a meta-device transformer)."""
    layers = {n: m for n, m in dit.named_modules() if not n.startswith(CHILD)}
    bound, skipped, wrong_shape, missing = {}, [], [], []
    for target, (A, B, scale) in lora.targets.items():
        src = lora.source_of.get(target, target)
        m = layers.get(target)
        if m is None:
            missing.append(target)
            skipped.append(f"{src} -> {target}: this transformer has no such layer")
        elif not isinstance(m, nn.Linear):
            skipped.append(f"{src} -> {target}: a {type(m).__name__}, not a linear layer")
        elif A.shape[1] != m.in_features or B.shape[0] != m.out_features:
            wrong_shape.append((target, A.shape[1], B.shape[0], m.in_features, m.out_features))
            skipped.append(f"{src} -> {target}: the LoRA maps {A.shape[1]} -> {B.shape[0]} features, the layer "
                           f"{m.in_features} -> {m.out_features}")
        else:
            bound[target] = (m, A, B, lora.biases.get(target), scale)
    skipped += [f"{u}: no FLUX transformer layer has this name" for u in lora.unmapped]
    skipped += lora.problems
    if lora.ignored:
        skipped.append(f"{len(lora.ignored)} tensors that are not LoRA pairs (e.g. {lora.ignored[0]}: full weights "
                       f"or norm changes): not applied")
    if lora.text_encoder:
        skipped.append(f"{len(lora.text_encoder)} text-encoder modules (e.g. {lora.text_encoder[0]}): only the "
                       f"transformer part of a LoRA is applied")
    by_source: dict[str, list] = {}
    for target, src in lora.source_of.items():
        for s in src.split(" + "):
            by_source.setdefault(s, []).append(target)
    pairs_bound = sum(all(t in bound for t in ts) for ts in by_source.values())
    total = lora.total
    report = {"name": None, "path": lora.path, "format": lora.format, "rank": lora.rank, "bound": len(bound),
              "total": total, "pairs": lora.pairs, "pairs_bound": pairs_bound, "skipped": skipped,
              "text_encoder": len(lora.text_encoder), "ignored": len(lora.ignored)}
    if not bound or 2 * len(bound) < total:
        raise LoraError(_bind_error(lora, bound, total, wrong_shape, missing), lora.path)
    return bound, report


def _bind_error(lora: LoraFile, bound, total, wrong_shape, missing) -> str:
    what = f"This looks like {article(lora.format)} {lora.format} LoRA" + (f" {lora.hint}" if lora.hint else "")
    head = f"{lora.path}: {what}"
    if total == 0:
        if lora.text_encoder:
            return (f"{head}, but it only holds text-encoder layers ({len(lora.text_encoder)}, e.g. "
                    f"{lora.text_encoder[0]}): nothing in it applies to the FLUX transformer.")
        return f"{head}, but it holds no usable LoRA pairs ({few(lora.problems) or 'none found'})."
    n = f"it binds to {len(bound)} of its {total} targets" if bound else "none of its targets bind"
    if wrong_shape and len(wrong_shape) >= len(missing) + len(lora.unmapped):
        t, i, o, mi, mo = wrong_shape[0]
        return (f"{head}, and {n}: it was made for a transformer of another size (e.g. {t}: the LoRA maps {i} -> {o} "
                f"features, this transformer's layer {mi} -> {mo}). Use a LoRA made for this {lora.mapped_for} "
                f"model.")
    examples = [*lora.unmapped, *(lora.source_of.get(t, t) for t in missing), *lora.problems]
    return (f"{head}, and {n}: it targets modules this {lora.mapped_for} transformer does not have (e.g. "
            f"{few(examples)}). Use a {lora.mapped_for} LoRA.")


def read(path_or_lora, device=None, family: str = "FLUX.1") -> LoraFile:
    """A LoraFile mapped onto ``family``'s transformer; a LoRA of the other family is refused naming both."""
    if isinstance(path_or_lora, LoraFile):
        lf = path_or_lora
    else:
        from . import read_lora
        lf = read_lora(path_or_lora, device=device, family=family)
    if lf.family and lf.family != family:
        raise LoraError(mismatch_message(lf.path, lf.family, family), lf.path)
    if lf.mapped_for != family:
        raise LoraError(f"{lf.path} was read for a {lf.mapped_for} transformer, and this transformer is {family}: "
                        f"read it again for {family} (attach the file itself).", lf.path)
    return lf


def attach_lora(dit, lora, weight: float = 1.0, name: str | None = None, dtype: torch.dtype | None = None) -> dict:
    """Attach a LoRA (a path, a ``LoraFile`` or a state dict) to the transformer with ``weight``; returns the report
    ``{"name", "format", "bound", "total", "skipped", "pairs", "pairs_bound", "rank", "weight", ...}``.

    ``name`` defaults to the file's stem (made unique if another file already has it). The same name again replaces
    that LoRA; the same unchanged file under the same name only changes the weight, without reading it again.
    ``dtype`` is the matrices' storage dtype (default: the layer's compute dtype, e.g. bf16 under fp8 storage)."""
    if isinstance(lora, Mapping):           # a state dict, read for this transformer's family
        lora = read(lora, family=model_family(dit))
    path = None if isinstance(lora, LoraFile) else str(Path(lora).expanduser())
    st = _state(dit)
    if name is None:
        name = _default_name(st, lora.path if isinstance(lora, LoraFile) else path)
    if st is not None and name in st.records and path is not None:
        old = st.records[name]
        if old.path == path and old.stamp is not None and old.stamp == _stamp(path):
            old.weight = float(weight)
            old.report["weight"] = float(weight)
            return dict(old.report)
    lf = read(lora, family=model_family(dit))
    bound, report = bind(dit, lf)           # raises before anything is changed
    if st is not None and name in st.records:
        detach_loras(dit, [name])
    st = _state(dit, create=True)
    st.counter += 1
    child = f"{CHILD}{st.counter}"
    report.update(name=name, weight=float(weight))
    rec = _Record(name=name, path=lf.path, format=lf.format, weight=float(weight), child=child, report=report,
                  stamp=_stamp(lf.path))
    holder = _LoraModule()
    for target, (module, A, B, bias, scale) in bound.items():
        dt = dtype or _compute_dtype(module)
        dev = module.weight.device

        def own(t):
            return None if t is None else t.to(device=dev, dtype=dt, copy=True).contiguous()

        pair = _Pair(own(A), own(B), own(bias), scale, rec)
        holder.pairs[target.replace(".", "__")] = pair
        slot = st.slots.get(target)
        if slot is None:
            slot = st.slots[target] = _Slot(target)
            slot.handle = module.register_forward_hook(slot.hook, with_kwargs=True)
        slot.pairs[child] = pair
        rec.slots.append(target)
    dit.add_module(child, holder)
    st.records[name] = rec
    return dict(report)


def _default_name(st: _State | None, path) -> str:
    stem = Path(str(path)).stem or "lora"
    if st is None:
        return stem
    name, n = stem, 1
    while name in st.records and st.records[name].path != str(path):
        n += 1
        name = f"{stem} ({n})"
    return name


def detach_loras(dit, names=None) -> list[str]:
    """Remove the named LoRAs (a name or a list; None = all). The layers they touched compute exactly as before
    (a layer left without LoRAs has no hook). Returns the names removed; unknown names are ignored."""
    st = _state(dit)
    if st is None:
        return []
    if names is None:
        names = list(st.records)
    elif isinstance(names, str):
        names = [names]
    removed = []
    for name in names:
        rec = st.records.pop(name, None)
        if rec is None:
            continue
        for target in rec.slots:
            slot = st.slots.get(target)
            if slot is None:
                continue
            slot.pairs.pop(rec.child, None)
            if not slot.pairs:
                if slot.handle is not None:
                    slot.handle.remove()
                del st.slots[target]
        dit._modules.pop(rec.child, None)
        removed.append(name)
    if not st.records:
        for slot in st.slots.values():   # nothing should be left; make sure no hook survives
            if slot.handle is not None:
                slot.handle.remove()
        delattr(dit, STATE)
    return removed


def set_lora_weight(dit, name: str, weight: float) -> None:
    """Change an attached LoRA's weight: one number, nothing reloaded or re-patched."""
    st = _state(dit)
    if st is None or name not in st.records:
        raise LoraError(f"No LoRA named {name!r} is attached (attached: {few(active_names(dit)) or 'none'}).")
    st.records[name].weight = float(weight)
    st.records[name].report["weight"] = float(weight)


def active_names(dit) -> list[str]:
    st = _state(dit)
    return list(st.records) if st is not None else []


def active_loras(dit) -> list[dict]:
    """[{name, path, format, weight, bound, total, rank, bytes}] in the order they were attached."""
    st = _state(dit)
    if st is None:
        return []
    out = []
    for rec in st.records.values():
        holder = dit._modules.get(rec.child)
        nbytes = sum(b.numel() * b.element_size() for b in holder.buffers()) if holder is not None else 0
        out.append({"name": rec.name, "path": rec.path, "format": rec.format, "weight": rec.weight,
                    "bound": rec.report["bound"], "total": rec.report["total"], "rank": rec.report["rank"],
                    "bytes": nbytes})
    return out
