"""The catalogue: every model variant the studio offers, its files (model id + origin pattern) and defaults.

Text encoders, tokenizers and the VAE are shared across the FLUX.1 variants and come from FLUX.1-dev's
repository, so switching variant only swaps the transformer file.
"""
from __future__ import annotations

from dataclasses import dataclass, field

FLUX_DEV = "black-forest-labs/FLUX.1-dev"
DEMO_ID = "FLUX-Studio/FLUX.1-dev-random-demo"
KONTEXT = "black-forest-labs/FLUX.1-Kontext-dev"
STEP1X = "stepfun-ai/Step1X-Edit"
QWEN_VL = "Qwen/Qwen2.5-VL-7B-Instruct"
STEP1X_DEMO_ID = "FLUX-Studio/Step1X-Edit-random-demo"   # engine.demo.step1x writes it
FILL = "black-forest-labs/FLUX.1-Fill-dev"
FLEX = "ostris/Flex.2-preview"
FILL_DEMO_ID = "FLUX-Studio/FLUX.1-Fill-dev-random-demo"   # engine.demo.inpaint writes these two
FLEX_DEMO_ID = "FLUX-Studio/Flex.2-preview-random-demo"
NEXUS_GEN = "DiffSynth-Studio/Nexus-GenV2"
NEXUS_GEN_DEMO_ID = "FLUX-Studio/Nexus-GenV2-random-demo"   # engine.demo.nexus_gen writes it


@dataclass(frozen=True)
class FileSpec:
    # dit | vae | text_encoder_1 | text_encoder_2 | tokenizer_1 | tokenizer_2 | step1x_connector | qwen_vl |
    # qwen_processor / nexus_gen_processor (files that must be present but are read by another role's loader) |
    # nexus_gen | nexus_gen_generation_adapter | nexus_gen_editing_adapter | flux_redux_image_encoder |
    # flux_redux_image_embedder | ipadapter_image_encoder | ipadapter
    role: str
    model_id: str
    pattern: str


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    description: str
    files: tuple
    default_steps: int = 30
    default_guidance: float = 3.5
    demo: bool = False
    extra_inputs: tuple = field(default=())
    default_cfg: float = 1.0
    # False for a variant the Python API runs but the studio does not list.
    in_studio: bool = True
    # False where the transformer has no guidance embedder (schnell, Step1X-Edit): embedded guidance does nothing.
    uses_guidance: bool = True
    # How the variant repaints a masked area: "fill" (FLUX.1-Fill's mask input), "flex" (Flex.2's inpaint input),
    # "controlnet" (the Inpainting ControlNet beside it), "mask" (FLUX.2's inpaint_mask: the masked step);
    # "" = it does not inpaint.
    inpaint: str = ""
    # How it takes control images: "controlnet" (ControlNets beside it), "flex" (Flex.2's control input), "".
    control: str = ""

    def file(self, role: str) -> FileSpec:
        return next(f for f in self.files if f.role == role)


def _step1x_files(model_id=STEP1X, qwen_id=QWEN_VL, qwen_folder=""):
    return (FileSpec("dit", model_id, "step1x-edit-i1258.safetensors"),
            FileSpec("step1x_connector", model_id, "step1x-edit-i1258.safetensors"),  # same file: connector.* keys
            FileSpec("vae", model_id, "vae.safetensors"),
            FileSpec("qwen_vl", qwen_id, qwen_folder + "model*.safetensors"),
            # config, index, tokenizer, preprocessor, chat template: read with the weights by the qwen_vl loader
            FileSpec("qwen_processor", qwen_id, qwen_folder + "*.json"))


def _nexus_gen_files(decoder: str, model_id=NEXUS_GEN, shared_id=FLUX_DEV):
    """Nexus-GenV2: the AR model and its processor, one decoder file (its DiT and its adapter, two roles of one file)
    and FLUX.1-dev's text encoders, tokenizers and VAE (the seed's examples)."""
    adapter = "nexus_gen_generation_adapter" if decoder.startswith("generation") else "nexus_gen_editing_adapter"
    return (FileSpec("dit", model_id, decoder), FileSpec(adapter, model_id, decoder),
            FileSpec("nexus_gen", model_id, "model*.safetensors"),
            FileSpec("nexus_gen_processor", model_id, "processor/")) + _shared(shared_id)


