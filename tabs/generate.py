"""The Generate tab: text to image with any FLUX.1 variant.

UI only: reads the controls, calls ``engine.generate``, shows the results. No torch here.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from app.common import ENGINE_QUEUE, StudioContext
from app.controls import (FIELD_CHECK, FreeNumber, FreeSlider, build_prompt_bar, build_step_cache,
                          build_upsample_option, cfg_line, clamp_note, is_flux3, model_choices, seed_note,
                          step_cache_request, steps_note, upsample_request, wire_step_cache_option,
                          wire_step_cache_restore,
                          wire_upsample_option, wire_upsample_restore)
from app.gallery import add_results, build_results_panel
from app.jobs import busy, engine_job, idle, stream_job, wire_cancel
from app.live_preview import build_live_preview, wire_live_preview
from app.lora_picker import LoraPicker, build_lora_picker, lora_request, refresh_loras_on_open, wire_lora_restore
from app.queue_panel import wire_queue
from app.references import build_reference_panel, reference_request, reference_settings
from app.restore import build_image_info_panel, number_setting, settings_of, wire_restore
from app.send_to import offer_input, offer_restore, send_button
from app.uploads import Image as CheckedImage

TITLE = "Generate"
TAB_ID = "generate"

MIN_SIZE, MAX_SIZE, SIZE_STEP = 64, 4096, 16
MAX_STEPS = 100
MAX_IMAGES = 8
ASPECTS = {  # label -> (width, height); all multiples of 16, about one megapixel
    "1:1": (1024, 1024),
    "4:3": (1152, 864),
    "3:4": (864, 1152),
    "3:2": (1216, 816),
    "2:3": (816, 1216),
    "16:9": (1344, 752),
    "9:16": (752, 1344),
}
EDIT_INPUTS = {"kontext_images", "step1x_reference_image", "nexus_gen_reference_image"}   # the Edit tab's models

def variant_choices(engine: Any) -> tuple[list[tuple[str, str]], dict[str, dict]]:
    """Dropdown choices (label, name): downloaded models first, then downloadable ones; labels say which is which.
    Editing models (those that take a reference image: Kontext, Step1X-Edit) are offered in the Edit tab instead, and
    FLUX.1-Fill (it needs an image and a mask) in Inpaint & Control."""
    return model_choices(engine, lambda v: not set(v.get("extra_inputs") or ()) & EDIT_INPUTS
                         and v.get("inpaint") != "fill")


def model_note(info: dict | None) -> str:
    if not info:
        return ""
    if info.get("demo"):
        return info.get("description", "")
    status = ("files present" if info.get("available")
              else "files not present yet: downloaded when you generate, if downloads are allowed")
    return f"{info.get('description', '')} ({status})"


def size_line(engine: Any, width: Any, height: Any, notes: tuple | list = ()) -> str:
    """The live "real output size" line under the size controls (``notes``: what became of a typed size)."""
    try:
        rule = engine.size_rule(int(width), int(height))
    except Exception as exc:  # noqa: BLE001 - EngineError: shown as the line itself
        return f"⚠️ {exc}"
    w, h = rule["width"], rule["height"]
    text = f"Output: **{w} × {h}** px · {w * h / 1e6:.2f} MP"
    if rule.get("note"):
        text += f" · {rule['note']}"
    return "  \n".join([text, *notes])


def size_check(engine: Any, width: Any, height: Any, typed: dict | None) -> tuple[str, dict]:
    """The size line for what the fields hold, saying what a typed out-of-range size becomes, and the typed sizes it
    still explains ({"width": 17}: the page has put that box at 64 since; see app.controls.clamp_note)."""
    typed, used, notes = dict(typed or {}), {}, []
    for key, value in (("width", width), ("height", height)):
        used[key], note, typed[key] = clamp_note(key.capitalize(), value, MIN_SIZE, MAX_SIZE, typed.get(key), " px")
        notes += [note] if note else []
    if None in used.values():
        return "  \n".join(notes), typed
    return size_line(engine, used["width"], used["height"], notes), typed


IMG2IMG_HINT = ("Image to image: the image is noised by the strength and repainted with the prompt (1 = only its "
                "colours and layout guide; lower keeps more of it). It is stretched to the output size.")
HIRES_HINT = ("Hires fix: the image is made at the size above, upscaled, then repainted at this low strength with "
              "the same prompt and seed, for more detail at the larger size (takes about 2-4x longer).")
HIRES_CHOICES = [("Off", 1.0), ("1.5×", 1.5), ("2×", 2.0)]


def img2img_settings(engine: Any, source: Any) -> tuple:
    """(input image, strength, hires factor, hires strength) updates from a result (its input copy beside it) or a
    dropped image's settings; a recipe without them turns them off (the restored settings redo that image)."""
    settings = settings_of(engine, source)
    if settings is None:
        return gr.update(), gr.update(), gr.update(), gr.update()
    image = settings.get("init_image") if isinstance(settings.get("init_image"), str) else None

    def number(key, default):
        return number_setting(settings, key, default)
    # The page offers a few factors; one set through the API is shown as the nearest of them.
    scale = min((value for _, value in HIRES_CHOICES), key=lambda c: abs(c - number("hires_scale", 1.0)))
    return image, number("denoising_strength", 0.7), scale, number("hires_strength", 0.4)


