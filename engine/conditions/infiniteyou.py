"""ByteDance InfiniteYou: ``infinityou_id_image`` (the identity photo, or its precomputed 512-d face embedding) and
``infinityou_guidance`` (1.0), the seed's names and defaults.

Prepared once per image, as DiffSynth-Studio's ``FluxImageUnit_InfiniteYou`` and bytedance/InfiniteYou's
``InfUFluxPipeline`` do:

- the face embedding: ``pipe.infinityou_face_embedder(photo)`` (``engine.infiniteyou.face``; insightface's
  detector + ArcFace by default, the largest face when there are several), or the embedding as given (a tensor, an
  array, a ``.npy`` file);
- the image projector turns it into 8 identity tokens, (1, 8, 4096);
- InfuseNet's control image is black at the output size (both references' default, without a pose image),
  VAE-encoded (the posterior's mean, as every image here) and packed.

At each step, in both CFG passes (the seed runs its ControlNets in both; bytedance's pipeline only runs the
positive one, its true CFG being off by default), InfuseNet reads the current latent tokens, the control tokens,
the identity tokens as its text (``encoder_hidden_states``, text ids zeros), the pass's pooled CLIP vector, the
step's timestep and ``infinityou_guidance`` as its embedded guidance (the seed: ``guidance=infinityou_guidance``;
bytedance: ``controlnet_guidance_scale=1.0``), conditioning scale 1. Its 4 + 10 residuals are added to the
transformer's blocks as a ControlNet's (``dit_kwargs``), spread over the transformer's depth as diffusers indexes
them (residual ``i // ceil(blocks / n)`` at block ``i``). The transformer itself reads the prompt as usual: the
identity tokens reach it only through InfuseNet.

``infinityou_notes`` (our addition, default None): a list that gets what was decided about the photo (several
faces: the largest was used), for a caller that shows notes (the studio).
"""
from __future__ import annotations

import math
import os
from numbers import Real
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from PIL import Image

from .. import latents as lat
from ..errors import EngineError
from ..infiniteyou import INFUSENET_PATTERN, MODEL_ID, PROJECTOR_PATTERN
from ..infiniteyou.model import INFUSENET_ROLE, PROJECTOR_ROLE, check_pair, repo_folder
from .base import Condition, ConditionContext, StepState
from .controlnet import spread

MAX_GUIDANCE = 10.0
MISSING = {PROJECTOR_ROLE: f'ModelConfig(model_id="{MODEL_ID}", origin_file_pattern="{PROJECTOR_PATTERN}")',
           INFUSENET_ROLE: f'ModelConfig(model_id="{MODEL_ID}", origin_file_pattern="{INFUSENET_PATTERN}")'}


def check_loaded(pipe) -> None:
    missing = [role for role in (PROJECTOR_ROLE, INFUSENET_ROLE) if getattr(pipe, role, None) is None]
    if missing:
        names = {PROJECTOR_ROLE: "the image projector", INFUSENET_ROLE: "InfuseNet"}
        raise EngineError(f"infinityou_id_image needs InfiniteYou's image projector and InfuseNet, and "
                          f"{' and '.join(names[r] for r in missing)} {'is' if len(missing) == 1 else 'are'} not "
                          f"loaded: add {' and '.join(MISSING[r] for r in missing)} to from_pretrained's "
                          f"model_configs.")


def check_guidance(value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)) \
            or not 0.0 <= float(value) <= MAX_GUIDANCE:
        raise EngineError(f"infinityou_guidance {value!r} is not a number from 0 to {MAX_GUIDANCE:g} (1 is the "
                          f"references' value).")
    return float(value)


def _place(pipe, role):
    place = getattr(pipe, "placements", {}).get(role)
    return (pipe.device, pipe.torch_dtype) if place is None else (place.compute_device, place.compute_dtype)


def insightface_root(pipe):
    """Where the antelopev2 files are looked for: ``supports/insightface`` beside the loaded projector (its
    InfiniteYou folder), else ``<models>/ByteDance/InfiniteYou/supports/insightface`` in the models folder the
    projector came from (a demo's, a studio's), else in ``DIFFSYNTH_MODEL_BASE_PATH`` / ./models."""
    from ..infiniteyou.face import ANTELOPE, DETECTOR_FILE, INSIGHTFACE_SUBDIR, default_root
    folder = repo_folder(getattr(pipe, PROJECTOR_ROLE, None))
    if folder is None:
        return default_root()
    beside, in_models = folder / INSIGHTFACE_SUBDIR, default_root(folder.parents[1])
    for place in (beside, in_models, default_root()):
        if (place / ANTELOPE / DETECTOR_FILE).is_file():
            return place
    return in_models