def _shared(model_id=FLUX_DEV):
    return (
        FileSpec("vae", model_id, "ae.safetensors"),
        FileSpec("text_encoder_1", model_id, "text_encoder/model.safetensors"),
        FileSpec("text_encoder_2", model_id, "text_encoder_2/*.safetensors"),
        FileSpec("tokenizer_1", model_id, "tokenizer/"),
        FileSpec("tokenizer_2", model_id, "tokenizer_2/"),
    )


VARIANTS = (
    Variant("FLUX.1-dev", "FLUX.1-dev", "Black Forest Labs' guidance-distilled text-to-image model.",
            (FileSpec("dit", FLUX_DEV, "flux1-dev.safetensors"),) + _shared(), inpaint="controlnet",
            control="controlnet"),
    Variant("FLUX.1-Krea-dev", "FLUX.1-Krea-dev", "Krea's aesthetic fine-tune of FLUX.1-dev (same architecture).",
            (FileSpec("dit", "black-forest-labs/FLUX.1-Krea-dev", "flux1-krea-dev.safetensors"),) + _shared()),
    Variant("FLUX.1-schnell", "FLUX.1-schnell", "The timestep-distilled model: 1-4 steps, no guidance embedder.",
            (FileSpec("dit", "black-forest-labs/FLUX.1-schnell", "flux1-schnell.safetensors"),) + _shared(),
            default_steps=4, default_guidance=0.0, uses_guidance=False),
    Variant("FLUX.1-Kontext-dev", "FLUX.1-Kontext-dev", "Black Forest Labs' in-context image editor: the instruction "
            "edits the reference image(s), which enter the transformer as extra tokens (same layout as FLUX.1-dev).",
            (FileSpec("dit", KONTEXT, "flux1-kontext-dev.safetensors"),) + _shared(),
            default_guidance=2.5, extra_inputs=("kontext_images",)),
    Variant("Step1X-Edit", "Step1X-Edit", "StepFun's instruction image editor: a FLUX-shaped DiT conditioned on "
            "Qwen2.5-VL (instruction + reference image) through its connector; true CFG with a negative prompt.",
            _step1x_files(), default_steps=28, default_guidance=0.0, default_cfg=6.0, uses_guidance=False,
            extra_inputs=("step1x_reference_image",)),
    Variant("FLUX.1-dev-random-demo", "FLUX.1-dev random-weight demo (images are noise)",
            "Tiny random-weight model in the official FLUX.1-dev file layout, for trying the studio without weights.",
            (FileSpec("dit", DEMO_ID, "flux1-dev.safetensors"),) + _shared(DEMO_ID),
            default_steps=8, demo=True, inpaint="controlnet", control="controlnet"),
    Variant("FLUX.1-Kontext-dev-random-demo", "FLUX.1-Kontext-dev random-weight demo (images are noise)",
            "The tiny random-weight demo (same files as the FLUX.1-dev demo) run as FLUX.1-Kontext-dev: the image you "
            "give is a reference. For trying the Edit tab without weights.",
            (FileSpec("dit", DEMO_ID, "flux1-dev.safetensors"),) + _shared(DEMO_ID),
            default_steps=8, default_guidance=2.5, demo=True, extra_inputs=("kontext_images",)),
    Variant("Step1X-Edit-random-demo", "Step1X-Edit random-weight demo (images are noise)",
            "Tiny random-weight Step1X-Edit in the official layouts (DiT + connector file, VAE, a Qwen2.5-VL folder), "
            "for trying the Edit tab without weights. Written on first use.",
            _step1x_files(STEP1X_DEMO_ID, STEP1X_DEMO_ID, "Qwen2.5-VL-7B-Instruct/"),
            default_steps=8, default_guidance=0.0, default_cfg=6.0, uses_guidance=False, demo=True,
            extra_inputs=("step1x_reference_image",)),
    Variant("Nexus-GenV2", "Nexus-GenV2", "DiffSynth-Studio's Nexus-GenV2: an autoregressive Qwen2.5-VL writes the "
            "image's embedding from the prompt, and its decoder (a FLUX.1-dev DiT with an adapter) paints it.",
            _nexus_gen_files("generation_decoder.bin"), default_steps=50, default_cfg=3.0),
    Variant("Nexus-GenV2-Edit", "Nexus-GenV2 (editing)", "DiffSynth-Studio's Nexus-GenV2 as an instruction editor: "
            "the AR model reads the reference image and the instruction, and the edit decoder paints the result.",
            _nexus_gen_files("edit_decoder.bin"), default_steps=50, default_cfg=2.0,
            extra_inputs=("nexus_gen_reference_image",)),
    Variant("Nexus-GenV2-random-demo", "Nexus-GenV2 random-weight demo (images are noise)",
            "Tiny random-weight Nexus-GenV2 in the official layouts (AR model, processor/, generation_decoder.bin), "
            "for trying it without weights. Written on first use.",
            _nexus_gen_files("generation_decoder.bin", NEXUS_GEN_DEMO_ID, DEMO_ID), default_steps=8, default_cfg=3.0,
            demo=True),
    Variant("Nexus-GenV2-Edit-random-demo", "Nexus-GenV2 (editing) random-weight demo (images are noise)",
            "Tiny random-weight Nexus-GenV2 edit model in the official layouts (AR model, processor/, "
            "edit_decoder.bin), for trying the Edit tab without weights. Written on first use.",
            _nexus_gen_files("edit_decoder.bin", NEXUS_GEN_DEMO_ID, DEMO_ID), default_steps=8, default_cfg=2.0,
            demo=True, extra_inputs=("nexus_gen_reference_image",)),
    Variant("FLUX.1-Fill-dev", "FLUX.1-Fill-dev", "Black Forest Labs' inpainting and outpainting model: the image "
            "outside the mask and the mask itself are extra inputs of the transformer. Guidance 30 is usual.",
            (FileSpec("dit", FILL, "flux1-fill-dev.safetensors"),) + _shared(), default_steps=30,
            default_guidance=30.0, inpaint="fill"),
    Variant("Flex.2-preview", "Flex.2-preview", "ostris' 8-billion-parameter FLUX derivative with inpainting and "
            "control (canny, depth, pose) built into its input.",
            (FileSpec("dit", FLEX, "Flex.2-preview.safetensors"),) + _shared(), default_steps=50,
            inpaint="flex", control="flex"),
    Variant("FLUX.1-Fill-dev-random-demo", "FLUX.1-Fill-dev random-weight demo (images are noise)",
            "Tiny random-weight FLUX.1-Fill-dev in its official layout, for trying inpainting without weights.",
            (FileSpec("dit", FILL_DEMO_ID, "flux1-fill-dev.safetensors"),) + _shared(DEMO_ID),
            default_steps=8, default_guidance=30.0, demo=True, inpaint="fill"),
    Variant("Flex.2-preview-random-demo", "Flex.2-preview random-weight demo (images are noise)",
            "Tiny random-weight Flex.2-preview in its official layout, for trying inpainting and control without "
            "weights.",
            (FileSpec("dit", FLEX_DEMO_ID, "Flex.2-preview.safetensors"),) + _shared(DEMO_ID),
            default_steps=8, demo=True, inpaint="flex", control="flex"),
)


