"""The Inpaint & Control tab: paint a mask on an image and repaint it (FLUX.1-Fill-dev, FLUX.1-dev with the
Inpainting ControlNet, Flex.2-preview, the FLUX.2 models with their inpaint mask), extend the canvas to outpaint, and
steer the FLUX.1 ones with control images (ControlNet Union / Upscaler beside FLUX.1-dev, Flex.2's own control input).

UI only: the image editor's background and mask layer go to the engine as files (``inpaint_image``,
``inpaint_mask``: the layer's alpha is the mask), control images with their preprocessor and strength as
``controls``. The engine fits the mask to the image, feathers it, composites the original back outside it and
says what it changed. No torch here.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from app import uploads
from app.common import ENGINE_QUEUE, StudioContext, call_engine
from app.controls import (FreeNumber, FreeSlider, build_prompt_bar, build_step_cache, file_label, step_cache_request,
                          variant_label, wire_step_cache_option, wire_step_cache_restore, wire_steps_and_seed_notes)
from app.gallery import add_results, build_results_panel
from app.jobs import busy, engine_job, idle, stream_job, wire_cancel
from app.live_preview import build_live_preview, wire_live_preview
from app.queue_panel import wire_queue
from app.restore import wire_restore
from app.send_to import offer_input, offer_restore

TITLE = "Inpaint & Control"
TAB_ID = "inpaint"

N_CONTROLS = 2            # control-image slots on the page
MAX_STEPS = 100
MAX_IMAGES = 4
MASK_COLOUR = ("#ffffff", 0.6)   # the brush: white at 60%, so the image shows through the painted area
METHODS = {"fill": "repaints with FLUX.1-Fill's mask input", "flex": "repaints with Flex.2's inpaint input",
           "controlnet": "repaints with FLUX.1-dev and the alimama Inpainting ControlNet",
           "mask": "repaints with FLUX.2's own masked denoising (no extra model)"}


def model_choices(engine: Any) -> tuple[list[tuple[str, str]], dict[str, dict]]:
    """(label, name) of the variants that inpaint or take control images; installed first, demos last."""
    variants = [v for v in engine.variants() if (v.get("inpaint") or v.get("control"))
                and (v.get("available") or v.get("downloadable"))]
    rank = {"fill": 0, "flex": 1, "controlnet": 2, "mask": 3}       # the official inpainting model first
    variants.sort(key=lambda v: (not v.get("available"), bool(v.get("demo")), rank.get(v.get("inpaint"), 4)))
    if any(v.get("available") and not v.get("demo") for v in variants):
        variants = [v for v in variants if not v.get("demo")]
    elif any(v.get("demo") for v in variants):       # demo mode: the demos first, real models to download after
        variants.sort(key=lambda v: (not v.get("demo"), rank.get(v.get("inpaint"), 4)))
    return [(variant_label(v), v["name"]) for v in variants], {v["name"]: v for v in variants}


def model_note(info: dict | None) -> str:
    if not info:
        return ("No inpainting model is installed: put FLUX.1-Fill-dev, Flex.2-preview, FLUX.1-dev or a FLUX.2 model "
                "in the models folder.")
    bits = [info.get("description", "")]
    if info.get("inpaint"):
        bits.append(f"A painted mask {METHODS[info['inpaint']]}.")
    if info.get("control") == "controlnet":
        bits.append("Control images go through ControlNets (Union-alpha, Upscaler).")
    elif info.get("control") == "flex":
        bits.append("One control image goes into Flex.2's control input (strength, stop).")
    else:
        bits.append("It takes no control images.")
    return " ".join(b for b in bits if b)


def editor_files(value: Any) -> tuple[str | None, str | None]:
    """(image, mask layer) files of the image editor's value."""
    if not isinstance(value, dict):
        return None, None
    layers = [p for p in (value.get("layers") or []) if p]
    return value.get("background") or None, (layers[0] if layers else None)


def size_line(engine: Any, value: Any) -> str:
    image, _ = editor_files(value)
    if not image:
        return "Upload or paste an image, then paint the area to change (white). The output keeps the image's size."
    try:
        size = engine.inpaint_size(image)
    except Exception as exc:  # noqa: BLE001 - the line says what is wrong with the image
        return f"⚠ {exc}"
    return f"Output: **{size['width']} × {size['height']}** px. {size['note']}".strip()


