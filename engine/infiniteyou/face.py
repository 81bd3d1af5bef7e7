"""The identity photo -> a 512-d face embedding, the input of InfiniteYou's image projector.

``pipe.infinityou_face_embedder`` is any callable ``image (PIL, RGB) -> 512-d float32 tensor``; replace it to script
or test the pipeline without insightface. The default, ``InsightFaceEmbedder``, does what both references
(bytedance/InfiniteYou ``InfUFluxPipeline`` and DiffSynth-Studio's ``InfinitYou`` unit) do:

1. the photo as BGR (OpenCV order), faces found by insightface's ``FaceAnalysis("antelopev2")`` detector (SCRFD,
   ONNX through onnxruntime), tried at detection sizes 640, 320 and 160 until one finds a face;
2. no face: an ``EngineError`` saying so; several: the largest box is used and ``last_notes`` says so;
3. the face aligned to 112x112 from its five key points (``insightface.utils.face_align.norm_crop``), scaled to
   [-1, 1], BGR, through facexlib's ArcFace (IR-SE50, ``recognition_arcface_ir_se50.pth``), whose normalised 512-d
   output is the embedding the projector was trained on. (antelopev2's own recognition model, glintr100, gives
   another 512-d space, so it is not used: only its detector is.)

The antelopev2 files are looked up at ``<models>/ByteDance/InfiniteYou/supports/insightface/models/antelopev2/``
as the seed does (``<models>``: where the projector was loaded from, else ``DIFFSYNTH_MODEL_BASE_PATH`` or
./models); the ArcFace weights in facexlib's own folder (``facexlib/weights/``, where facexlib downloads them) or
beside antelopev2 in ``supports/facexlib/``. Nothing is downloaded here, and insightface, onnxruntime and facexlib
are imported only when a photo is embedded: they are an optional extra (``requirements-infiniteyou.txt``). Without
them, or without the files, the ``EngineError`` says exactly what to install and where the files go.

A subclass of ``FaceEmbedder`` gives ``detect`` (BGR array -> faces with ``bbox`` and ``kps``) and ``embed``
(BGR array, face -> 512 numbers); the choice of face is shared (``choose_face``).

``as_embedding`` reads a precomputed embedding (a tensor, an array or a ``.npy`` file); ``PixelHashEmbedder`` is
the demo's stand-in (a hash of the pixels, no face recognition at all).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
from typing import Optional, Sequence

import numpy as np

from ..errors import EngineError

EMBED_DIM = 512
MODEL_ID = "ByteDance/InfiniteYou"
INSIGHTFACE_SUBDIR = "supports/insightface"                   # FaceAnalysis root, as the seed's
ANTELOPE = "models/antelopev2"                                 # under it
DETECTOR_FILE = "scrfd_10g_bnkps.onnx"                         # the one antelopev2 file read here
ANTELOPE_FILES = ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx", DETECTOR_FILE)
ARCFACE_FILE = "recognition_arcface_ir_se50.pth"
ARCFACE_URL = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/" + ARCFACE_FILE
DET_SIZES = (640, 320, 160)
PACKAGES = {"insightface": "insightface", "onnxruntime": "onnxruntime", "facexlib": "facexlib",
            "cv2": "opencv-python-headless"}
INSTALL = "pip install -r requirements-infiniteyou.txt"


# ------------------------------------------------------------------------------------------------ messages
def missing_packages() -> list:
    """The pip names of the optional packages that are not installed (found without importing them)."""
    return [pip for module, pip in PACKAGES.items() if importlib.util.find_spec(module) is None]


def default_root(models_dir=None) -> pathlib.Path:
    """``<models>/ByteDance/InfiniteYou/supports/insightface``."""
    if models_dir is None:
        from ..downloads import models_base_path
        models_dir = models_base_path()
    return pathlib.Path(models_dir) / MODEL_ID / INSIGHTFACE_SUBDIR


def setup_message(root, missing: Sequence[str] = (), files_missing: bool = False) -> str:
    """What to install and where the face models go (``root``: the ``supports/insightface`` folder)."""
    folder = pathlib.Path(root) / ANTELOPE
    parts = ["InfiniteYou needs a face embedding of the identity photo, made with insightface's antelopev2 face "
             "detector and facexlib's ArcFace."]
    if missing:
        parts.append(f"Not installed: {', '.join(missing)}. Install the optional extra: `{INSTALL}` "
                     f"(insightface, onnxruntime, facexlib, opencv-python-headless).")
    if files_missing or missing:
        parts.append(f"The antelopev2 files ({', '.join(ANTELOPE_FILES)}; from {MODEL_ID}: "
                     f"{INSIGHTFACE_SUBDIR}/{ANTELOPE}/*) go in {folder}/.")
    parts.append("Or give a precomputed 512-d ArcFace embedding (.npy) instead of a photo.")
    return " ".join(parts)


def readiness(root) -> Optional[str]:
    """None when the default embedder can run with ``root``; else the setup message."""
    missing = missing_packages()
    files_missing = not (pathlib.Path(root) / ANTELOPE / DETECTOR_FILE).is_file()
    if missing or files_missing:
        return setup_message(root, missing, files_missing)
    return None


# ------------------------------------------------------------------------------------------------ inputs
def as_embedding(value, what: str = "infinityou_id_image"):
    """A precomputed embedding -> (512,) float32 tensor: a tensor, an array or a ``.npy`` file of 512 numbers (any
    shape holding 512, e.g. (1, 512))."""
    import torch
    name = what
    if isinstance(value, (str, os.PathLike)):
        path = pathlib.Path(value)
        name = f"{what} ({path.name})"
        if not path.is_file():
            raise EngineError(f"{name} was not found ({path}).")
        try:
            value = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - never unpickle: a .npy of objects or a damaged file is refused
            raise EngineError(f"{name} is not a readable .npy array of numbers ({type(e).__name__}: "
                              f"{str(e)[:120]}). Save the embedding with numpy.save(path, embedding).") from None
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "fiu" or array.size != EMBED_DIM:
        raise EngineError(f"{name} must be a face embedding of {EMBED_DIM} numbers (ArcFace), got an array of shape "
                          f"{tuple(array.shape)} ({array.dtype}).")
    array = array.astype(np.float32).reshape(EMBED_DIM)
    if not np.isfinite(array).all():
        raise EngineError(f"{name} holds NaN or infinite values.")
    return torch.from_numpy(array.copy())


def is_embedding(value) -> bool:
    """Whether ``infinityou_id_image`` is a precomputed embedding rather than a photo."""
    import torch
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return True
    return isinstance(value, (str, os.PathLike)) and str(value).lower().endswith(".npy")


def to_bgr(image) -> np.ndarray:
    """PIL -> (H, W, 3) uint8 BGR, the order the references hand to insightface and ArcFace."""
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


def _field(face, name):
    value = face.get(name) if isinstance(face, dict) else None
    return getattr(face, name, None) if value is None else value


def box_area(face) -> float:
    x0, y0, x1, y1 = [float(v) for v in _field(face, "bbox")[:4]]
    return max(0.0, x1 - x0) * max(0.0, y1 - y0)


def choose_face(faces, notes: list):
    """The largest face (the references' rule); none -> EngineError; several -> a note."""
    faces = list(faces or [])
    if not faces:
        raise EngineError("No face was found in the InfiniteYou identity photo. Use a photo where the face is clearly "
                          "visible (front-facing, not too small, not cut off), or give a precomputed 512-d face "
                          "embedding (.npy).")
    face = max(faces, key=box_area)
    if len(faces) > 1:
        x0, y0, x1, y1 = [int(round(float(v))) for v in _field(face, "bbox")[:4]]
        notes.append(f"The identity photo shows {len(faces)} faces; InfiniteYou used the largest "
                     f"({x1 - x0}x{y1 - y0} px at {x0},{y0}).")
    return face


# ------------------------------------------------------------------------------------------------ embedders
class FaceEmbedder:
    """Detect, choose the largest face, embed it. ``last_notes``: what the last call decided (several faces)."""

    def __init__(self):
        self.last_notes: list = []

    def detect(self, bgr: np.ndarray) -> list:
        raise NotImplementedError

    def embed(self, bgr: np.ndarray, face):
        raise NotImplementedError

    def __call__(self, image):
        self.last_notes = []
        bgr = to_bgr(image)
        face = choose_face(self.detect(bgr), self.last_notes)
        return as_embedding(self.embed(bgr, face), "the face embedder's output")


class InsightFaceEmbedder(FaceEmbedder):
    """The references' embedder (see the module docstring). ``root``: the ``supports/insightface`` folder; None =
    ``default_root`` (set by the pipeline beside its projector, else ``<models>/ByteDance/InfiniteYou/...``).
    ``device``: where ArcFace runs (None: CUDA when there is one)."""

    def __init__(self, root=None, device: Optional[str] = None):
        super().__init__()
        self.root = pathlib.Path(root) if root is not None else None
        self.default_root: Optional[pathlib.Path] = None
        self.device = device
        self._apps: dict = {}           # det size -> prepared FaceAnalysis
        self._arcface = None
        self._loaded_from = None

    def folder(self) -> pathlib.Path:
        return self.root or self.default_root or default_root()

    def _ready(self) -> pathlib.Path:
        root = self.folder()
        message = readiness(root)
        if message:
            raise EngineError(message)
        if self._loaded_from != root:
            self._apps, self._arcface, self._loaded_from = {}, None, root
        return root

    def _providers(self) -> list:
        import onnxruntime
        have = onnxruntime.get_available_providers()
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have] or have

    def _app(self, size: int):
        if size not in self._apps:
            from insightface.app import FaceAnalysis
            # the folder itself as the name: insightface uses it as is and never downloads
            app = FaceAnalysis(name=str((self.folder() / ANTELOPE).resolve()), root=str(self.folder()),
                               allowed_modules=["detection"], providers=self._providers())
            app.prepare(ctx_id=0, det_size=(size, size))
            self._apps[size] = app
        return self._apps[size]

    def detect(self, bgr: np.ndarray) -> list:
        self._ready()
        for size in DET_SIZES:
            faces = self._app(size).get(bgr)
            if len(faces) > 0:
                return list(faces)
        return []

    def arcface_weights(self) -> pathlib.Path:
        spec = importlib.util.find_spec("facexlib")
        places = [pathlib.Path(self.folder()).parent / "facexlib" / ARCFACE_FILE]
        if spec is not None and spec.origin:
            places.insert(0, pathlib.Path(spec.origin).parent / "weights" / ARCFACE_FILE)
        for place in places:
            if place.is_file():
                return place
        raise EngineError(f"facexlib's ArcFace weights ({ARCFACE_FILE}) were not found: download {ARCFACE_URL} "
                          f"into {places[0].parent}/ (facexlib's own folder) or {places[-1].parent}/.")

    def _model(self):
        if self._arcface is None:
            import torch
            from facexlib.recognition.arcface_arch import Backbone
            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = Backbone(num_layers=50, drop_ratio=0.6, mode="ir_se")
            state = torch.load(self.arcface_weights(), map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
            self._arcface = model.eval().requires_grad_(False).to(device)
        return self._arcface

    def embed(self, bgr: np.ndarray, face):
        import torch
        from insightface.utils import face_align
        crop = face_align.norm_crop(bgr, landmark=np.asarray(_field(face, "kps")), image_size=112)
        model = self._model()
        x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float() / 255.0 * 2.0 - 1.0
        param = next(model.parameters())
        with torch.no_grad():
            return model(x.to(device=param.device, dtype=param.dtype))[0].float().cpu()


class PixelHashEmbedder:
    """The random-weight demo's stand-in: NOT a face recogniser. The photo's pixels (at 64x64) are hashed into a
    seed for 512 unit-length normal numbers, so the same photo always gives the same embedding, without insightface."""

    name = "pixel-hash stand-in (demo)"

    def __init__(self):
        self.last_notes: list = []

    def array(self, image) -> np.ndarray:
        small = image.convert("RGB").resize((64, 64))
        seed = int.from_bytes(hashlib.sha256(small.tobytes()).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(EMBED_DIM).astype(np.float32)
        return v / np.linalg.norm(v)

    def __call__(self, image):
        import torch
        self.last_notes = []
        return torch.from_numpy(self.array(image))


__all__ = ["EMBED_DIM", "FaceEmbedder", "InsightFaceEmbedder", "PixelHashEmbedder", "as_embedding", "choose_face",
           "default_root", "is_embedding", "missing_packages", "readiness", "setup_message", "to_bgr", "INSTALL",
           "ANTELOPE", "ANTELOPE_FILES", "DETECTOR_FILE"]
