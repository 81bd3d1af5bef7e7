"""The catalogue as the studio shows it: which variants are on offer, which are in the models folder, the default
one, and the random-weight demos (written when there is nothing else, or when asked for with ``--demo``).

Pure Python at import (the demo writers load torch when they run).
"""
from __future__ import annotations

import pathlib
import threading
from typing import Optional

from engine import registry
from engine.model_config import match_local_files


class Catalogue:
    def __init__(self, models_dir, demo: bool = False, defer_demo: bool = False):
        self.models_dir = pathlib.Path(models_dir)
        self.demo = demo
        self._demo_written = False
        self._demo_lock = threading.Lock()
        # Writing the demo imports torch and takes seconds on a fresh models folder: ``defer_demo`` leaves it to the
        # first job (or ``ensure_demo`` in the background once the page is served) so the page comes up first.
        self.demo_pending = bool(defer_demo and (demo or self.demo_only))
        if (demo or self.demo_only) and not self.demo_pending:
            self.ensure_demo()

    def file_available(self, model_id: str, pattern: str) -> bool:
        """Whether ``models/<model_id>/<pattern>`` is in the models folder (nothing is downloaded)."""
        return bool(match_local_files(self.models_dir / model_id, [pattern]))

    def available(self, variant) -> bool:
        return all(self.file_available(f.model_id, f.pattern) for f in variant.files)

    @property
    def demo_only(self) -> bool:
        """No real model is in the models folder: only the random-weight demos can run."""
        return not any(self.available(v) for v in registry.studio_variants() if not v.demo)

    def ensure_demo(self) -> None:
        with self._demo_lock:        # a first job waits for the background writer instead of writing twice
            from engine.demo import write_demo_model
            write_demo_model(self.models_dir)
            self._demo_written = True
            self.demo_pending = False

    def write_demo(self, variant) -> None:
        """Write a demo variant's random-weight files (the Step1X-Edit and FLUX.2 demos are written on first use:
        they take a few seconds, and only the tabs that use them need them)."""
        ids = {f.model_id for f in variant.files}
        if registry.STEP1X_DEMO_ID in ids:
            from engine.demo import write_step1x_demo
            write_step1x_demo(self.models_dir)
            return
        if registry.NEXUS_GEN_DEMO_ID in ids:    # its own AR model and decoders; the FLUX.1 demo's encoders and VAE
            self.ensure_demo()
            from engine.demo import write_nexus_gen_demo
            write_nexus_gen_demo(self.models_dir)
            return
        if ids & {registry.FLUX3_DEMO_ID, registry.FLUX3_BASE_DEMO_ID}:   # FLUX 3's layouts, its own files
            from engine.demo import write_flux3_demo
            write_flux3_demo(self.models_dir)
            return
        if registry.FLUX2_DEMO_ID in ids:        # FLUX.2 [klein] 4B's folder layout, its own files
            from engine.demo import write_flux2_demo
            write_flux2_demo(self.models_dir)
            return
        self.ensure_demo()
        if registry.FILL_DEMO_ID in ids or registry.FLEX_DEMO_ID in ids:
            from engine.demo import write_inpaint_demos
            write_inpaint_demos(self.models_dir)

    def variants(self) -> list[dict]:
        """The variants on offer: [{"name", "label", "available", "downloadable", "demo", "description",
        "default_steps", "default_guidance", "extra_inputs", "default_cfg", "uses_guidance", "inpaint", "control",
        "family" ("FLUX.1" / "FLUX.2" / "FLUX 3"), "features" (the studio features its family takes, None: all)}]."""
        from .families import family_of
        out = []
        for v in registry.studio_variants():
            # A demo's files are written on first use when the engine runs on demo weights: available to use.
            available = self.available(v) or (v.demo and (self._demo_written or self.demo_pending))
            if v.demo and not available:
                continue
            out.append({"name": v.name, "label": v.label + ("" if available or v.demo else " (download)"),
                        "available": available, "downloadable": not v.demo, "demo": v.demo,
                        "description": v.description, "default_steps": v.default_steps,
                        "default_guidance": v.default_guidance, "extra_inputs": list(v.extra_inputs),
                        "default_cfg": v.default_cfg, "uses_guidance": v.uses_guidance, "inpaint": v.inpaint,
                        "control": v.control, "family": family_of(v).name,
                        "features": _features(family_of(v))})
        return out

    def default_variant(self) -> str:
        variants = self.variants()
        if self.demo:
            return registry.get_variant(registry.DEMO_ID.split("/")[1]).name
        for v in variants:
            if v["available"] and not v["demo"]:
                return v["name"]
        return next((v["name"] for v in variants if v["demo"]), variants[0]["name"])


def _features(family) -> Optional[list]:
    """The studio features (``studio.features``) a family takes, sorted; None when it takes every one."""
    return None if family.features is None else sorted(family.features)
