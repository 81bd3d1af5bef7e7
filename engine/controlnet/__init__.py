"""FLUX.1 ControlNets: the seed's ``ControlNetInput``, loading the files, several at once, random-weight demos.

- ``inputs``: ``ControlNetInput`` (the seed's fields and defaults; ``start``/``end`` window)
- ``config``: what a ControlNet file is, its ``FluxControlNetModel`` config from tensor shapes
- ``load``: ``load_controlnet(files)``, ``check_compatible(controlnets, dit)``
- ``multi``: ``MultiControlNet``, the pipeline's ``controlnet`` role (``controlnet_id`` = order of the files)
- ``attach``: ``attach_controlnets(pipe, [...])`` on an already-built pipeline
- ``modes``: the Union ControlNet's ``processor_id`` -> mode
- random-weight demo files in the three official layouts: ``engine.demo.controlnet``

How the pipeline uses them per step is ``engine.conditions.controlnet``.
"""
from .inputs import ControlNetInput

_EXPORTS = {
    "MultiControlNet": ".multi",
    "load_controlnet": ".load",
    "check_compatible": ".load",
    "attach_controlnets": ".attach",
    "classify": ".config",
    "looks_like_controlnet": ".config",
    "infer_controlnet_config": ".config",
    "build_controlnet": ".config",
    "UNION_MODES": ".modes",
    "union_mode": ".modes",
    "write_controlnet_demo": "..demo",
    "write_controlnet_demos": "..demo",
}

__all__ = ["ControlNetInput", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'engine.controlnet' has no attribute {name!r}")
