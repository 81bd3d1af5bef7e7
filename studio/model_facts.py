"""What the model manager knows about each repository without asking a hub: its licence (and whether the hub gates
it behind accepting that licence), and the approximate size of the weight files the catalogue names.

Sizes are the tensor bytes the project's checkpoint manifests record (``shared/checkpoint-manifests/index.json``,
``data_bytes``): the files themselves are a few kilobytes to a megabyte larger (their headers). Patterns that are not
weights (tokenizers, configs) are small and not listed; weights no manifest covers are unknown until a hub lists
them. ``tests/test_model_manager.py`` checks this table against the manifests.
"""
from __future__ import annotations

FLUX1_NC = "FLUX.1 [dev] Non-Commercial License"
FLUX2_NC = "FLUX [dev] Non-Commercial License"
APACHE = "Apache-2.0"
SEE_CARD = "see the model card"
DEMO_LICENCE = "random weights made here (no licence terms)"

# repo id -> (licence, gated: the hub asks you to accept the licence, then a token downloads it)
LICENCES = {
    "black-forest-labs/FLUX.1-dev": (FLUX1_NC, True),
    "black-forest-labs/FLUX.1-Kontext-dev": (FLUX1_NC, True),
    "black-forest-labs/FLUX.1-Krea-dev": (FLUX1_NC, True),
    "black-forest-labs/FLUX.1-Fill-dev": (FLUX1_NC, True),
    "black-forest-labs/FLUX.1-Redux-dev": (FLUX1_NC, True),
    "black-forest-labs/FLUX.1-schnell": (APACHE, False),
    "black-forest-labs/FLUX.2-dev": (FLUX2_NC, True),
    "black-forest-labs/FLUX.2-klein-4B": (APACHE, False),
    "black-forest-labs/FLUX.2-klein-base-4B": (APACHE, False),
    "black-forest-labs/FLUX.2-klein-9B": ("FLUX Non-Commercial License", True),
    "black-forest-labs/FLUX.2-klein-base-9B": ("FLUX Non-Commercial License", True),
    "ostris/Flex.2-preview": (APACHE, False),
    "stepfun-ai/Step1X-Edit": (APACHE, False),
    "Qwen/Qwen2.5-VL-7B-Instruct": (APACHE, False),
    "google/siglip-so400m-patch14-384": (APACHE, False),
    "InstantX/FLUX.1-dev-Controlnet-Union-alpha": (FLUX1_NC, False),
    "InstantX/FLUX.1-dev-IP-Adapter": (FLUX1_NC, False),
    "jasperai/Flux.1-dev-Controlnet-Upscaler": (FLUX1_NC, False),
    "alimama-creative/FLUX.1-dev-Controlnet-Inpainting-Beta": (FLUX1_NC, False),
}

# (repo id, catalogue pattern) -> tensor bytes of the weights it names (checkpoint manifests' data_bytes)
KNOWN_SIZES = {
    ("ByteDance/InfiniteYou", "infu_flux_v1.0/aes_stage2/InfuseNetModel/*.safetensors"): 5905308672,
    ("ByteDance/InfiniteYou", "infu_flux_v1.0/aes_stage2/image_proj_model.bin"): 169191936,
    ("DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev", "model.safetensors"): 1402191872,
    ("DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev", "model.safetensors"): 54632448,
    ("InstantX/FLUX.1-dev-Controlnet-Union-alpha", "diffusion_pytorch_model.safetensors"): 6603913216,
    ("InstantX/FLUX.1-dev-IP-Adapter", "ip-adapter.bin"): 5291201024,
    ("Qwen/Qwen2.5-VL-7B-Instruct", "model*.safetensors"): 16584333312,
    ("alimama-creative/FLUX.1-dev-Controlnet-Inpainting-Beta", "diffusion_pytorch_model.safetensors"): 4281778176,
    ("black-forest-labs/FLUX.1-Fill-dev", "flux1-fill-dev.safetensors"): 23804782720,
    ("black-forest-labs/FLUX.1-Kontext-dev", "flux1-kontext-dev.safetensors"): 23802816640,
    ("black-forest-labs/FLUX.1-Krea-dev", "flux1-krea-dev.safetensors"): 23802816640,
    ("black-forest-labs/FLUX.1-Redux-dev", "image_embedder/diffusion_pytorch_model.safetensors"): 129007616,
    ("black-forest-labs/FLUX.1-Redux-dev", "image_encoder/model.safetensors"): 856451200,
    ("black-forest-labs/FLUX.1-dev", "ae.safetensors"): 335278732,
    ("black-forest-labs/FLUX.1-dev", "flux1-dev.safetensors"): 23802816640,
    ("black-forest-labs/FLUX.1-dev", "text_encoder/model.safetensors"): 246120960,
    ("black-forest-labs/FLUX.1-dev", "text_encoder_2/*.safetensors"): 9524621312,
    ("black-forest-labs/FLUX.1-schnell", "flux1-schnell.safetensors"): 23782357120,
    ("black-forest-labs/FLUX.2-dev", "text_encoder/*.safetensors"): 48022722560,
    ("black-forest-labs/FLUX.2-dev", "transformer/*.safetensors"): 64446562304,
    ("black-forest-labs/FLUX.2-dev", "vae/diffusion_pytorch_model.safetensors"): 168092750,
    ("black-forest-labs/FLUX.2-klein-4B", "text_encoder/*.safetensors"): 8044936192,
    ("black-forest-labs/FLUX.2-klein-4B", "transformer/*.safetensors"): 7751089152,
    ("black-forest-labs/FLUX.2-klein-4B", "vae/diffusion_pytorch_model.safetensors"): 168092750,
    ("black-forest-labs/FLUX.2-klein-9B", "text_encoder/*.safetensors"): 16381470720,
    ("black-forest-labs/FLUX.2-klein-9B", "transformer/*.safetensors"): 18157162496,
    ("black-forest-labs/FLUX.2-klein-9B", "vae/diffusion_pytorch_model.safetensors"): 168092750,
    ("black-forest-labs/FLUX.2-klein-base-4B", "transformer/*.safetensors"): 7751089152,
    ("black-forest-labs/FLUX.2-klein-base-9B", "transformer/*.safetensors"): 18157162496,
    ("black-forest-labs/flux-3-image-klein", "model.safetensors"): 11097363968,
    ("black-forest-labs/flux-3-image-klein", "text_encoder/*.safetensors"): 8875631616,
    ("black-forest-labs/flux-3-image-klein-base", "model.safetensors"): 11076916736,
    ("google/siglip-so400m-patch14-384", "model.safetensors"): 3511841992,
    ("jasperai/Flux.1-dev-Controlnet-Upscaler", "diffusion_pytorch_model.safetensors"): 3583210496,
    ("ostris/Flex.2-preview", "Flex.2-preview.safetensors"): 16327339136,
    ("stepfun-ai/Step1X-Edit", "step1x-edit-i1258.safetensors"): 24855600770,
    ("stepfun-ai/Step1X-Edit", "vae.safetensors"): 335278732,
}

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def is_weights(pattern: str) -> bool:
    return pattern.endswith(WEIGHT_SUFFIXES)


def licence(model_id: str) -> tuple[str, bool]:
    """(licence, gated) of a repository; demos are made here; others: see the model card."""
    if model_id.startswith("FLUX-Studio/"):
        return DEMO_LICENCE, False
    return LICENCES.get(model_id, (SEE_CARD, False))