# FLUX.2 (engine.flux2.Flux2ImagePipeline builds these from their files; engine.flux2.variants.model_configs turns a row
# into ModelConfigs). Roles: dit (transformer/), vae, text_encoder (Qwen3 / Mistral Small), tokenizer. The studio
# runs them through studio.families.Flux2 (Generate: text and image to image). Text encoder, VAE and tokenizer of the
# base models come from the distilled repositories, as in DiffSynth-Studio's examples.
KLEIN_4B, KLEIN_9B = "black-forest-labs/FLUX.2-klein-4B", "black-forest-labs/FLUX.2-klein-9B"
FLUX2_DEV = "black-forest-labs/FLUX.2-dev"
FLUX2_DEMO_ID = "FLUX-Studio/FLUX.2-klein-4B-random-demo"   # engine.demo.flux2 writes it


def _flux2_files(dit_id, shared_id):
    return (FileSpec("dit", dit_id, "transformer/*.safetensors"),
            FileSpec("text_encoder", shared_id, "text_encoder/*.safetensors"),
            FileSpec("vae", shared_id, "vae/diffusion_pytorch_model.safetensors"),
            FileSpec("tokenizer", shared_id, "tokenizer/"))


FLUX2_VARIANTS = (
    Variant("FLUX.2-klein-4B", "FLUX.2 [klein] 4B", "Black Forest Labs' 4-billion-parameter step-distilled FLUX.2 "
            "(Qwen3-4B text encoder): 4 steps, no CFG.", _flux2_files(KLEIN_4B, KLEIN_4B), default_steps=4,
            default_guidance=0.0, uses_guidance=False, inpaint="mask"),
    Variant("FLUX.2-klein-9B", "FLUX.2 [klein] 9B", "The 9-billion-parameter step-distilled FLUX.2 (Qwen3-8B text "
            "encoder): 4 steps, no CFG.", _flux2_files(KLEIN_9B, KLEIN_9B), default_steps=4, default_guidance=0.0,
            uses_guidance=False, inpaint="mask"),
    Variant("FLUX.2-klein-base-4B", "FLUX.2 [klein] base 4B", "The undistilled 4B base model: 50 steps, CFG 4.",
            _flux2_files("black-forest-labs/FLUX.2-klein-base-4B", KLEIN_4B), default_steps=50, default_guidance=0.0,
            default_cfg=4.0, uses_guidance=False, inpaint="mask"),
    Variant("FLUX.2-klein-base-9B", "FLUX.2 [klein] base 9B", "The undistilled 9B base model: 50 steps, CFG 4.",
            _flux2_files("black-forest-labs/FLUX.2-klein-base-9B", KLEIN_9B), default_steps=50, default_guidance=0.0,
            default_cfg=4.0, uses_guidance=False, inpaint="mask"),
    Variant("FLUX.2-dev", "FLUX.2 [dev]", "Black Forest Labs' 32-billion-parameter guidance-distilled FLUX.2 (Mistral "
            "Small 3.2 text encoder): 50 steps, embedded guidance 4.", _flux2_files(FLUX2_DEV, FLUX2_DEV),
            default_steps=50, default_guidance=4.0, inpaint="mask"),
    Variant("FLUX.2-klein-4B-random-demo", "FLUX.2 [klein] 4B random-weight demo (images are noise)",
            "Tiny random-weight FLUX.2 [klein] 4B in the official folder layout (transformer, VAE, Qwen3, tokenizer).",
            _flux2_files(FLUX2_DEMO_ID, FLUX2_DEMO_ID), default_steps=4, default_guidance=0.0, uses_guidance=False,
            demo=True, inpaint="mask"),
)
VARIANTS = VARIANTS + FLUX2_VARIANTS

