"""The Edit tab: instruction editing of an image with FLUX.1-Kontext-dev, Step1X-Edit or FLUX.2.

UI only: reads the controls, asks the engine for the output size (``edit_size``) and runs ``engine.generate`` with
the image as the variant's reference input (``kontext_images``, ``step1x_reference_image`` or FLUX.2's
``edit_images``). Models that take several references (Kontext, FLUX.2) also show "More reference images": they go
after the image to edit, in the gallery's order. No torch here.
"""
from __future__ import annotations

import pathlib
from typing import Any

import gradio as gr

from app import uploads
from app.common import ENGINE_QUEUE, StudioContext, call_engine
from app.controls import (FreeNumber, FreeSlider, build_prompt_bar, build_step_cache, build_upsample_option, cfg_line,
                          is_flux3, model_choices, step_cache_request, upsample_request, wire_step_cache_option,
                          wire_step_cache_restore,
                          wire_steps_and_seed_notes, wire_upsample_option, wire_upsample_restore)
from app.gallery import add_results, build_results_panel
from app.jobs import busy, engine_job, idle, stream_job, wire_cancel
from app.live_preview import build_live_preview, wire_live_preview
from app.lora_picker import LoraPicker, build_lora_picker, lora_request, refresh_loras_on_open, wire_lora_restore
from app.queue_panel import wire_queue
from app.reference_order import order_controls
from app.restore import wire_restore
from app.send_to import offer_input, offer_restore
from studio.features.edit import edit_inputs_of

TITLE = "Edit"
TAB_ID = "edit"

EDIT_KEYS = ("kontext_images", "step1x_reference_image", "edit_images", "nexus_gen_reference_image")
MULTI_KEYS = ("kontext_images", "edit_images")        # keys that take several reference images
EDIT_HOW = {   # how each kind of editing model reads the image, under the model dropdown
    "kontext_images": "Kontext: the image (and any more reference images) is a reference the model sees whole; the "
                      "instruction says what to change.",
    "edit_images": "FLUX.2: the image and any more reference images are seen whole; the instruction says what to "
                   "change (\"the lamp of image 2 in the room of image 1\").",
    "step1x_reference_image": "Step1X-Edit: the image and the instruction go through Qwen2.5-VL; CFG 6 with a negative "
                              "prompt is usual.",
    "nexus_gen_reference_image": "Nexus-GenV2: Qwen2.5-VL reads the image and the instruction and writes the "
                                 "result's embedding, which the edit decoder paints; CFG 2 is usual.",
}
FLUX3_HOW = ("FLUX 3: the image and up to nine more reference images are seen whole, each in its own stream; the "
             "instruction says what to change. The distilled model runs without CFG; the base model takes it.")
MAX_MORE_REFS = 9      # ten references in all: FLUX 3's limit
MIN_SIZE, MAX_SIZE, SIZE_STEP = 64, 4096, 16
MAX_STEPS = 100
MAX_IMAGES = 4
STEP1X_CFG = 6.0


def edit_key(info: dict | None) -> str | None:
    """The request key that carries the image for this variant (None: the variant does not edit)."""
    info = info or {}
    extra = tuple(info.get("extra_inputs") or ()) + (edit_inputs_of(info["name"]) if info.get("name") else ())
    return next((k for k in EDIT_KEYS if k in extra), None)


def takes_several(info: dict | None) -> bool:
    """Whether the variant takes more than one reference image (the "More reference images" gallery shows)."""
    return edit_key(info) in MULTI_KEYS


def editor_choices(engine: Any) -> tuple[list[tuple[str, str]], dict[str, dict]]:
    """Dropdown choices (label, name) of the variants that edit an image; labels say demo / downloaded / download."""
    return model_choices(engine, edit_key)


def default_cfg(info: dict | None) -> float:
    """The variant's usual CFG scale (Step1X-Edit: 6; Kontext: 1 = off)."""
    info = info or {}
    if info.get("default_cfg") is not None:
        return float(info["default_cfg"])
    return STEP1X_CFG if edit_key(info) == "step1x_reference_image" else 1.0