def build(ctx: StudioContext) -> None:
    engine = ctx.engine
    choices, infos = model_choices(engine)
    names = [name for _, name in choices]
    default = names[0] if names else None
    default_info = infos.get(default, {})
    preprocessors = call_engine(engine.preprocessors, title="Cannot list the preprocessors")
    pre_choices = [(p["label"], p["name"]) for p in preprocessors]

    bar = build_prompt_bar("inp", interactive=bool(names),
                           placeholder="What the painted area (or the whole image, with control) shows")
    prompt, negative_prompt, run_btn, cancel_btn = bar.prompt, bar.negative, bar.run, bar.cancel

    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=340, elem_id="inp-settings"):
            editor = uploads.NotedImageEditor(
                label="Image and mask: paint the area to change", type="filepath", format="png",
                sources=["upload", "clipboard"], layers=False, transforms=(), image_mode="RGBA", height=420,
                brush=gr.Brush(default_size=32, colors=[MASK_COLOUR], color_mode="fixed"),
                eraser=gr.Eraser(default_size=32), elem_id="inp-editor")
            with gr.Row(elem_classes=["tool-row"]):
                invert = gr.Checkbox(value=False, label="Invert mask", elem_id="inp-invert", min_width=120)
                feather = gr.Slider(0, 64, value=8, step=1, label="Feather (px)", elem_id="inp-feather",
                                    info="softens the seam", min_width=160)
                clear_btn = gr.Button("Clear mask", size="sm", elem_id="inp-clear-mask", min_width=100)
            size_md = gr.Markdown(size_line(engine, None), elem_classes=["hint"], elem_id="inp-size-line")
            # The whole mask as the job will use it: painted strokes + a kept mask (outpainting strip, restored
            # mask), inverted if asked. The editor cannot draw a mask sent from the server, so this shows it.
            mask_view = gr.Image(label="Mask used (tinted = repainted)", type="filepath", interactive=False,
                                 height=200, elem_id="inp-mask-preview", buttons=["fullscreen"])
            kept_mask = gr.State(None)      # {"mask": file, "key": the image_key of the image it belongs to}
            with gr.Accordion("Outpaint: extend the canvas", open=False, elem_id="inp-outpaint"):
                with gr.Row():
                    pads = [gr.Number(value=0, minimum=0, maximum=2048, step=16, precision=0, label=side,
                                      elem_id=f"inp-pad-{side.lower()}", min_width=80)
                            for side in ("Left", "Right", "Top", "Bottom")]
                extend_btn = gr.Button("Extend canvas", size="sm", elem_id="inp-extend")
                gr.Markdown("The new area is masked (with a little overlap into the image) and filled from the "
                            "edges; generate to paint it.", elem_classes=["hint"])
            model = gr.Dropdown(choices=choices, value=default, label="Model", elem_id="inp-model",
                                interactive=bool(names))
            model_md = gr.Markdown(model_note(default_info), elem_classes=["hint"], elem_id="inp-model-note")
            with gr.Group():
                with gr.Row():
                    steps = FreeSlider(1, MAX_STEPS, value=int(default_info.get("default_steps") or 28), step=1,
                                       label="Steps", elem_id="inp-steps")
                    num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images", elem_id="inp-num-images")
                with gr.Row():
                    guidance = gr.Slider(0, 40, value=float(default_info.get("default_guidance", 3.5)), step=0.5,
                                         label="Guidance (embedded)", info="Fill: 30 · others: 3.5",
                                         visible=default_info.get("uses_guidance", True), elem_id="inp-guidance")
                    cfg = gr.Slider(1, 10, value=1, step=0.1, label="CFG scale", info="1 = off (fast)",
                                    elem_id="inp-cfg")
                step_cache = build_step_cache("inp", default_info)
            steps_md = gr.Markdown("", elem_classes=["hint"], elem_id="inp-steps-note")
            with gr.Row():
                seed = FreeNumber(value=-1, precision=0, label="Seed (-1 = random)", elem_id="inp-seed",
                                  min_width=130)
                used_seed = gr.Number(value=None, precision=0, label="Seed used (last run)", interactive=False,
                                      visible=False, elem_id="inp-used-seed", min_width=130)
            seed_md = gr.Markdown("", elem_classes=["hint"], elem_id="inp-seed-note")
            with gr.Accordion("Control images", open=False, elem_id="inp-controls"):
                gr.Markdown("A control image steers the layout: edges (canny), a depth or pose map, a blurred or "
                            "small version. The preview shows what the model gets.", elem_classes=["hint"])
                slots = [_control_slot(i, pre_choices, engine, default) for i in range(N_CONTROLS)]
                controls_md = gr.Markdown("", elem_classes=["hint"], elem_id="inp-controls-note")

        with gr.Column(scale=6, min_width=360, elem_id="inp-results"):
            preview = build_live_preview("inp")    # the image as it denoises, while a job runs (app.live_preview)
            results = build_results_panel(height=420, id_prefix="inp-")
            new_images = gr.Gallery(visible=False, label="New images", elem_id="inp-new-images")
            new_results = gr.State([])

    # ------------------------------------------------------------------------------------------------ events
    def inpaint_request(editor_value, variant, prompt, negative_prompt, num_inference_steps, embedded_guidance,
                        cfg_scale, seed, num_images, mask_invert, mask_feather, controls=None, kept=None,
                        tea_cache_l1_thresh=0.0) -> dict:
        """The engine request of the tab's controls (the run button's and "Add to queue"'s); the mask is made now,
        from the strokes on the page."""
        image, layer = editor_files(editor_value)
        mask = None
        if image:
            mask = _mask(engine, image, layer, kept)["mask"]
        request = {
            "variant": variant, "prompt": prompt or "", "negative_prompt": negative_prompt or "",
            "num_inference_steps": num_inference_steps, "embedded_guidance": embedded_guidance,
            "cfg_scale": cfg_scale, "seed": -1 if seed is None else seed, "num_images": num_images or 1,
            "mask_invert": bool(mask_invert), "mask_feather": mask_feather or 0,
            "controls": [c for c in (controls or []) if isinstance(c, dict) and c.get("image")],
            **step_cache_request(tea_cache_l1_thresh),
        }
        if image:
            request["inpaint_image"] = image
            request["inpaint_mask"] = mask
        elif not request["controls"]:
            raise gr.Error("Upload an image and paint a mask, or add a control image.", print_exception=False)
        return request

    @engine_job
    def generate(editor_value, variant, prompt, negative_prompt, num_inference_steps, embedded_guidance, cfg_scale,
                 seed, num_images, mask_invert, mask_feather, controls=None, kept=None, tea_cache_l1_thresh=0.0,
                 live_preview=False, progress=gr.Progress()):
        """Repaint the masked area of an image (and/or follow control images) with FLUX.1-Fill-dev, Flex.2-preview,
        FLUX.1-dev (+ ControlNets) or a FLUX.2 model (a mask only, no control images).

        Args:
            editor_value: the image editor's value: {"background": image file, "layers": [mask layer file]}; the
                layer's alpha is the mask (any painted pixel = repaint). A mask of another size is resized (noted).
            variant: the model's name, one of the Model dropdown's values.
            prompt: what the repainted area (or, with control only, the image) shows.
            negative_prompt: used only when cfg_scale > 1.
            num_inference_steps: denoising steps, 1..100.
            embedded_guidance: the distilled guidance (30 is usual for FLUX.1-Fill-dev, 3.5 for the others).
            cfg_scale: 1 = off; above 1 runs true CFG with the negative prompt.
            seed: -1 for a random seed, else a whole number; image k of a batch uses seed + k.
            num_images: how many images, 1..4.
            mask_invert: repaint everything except the painted area.
            mask_feather: blur radius of the mask's edge in pixels; outside the feathered mask the original is kept.
            controls: a list of {"image": file, "preprocessor": name, "controlnet": name, "scale": 0..2,
                "start": 0..1, "end": 0..1} (start/end: the fraction of the steps the control acts on).
            kept: {"mask": a mask file (white = repaint), "key": the engine's image_key of the image it was made
                for} united with the painted layer (the page's outpainting strip or restored mask); None for none.
            tea_cache_l1_thresh: the step cache (TeaCache): 0 = off; 0.2-0.6 skips more steps as it rises (FLUX.1).
            live_preview: (the page's own State, not an API input) show the image as it denoises.

        Returns:
            images: the new images (PNG files with their recipe; the image, mask and control images are saved
                beside each as <name>.ref0.png, <name>.ref1.png, <name>.ctl0.png, ...).
            info: the settings of the first image, as text.
            seed: the seed of the first image (None when cancelled).
        """
        request = inpaint_request(editor_value, variant, prompt, negative_prompt, num_inference_steps,
                                  embedded_guidance, cfg_scale, seed, num_images, mask_invert, mask_feather, controls,
                                  kept, tea_cache_l1_thresh)
        yield from stream_job(engine, request, progress, title="Could not generate", previews=bool(live_preview))

    def collect(*values):
        """The control slots' values -> the request's ``controls`` list (slots without an image are skipped)."""
        out = []
        for i in range(N_CONTROLS):
            image, pre, net, scale, start, end = values[i * 6:(i + 1) * 6]
            if image:
                out.append({"image": image, "preprocessor": pre, "controlnet": net, "scale": scale,
                            "start": start, "end": end})
        return out

    controls_json = gr.JSON(value=None, visible=False, elem_id="inp-controls-json")
    slot_inputs = [c for slot in slots for c in slot["inputs"]]
    helper = {"queue": False, "api_visibility": "private"}
    start = run_btn.click(lambda live, *v: (*busy(), collect(*v), bool(live)), inputs=[preview.toggle, *slot_inputs],
                          outputs=[run_btn, cancel_btn, controls_json, preview.wanted], **helper)
    request_inputs = [editor, model, prompt, negative_prompt, steps, guidance, cfg, seed, num_images, invert, feather,
                      controls_json, kept_mask, step_cache]
    job = start.then(generate, inputs=[*request_inputs, preview.wanted],
                     outputs=[new_images, results.info, used_seed, new_results, preview.file], api_name="inpaint",
                     show_progress="full", show_progress_on=[results.gallery], **ENGINE_QUEUE)

    def show_results(new, history):
        shown = add_results(new, history)
        newest = new[0] if new else None
        seed_box = gr.update(value=newest["seed"], visible=True) if newest else gr.update()
        return (*shown, seed_box, [])

    shown_outputs = [results.gallery, results.history, results.info, results.selected, used_seed]
    job.success(show_results, inputs=[new_results, results.history], outputs=[*shown_outputs, new_results], **helper)
    # "Add to queue" (and Ctrl+Enter): the same request, run by the studio's queue; its images arrive here.
    wire_queue(ctx, TAB_ID, bar.queue, inpaint_request, request_inputs,
               before=(collect, slot_inputs, [controls_json]),
               show=(lambda new, history: show_results(new, history)[:-1], [results.history], shown_outputs))
    job.then(idle, outputs=[run_btn, cancel_btn], **helper)
    job.failure(idle, outputs=[run_btn, cancel_btn], **helper)
    wire_live_preview(preview, job)
    wire_cancel(cancel_btn, engine, api_name="inpaint_cancel")

    # The editor's image as last read: "Clear mask" needs only it, and an event that reads the editor itself waits
    # (seconds, with the editor greyed) while the page draws its layers into files.
    shown_image = gr.State(None)

    def refresh(value, kept, inverted):
        """The size line, the mask preview and the image for what the editor holds now."""
        image, layer = editor_files(value)
        if not image:
            return size_line(engine, None), None, None
        try:
            made = _mask(engine, image, layer, kept, inverted)
        except Exception:  # noqa: BLE001 - the size line says what is wrong with the image
            return size_line(engine, value), None, image
        return size_line(engine, value), made["preview"], image

    watch = {"inputs": [editor, kept_mask, invert], "outputs": [size_md, mask_view, shown_image], **helper}
    # A kept mask applies only to the image it was made for (the engine compares pixels: a new upload drops it).
    for event in (editor.upload, editor.change, editor.clear, invert.change):
        event(refresh, **watch)

    def clear_mask(image, inverted):
        """Strokes and the kept mask go, from the editor and from "Mask used" at once; the image stays."""
        if not image:
            return gr.update(), None, size_line(engine, None), None
        canvas = {"background": image, "layers": [], "composite": image}
        return (canvas, None, *refresh(canvas, None, inverted)[:2])

    # (No show_progress="hidden" on an event that writes the editor: Gradio's editor then fails in the page; "full"
    # greys it over while the page re-reads it, seconds on a busy machine. "minimal" shows a timer in its corner.)
    clear_btn.click(clear_mask, inputs=[shown_image, invert], outputs=[editor, kept_mask, size_md, mask_view],
                    show_progress="minimal", **helper)

    def extend(value, kept, inverted, left, right, top, bottom):
        image, layer = editor_files(value)
        if not image:
            gr.Warning("Upload an image first.")
            return gr.update(), kept, gr.update(), gr.update(), gr.update()
        current = _mask(engine, image, layer, kept)["mask"]
        made = call_engine(engine.outpaint_canvas, image, current, left=left or 0, right=right or 0, top=top or 0,
                           bottom=bottom or 0, title="Cannot extend the canvas")
        if made.get("note"):
            gr.Info(made["note"])
        canvas = {"background": made["image"], "layers": [], "composite": made["image"]}
        new_kept = {"mask": made["mask"], "key": made["image_key"]}
        return canvas, new_kept, *refresh(canvas, new_kept, inverted)

    extend_btn.click(extend, inputs=[editor, kept_mask, invert, *pads],
                     outputs=[editor, kept_mask, size_md, mask_view, shown_image], **helper)

    def on_model(name):
        info = infos.get(name, {})
        return (model_note(info), gr.update(value=int(info.get("default_steps") or 28)),
                gr.update(value=float(info.get("default_guidance", 3.5))),
                gr.update(value=float(info.get("default_cfg") or 1.0)))   # FLUX.2's base models: CFG 4

    model.input(on_model, inputs=[model], outputs=[model_md, steps, guidance, cfg], **helper)
    wire_steps_and_seed_notes(steps, steps_md, seed, seed_md, MAX_STEPS)
    model.change(lambda name: model_note(infos.get(name)), inputs=[model], outputs=[model_md], **helper)
    wire_step_cache_option(model, infos, step_cache)
    # Models without a guidance embedder (klein, schnell) hide the slider: it would do nothing.
    model.change(lambda name: gr.update(visible=(infos.get(name) or {}).get("uses_guidance", True)), inputs=[model],
                 outputs=[guidance], **helper)
    for slot in slots:
        model.change(slot["on_model"], inputs=[model], outputs=[slot["controlnet"]], **helper)

    # A model that takes no control images (FLUX.1-Fill-dev) drops those left in the slots as soon as it is chosen,
    # and says so next to them; one added while it is chosen is named there too (Generate would refuse it).
    control_images = [slot["inputs"][0] for slot in slots]

    def model_words(name):
        info = infos.get(name) or {}
        return str(info.get("label") or name).split(" (")[0] if info.get("demo") else name

    def drop_controls(name, *images):
        if (infos.get(name) or {}).get("control") or not any(images):
            return (*[gr.update()] * len(images), "")
        return (*[None] * len(images), f"⚠️ {model_words(name)} takes no control images, so the control image was "
                                       f"removed. Choose a FLUX.1-dev or Flex.2 model to use one.")

    def controls_note(name, *images):
        if (infos.get(name) or {}).get("control") or not any(images):
            return ""
        return (f"⚠️ {model_words(name)} takes no control images: Generate would refuse this one. Choose a FLUX.1-dev "
                f"or Flex.2 model, or remove it.")

    model.change(drop_controls, inputs=[model, *control_images], outputs=[*control_images, controls_md], **helper)
    for image in control_images:
        image.upload(controls_note, inputs=[model, *control_images], outputs=[controls_md], **helper)

    # Restore: settings by key; the image, the mask and the control images from the copies beside the result.
    targets = {"variant": model, "prompt": prompt, "negative_prompt": negative_prompt,
               "num_inference_steps": steps, "embedded_guidance": guidance, "cfg_scale": cfg, "seed": seed}

    def restore_inputs(selected):
        found = call_engine(engine.restore_inputs, selected.get("path") if isinstance(selected, dict) else None,
                            title="Cannot restore")
        out = [gr.update(), gr.update()]
        if found.get("inpaint_image"):
            image = found["inpaint_image"]
            kept = {"mask": found["inpaint_mask"], "key": found.get("image_key")} if found.get("inpaint_mask") else None
            out = [{"background": image, "layers": [], "composite": image}, kept]
        out += [gr.update(value=bool(found["mask_invert"])) if "mask_invert" in found else gr.update(),
                gr.update(value=found["mask_feather"]) if "mask_feather" in found else gr.update()]
        controls = found.get("controls") or []
        for i in range(N_CONTROLS):
            c = controls[i] if i < len(controls) else None
            out += ([c["image"], c.get("preprocessor"), c.get("controlnet"), c.get("scale", 1.0),
                     c.get("start", 0.0), c.get("end", 1.0)] if c else [None] + [gr.update()] * 5)
        return out

    def wire_restore_from(button, source):
        """Restore the result in ``source`` when ``button`` is clicked (this tab's gallery, or History's)."""
        wire_restore(button, source, targets, names)
        wire_step_cache_restore(button, source, step_cache)
        restored = button.click(restore_inputs, inputs=[source],
                                outputs=[editor, kept_mask, invert, feather] + slot_inputs, **helper)
        restored.then(refresh, **watch)

    wire_restore_from(results.restore, results.selected)
    offer_restore(ctx, TAB_ID, wire_restore_from)
    # "Send to Inpaint" (History): the image becomes the one to paint on.
    offer_input(ctx, TAB_ID, "Inpaint", editor,
                to_value=lambda path, _: {"background": path, "layers": [], "composite": path})


