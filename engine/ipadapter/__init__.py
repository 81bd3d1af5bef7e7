"""InstantX's FLUX.1 IP-Adapter (``pipe(ipadapter_images=[...], ipadapter_scale=...)``): SigLIP's pooled vector of each
reference image -> 128 tokens -> per-block keys and values that every one of the transformer's 57 attention blocks
attends to beside its own (``engine.conditions.ipadapter``).

- ``model``: the modules, the ``ip-adapter.bin`` format (nested pickle, read with ``torch.load(weights_only=True)``),
  architecture from shapes, files of the wrong kind (SDXL, XLabs) named
- ``load``: the two files onto their roles (``ipadapter``, ``ipadapter_image_encoder``)
- ``encode``: images -> keys and values, through the pipeline's placements
- ``attention``: the attention processor that adds the IP term (inert without one)
- ``engine.demo.ipadapter``: the random-weight demo files
"""
from .attention import IPAdapterAttnProcessor, IPAdapterKV, install, remove
from .model import ADAPTER_ROLE, ENCODER_ROLE, FluxIPAdapter

__all__ = ["ADAPTER_ROLE", "ENCODER_ROLE", "FluxIPAdapter", "IPAdapterAttnProcessor", "IPAdapterKV", "install",
           "remove"]