# FLUX 3 Image Klein (engine.flux3.Flux3ImagePipeline; engine.flux3.variants.model_configs turns a row into
# ModelConfigs). Roles: dit (BFL's model.safetensors, which DiffSynth-Studio loads; transformer/ loads as well),
# text_encoder (Qwen3-VL-4B-Instruct in text_encoder/), vae (FLUX.2's: klein 4B's vae/), tokenizer (text_encoder/
# holds it). The base model reads klein's text encoder. studio.families' Flux3 runs them in the studio.
FLUX3 = "black-forest-labs/flux-3-image-klein"
FLUX3_BASE = "black-forest-labs/flux-3-image-klein-base"
FLUX3_DEMO_ID = "FLUX-Studio/flux-3-image-klein-random-demo"        # engine.demo.flux3 writes these two
FLUX3_BASE_DEMO_ID = "FLUX-Studio/flux-3-image-klein-base-random-demo"


def _flux3_files(dit_id, shared_id, vae_id):
    return (FileSpec("dit", dit_id, "model.safetensors"),
            FileSpec("text_encoder", shared_id, "text_encoder/*.safetensors"),
            FileSpec("vae", vae_id, "vae/diffusion_pytorch_model.safetensors"),
            FileSpec("tokenizer", shared_id, "text_encoder/"))