def _mask(engine: Any, image: str, layer: str | None, kept: Any, inverted: bool = False) -> dict:
    """The engine's mask for the page's state: painted layer + kept mask (when it belongs to this image)."""
    kept = kept if isinstance(kept, dict) else {}
    return call_engine(engine.mask_preview, image, layer, kept.get("mask"), invert=inverted, extra_key=kept.get("key"),
                       title="Cannot read the mask")


def _control_slot(i: int, pre_choices: list, engine: Any, variant: str | None) -> dict:
    """One control image: the image, its preprocessor (with a preview), the ControlNet, strength and step range."""
    nets = _controlnet_choices(engine, variant)
    with gr.Group(elem_id=f"inp-control-{i}"):
        with gr.Row():
            image = uploads.Image(label=f"Control image {i + 1}", type="filepath",
                                  sources=["upload", "clipboard"], height=200, elem_id=f"inp-control-{i}-image")
            preview = gr.Image(label="What the model gets", type="filepath", interactive=False, height=200,
                               elem_id=f"inp-control-{i}-preview")
        pre = gr.Dropdown(choices=pre_choices, value=pre_choices[0][1] if pre_choices else None,
                          label="Preprocessor", elem_id=f"inp-control-{i}-pre")
        # A row of its own, and short labels (the inputs each reads are in its info): the text is never cut off.
        net = gr.Dropdown(choices=nets, value=nets[0][1] if nets else None, label="ControlNet",
                          elem_id=f"inp-control-{i}-net", info=_controlnet_info(engine, variant))
        with gr.Row():
            scale = gr.Slider(0, 2, value=0.6, step=0.05, label="Strength", elem_id=f"inp-control-{i}-scale")
            start = gr.Slider(0, 1, value=0.0, step=0.05, label="From (fraction of steps)",
                              elem_id=f"inp-control-{i}-start")
            end = gr.Slider(0, 1, value=1.0, step=0.05, label="To", elem_id=f"inp-control-{i}-end")

    def show(path, name):
        if not path:
            return None
        return call_engine(engine.preview_control, path, name, title="Cannot preprocess this image")["path"]

    for trigger in (image.change, pre.change):
        trigger(show, inputs=[image, pre], outputs=[preview], queue=False, api_visibility="private")

    def on_model(name):
        choices = _controlnet_choices(engine, name)
        return gr.update(choices=choices, value=choices[0][1] if choices else None, interactive=bool(choices),
                         info=_controlnet_info(engine, name))

    return {"inputs": [image, pre, net, scale, start, end], "controlnet": net, "on_model": on_model}