def build_img2img() -> dict:
    """Image to image and the hires fix: {"accordion", "image", "strength", "hires_scale", "hires_strength"}."""
    with gr.Accordion("Image to image & hires fix", open=False, elem_id="gen-img2img-accordion") as accordion:
        image = CheckedImage(label="Input image (image to image)", type="filepath", sources=["upload", "clipboard"],
                             height=200, elem_id="gen-init-image")
        strength = gr.Slider(0.05, 1, value=0.7, step=0.05, label="Denoising strength",
                             info="how much is repainted: 1 = all", elem_id="gen-denoising-strength")
        gr.Markdown(IMG2IMG_HINT, elem_classes=["hint"], elem_id="gen-img2img-hint")
        with gr.Row():
            hires_scale = gr.Radio(HIRES_CHOICES, value=1.0, label="Hires fix (upscale, then refine)",
                                   elem_id="gen-hires-scale")
            hires_strength = gr.Slider(0.1, 0.8, value=0.4, step=0.05, label="Hires strength",
                                       info="0.3-0.5 keeps the picture", elem_id="gen-hires-strength")
        gr.Markdown(HIRES_HINT, elem_classes=["hint"], elem_id="gen-hires-hint")
    return {"accordion": accordion, "image": image, "strength": strength, "hires_scale": hires_scale,
            "hires_strength": hires_strength}


def generate_request(variant, prompt, negative_prompt, width, height, num_inference_steps, embedded_guidance,
                     cfg_scale, seed, num_images, loras=None, flux_redux_image=None, flux_redux_strength=1.0,
                     init_image=None, denoising_strength=0.7, hires_scale=1.0, hires_strength=0.4,
                     ipadapter_images=None, ipadapter_scale=0.7, infinityou_id_image=None,
                     infinityou_guidance=1.0, tea_cache_l1_thresh=0.0, upsample_prompt=False) -> dict:
    """The engine request of the Generate tab's controls (the run button's and "Add to queue"'s)."""
    request = {
        "variant": variant,
        "prompt": prompt or "",
        "negative_prompt": negative_prompt or "",
        "width": width,
        "height": height,
        "num_inference_steps": num_inference_steps,
        "embedded_guidance": embedded_guidance,
        "cfg_scale": cfg_scale,
        "seed": -1 if seed is None else seed,
        "num_images": num_images,
    }
    request.update(lora_request(loras))
    request.update(step_cache_request(tea_cache_l1_thresh))
    request.update(upsample_request(upsample_prompt))
    request.update(reference_request(ipadapter_images, ipadapter_scale, flux_redux_image, flux_redux_strength,
                                     infinityou_id_image, infinityou_guidance))
    if init_image:
        request.update(init_image=init_image, denoising_strength=denoising_strength)
    if hires_scale and float(hires_scale) > 1:
        request.update(hires_scale=hires_scale, hires_strength=hires_strength)
    return request