def model_note(info: dict | None) -> str:
    if not info:
        return ("No editing model is offered: FLUX.1-Kontext-dev, Step1X-Edit, Nexus-GenV2, FLUX.2 or FLUX 3 must be "
                "in the registry (see README).")
    key = edit_key(info)
    how = FLUX3_HOW if info.get("family") == "FLUX 3" else EDIT_HOW.get(key, "")
    if info.get("demo"):
        return f"{info.get('description', '')} {how}"
    status = ("files present" if info.get("available")
              else "files not present yet: downloaded when you edit, if downloads are allowed")
    return f"{info.get('description', '')} ({status}). {how}"


def _custom_size(custom: Any, width: Any, height: Any) -> tuple[int | None, int | None]:
    if not custom:
        return None, None
    try:
        return (int(width) if width else None), (int(height) if height else None)
    except (TypeError, ValueError):
        return None, None


def size_line(engine: Any, image: str | None, megapixels: Any, custom: Any = False, width: Any = None,
              height: Any = None) -> str:
    """The live "what the output will be" line, before the button is pressed."""
    if not image:
        return "Upload or paste an image: the output follows its aspect ratio at the chosen megapixels."
    w, h = _custom_size(custom, width, height)
    try:
        size = engine.edit_size(image, width=w, height=h, megapixels=megapixels)
    except Exception as exc:  # noqa: BLE001 - EngineError: the message is the line
        return f"⚠️ {exc}"
    out_w, out_h = size["width"], size["height"]
    note = size.get("note") or ""
    # The note begins with "WxH: how it was chosen"; the size itself is shown in bold already.
    how = note.split(": ", 1)[1] if note.startswith(f"{out_w}x{out_h}: ") else note
    return f"Output: **{out_w} × {out_h}** px · {out_w * out_h / 2 ** 20:.2f} MP · {how}"


def reference_copy(result: dict | None) -> str | None:
    """The input image as the model saw it, saved next to a result (``<name>.ref0.png``), or None."""
    if not isinstance(result, dict) or not result.get("path"):
        return None
    path = pathlib.Path(result["path"])
    copy = path.with_name(path.stem + ".ref0.png")
    return str(copy) if copy.is_file() else None


def more_copies(result: dict | None) -> list[str]:
    """The references after the first saved next to a result (``<name>.ref1.png``, ``.ref2.png``, ...), in order."""
    copies = []
    if isinstance(result, dict) and result.get("path"):
        path = pathlib.Path(result["path"])
        n = 1
        while (copy := path.with_name(f"{path.stem}.ref{n}.png")).is_file():
            copies.append(str(copy))
            n += 1
    return copies


def compare_pair(engine: Any, result: dict | None) -> tuple[str, str] | None:
    """(before, after) for the slider: the input resized to the output's size so the two line up (the engine writes
    it among its scratch files), and the result."""
    if not isinstance(result, dict) or not result.get("path"):
        return None
    return engine.before_after(result["path"])


def selected_path(selected: Any) -> str | None:
    if isinstance(selected, dict) and selected.get("path") and pathlib.Path(selected["path"]).is_file():
        return str(selected["path"])
    return None