def _controlnets(engine: Any, variant: str | None) -> list[dict]:
    """The ControlNets beside ``variant``, each with "short" (its name without the inputs it reads, which are in
    "reads") and "demo"."""
    if not variant:
        return []
    try:
        found = engine.controlnet_choices(variant)
    except Exception:  # noqa: BLE001 - an unknown variant offers none
        return []
    out = []
    for c in found:
        # The studio's label: "<name> (<inputs it reads>)" then " (download)" or " (random-weight demo)".
        text = str(c.get("label") or c["name"])
        demo = text.endswith(" (random-weight demo)")
        text = text.removesuffix(" (random-weight demo)").removesuffix(" (download)")
        short, _, reads = text.partition(" (")
        out.append({**c, "short": short, "reads": reads.removesuffix(")"), "demo": demo})
    return out


def _controlnet_choices(engine: Any, variant: str | None) -> list[tuple[str, str]]:
    """(label, name) of the ControlNets beside ``variant``, worded as every model list is (app.controls)."""
    return [(f"{c['short']} (random-weight demo)" if c["demo"] else file_label(c["short"], bool(c.get("available"))),
             c["name"]) for c in _controlnets(engine, variant)]


def _controlnet_info(engine: Any, variant: str | None) -> str:
    """The ControlNet dropdown's hint: what each one reads."""
    reads = [f"{c['short']}: {c['reads']}" for c in _controlnets(engine, variant) if c["reads"]]
    return " · ".join(reads + ["Flex.2 uses its own control input"])
