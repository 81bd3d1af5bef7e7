"""Regional ``torch.compile`` of a transformer's blocks: diffusers' ``compile_repeated_blocks``.

Only the repeated blocks (``_repeated_blocks``: FLUX.1's ``FluxTransformerBlock`` / ``FluxSingleTransformerBlock``,
FLUX.2's) are compiled, not the whole model: dynamo compiles one graph per block class and input shapes (the blocks
of a class share it: their weights are inputs, not constants) and caches it, so a 57-block FLUX.1 compiles two
graphs, not 57. A new image size is a new shape: torch's default "automatic dynamic" compiles it once more, with
dynamic sizes, and that graph serves every later size. Each block keeps its compiled callable
(``_flux_compiled[backend]``), so switching compile off and on again does not recompile.

The engine's hooks stay outside what this changes: LoRA adapters and fp8 storage are forward hooks and casts on the
blocks' layers, which dynamo traces (adding or removing a LoRA recompiles once). A transformer streamed block by
block (group offloading moves each block's weights inside its call) is not compiled: the blocks run eagerly, with
a note.
"""
from __future__ import annotations

import torch

from .settings import SettingError

CPU_NOTE = ("Compile is off on the CPU: inductor's CPU code is rarely faster for these blocks and compiling takes "
            "minutes (pass compile=\"inductor\" to force it).")


def repeated_blocks(dit) -> list:
    names = tuple(getattr(dit, "_repeated_blocks", ()) or ())
    return [m for m in dit.modules() if m.__class__.__name__ in names]


def compiled_backend(dit):
    """The backend the blocks run compiled with now, or None."""
    return getattr(dit, "_flux_compile_backend", None)


def remove_compile(dit) -> None:
    """The blocks run eagerly again (their compiled callables are kept for a later switch back)."""
    for block in repeated_blocks(dit):
        block._compiled_call_impl = None     # nn.Module.__call__ runs _call_impl when this is None
    dit._flux_compile_backend = None


def apply_compile(dit, setting, device, streamed: bool = False) -> list:
    """Compile (or stop compiling) the transformer's blocks as ``setting`` says (see ``settings``); returns notes.
    True compiles with inductor on CUDA only; a backend's name compiles on any device."""
    if not setting:
        remove_compile(dit)
        return []
    device = torch.device(device)
    if setting is True and device.type != "cuda":
        remove_compile(dit)
        return [CPU_NOTE]
    if streamed:
        remove_compile(dit)
        return ["Compile is skipped: the transformer is streamed block by block under this VRAM limit (its weights "
                "move inside each block's call). Raise the limit to compile it."]
    backend = "inductor" if setting is True else setting
    blocks = repeated_blocks(dit)
    if not blocks:
        raise SettingError(f"{type(dit).__name__} names no repeated blocks to compile.")
    if compiled_backend(dit) == backend:
        return []
    fresh = [b for b in blocks if backend not in b.__dict__.get("_flux_compiled", {})]
    if fresh:
        dit.compile_repeated_blocks(backend=backend)      # diffusers: block.compile(...) on every repeated block
    for block in blocks:
        cache = block.__dict__.setdefault("_flux_compiled", {})
        if block in fresh:
            cache[backend] = block._compiled_call_impl
        block._compiled_call_impl = cache[backend]
    dit._flux_compile_backend = backend
    return [f"Compiling the transformer's {len(blocks)} blocks ({backend}): the first image at each new size waits "
            f"for it."] if fresh else []
