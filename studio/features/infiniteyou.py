"""Identity from a face photo (ByteDance InfiniteYou): the person in the result looks like the one in the photo.
A face embedding of the photo becomes 8 tokens (the projector) that InfuseNet, a ControlNet, reads at every step
(``engine.conditions.infiniteyou``).

Request keys: ``infinityou_id_image`` (a path: a photo, or a ``.npy`` file holding a precomputed 512-d ArcFace
embedding; "" = not used) and ``infinityou_guidance`` (0 to 10, 1 as in both references: InfuseNet's embedded
guidance). The InfiniteYou files (``ByteDance/InfiniteYou``: the projector and InfuseNet) fill two pipeline slots
beside the variant's; a demo variant gets their random-weight twins.

The face embedding: on a real model the engine makes it with ``pipe.infinityou_face_embedder`` (insightface's
antelopev2 detector + facexlib's ArcFace, an optional extra: ``requirements-infiniteyou.txt``; ``setup_status``
says what is missing, for the tab to show). On a demo model a stand-in is used instead (``PixelHashEmbedder``: a
hash of the photo's pixels, no face recognition), and a note says so. Several faces: the largest is used (a note);
none: a message. The photo is saved beside the result (``<name>.idf0.png``), an embedding as is
(``<name>.idf0.npy``), so that a restore brings it back.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Optional

from engine.errors import EngineError

from .base import Feature, adapter_models, describe_files, file_entry, number_in

ADAPTER = "InfiniteYou"
MAX_GUIDANCE = 10.0
PARTS = {"infinityou_image_projector": "image projector", "infinityou_infusenet": "InfuseNet"}
KIND = "idf"
DEMO_NOTE = ("Demo model: the identity embedding is a stand-in (a hash of the photo's pixels), not a face "
             "recogniser's; install requirements-infiniteyou.txt and use FLUX.1-dev for the real one.")
PLACEHOLDER_MODELS = pathlib.Path("<models folder>")


@dataclasses.dataclass(frozen=True)
class InfiniteYouInputs:
    """The request keys of the identity photo (a path as sent)."""

    infinityou_id_image: str = dataclasses.field(default="", metadata={
        "file": "an identity photo or face embedding (InfiniteYou)"})
    infinityou_guidance: float = 1.0


@dataclasses.dataclass
class IdentityState:
    path: str
    image: object = None          # PIL image (a photo), or None
    embedding: object = None      # (512,) float32 numpy array (a .npy), or None
    guidance: float = 1.0


def check_guidance(value) -> float:
    return number_in(value, 0.0, MAX_GUIDANCE, f"InfiniteYou's guidance must be a number from 0 to {MAX_GUIDANCE:g} "
                     f"(1 = as the references use it), got {{value}}.")


def setup_status(models_dir=None) -> Optional[str]:
    """None when real identity photos can be read (insightface & co. installed, antelopev2 files in place); else
    the message saying what to install and where the files go (the tab shows it beside the photo)."""
    from engine.infiniteyou.face import default_root, readiness
    return readiness(default_root(models_dir))


def read_embedding(path: str):
    """A ``.npy`` of 512 numbers -> (512,) float32 array (never unpickled); else the engine's message."""
    from engine.infiniteyou.face import as_embedding
    return as_embedding(path, f"The face embedding {pathlib.Path(path).name}").numpy()


class _NpyCopy:
    """A ``.npy`` for ``Sidecars``, which writes each copy through ``.save(buffer, format=...)``: the file's bytes
    as they are."""

    def __init__(self, path: str):
        self.data = pathlib.Path(path).read_bytes()

    def save(self, buffer, format=None, **params):
        buffer.write(self.data)


