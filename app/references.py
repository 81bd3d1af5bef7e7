"""The "Reference images" panel: pictures that guide an image beside its prompt, each through its own adapter.

- **Style or subject** (InstantX IP-Adapter): one or more images (their tokens read together, as DiffSynth-Studio
  does) and a scale (``ipadapter_images``, ``ipadapter_scale``);
- **Image prompt** (FLUX.1-Redux): an image that takes the prompt's place or joins it (``flux_redux_image``,
  ``flux_redux_strength``);
- **Identity** (ByteDance InfiniteYou): a photo of one face (or a saved 512-d face embedding, ``.npy``) and its
  guidance (``infinityou_id_image``, ``infinityou_guidance``).

``build_reference_panel(prefix)`` draws it (ids ``#<prefix>-redux-image``, ``#<prefix>-ipa-images``,
``#<prefix>-id-image`` ...); ``reference_request(...)`` adds what is set to a request; ``reference_settings`` reads
them back from a result's recipe (the copies saved beside it) for a restore. No torch here.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import gradio as gr

from app.uploads import Image as CheckedImage
from app.restore import number_setting, settings_of
from app.uploads import gallery_paths

IPA_HINT = ("IP-Adapter (InstantX): the images' style and subject guide the result (several are read together, "
            "blended by attention); 0.5-0.8 keeps the prompt in charge. Its files (InstantX/FLUX.1-dev-IP-Adapter and the SigLIP image "
            "encoder) load beside the model on first use.")
REDUX_HINT = ("FLUX.1-Redux: the image's content and style guide the result. With an empty prompt the image alone "
              "guides; with a prompt, both count. Its files (black-forest-labs/FLUX.1-Redux-dev, about 1 GB) load "
              "beside the model on first use.")
ID_HINT = ("InfiniteYou (ByteDance): the person in the photo, kept while the prompt sets the scene. One clear face "
           "(the largest is used when there are several), or a saved face embedding (.npy). The face detector "
           "needs the optional insightface extra (see README).")


@dataclasses.dataclass
class ReferencePanel:
    accordion: Any
    ip_images: Any          # gr.Gallery: IP-Adapter images (paths)
    ip_scale: Any
    redux_image: Any
    redux_strength: Any
    id_image: Any           # gr.File: a face photo or a .npy embedding
    id_guidance: Any

    @property
    def inputs(self) -> list:
        """In the order ``reference_request`` takes them."""
        return [self.ip_images, self.ip_scale, self.redux_image, self.redux_strength, self.id_image,
                self.id_guidance]


def identity_note(engine: Any) -> str:
    """Under the identity photo: what the real face reader still needs (the demo model uses a stand-in)."""
    try:
        status = engine.identity_status()
    except Exception:  # noqa: BLE001 - an engine without the check: nothing to say
        return ""
    if not status:
        return ""
    demo = " The random-weight demo model reads photos with a stand-in (no face detection) meanwhile." if getattr(
        engine, "demo_only", False) else ""
    return f"⚠️ {status}{demo}"


def build_reference_panel(prefix: str, engine: Any = None) -> ReferencePanel:
    with gr.Accordion("Reference images (style, image prompt, identity)", open=False,
                      elem_id=f"{prefix}-references") as accordion:
        # Wrapped, not folded behind "⋯": the panel is narrow beside the results.
        with gr.Tabs(overflow_behavior="wrap", elem_id=f"{prefix}-reference-tabs"):
            with gr.Tab("Style / subject (IP-Adapter)", elem_id=f"{prefix}-ipa-tab"):
                ip_images = gr.Gallery(label="IP-Adapter images", type="filepath", interactive=True, height=180,
                                       columns=4, fit_columns=False, preview=False, object_fit="contain",
                                       file_types=["image"], elem_id=f"{prefix}-ipa-images")
                ip_scale = gr.Slider(0, 2, value=0.7, step=0.05, label="IP-Adapter scale", info="1 = as trained",
                                     elem_id=f"{prefix}-ipa-scale")
                gr.Markdown(IPA_HINT, elem_classes=["hint"], elem_id=f"{prefix}-ipa-hint")
            with gr.Tab("Image prompt (Redux)", elem_id=f"{prefix}-redux-tab"):
                redux_image = CheckedImage(label="Image prompt", type="filepath", sources=["upload", "clipboard"],
                                           height=200, elem_id=f"{prefix}-redux-image")
                redux_strength = gr.Slider(0, 2, value=1.0, step=0.05, label="Image prompt strength",
                                           info="1 = as trained", elem_id=f"{prefix}-redux-strength")
                gr.Markdown(REDUX_HINT, elem_classes=["hint"], elem_id=f"{prefix}-redux-hint")
            with gr.Tab("Identity (InfiniteYou)", elem_id=f"{prefix}-id-tab"):
                id_image = gr.File(label="Face photo or embedding (.npy)", file_types=["image", ".npy"],
                                   type="filepath", height=120, elem_id=f"{prefix}-id-image")
                id_preview = gr.Image(label="Identity photo", interactive=False, height=160, visible=False,
                                      elem_id=f"{prefix}-id-preview")
                id_guidance = gr.Slider(0, 2, value=1.0, step=0.05, label="Identity guidance", info="1 = as trained",
                                        elem_id=f"{prefix}-id-guidance")
                gr.Markdown(ID_HINT, elem_classes=["hint"], elem_id=f"{prefix}-id-hint")
                gr.Markdown(identity_note(engine) if engine is not None else "", elem_classes=["hint"],
                            elem_id=f"{prefix}-id-setup")
    # The photo is shown (a .npy embedding has no picture).
    id_image.change(_id_preview, inputs=[id_image], outputs=[id_preview], queue=False, show_progress="hidden",
                    api_visibility="private")
    return ReferencePanel(accordion, ip_images, ip_scale, redux_image, redux_strength, id_image, id_guidance)


def _id_preview(path: Any):
    if isinstance(path, str) and not path.lower().endswith(".npy"):
        return gr.update(value=path, visible=True)
    return gr.update(value=None, visible=False)


def reference_request(ip_images=None, ip_scale=0.7, redux_image=None, redux_strength=1.0, id_image=None,
                      id_guidance=1.0) -> dict:
    """The request keys of the references that are set (none for an empty panel)."""
    request: dict = {}
    ip = gallery_paths(ip_images)
    if ip:
        request.update(ipadapter_images=ip, ipadapter_scale=ip_scale)
    if redux_image:
        request.update(flux_redux_image=redux_image, flux_redux_strength=redux_strength)
    if id_image:
        request.update(infinityou_id_image=id_image, infinityou_guidance=id_guidance)
    return request


def reference_settings(engine: Any, source: Any) -> tuple:
    """The panel's values from a result (its recipe and the copies beside it) or a dropped image's settings, in
    ``ReferencePanel.inputs`` order; a recipe without a reference clears it (the restored settings redo that
    image)."""
    settings = settings_of(engine, source)
    if settings is None:
        return tuple(gr.update() for _ in range(6))

    def paths(key) -> list[str]:
        value = settings.get(key) or []
        value = value if isinstance(value, list) else [value]
        return [v for v in value if isinstance(v, str)]

    def number(key, default):
        return number_setting(settings, key, default)

    redux = paths("flux_redux_image")
    ident = paths("infinityou_id_image")
    return (paths("ipadapter_images") or None, number("ipadapter_scale", 0.7), redux[0] if redux else None,
            number("flux_redux_strength", 1.0), ident[0] if ident else None, number("infinityou_guidance", 1.0))
