"""The seed's ``pipe.load_lora`` / ``pipe.clear_lora`` for every pipeline (FLUX.1, FLUX.2, FLUX 3): LoRAs are runtime
adapters on the transformer, so one mixin serves all; each pipeline names only whose transformer it is (``WHOSE``).

The LoRA file's format and family are the reader's business (``engine.lora``: the family's name tables; a LoRA of
another family is refused naming both). FLUX.1's LoRA Fusion gates wrap these adapters (``engine.lora.fusion``).
"""
from __future__ import annotations

from typing import Optional

from ..errors import EngineError


class RuntimeLoraMethods:
    """``load_lora`` and ``clear_lora`` on ``self.dit``; the class says whose transformer it is (``WHOSE``)."""

    WHOSE = ""

    def load_lora(self, module=None, lora_config=None, alpha: float = 1.0, hotload=None, state_dict=None,
                  verbose: int = 1, name: Optional[str] = None) -> dict:
        """The seed's ``pipe.load_lora(pipe.dit, path, alpha=1)``: attach a LoRA of this family (a path, a
        ModelConfig or ``state_dict``) to the transformer as a runtime adapter, kept across calls and removed exactly
        by ``clear_lora``; ``hotload`` is accepted for compatibility."""
        from ..model_config import ModelConfig
        from . import LoraError, attach_lora
        module = module if module is not None else self.dit
        if module is None or module is not self.dit:
            raise EngineError(f"LoRAs attach to the {self.WHOSE}transformer (pipe.dit) only: load it first.")
        source = state_dict
        if source is None:
            if lora_config is None:
                raise EngineError("load_lora needs a LoRA: a file path, a ModelConfig or state_dict=...")
            source = lora_config.resolve()[0] if isinstance(lora_config, ModelConfig) else lora_config
        try:
            report = attach_lora(module, source, weight=alpha, name=name)
        except LoraError as exc:
            raise EngineError(str(exc)) from exc
        if verbose:
            print(f"LoRA {report['name']} ({report['format']}): {report['bound']} of {report['total']} layers, "
                  f"weight {alpha}")
        return report

    def clear_lora(self, verbose: int = 1) -> list:
        """Remove every LoRA from the transformer; its weights are exactly as loaded."""
        from . import detach_loras
        removed = detach_loras(self.dit) if self.dit is not None else []
        if verbose and removed:
            print(f"Removed LoRAs: {', '.join(removed)}")
        return removed


__all__ = ["RuntimeLoraMethods"]