FLUX3_VARIANTS = (
    Variant("FLUX.3-Image-Klein", "FLUX 3 Image Klein", "Black Forest Labs' 5.5-billion-parameter step-distilled "
            "FLUX 3 (Qwen3-VL-4B text encoder): 16 steps, no CFG; edits with up to ten reference images.",
            _flux3_files(FLUX3, FLUX3, KLEIN_4B), default_steps=16, default_guidance=0.0, default_cfg=1.0,
            uses_guidance=False),
    Variant("FLUX.3-Image-Klein-base", "FLUX 3 Image Klein base", "The undistilled FLUX 3 Image Klein base model: "
            "50 steps, CFG 3.5 (diffusers' modular FLUX 3 defaults); the one to train LoRAs on.",
            _flux3_files(FLUX3_BASE, FLUX3, KLEIN_4B), default_steps=50, default_guidance=0.0, default_cfg=3.5,
            uses_guidance=False),
    Variant("FLUX.3-Image-Klein-random-demo", "FLUX 3 Image Klein random-weight demo (images are noise)",
            "Tiny random-weight step-distilled FLUX 3 Image Klein in the official layouts (model.safetensors, "
            "transformer/, text_encoder/ Qwen3-VL with its tokenizer, vae/). Written on first use.",
            _flux3_files(FLUX3_DEMO_ID, FLUX3_DEMO_ID, FLUX3_DEMO_ID), default_steps=16, default_guidance=0.0,
            default_cfg=1.0, uses_guidance=False, demo=True),
    Variant("FLUX.3-Image-Klein-base-random-demo", "FLUX 3 Image Klein base random-weight demo (images are noise)",
            "Tiny random-weight FLUX 3 Image Klein base (no ref_time_in) in the official layouts; text encoder and "
            "VAE from the klein demo. Written on first use.",
            _flux3_files(FLUX3_BASE_DEMO_ID, FLUX3_DEMO_ID, FLUX3_DEMO_ID), default_steps=8, default_guidance=0.0,
            default_cfg=3.5, uses_guidance=False, demo=True),
)
VARIANTS = VARIANTS + FLUX3_VARIANTS

@dataclass(frozen=True)
class ControlNetSpec:
    """A ControlNet the studio offers beside a FLUX.1-dev-type variant."""

    name: str
    label: str
    model_id: str
    pattern: str
    kind: str                 # "union" (modes), "upscaler" (a low-resolution image), "inpaint" (image + mask)
    description: str = ""
    demo: bool = False


_CN_FILE = "diffusion_pytorch_model.safetensors"
CONTROLNETS = (
    ControlNetSpec("Union-alpha", "InstantX Union-alpha (canny, tile, depth, blur, pose, gray, low quality)",
                   "InstantX/FLUX.1-dev-Controlnet-Union-alpha", _CN_FILE, "union",
                   "One ControlNet for seven kinds of control image; the preprocessor picks the mode."),
    ControlNetSpec("Upscaler", "jasperai Upscaler", "jasperai/Flux.1-dev-Controlnet-Upscaler", _CN_FILE, "upscaler",
                   "Regenerates a sharp image from a small or degraded one at the output size."),
    ControlNetSpec("Inpainting-Beta", "alimama Inpainting-Beta", "alimama-creative/FLUX.1-dev-Controlnet-Inpainting-Beta",
                   _CN_FILE, "inpaint", "Repaints the masked area of an image with FLUX.1-dev."),
)


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter the studio offers beside a FLUX.1-dev-type variant: its files (one ``FileSpec`` per role, all
    needed) and the ``pipe(...)`` argument it serves."""

    name: str
    label: str
    files: tuple
    call_arg: str
    description: str = ""
    demo: bool = False

    def file(self, role: str) -> FileSpec:
        return next(f for f in self.files if f.role == role)


REDUX = "black-forest-labs/FLUX.1-Redux-dev"
INFINITEYOU = "ByteDance/InfiniteYou"
ADAPTERS = (
    AdapterSpec("FLUX.1-Redux-dev", "FLUX.1-Redux-dev (image prompt)",
                (FileSpec("flux_redux_image_encoder", REDUX, "image_encoder/model.safetensors"),
                 FileSpec("flux_redux_image_embedder", REDUX, "image_embedder/diffusion_pytorch_model.safetensors")),
                "flux_redux_image", "Black Forest Labs' image variation: SigLIP reads the image and its 729 tokens "
                "take the prompt's place (or follow it), so the result takes up the image's content and style."),
    AdapterSpec("FLUX.1-dev-IP-Adapter", "InstantX FLUX.1-dev IP-Adapter (reference images)",
                (FileSpec("ipadapter_image_encoder", "google/siglip-so400m-patch14-384", "model.safetensors"),
                 FileSpec("ipadapter", "InstantX/FLUX.1-dev-IP-Adapter", "ip-adapter.bin")),
                "ipadapter_images", "InstantX's IP-Adapter: SigLIP reads each reference image, 128 tokens per image "
                "are attended to in all 57 transformer blocks beside the prompt, so the result takes up the "
                "images' style and subject while the prompt still counts."),
    AdapterSpec("InfiniteYou", "ByteDance InfiniteYou (identity from a face photo)",
                (FileSpec("infinityou_image_projector", INFINITEYOU, "infu_flux_v1.0/aes_stage2/image_proj_model.bin"),
                 FileSpec("infinityou_infusenet", INFINITEYOU,
                          "infu_flux_v1.0/aes_stage2/InfuseNetModel/*.safetensors")),
                "infinityou_id_image", "ByteDance's identity adapter: a face embedding of the photo becomes 8 tokens "
                "that InfuseNet (a ControlNet) reads, so the person in the result looks like the one in the photo."),
    AdapterSpec("LoRA-Encoder-FLUX.1-Dev", "DiffSynth-Studio LoRA Encoder (a LoRA as a prompt token)",
                (FileSpec("lora_encoder", "DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev", "model.safetensors"),),
                "lora_encoder_inputs", "DiffSynth-Studio's encoder of a LoRA's weights: each LoRA becomes one token "
                "after the prompt, which brings out what the LoRA does even without its trigger words."),
    # Not a pipe(...) argument: pipe.enable_lora_merger() then load_lora of several LoRAs (engine.lora.fusion).
    AdapterSpec("LoRAFusion-preview-FLUX.1-dev", "DiffSynth-Studio LoRA Fusion (merge several LoRAs)",
                (FileSpec("lora_patcher", "DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev", "model.safetensors"),),
                "", "DiffSynth-Studio's learned gate per transformer layer: several LoRAs are merged by how each "
                "one's output relates to the layer's own, instead of simply added, so they combine without "
                "blowing up."),
    # Beside FLUX 3 Image Klein, not a pipe(...) argument: the studio runs engine.flux3.upsampler.upsample_prompt
    # before the job (the whole Qwen3.5 folder: weights, configs, tokenizer, processor, chat template).
    AdapterSpec("FLUX.3-Image-Klein-pup", "BFL FLUX 3 Image Klein prompt upsampler",
                (FileSpec("prompt_upsampler", "black-forest-labs/flux-3-image-klein-pup", "*.safetensors"),
                 FileSpec("prompt_upsampler_config", "black-forest-labs/flux-3-image-klein-pup", "*.json"),
                 FileSpec("prompt_upsampler_template", "black-forest-labs/flux-3-image-klein-pup",
                          "chat_template.jinja")),
                "", "Black Forest Labs' Qwen3.5 fine-tune that the model card says to run first: it expands a short "
                "prompt into the detailed caption FLUX 3 was trained on, or an edit instruction into a full one "
                "written from the reference images."),
)


def adapter_demo_id(name: str) -> str:
    """The model id of an adapter's random-weight demo twin (engine.demo writes it)."""
    return f"FLUX-Studio/{name}-random-demo"


