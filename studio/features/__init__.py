"""The studio's features: one module per kind of extra input of a job, each a ``Feature`` (see ``base``): its request
keys, validation into a typed state, pipeline arguments, the models and LoRAs it attaches, finishing, recipe entries,
input copies and restore. The request parser, the job runner and the recipe reader loop over ``FEATURES``.

Adding a feature = a module with its ``Feature`` subclass + one line in ``FEATURES`` (its controls go in a tab).
Its page helpers, if any, sit beside it (``inpaint_page``, ``eligen_page``) and the studio engine exposes them.
"""
from .base import ExtraModel, Feature
from .edit import EditFeature
from .eligen import EligenFeature
from .img2img import Img2ImgFeature
from .infiniteyou import InfiniteYouFeature
from .inpaint import InpaintFeature
from .ipadapter import IPAdapterFeature
from .prompt_upsampler import PromptUpsamplerFeature
from .lora_encoder import LoraEncoderFeature
from .lora_fusion import LoraFusionFeature
from .redux import ReduxFeature
from .tea_cache import TeaCacheFeature

# In the order they validate (a later one may set the output size over an earlier one's) and write recipes.
FEATURES = (
    EditFeature(),
    InpaintFeature(),
    EligenFeature(),
    ReduxFeature(),
    IPAdapterFeature(),
    InfiniteYouFeature(),
    LoraEncoderFeature(),
    LoraFusionFeature(),
    TeaCacheFeature(),
    PromptUpsamplerFeature(),   # after edit: an edit's references go to the upsampler
    Img2ImgFeature(),     # last: its hires fix checks the inputs of the others
)

__all__ = ["Feature", "ExtraModel", "FEATURES"]
