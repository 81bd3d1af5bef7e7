"""FLUX Studio's services: what the tabs call. Plain Python: no gradio, and no torch at import (the engine's
modules that touch tensors are imported when a job first needs them).

    Engine, get_engine(), configure_engine(...)   the process-wide studio engine (``studio.engine``)

Modules: ``engine`` (the singleton: model cache, one job at a time, cancel), ``requests`` (typed requests),
``features/`` (one module per kind of extra input), ``recipes`` (PNG metadata, sidecar copies, restore),
``training/`` (the Train tab's runs), ``file_access`` (which paths a request may name), ``work_files`` (the
page's scratch files), ``jobs`` (who a job belongs to).
"""
_EXPORTS = {"Engine": ".engine", "get_engine": ".engine", "configure_engine": ".engine"}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'studio' has no attribute {name!r}")