def build(ctx: StudioContext) -> None:
    engine = ctx.engine
    choices, infos = editor_choices(engine)
    names = [name for _, name in choices]
    default = names[0] if names else None
    default_info = infos.get(default, {})
    demo = bool(default_info.get("demo"))
    start_mp = 0.06 if demo else 1.0   # the demo model is tiny: small images keep it instant on a CPU
    start_steps = int(default_info.get("default_steps") or 28)
    start_guidance = float(default_info.get("default_guidance", 2.5))
    start_cfg = default_cfg(default_info)

    bar = build_prompt_bar("edit", label="Instruction", button="Edit", interactive=bool(names),
                           placeholder="Make the car red · Put her in a snowy street · Remove the text")
    prompt, negative_prompt, edit_btn, cancel_btn = bar.prompt, bar.negative, bar.run, bar.cancel

    with gr.Row(equal_height=False):
        with gr.Column(scale=4, min_width=320, elem_id="edit-settings"):
            image = uploads.NotedImage(label="Image to edit (upload or paste)", type="filepath", image_mode=None,
                                  sources=["upload", "clipboard"], height=300, elem_id="edit-input")
            model = gr.Dropdown(choices=choices, value=default, label="Editing model", elem_id="edit-model",
                                interactive=True)
            model_md = gr.Markdown(model_note(default_info), elem_classes=["hint"], elem_id="edit-model-note")
            upsample = build_upsample_option("edit", is_flux3(default_info))
            more_refs = gr.Gallery(label="More reference images (after the image to edit, in this order: click one to "
                                         "move or remove it)",
                                   type="filepath", interactive=True, visible=takes_several(default_info),
                                   columns=4, fit_columns=False, preview=False, allow_preview=False, height=150,
                                   object_fit="contain",
                                   elem_id="edit-more-refs")
            more_order = order_controls(more_refs, "edit-more-refs", visible=takes_several(default_info))
            with gr.Group():
                megapixels = gr.Slider(0.01, 4.0, value=start_mp, step=0.01, label="Output megapixels",
                                       info="follows the input's aspect ratio", elem_id="edit-megapixels")
                custom = gr.Checkbox(value=False, label="Set width and height myself", elem_id="edit-custom-size")
                with gr.Row(visible=False, elem_id="edit-size-row") as size_row:
                    # Free*: a typed size out of range reaches the size line (the engine says what is wrong).
                    width = FreeSlider(MIN_SIZE, MAX_SIZE, value=1024, step=SIZE_STEP, label="Width",
                                       elem_id="edit-width")
                    height = FreeSlider(MIN_SIZE, MAX_SIZE, value=1024, step=SIZE_STEP, label="Height",
                                        elem_id="edit-height")
            size_md = gr.Markdown(size_line(engine, None, start_mp), elem_classes=["hint"], elem_id="edit-size-line")
            with gr.Group():
                with gr.Row():
                    steps = FreeSlider(1, MAX_STEPS, value=start_steps, step=1, label="Steps", elem_id="edit-steps")
                    num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images",
                                           elem_id="edit-num-images")
                with gr.Row():
                    guidance = gr.Slider(0, 10, value=start_guidance, step=0.1, label="Guidance (embedded)",
                                         info="2.5 is typical for Kontext", visible=default_info.get("uses_guidance", True), elem_id="edit-guidance")
                    cfg = gr.Slider(1, 10, value=start_cfg, step=0.1, label="CFG scale", info="1 = off (fast)",
                                    elem_id="edit-cfg")
                step_cache = build_step_cache("edit", default_info)
            steps_md = gr.Markdown("", elem_classes=["hint"], elem_id="edit-steps-note")
            cfg_md = gr.Markdown(cfg_line(start_cfg, ""), elem_classes=["hint"], elem_id="edit-cfg-line")
            with gr.Row(equal_height=False, elem_classes=["tool-row"]):
                seed = FreeNumber(value=-1, precision=0, minimum=-1, label="Seed (-1 = random)", scale=3,
                                  min_width=130, elem_id="edit-seed")
                used_seed = gr.Number(value=None, precision=0, label="Seed used (last run)", interactive=False,
                                      visible=False, scale=3, min_width=130, elem_id="edit-used-seed")
                with gr.Column(scale=2, min_width=110, elem_classes=["tool-buttons"]):
                    random_btn = gr.Button("Random", size="sm", elem_id="edit-seed-random")
                    reuse_btn = gr.Button("Reuse seed", size="sm", elem_id="edit-seed-reuse")
            seed_md = gr.Markdown("", elem_classes=["hint"], elem_id="edit-seed-note")
            loras = build_lora_picker(engine, ctx.models_dir, id_prefix="edit-", model=model)
            loras_spec = gr.JSON(value=None, visible=False, label="LoRAs", elem_id="edit-loras-json")

        with gr.Column(scale=6, min_width=360, elem_id="edit-results"):
            preview = build_live_preview("edit")    # the edit as it denoises, while a job runs (app.live_preview)
            compare = gr.ImageSlider(label="Before / after (drag the handle)", type="filepath",
                                     max_height=520, interactive=False, elem_id="edit-compare",
                                     buttons=["download", "fullscreen"])
            with gr.Row(elem_classes=["tool-row"]):
                use_result = gr.Button("↻ Use result as input", size="sm", elem_id="edit-use-result")
            results = build_results_panel(height=360, id_prefix="edit-")
            new_images = gr.Gallery(visible=False, label="New images", elem_id="edit-new-images")
            new_results = gr.State([])

    # ------------------------------------------------------------------------------------------------ events
    def edit_request(image, variant, prompt, negative_prompt, num_inference_steps, embedded_guidance, cfg_scale,
                     seed, megapixels, width, height, num_images=1, loras=None, more_images=None,
                     tea_cache_l1_thresh=0.0, upsample_prompt=False) -> dict:
        """The engine request of the tab's controls (the run button's and "Add to queue"'s)."""
        if not image:
            raise gr.Error("Upload or paste an image to edit first.", print_exception=False)
        info = infos.get(variant) or next((v for v in engine.variants() if v["name"] == variant), None)
        key = edit_key(info)
        if not variant or key is None:
            raise gr.Error(f"{variant or 'No model'} is not an editing model; choose one of: "
                           f"{', '.join(names) or 'none is installed'}.", print_exception=False)
        size = call_engine(engine.edit_size, image, width=width or None, height=height or None,
                           megapixels=megapixels or 1.0, title="Cannot use this image")
        request = {
            "variant": variant,
            "prompt": prompt or "",
            "negative_prompt": negative_prompt or "",
            "width": size["width"],
            "height": size["height"],
            "num_inference_steps": num_inference_steps,
            "embedded_guidance": embedded_guidance,
            "cfg_scale": cfg_scale,
            "seed": -1 if seed is None else seed,
            "num_images": num_images or 1,
            key: [image, *uploads.gallery_paths(more_images)[:MAX_MORE_REFS]] if key in MULTI_KEYS else image,
        }
        request.update(lora_request(loras))
        request.update(step_cache_request(tea_cache_l1_thresh))
        request.update(upsample_request(upsample_prompt))
        return request

    @engine_job
    def edit(image, variant, prompt, negative_prompt, num_inference_steps, embedded_guidance, cfg_scale, seed,
             megapixels, width, height, num_images=1, loras=None, more_images=None, tea_cache_l1_thresh=0.0,
             upsample_prompt=False, live_preview=False, progress=gr.Progress()):
        """Edit an image by instruction with FLUX.1-Kontext-dev, Step1X-Edit or FLUX.2.

        Args:
            image: the image to edit (a file); RGBA / palette / 16-bit / EXIF-rotated images are converted, images
                under 64 px or over 40 MP are refused, sides over 4096 px are downscaled.
            variant: the editing model's name, one of the Editing model dropdown's values.
            prompt: the instruction ("make the car red").
            negative_prompt: used only when cfg_scale > 1.
            num_inference_steps: denoising steps, 1..100.
            embedded_guidance: the distilled guidance value (2.5 is typical for Kontext).
            cfg_scale: 1 = off; above 1 runs true classifier-free guidance with the negative prompt (Step1X: 6).
            seed: -1 for a random seed, else a whole number; image k of a batch uses seed + k.
            megapixels: output size in megapixels when width/height are 0: the input's aspect ratio, multiples of 16.
            width: output width in pixels (0 = follow the input's aspect).
            height: output height in pixels (0 = follow the input's aspect).
            num_images: how many images, 1..4.
            loras: LoRAs to apply, as in /generate: a list of {"name": file, "weight": number} or [file, weight]
                pairs (or the same as JSON text); None or [] for none.
            more_images: more reference images after ``image`` (a gallery's value: files), for the models that take
                several (Kontext, FLUX.2, FLUX 3); ignored by Step1X-Edit and Nexus-GenV2. At most 9.
            tea_cache_l1_thresh: the step cache (TeaCache): 0 = off; 0.2-0.6 skips more steps as it rises (FLUX.1).
            upsample_prompt: FLUX 3 only: BFL's prompt upsampler rewrites the instruction with the references first.
            live_preview: (the page's own State, not an API input) show the image as it denoises.

        Returns:
            images: the edited images (PNG files carrying their recipe, with the reference image's name and
                fingerprint; the references are saved beside each as <name>.ref0.png, .ref1.png, ...).
            info: the settings of the first image, as text.
            seed: the seed of the first image (None when the job was cancelled; info is then "Cancelled.").
        """
        request = edit_request(image, variant, prompt, negative_prompt, num_inference_steps, embedded_guidance,
                               cfg_scale, seed, megapixels, width, height, num_images, loras, more_images,
                               tea_cache_l1_thresh, upsample_prompt)
        yield from stream_job(engine, request, progress, title="Could not edit", previews=bool(live_preview))

    def running(image, live, *picked):
        # No image: a validator says so at the field and nothing runs, so the buttons stay as they are.
        return (*(busy() if image else idle()), LoraPicker.spec(*picked), bool(live))

    def job_size(custom_on, w, h):
        """Width and height for the endpoint: 0 (follow the input) unless set by hand."""
        return (int(w), int(h)) if custom_on else (0, 0)

    def needs_image(image):
        """No image: a plain message at the image field, and the job never starts (no "Error" badges). A validator
        runs only on a queued event: this private step's, so the /edit endpoint keeps its own messages for clients
        (a validator there would also turn a refused upload's message into a bare "400 Bad Request")."""
        return gr.validate(bool(image), "Upload or paste an image to edit first.")

    def image_given(_image):
        """Nothing to do: ``needs_image``, its validator, stops the job when there is no image."""

    size_w = gr.Number(value=0, visible=False, precision=0, elem_id="edit-job-width")
    size_h = gr.Number(value=0, visible=False, precision=0, elem_id="edit-job-height")
    helper = {"queue": False, "api_visibility": "private"}
    refresh_loras_on_open(ctx, loras)
    start = edit_btn.click(running, inputs=[image, preview.toggle, *loras.spec_inputs],
                           outputs=[edit_btn, cancel_btn, loras_spec, preview.wanted], **helper)
    start = start.then(image_given, inputs=[image], outputs=None, validator=needs_image, show_progress="hidden",
                       api_visibility="private")
    start = start.then(job_size, inputs=[custom, width, height], outputs=[size_w, size_h], **helper)
    request_inputs = [image, model, prompt, negative_prompt, steps, guidance, cfg, seed, megapixels, size_w, size_h,
                      num_images, loras_spec, more_refs, step_cache, upsample]
    job = start.then(
        edit,
        inputs=[*request_inputs, preview.wanted],
        outputs=[new_images, results.info, used_seed, new_results, preview.file],
        api_name="edit",
        show_progress="full",
        show_progress_on=[compare, results.gallery],
        **ENGINE_QUEUE,
    )

    def show_results(new, history):
        shown = add_results(new, history)
        newest = new[0] if new else None
        seed_box = gr.update(value=newest["seed"], visible=True) if newest else gr.update()
        pair = compare_pair(engine, newest) if newest else None
        pair = gr.update(value=pair) if pair else gr.update()
        return (*shown, seed_box, pair, [])

    shown_outputs = [results.gallery, results.history, results.info, results.selected, used_seed, compare]
    job.success(show_results, inputs=[new_results, results.history], outputs=[*shown_outputs, new_results], **helper)
    # "Add to queue" (and Ctrl+Enter): the same request, run by the studio's queue; its images arrive here.
    wire_queue(ctx, TAB_ID, bar.queue, edit_request, request_inputs,
               before=(lambda custom_on, w, h, *picked: (LoraPicker.spec(*picked), *job_size(custom_on, w, h)),
                       [custom, width, height, *loras.spec_inputs], [loras_spec, size_w, size_h]),
               check=(needs_image, [image]),
               show=(lambda new, history: show_results(new, history)[:-1], [results.history], shown_outputs))
    job.then(idle, outputs=[edit_btn, cancel_btn], **helper)
    job.failure(idle, outputs=[edit_btn, cancel_btn], **helper)
    wire_live_preview(preview, job)
    wire_cancel(cancel_btn, engine, api_name="edit_cancel")

    # Live helpers: the output size before the button is pressed. They read the image as sent (preprocess=False):
    # on an upload they may run before the field's own check has emptied a refused file, which they take as none.
    size_inputs = [image, megapixels, custom, width, height]
    for control in (image, megapixels, width, height):
        control.change(lambda payload, *a: size_line(engine, uploads.checked_path(payload), *a), inputs=size_inputs,
                       outputs=[size_md], preprocess=False, **helper)

    def on_custom(custom_on, payload, mp):
        """Turning on custom sizes starts from the size that would be used now."""
        image_path = uploads.checked_path(payload)
        w = h = None
        if custom_on and image_path:
            try:
                size = engine.edit_size(image_path, megapixels=mp)
                w, h = size["width"], size["height"]
            except Exception:  # noqa: BLE001 - the size line shows the problem
                pass
        line = size_line(engine, image_path, mp, custom_on and w is not None, w, h)
        return (gr.update(visible=bool(custom_on)), gr.update(interactive=not custom_on),
                gr.update() if w is None else w, gr.update() if h is None else h, line)

    custom.change(on_custom, inputs=[custom, image, megapixels], outputs=[size_row, megapixels, width, height,
                                                                           size_md], preprocess=False, **helper)
    wire_steps_and_seed_notes(steps, steps_md, seed, seed_md, MAX_STEPS)
    for control in (cfg, negative_prompt):
        control.change(cfg_line, inputs=[cfg, negative_prompt], outputs=[cfg_md], **helper)

    def on_model(name):
        info = infos.get(name, {})
        return (model_note(info), gr.update(value=int(info.get("default_steps") or 28)),
                gr.update(value=float(info.get("default_guidance", 2.5))), gr.update(value=default_cfg(info)))

    model.input(on_model, inputs=[model], outputs=[model_md, steps, guidance, cfg], **helper)
    model.change(lambda name: model_note(infos.get(name)), inputs=[model], outputs=[model_md], **helper)
    # Models without a guidance embedder (schnell, Step1X-Edit) hide the slider: it would do nothing.
    model.change(lambda name: gr.update(visible=(infos.get(name) or {}).get("uses_guidance", True)), inputs=[model],
                 outputs=[guidance], **helper)
    # Only the models that take several references (Kontext, FLUX.2) show "More reference images".
    model.change(lambda name: (gr.update(visible=takes_several(infos.get(name))),) * 2, inputs=[model],
                 outputs=[more_refs, more_order], **helper)
    random_btn.click(lambda: -1, outputs=[seed], **helper)

    def reuse_seed(selected, last):
        value = selected.get("seed") if isinstance(selected, dict) else None
        value = last if value is None else value
        return gr.update() if value is None else int(value)

    reuse_btn.click(reuse_seed, inputs=[results.selected, used_seed], outputs=[seed], **helper)

    def use_as_input(selected):
        """The selected result (the newest after a run) becomes the image to edit: iterative edits."""
        path = selected_path(selected)
        if not path:
            gr.Warning("No result to use yet: edit an image first (or select one in the gallery).")
            return gr.update()
        return path

    use_result.click(use_as_input, inputs=[results.selected], outputs=[image], show_progress="hidden",
                     api_visibility="private")

    # Restore: the settings (not the size: the output follows the input) and the reference image saved beside it.
    targets = {"variant": model, "prompt": prompt, "negative_prompt": negative_prompt,
               "num_inference_steps": steps, "embedded_guidance": guidance, "cfg_scale": cfg, "seed": seed}

    def restore_input(selected):
        copy = reference_copy(selected)
        return copy if copy else gr.update()

    def restore_more(selected):
        """The references after the first, from their copies beside the result (none: the gallery empties)."""
        return more_copies(selected) if reference_copy(selected) else gr.update()

    wire_upsample_option(model, infos, upsample)
    wire_step_cache_option(model, infos, step_cache)

    def wire_restore_from(button, source):
        """Restore the result in ``source`` when ``button`` is clicked (this tab's gallery, or History's)."""
        wire_restore(button, source, targets, names)
        wire_lora_restore(button, source, loras)
        wire_step_cache_restore(button, source, step_cache)
        wire_upsample_restore(button, source, upsample)
        button.click(restore_input, inputs=[source], outputs=[image], **helper)
        button.click(restore_more, inputs=[source], outputs=[more_refs], **helper)

    wire_restore_from(results.restore, results.selected)
    offer_restore(ctx, TAB_ID, wire_restore_from)

    # "Send to Edit" buttons in other tabs (Generate's gallery, History): their image becomes the input here.
    offer_input(ctx, TAB_ID, "Edit", image)