def face_embedding(pipe, value, notes: Optional[list] = None) -> torch.Tensor:
    """``infinityou_id_image`` -> (512,) float32: an embedding as given, or the face embedder's of the photo."""
    from ..infiniteyou import face
    if face.is_embedding(value):
        return face.as_embedding(value)
    if isinstance(value, (str, os.PathLike)):
        from ..images import load_user_image
        value = load_user_image(value, notes=notes)
    if not isinstance(value, Image.Image):
        raise EngineError(f"infinityou_id_image is a {type(value).__name__}: give a photo (PIL image or image file) "
                          f"or a 512-d face embedding (tensor, array or .npy file).")
    embedder = getattr(pipe, "infinityou_face_embedder", None)
    if embedder is None:
        embedder = pipe.infinityou_face_embedder = face.InsightFaceEmbedder()
    if isinstance(embedder, face.InsightFaceEmbedder) and embedder.root is None:
        embedder.default_root = insightface_root(pipe)
    embedding = face.as_embedding(embedder(value.convert("RGB")), "the face embedder's output")
    if notes is not None:
        notes.extend(n for n in getattr(embedder, "last_notes", ()) or () if n not in notes)
    return embedding


class InfiniteYouCondition(Condition):
    name = "infiniteyou"
    call_args = {"infinityou_id_image": None, "infinityou_guidance": 1.0, "infinityou_notes": None}

    def __init__(self, ctx: ConditionContext, tokens: torch.Tensor, cond: torch.Tensor, guidance: float):
        self.pipe = ctx.pipe
        self.tokens = tokens            # (1, 8, 4096) identity tokens, float32 on the CPU
        self.cond = cond                # (1, N, 64) packed control latents (a black image), float32
        self.guidance = guidance
        self.device, self.dtype = ctx.device, ctx.dtype
        dit = ctx.pipe.dit
        self.depths = (len(dit.transformer_blocks), len(dit.single_transformer_blocks))

    @classmethod
    def requested(cls, args: Mapping, pipe) -> bool:
        value = args.get("infinityou_id_image")
        return value is not None and not (isinstance(value, (list, tuple)) and not value)

    @classmethod
    def prepare(cls, ctx: ConditionContext, args: Mapping) -> "InfiniteYouCondition":
        guidance = check_guidance(args.get("infinityou_guidance", 1.0))
        notes = args.get("infinityou_notes")
        if notes is not None and not isinstance(notes, list):
            raise EngineError("infinityou_notes must be a list (it receives notes about the identity photo).")
        pipe = ctx.pipe
        check_loaded(pipe)
        projector, infusenet = getattr(pipe, PROJECTOR_ROLE), getattr(pipe, INFUSENET_ROLE)
        check_pair(projector, infusenet, pipe.dit)
        embedding = face_embedding(pipe, args["infinityou_id_image"], notes)
        if embedding.numel() != projector.embedding_dim:
            raise EngineError(f"The face embedding has {embedding.numel()} numbers but InfiniteYou's projector reads "
                              f"{projector.embedding_dim}.")
        device, dtype = _place(pipe, PROJECTOR_ROLE)
        x = embedding.reshape(1, 1, -1).to(device=device, dtype=dtype)
        with torch.no_grad():
            tokens = pipe.run_model(PROJECTOR_ROLE, projector, lambda m: m(x)).float().cpu()
        black = Image.new("RGB", (ctx.width, ctx.height))
        cond = lat.pack(ctx.encode_image(black).float()).cpu()
        return cls(ctx, tokens, cond, guidance)

    def dit_kwargs(self, state: StepState) -> dict:
        pipe = self.pipe
        dev, dt = _place(pipe, INFUSENET_ROLE)
        latents, text = state.latents, state.text
        b = latents.shape[0]

        def run(net):
            return net(hidden_states=latents.to(device=dev, dtype=dt), controlnet_cond=self.cond.to(device=dev, dtype=dt),
                       conditioning_scale=1.0, encoder_hidden_states=self.tokens.to(device=dev, dtype=dt).expand(b, -1, -1),
                       pooled_projections=text.pooled.to(device=dev, dtype=dt),
                       timestep=state.timestep.to(device=dev, dtype=dt), img_ids=state.latent_ids.to(dev),
                       txt_ids=lat.text_ids(self.tokens.shape[1], device=dev),
                       guidance=torch.full((b,), self.guidance, device=dev, dtype=torch.float32), return_dict=False)

        double, single = pipe.run_model(INFUSENET_ROLE, getattr(pipe, INFUSENET_ROLE), run)
        extra = state.hidden_states.shape[1] - latents.shape[1]     # other conditions' image tokens: no residual

        def finish(res, depth):
            if not res:
                return None
            res = [r.to(device=self.device, dtype=self.dtype) for r in res]
            if extra > 0:
                res = [F.pad(r, (0, 0, 0, extra)) for r in res]
            return spread(res, depth)          # one per block: adds up with a ControlNet's of another count

        return {"controlnet_block_samples": finish(double, self.depths[0]),
                "controlnet_single_block_samples": finish(single, self.depths[1])}


__all__ = ["InfiniteYouCondition", "check_loaded", "check_guidance", "face_embedding", "insightface_root"]