class InfiniteYouFeature(Feature):
    name = "infiniteyou"
    Inputs = InfiniteYouInputs
    roles = ("infinityou_image_projector", "infinityou_infusenet")

    def validate(self, inputs: InfiniteYouInputs, job) -> Optional[IdentityState]:
        path = str(inputs.infinityou_id_image or "")
        if not path:
            return None
        if "step1x_reference_image" in job.variant.extra_inputs:
            raise EngineError(f"{job.variant.name} reads its instruction through Qwen2.5-VL and has no guidance "
                              f"embedder, so InfiniteYou's InfuseNet (made for FLUX.1-dev) cannot steer it. Remove "
                              f"the identity photo, or choose a FLUX.1 model.")
        guidance = check_guidance(inputs.infinityou_guidance)
        if path.lower().endswith(".npy"):
            return IdentityState(path, embedding=read_embedding(path), guidance=guidance)
        from engine.images import load_user_image
        image = load_user_image(path, notes=job.notes)
        if not job.variant.demo:
            from engine.infiniteyou.face import default_root, missing_packages, setup_message
            missing = missing_packages()
            if missing:      # before any model is loaded; the engine checks the antelopev2 files where it finds them
                raise EngineError(setup_message(default_root(PLACEHOLDER_MODELS), missing))
        return IdentityState(path, image=image, guidance=guidance)

    def pipe_kwargs(self, state: IdentityState, job, notes: list) -> dict:
        if state.embedding is not None:
            value = state.embedding
        elif job.variant.demo:
            from engine.infiniteyou.face import PixelHashEmbedder
            value = PixelHashEmbedder().array(state.image)
            if DEMO_NOTE not in notes:
                notes.append(DEMO_NOTE)
        else:
            value = state.image          # the engine's face embedder reads it; its notes come back in ``notes``
        return {"infinityou_id_image": value, "infinityou_guidance": state.guidance, "infinityou_notes": notes}

    def extra_models(self, state: IdentityState, job) -> list:
        return adapter_models(ADAPTER, job.variant.demo, PARTS, _loader, "write_infiniteyou_demo")

    def recipe(self, state: IdentityState, job, copies) -> dict:
        """{"infinityou_id_image": {"file", "copy", "size" | "embedding", "fingerprint", "embedder"},
        "infinityou_guidance"}."""
        if state.embedding is not None:
            entry = {"file": pathlib.Path(state.path).name, "embedding": True, "embedder": "given (.npy)",
                     "copy": copies.add(_NpyCopy(state.path), KIND, suffix=f".{KIND}0.npy")}
            try:
                from engine.fingerprints import fingerprint
                entry["fingerprint"] = fingerprint(state.path)
            except OSError:
                pass
        else:
            entry = file_entry(state.path, state.image, copies, KIND)
            entry["embedder"] = ("pixel-hash stand-in (demo)" if job.variant.demo
                                 else "insightface antelopev2 + facexlib ArcFace")
        return {"infinityou_id_image": entry, "infinityou_guidance": state.guidance}

    def restore(self, found: dict, result: pathlib.Path) -> dict:
        out = {}
        if "infinityou_guidance" in found:
            out["infinityou_guidance"] = found["infinityou_guidance"]
        entry = found.get("infinityou_id_image")
        suffix = entry.get("copy") if isinstance(entry, dict) else None
        if isinstance(suffix, str) and suffix.endswith(".npy"):
            from ..recipes import beside
            if suffix.startswith(".") and "/" not in suffix and "\\" not in suffix:
                path = beside(result, suffix)
                try:
                    read_embedding(str(path))
                    out["infinityou_id_image"] = str(path)
                except EngineError:
                    pass                 # gone or damaged: left out, as a missing image copy
        elif suffix:
            from ..recipes import sidecar
            path = sidecar(result, suffix)
            if path:
                out["infinityou_id_image"] = str(path)
        return out

    def describe(self, recipe: dict) -> list:
        entry = recipe.get("infinityou_id_image")
        if not entry:
            return []
        what = "Face embedding" if isinstance(entry, dict) and entry.get("embedding") else "Identity photo"
        lines = [f"Identity (InfiniteYou), guidance {recipe.get('infinityou_guidance', 1.0)}:",
                 *describe_files(what, entry)]
        if isinstance(entry, dict) and entry.get("embedder"):
            lines.append(f"  Face embedding by: {entry['embedder']}")
        return lines


def _loader(role: str):
    def load(files, torch_dtype):
        from engine.infiniteyou.load import load_role
        return load_role(role, files, torch_dtype, device="cpu")
    return load
