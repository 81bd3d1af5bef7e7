"""Step1X-Edit sampling on a ``FluxImagePipeline``'s components, as the model authors do it (``inference.py``).

- The reference image is resized to the output size (the authors derive the output size from the reference and
  assert they are equal; here the requested size wins and the reference is resized to it), VAE-encoded, packed,
  and its tokens appended after the generated image's tokens. Its position ids are the generated image's own:
  index 0, the same rows and columns (authors' ``ref_img_ids``; DiffSynth's seed does the same).
- Qwen2.5-VL sees that same resized reference with the instruction (and, for CFG, with the negative prompt); the
  connector turns its 640 hidden states into text tokens and the pooled vector for every step, conditioned on the
  step's sigma (all steps are computed before denoising: the result is the same, and the connector's stage is
  separate from the DiT's). Text position ids are zero. The DiT attends to all 640 text tokens (the mask only enters the
  connector), as in the authors' code.
- True CFG: ``v = v_neg + cfg * (v_pos - v_neg)`` (the authors' norm-rescaled branch only applies for
  t > ``timesteps_truncate`` = 1.0, i.e. never). Only the generated tokens are stepped; the reference tokens are
  put back unchanged each step and dropped before decoding.

Deviations of DiffSynth-Studio (the seed) from the authors, where we follow the authors: the seed gives Qwen and
the VAE the reference as uploaded (not resized to the output size), so a reference of another size than the output
gets other Qwen tokens and breaks the seed's ``[:, :n // 2]`` split of generated and reference tokens.
"""
from __future__ import annotations

import random
from typing import Callable, Optional

import torch
from PIL import Image

from .. import latents as lat
from ..errors import EngineError
from ..scheduler import euler_step, flux_sigmas
from ..sizes import normalize_size
from .encoder import Step1XEncoder


def _encoder(pipe) -> Step1XEncoder:
    if getattr(pipe, "qwen_vl", None) is None or getattr(pipe, "step1x_connector", None) is None:
        raise EngineError("Step1X-Edit needs its Qwen2.5-VL encoder (Qwen/Qwen2.5-VL-7B-Instruct folder) and the "
                          "step1x-edit-i1258.safetensors file (DiT + connector): add their ModelConfigs.")
    enc = getattr(pipe, "_step1x_encoder", None)
    if enc is None or enc.model is not pipe.qwen_vl:
        processor = getattr(pipe.qwen_vl, "flux_studio_processor", None)
        if processor is None:
            raise EngineError("The Qwen2.5-VL processor is not loaded: the Qwen2.5-VL folder needs its tokenizer, "
                              "preprocessor_config.json and chat template.")
        enc = pipe._step1x_encoder = Step1XEncoder(pipe.qwen_vl, processor)
    return enc


def _run(pipe, role, fn):
    run_model = getattr(pipe, "run_model", None)
    module = getattr(pipe, role)
    return run_model(role, module, fn) if run_model is not None else fn(module)


def _place(pipe, role):
    place = getattr(pipe, "placements", {}).get(role)
    if place is not None:
        return place.compute_device, place.compute_dtype
    p = next(getattr(pipe, role).parameters())
    return p.device, p.dtype


@torch.no_grad()
def step1x_generate(pipe, prompt: str, step1x_reference_image: Image.Image, negative_prompt: str = "",
                    cfg_scale: float = 6.0, height: int = 1024, width: int = 1024, seed: Optional[int] = None,
                    rand_device: str = "cpu", sigma_shift: Optional[float] = None, num_inference_steps: int = 28,
                    tiled: bool = False, tile_size: int = 128, tile_stride: int = 64, progress_bar_cmd=None,
                    schedule: str = "seed", step_callback: Optional[Callable[[int, int], None]] = None,
                    **ignored) -> Image.Image:
    if pipe.dit is None:
        raise EngineError("No FLUX transformer is loaded: add step1x-edit-i1258.safetensors.")
    if not isinstance(step1x_reference_image, Image.Image):
        raise EngineError("step1x_reference_image must be a PIL image.")
    enc = _encoder(pipe)
    width, height, _ = normalize_size(width, height)
    seed = random.randrange(2 ** 31) if seed is None else int(seed)
    steps = int(num_inference_steps)
    n_tokens = (height // lat.TOKEN_FACTOR) * (width // lat.TOKEN_FACTOR)
    sigmas = flux_sigmas(steps, 1.0, sigma_shift, schedule, image_seq_len=n_tokens)
    device, dtype = _place(pipe, "dit")
    cdev, cdtype = _place(pipe, "step1x_connector")
    qdev, _ = _place(pipe, "qwen_vl")

    reference = step1x_reference_image.convert("RGB")
    if reference.size != (width, height):
        reference = reference.resize((width, height), Image.LANCZOS)

    def encode(text):
        return _run(pipe, "qwen_vl", lambda m: enc.encode(text or "", reference, device=qdev, dtype=cdtype))

    hidden, mask = encode(prompt)
    use_cfg = cfg_scale != 1.0
    if use_cfg:
        neg_hidden, neg_mask = encode(negative_prompt)

    ref_latents = pipe.encode_image(reference, tiled, tile_size, tile_stride).to(device)
    ref_tokens = lat.pack(ref_latents).float()
    noise = lat.initial_noise(height, width, seed, rand_device).to(device)
    tokens = lat.pack(noise).float()
    img_ids = lat.image_ids(height, width, device=device)
    ids = torch.cat([img_ids, img_ids.clone()], dim=0)          # the reference shares the image's position ids
    txt_ids = lat.text_ids(hidden.shape[1], device=device)

    # The connector depends on the step's sigma, not on the latents: run it for every step up front, so it has a
    # stage of its own (like a text encoder) and an offloaded connector is not swapped with the DiT at every step.
    def condition(h, m):
        def run(c):
            out = []
            for i in range(steps):
                sig = sigmas[i].expand(tokens.shape[0]).to(device=cdev, dtype=cdtype)
                txt, pooled = c(h.to(cdev, cdtype), sig, m.to(cdev))
                out.append((txt.to(device, dtype), pooled.to(device, dtype)))
            return out
        return _run(pipe, "step1x_connector", run)

    conds = condition(hidden, mask)
    neg_conds = condition(neg_hidden, neg_mask) if use_cfg else None

    def velocity(cond, t_sigma):
        txt, pooled = cond
        x = torch.cat([tokens, ref_tokens], dim=1).to(dtype)
        t = t_sigma.to(device=device, dtype=dtype)
        out = _run(pipe, "dit", lambda d: d(hidden_states=x, encoder_hidden_states=txt,
                                            pooled_projections=pooled, timestep=t, img_ids=ids,
                                            txt_ids=txt_ids, guidance=None, return_dict=False)[0])
        return out[:, : tokens.shape[1]].float()

    it = range(steps) if progress_bar_cmd is None else progress_bar_cmd(range(steps))
    for i in it:
        t_sigma = sigmas[i].expand(tokens.shape[0])
        v = velocity(conds[i], t_sigma)
        if use_cfg:
            v_neg = velocity(neg_conds[i], t_sigma)
            v = v_neg + cfg_scale * (v - v_neg)
        tokens = euler_step(tokens, v, float(sigmas[i]), float(sigmas[i + 1]))
        if step_callback is not None:
            step_callback(i + 1, steps)
    return pipe.decode_latents(lat.unpack(tokens, height, width), tiled, tile_size, tile_stride)