def get_adapter(name: str, demo: bool = False) -> AdapterSpec:
    """The adapter by name; ``demo`` gives its random-weight demo twin (same file names under the demo's id)."""
    for spec in ADAPTERS:
        if spec.name == name or spec.label == name:
            if demo:
                from dataclasses import replace
                demo_id = adapter_demo_id(spec.name)
                return replace(spec, files=tuple(replace(f, model_id=demo_id) for f in spec.files), demo=True,
                               label=spec.label + " (random-weight demo)")
            return spec
    from .errors import EngineError
    raise EngineError(f"Unknown adapter {name!r}. Choose one of: {', '.join(a.name for a in ADAPTERS)}.")


def get_controlnet(name: str, demo: bool = False) -> ControlNetSpec:
    """The ControlNet by name; ``demo`` gives its random-weight demo twin (for the demo variants)."""
    for spec in CONTROLNETS:
        if spec.name == name or spec.label == name:
            if demo:
                from dataclasses import replace
                return replace(spec, model_id=f"FLUX-Studio/ControlNet-{spec.name}-random-demo", demo=True,
                               label=spec.label + " (random-weight demo)")
            return spec
    from .errors import EngineError
    raise EngineError(f"Unknown ControlNet {name!r}. Choose one of: {', '.join(c.name for c in CONTROLNETS)}.")


def get_variant(name: str) -> Variant:
    for v in VARIANTS:
        if v.name == name or v.label == name:
            return v
    from .errors import EngineError
    raise EngineError(f"Unknown model {name!r}. Choose one of: {', '.join(v.name for v in VARIANTS)}.")


def studio_variants() -> tuple:
    """The variants the studio offers (see ``Variant.in_studio``)."""
    return tuple(v for v in VARIANTS if v.in_studio)