def build(ctx: StudioContext) -> None:
    engine = ctx.engine
    choices, infos = variant_choices(engine)
    names = [name for _, name in choices]
    default = engine.default_variant()
    if default not in names and names:
        default = names[0]
    default_info = infos.get(default, {})
    demo = bool(default_info.get("demo"))
    start_size = 256 if demo else 1024  # the demo model is tiny: small images keep it instant on a CPU
    start_steps = int(default_info.get("default_steps") or 30)
    start_guidance = float(default_info.get("default_guidance", 3.5))

    bar = build_prompt_bar("gen", placeholder="A photo of a red fox in fresh snow, golden hour, 85mm", lines=3,
                           max_lines=12, negative_max_lines=6)
    prompt, negative_prompt, generate_btn, cancel_btn = bar.prompt, bar.negative, bar.run, bar.cancel

    with gr.Row(equal_height=False):
        with gr.Column(scale=4, min_width=320, elem_id="gen-settings"):
            model = gr.Dropdown(choices=choices, value=default, label="Model", elem_id="gen-model",
                                interactive=True)
            model_md = gr.Markdown(model_note(default_info), elem_classes=["hint"], elem_id="gen-model-note")
            upsample = build_upsample_option("gen", is_flux3(default_info))
            with gr.Group():
                with gr.Row():
                    # Free*: a typed value out of range reaches size_check, which says what will be used.
                    width = FreeSlider(MIN_SIZE, MAX_SIZE, value=start_size, step=SIZE_STEP, label="Width",
                                       elem_id="gen-width")
                    height = FreeSlider(MIN_SIZE, MAX_SIZE, value=start_size, step=SIZE_STEP, label="Height",
                                        elem_id="gen-height")
            with gr.Row(equal_height=False, elem_classes=["tool-row"]):
                aspect = gr.Dropdown(choices=list(ASPECTS), value=None, label="Aspect preset (about 1 MP)",
                                     scale=4, min_width=120, elem_id="gen-aspect")
                with gr.Column(scale=1, min_width=90, elem_classes=["tool-buttons"]):
                    swap = gr.Button("⇄ Swap", size="sm", elem_id="gen-swap")
            size_md = gr.Markdown(size_line(engine, start_size, start_size), elem_classes=["hint"],
                                  elem_id="gen-size-line")
            with gr.Group():
                with gr.Row():
                    steps = FreeSlider(1, MAX_STEPS, value=start_steps, step=1, label="Steps", elem_id="gen-steps")
                    num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images",
                                           elem_id="gen-num-images")
                with gr.Row():
                    guidance = gr.Slider(0, 10, value=start_guidance, step=0.1, label="Guidance (embedded)",
                                         info="3.5 is typical", visible=default_info.get("uses_guidance", True), elem_id="gen-guidance")
                    cfg = gr.Slider(1, 10, value=1, step=0.1, label="CFG scale", info="1 = off (fast)",
                                    elem_id="gen-cfg")
                step_cache = build_step_cache("gen", default_info)
            steps_md = gr.Markdown("", elem_classes=["hint"], elem_id="gen-steps-note")
            cfg_md = gr.Markdown(cfg_line(1, ""), elem_classes=["hint"], elem_id="gen-cfg-line")
            with gr.Row(equal_height=False, elem_classes=["tool-row"]):
                seed = FreeNumber(value=-1, precision=0, minimum=-1, label="Seed (-1 = random)", scale=3,
                                  min_width=130, elem_id="gen-seed")
                # Shown once there is a seed to show (an empty number box would read 0).
                used_seed = gr.Number(value=None, precision=0, label="Seed used (last run)", interactive=False,
                                      visible=False, scale=3, min_width=130, elem_id="gen-used-seed")
                with gr.Column(scale=2, min_width=110, elem_classes=["tool-buttons"]):
                    random_btn = gr.Button("Random", size="sm", elem_id="gen-seed-random")
                    reuse_btn = gr.Button("Reuse seed", size="sm", elem_id="gen-seed-reuse")
            seed_md = gr.Markdown("", elem_classes=["hint"], elem_id="gen-seed-note")
            refs = build_reference_panel("gen", engine)    # IP-Adapter, Redux, InfiniteYou (app.references)
            img2img = build_img2img()
            loras = build_lora_picker(engine, ctx.models_dir, model=model)   # offers the model family's LoRAs
            ctx.shared["lora_picker:generate"] = loras  # Train's "Try it in Generate" ticks its LoRA here
            # ... after choosing a model of the LoRA's family (with that model's steps, guidance and CFG)
            ctx.shared["model:generate"] = (model, infos)
            # The chosen LoRAs, written when Generate is pressed: the /generate endpoint's last input (a list, or
            # the same as JSON text).
            loras_spec = gr.JSON(value=None, visible=False, label="LoRAs", elem_id="gen-loras-json")

        with gr.Column(scale=6, min_width=360, elem_id="gen-results"):
            preview = build_live_preview("gen")    # the image as it denoises, while a job runs (app.live_preview)
            results = build_results_panel()
            if "edit" in ctx.tab_ids:  # the selected image becomes the Edit tab's input (app.send_to)
                send_to_edit = gr.Button("✎ Send to Edit", size="sm", elem_id="gen-send-to-edit")
                send_button(ctx, send_to_edit, results.selected, "edit")
            new_images = gr.Gallery(visible=False, label="New images", elem_id="gen-new-images")
            new_results = gr.State([])

    with gr.Accordion("Image info: drop a PNG to read its settings", open=False, elem_id="gen-info-accordion"):
        info_panel = build_image_info_panel(engine)

    # ------------------------------------------------------------------------------------------------ events
    @engine_job
    def generate(variant, prompt, negative_prompt, width, height, num_inference_steps, embedded_guidance,
                 cfg_scale, seed, num_images, loras=None, flux_redux_image=None, flux_redux_strength=1.0,
                 init_image=None, denoising_strength=0.7, hires_scale=1.0, hires_strength=0.4, ipadapter_images=None,
                 ipadapter_scale=0.7, infinityou_id_image=None, infinityou_guidance=1.0, tea_cache_l1_thresh=0.0,
                 upsample_prompt=False, live_preview=False, progress=gr.Progress()):
        """Generate images from a prompt with a FLUX.1 or FLUX.2 model.

        Args:
            variant: model name, one of the Model dropdown's values (e.g. "FLUX.1-dev"; the demo model's name in demo mode).
            prompt: what the image shows.
            negative_prompt: what it should not show; used only when cfg_scale > 1.
            width: width in pixels, 64..4096; rounded up to a multiple of 16.
            height: height in pixels, 64..4096; rounded up to a multiple of 16.
            num_inference_steps: denoising steps, 1..100 (30 is the usual for FLUX.1-dev).
            embedded_guidance: the distilled guidance value (3.5 is typical).
            cfg_scale: 1 = off; above 1 runs true classifier-free guidance with the negative prompt (2x slower).
            seed: -1 for a random seed, else a whole number; image k of a batch uses seed + k.
            num_images: how many images, 1..8.
            loras: LoRAs to apply: a list of {"name": file, "weight": number} or of [file, weight] pairs (or the same
                as JSON text); names as listed in <models dir>/loras/ (subfolders with "/"); None or [] for none.
                An entry may add "encode": true (also a prompt token, LoRA Encoder) or "fuse": true (LoRA Fusion).
            flux_redux_image: an image prompt (FLUX.1-Redux), or None: its content and style guide the result; with
                an empty prompt the image alone guides.
            flux_redux_strength: the image prompt's weight, 0..2 (1 = as trained).
            init_image: an input image for image to image, or None (text to image).
            denoising_strength: with init_image, how much of it is repainted, above 0 to 1 (1 = all).
            hires_scale: 1 = off; 1.5 or 2: the hires fix (made at width x height, upscaled by this, then refined).
            hires_strength: the hires fix's refining strength (0.3-0.5 keeps the picture).
            ipadapter_images: reference images for the InstantX IP-Adapter (their style and subject guide the
                result; several are read together), or None.
            ipadapter_scale: the IP-Adapter's weight, 0..2 (1 = as trained).
            infinityou_id_image: a face photo (or a .npy 512-d face embedding) for InfiniteYou, or None.
            infinityou_guidance: InfiniteYou's identity guidance, 0..2 (1 = as trained).
            tea_cache_l1_thresh: the step cache (TeaCache): 0 = off; 0.2-0.6 skips more steps as it rises (FLUX.1).
            upsample_prompt: FLUX 3 only: BFL's prompt upsampler expands the prompt first (shown in the info).
            live_preview: (the page's own State, not an API input) show the image as it denoises.

        Returns:
            images: the new images (PNG files carrying their full recipe), in order.
            info: the settings of the first image, as text.
            seed: the seed of the first image (None when the job was cancelled; info is then "Cancelled.").
        """
        request = generate_request(variant, prompt, negative_prompt, width, height, num_inference_steps,
                                   embedded_guidance, cfg_scale, seed, num_images, loras, flux_redux_image,
                                   flux_redux_strength, init_image, denoising_strength, hires_scale, hires_strength,
                                   ipadapter_images, ipadapter_scale, infinityou_id_image, infinityou_guidance,
                                   tea_cache_l1_thresh, upsample_prompt)
        yield from stream_job(engine, request, progress, title="Could not generate", previews=bool(live_preview))

    def running(live, *picked):
        return (*busy(), LoraPicker.spec(*picked), bool(live))

    start = generate_btn.click(running, inputs=[preview.toggle, *loras.spec_inputs],
                               outputs=[generate_btn, cancel_btn, loras_spec, preview.wanted],
                               queue=False, api_visibility="private")
    # generate_request's inputs. New inputs go at the end, so that API clients written for the older endpoint keep
    # working.
    request_inputs = [model, prompt, negative_prompt, width, height, steps, guidance, cfg, seed, num_images,
                      loras_spec, refs.redux_image, refs.redux_strength, img2img["image"], img2img["strength"],
                      img2img["hires_scale"], img2img["hires_strength"], refs.ip_images, refs.ip_scale,
                      refs.id_image, refs.id_guidance, step_cache, upsample]
    job = start.then(
        generate,
        inputs=[*request_inputs, preview.wanted],
        outputs=[new_images, results.info, used_seed, new_results, preview.file],
        api_name="generate",
        show_progress="full",
        show_progress_on=[results.gallery],
        **ENGINE_QUEUE,
    )
    def show_results(new, history):
        shown = add_results(new, history)
        newest = shown[1][0] if shown[1] else None  # a cancelled run leaves the previous seed on show
        seed_box = gr.update(value=newest["seed"], visible=True) if newest else gr.update()
        return (*shown, seed_box, [])

    shown_outputs = [results.gallery, results.history, results.info, results.selected, used_seed]
    job.success(show_results, inputs=[new_results, results.history], outputs=[*shown_outputs, new_results],
                queue=False, api_visibility="private")
    # "Add to queue" (and Ctrl+Enter): the same request, run by the studio's queue; its images arrive here.
    wire_queue(ctx, TAB_ID, bar.queue, generate_request, request_inputs,
               before=(LoraPicker.spec, loras.spec_inputs, [loras_spec]),
               show=(lambda new, history: show_results(new, history)[:-1], [results.history], shown_outputs))
    # Back to idle whatever happened (in Gradio 6 an error triggers only .failure listeners, not .then ones).
    job.then(idle, outputs=[generate_btn, cancel_btn], queue=False, api_visibility="private")
    job.failure(idle, outputs=[generate_btn, cancel_btn], queue=False, api_visibility="private")
    wire_live_preview(preview, job)
    wire_cancel(cancel_btn, engine, api_name="cancel")

    # Live helpers (no queue: they are instant and must not wait behind a running job).
    helper = {"queue": False, "api_visibility": "private"}
    # What the size, steps and seed fields will give, said next to them (typed values out of range included).
    size_typed, steps_typed = gr.State({}), gr.State(None)
    for control in (width, height):
        control.change(lambda w, h, typed: size_check(engine, w, h, typed), inputs=[width, height, size_typed],
                       outputs=[size_md, size_typed], **FIELD_CHECK)
    steps.change(steps_note, inputs=[steps, steps_typed], outputs=[steps_md, steps_typed], **FIELD_CHECK)
    seed.change(seed_note, inputs=[seed], outputs=[seed_md], **FIELD_CHECK)
    for control in (cfg, negative_prompt):
        control.change(cfg_line, inputs=[cfg, negative_prompt], outputs=[cfg_md], **helper)

    def on_model(name):
        info = infos.get(name, {})
        return (model_note(info), gr.update(value=int(info.get("default_steps") or 30)),
                gr.update(value=float(info.get("default_guidance", 3.5))),
                gr.update(value=float(info.get("default_cfg", 1.0))))

    # Only a person's choice resets steps/guidance/CFG to the model's defaults (a restore sets them itself), or
    # Train's "Try it in Generate" choosing a model for its LoRA.
    model.input(on_model, inputs=[model], outputs=[model_md, steps, guidance, cfg], **helper)
    ctx.shared["model defaults:generate"] = [steps, guidance, cfg]
    model.change(lambda name: model_note(infos.get(name)), inputs=[model], outputs=[model_md], **helper)
    # Models without a guidance embedder (schnell, Step1X-Edit) hide the slider: it would do nothing.
    model.change(lambda name: gr.update(visible=(infos.get(name) or {}).get("uses_guidance", True)), inputs=[model],
                 outputs=[guidance], **helper)

    aspect.input(lambda a: ASPECTS.get(a, (gr.update(), gr.update())), inputs=[aspect], outputs=[width, height],
                 **helper)
    swap.click(lambda w, h: (h, w), inputs=[width, height], outputs=[width, height], **helper)
    random_btn.click(lambda: -1, outputs=[seed], **helper)

    def reuse_seed(selected, last):
        """The selected image's seed, else the last run's."""
        value = selected.get("seed") if isinstance(selected, dict) else None
        value = last if value is None else value
        return gr.update() if value is None else int(value)

    reuse_btn.click(reuse_seed, inputs=[results.selected, used_seed], outputs=[seed], **helper)

    targets = {
        "variant": model,
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "width": width,
        "height": height,
        "num_inference_steps": steps,
        "embedded_guidance": guidance,
        "cfg_scale": cfg,
        "seed": seed,
    }

    def wire_restore_from(button, source):
        """Restore the result (or dropped image's settings) in ``source`` when ``button`` is clicked."""
        wire_restore(button, source, targets, names)
        wire_lora_restore(button, source, loras)
        wire_step_cache_restore(button, source, step_cache)
        wire_upsample_restore(button, source, upsample)
        button.click(lambda value: reference_settings(engine, value), inputs=[source], outputs=refs.inputs,
                     **helper)
        button.click(lambda value: img2img_settings(engine, value), inputs=[source],
                     outputs=[img2img["image"], img2img["strength"], img2img["hires_scale"],
                              img2img["hires_strength"]], **helper)

    wire_upsample_option(model, infos, upsample)
    wire_step_cache_option(model, infos, step_cache)
    wire_restore_from(results.restore, results.selected)
    wire_restore_from(info_panel.restore, info_panel.recipe)
    offer_restore(ctx, TAB_ID, wire_restore_from)   # History restores into this tab the same way
    # Other tabs and History send an image here as image to image's input (its accordion opens).
    offer_input(ctx, TAB_ID, "Generate (img2img)", img2img["image"],
                also={img2img["accordion"]: gr.update(open=True)})

    refresh_loras_on_open(ctx, loras)
