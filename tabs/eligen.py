"""The EliGen tab: regional prompts. Paint one area per entity, each in its own colour, write what each area
shows, and generate with FLUX.1-dev + the EliGen LoRA (DiffSynth-Studio's ``eligen_entity_prompts`` /
``eligen_entity_masks``).

UI only. The canvas is an image editor whose brush has one colour per entity; the engine splits the painted layer
by colour into entity masks (``studio.eligen_layout``), unites them with masks the page keeps (a loaded layout, or
the masks carried over when the canvas size changes: the editor cannot draw masks sent from the server) and draws
the preview that shows exactly what the job will use. Layouts save and load as a zip in DiffSynth-Studio's EliGen
folder format. No torch here.
"""
from __future__ import annotations


import gradio as gr

from app import uploads
from app.common import ENGINE_QUEUE, StudioContext, call_engine
from app.controls import (build_prompt_bar, build_step_cache, file_label, step_cache_request,
                          wire_step_cache_restore)
from app.gallery import add_results, build_results_panel
from app.jobs import busy, engine_job, idle, stream_job, wire_cancel
from app.live_preview import build_live_preview, wire_live_preview
from app.queue_panel import wire_queue
from app.restore import wire_restore
from app.send_to import offer_input, offer_restore

TITLE = "EliGen"
TAB_ID = "eligen"
MAX_STEPS = 100
MAX_IMAGES = 4
START_ENTITIES = 2


def swatch_html(k: int, colour: str) -> str:
    return (f"<button class='eli-swatch' type='button' title='Paint entity {k + 1} (selects this brush colour)' "
            f"style='width:34px;height:34px;border-radius:6px;border:2px solid rgba(0,0,0,.25);cursor:pointer;"
            f"color:#fff;font-weight:600;text-shadow:0 0 2px #000;background:{colour}'>{k + 1}</button>")


def pick_colour_js(k: int) -> str:
    """A click on entity k's swatch selects the brush and its colour in the editor's menu (then closes the menu):
    the editor has no API for its brush colour, so this presses its own buttons."""
    return (
        "element.querySelector('button').addEventListener('click', () => {"
        " const ed = document.querySelector('#eli-editor'); if (!ed) return;"
        " const brush = ed.querySelector(\"button[aria-label='Brush']\"); if (brush) brush.click();"
        " setTimeout(() => {"
        "  const menu = ed.querySelector(\"button[aria-label='Color']\"); if (!menu) return; menu.click();"
        "  setTimeout(() => {"
        f"   const c = ed.querySelectorAll('button.color')[{k}]; if (c) c.click();"
        "   setTimeout(() => { if (ed.querySelector('button.color')) menu.click(); }, 80);"
        "  }, 80);"
        " }, 80);"
        "});")


def model_label(variant: dict) -> str:
    """A model's label, worded as in every tab's model list (app.controls): the catalogue marks one whose files are
    missing with " (download)"."""
    label = str(variant.get("label") or variant["name"])
    if variant.get("demo"):
        return label
    return file_label(variant["name"], not label.endswith(" (download)"))


def build(ctx: StudioContext) -> None:
    engine = ctx.engine
    info = call_engine(engine.eligen_info, title="EliGen is not available")
    colours, max_entities = info["colours"], info["max_entities"]
    names = [v["name"] for v in info["variants"]]
    default = names[0] if names else None
    demo = bool(info["variants"][0].get("demo")) if names else False
    size0 = 256 if demo else 1024                     # the demo is tiny: small canvases keep it quick on a CPU
    canvas0 = call_engine(engine.eligen_canvas, size0, size0, title="Cannot make the canvas")

    bar = build_prompt_bar("eli", label="Global prompt", max_lines=6, interactive=bool(names),
                           placeholder="The whole picture: a cosy room at dusk, a cat on a sofa, a lamp…")
    prompt, negative_prompt, run_btn, cancel_btn = bar.prompt, bar.negative, bar.run, bar.cancel

    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=340):
            with gr.Row():
                width = gr.Number(value=size0, minimum=64, maximum=2048, step=16, precision=0, label="Width",
                                  elem_id="eli-width", min_width=90)
                height = gr.Number(value=size0, minimum=64, maximum=2048, step=16, precision=0, label="Height",
                                   elem_id="eli-height", min_width=90)
                resize_btn = gr.Button("Set canvas size", size="sm", elem_id="eli-resize", min_width=110)
            editor = uploads.ImageEditor(
                value={"background": canvas0["image"], "layers": [], "composite": canvas0["image"]},
                label="Paint each entity's area in its colour", type="filepath", format="png",
                sources=[], layers=False, transforms=(), height=420, elem_id="eli-editor",
                brush=gr.Brush(default_size=40, colors=list(colours), default_color=colours[0], color_mode="fixed"),
                eraser=gr.Eraser(default_size=40))
            gr.Markdown("Click an entity's colour (or pick it in the brush menu), then paint where it goes. Areas "
                        "may overlap.", elem_classes=["hint"])
            count = gr.State(START_ENTITIES)
            rows, boxes = [], []
            for k in range(max_entities):
                with gr.Row(visible=k < START_ENTITIES, elem_id=f"eli-entity-{k}", equal_height=True) as row:
                    gr.HTML(swatch_html(k, colours[k]), js_on_load=pick_colour_js(k), min_width=44, scale=0,
                            elem_id=f"eli-swatch-{k}", padding=False)
                    box = gr.Textbox(show_label=False, placeholder=f"Entity {k + 1}: what this area shows",
                                     lines=1, elem_id=f"eli-entity-{k}-prompt", scale=8, container=False)
                rows.append(row)
                boxes.append(box)
            with gr.Row():
                add_btn = gr.Button("+ Add entity", size="sm", elem_id="eli-add")
                remove_btn = gr.Button("− Remove last", size="sm", elem_id="eli-remove")
                clear_btn = gr.Button("Clear masks", size="sm", elem_id="eli-clear")
            preview = gr.Image(label="Entities as the job will use them", type="filepath", interactive=False,
                               height=260, elem_id="eli-preview", buttons=["fullscreen"])
            kept = gr.State(None)        # {"masks": [file or None per entity], "size": [w, h]}
            base = gr.State(canvas0["image"])   # the plain canvas (or the input image): the editor shows it tinted
            with gr.Accordion("Layout file: save or load masks + prompts", open=False, elem_id="eli-layout"):
                with gr.Row():
                    save_btn = gr.Button("Save layout", size="sm", elem_id="eli-save")
                    saved = gr.File(label="Layout (.zip)", interactive=False, elem_id="eli-saved")
                load = gr.File(label="Load a layout (.zip)", file_types=[".zip"], type="filepath",
                               elem_id="eli-load")
            with gr.Accordion("Inpaint into an image", open=False, elem_id="eli-inpaint"):
                inpaint = gr.Checkbox(value=False, label="Repaint only the entities' areas of an input image",
                                      elem_id="eli-inpaint-on")
                input_image = uploads.Image(label="Input image (becomes the canvas)", type="filepath",
                                            sources=["upload", "clipboard"], height=200, elem_id="eli-input-image")
            model = gr.Dropdown(choices=[(model_label(v), v["name"]) for v in info["variants"]], value=default,
                                label="Model", elem_id="eli-model", interactive=bool(names))
            gr.Markdown(info["note"], elem_classes=["hint"], elem_id="eli-model-note")
            with gr.Group():
                with gr.Row():
                    steps = gr.Slider(1, MAX_STEPS, value=8 if demo else 30, step=1, label="Steps", elem_id="eli-steps")
                    num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images", elem_id="eli-num-images")
                with gr.Row():
                    guidance = gr.Slider(0, 10, value=3.5, step=0.1, label="Guidance (embedded)",
                                         elem_id="eli-guidance")
                    cfg = gr.Slider(1, 10, value=1.0, step=0.1, label="CFG scale",
                                    info="DiffSynth-Studio's examples use 3", elem_id="eli-cfg")
                step_cache = build_step_cache("eli")
                on_negative = gr.Checkbox(value=False, label="Apply the regions on the negative prompt too",
                                          elem_id="eli-on-negative")
            with gr.Row():
                seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", elem_id="eli-seed")
                used_seed = gr.Number(value=None, precision=0, label="Seed used (last run)", interactive=False,
                                      visible=False, elem_id="eli-used-seed")
        with gr.Column(scale=6, min_width=360):
            # The image as it denoises, while a job runs (app.live_preview; "eli-preview" is the entities' preview).
            live = build_live_preview("eli-job")
            results = build_results_panel(height=420, id_prefix="eli-")
            new_images = gr.Gallery(visible=False, label="New images", elem_id="eli-new-images")
            new_results = gr.State([])

    # ------------------------------------------------------------------------------------------------ helpers
    def layout_now(value, base_path, kept_value, n, *prompts, labels=True):
        """The engine's entity masks for the page's state (strokes on the editor + kept masks), and the preview."""
        layers = [p for p in (value.get("layers") or []) if p] if isinstance(value, dict) else []
        if not base_path:
            return None
        return call_engine(engine.eligen_layout, base_path, layers[0] if layers else None, kept_value,
                           list(prompts[:n]), labels=labels, title="Cannot read the entity masks")

    def editor_value(base_path, kept_value, n=0):
        """The editor's value for a canvas: the kept masks are drawn tinted into its background (the editor shows
        no layer sent from the server), and the strokes start empty."""
        background = base_path
        if kept_value and any(kept_value.get("masks") or []):
            count = max(n, len(kept_value["masks"]))
            background = layout_now(None, base_path, kept_value, count, *([""] * count), labels=False)["preview"]
        return {"background": background, "layers": [], "composite": background}

    def refresh(value, base_path, kept_value, n, *prompts):
        made = layout_now(value, base_path, kept_value, n, *prompts)
        return made["preview"] if made else None

    watch = {"inputs": [editor, base, kept, count, *boxes], "outputs": [preview], "queue": False,
             "api_visibility": "private"}
    helper = {"queue": False, "api_visibility": "private"}
    for event in (editor.change, editor.clear):
        event(refresh, **watch)
    for box in boxes:
        box.blur(refresh, **watch)
        box.submit(refresh, **watch)

    def show_rows(n):
        return [gr.update(visible=k < n) for k in range(max_entities)]

    add_btn.click(lambda n: min(max_entities, n + 1), inputs=[count], outputs=[count], **helper).then(
        show_rows, inputs=[count], outputs=rows, **helper)
    remove_btn.click(lambda n: max(1, n - 1), inputs=[count], outputs=[count], **helper).then(
        show_rows, inputs=[count], outputs=rows, **helper).then(refresh, **watch)

    def new_canvas(value, base_path, kept_value, n, w, h, inpaint_on, image, *prompts):
        """A canvas of the new size (or the input image); the masks so far are resized onto it and kept."""
        made = layout_now(value, base_path, kept_value, max_entities, *prompts)
        canvas = call_engine(engine.eligen_canvas, w, h, image if inpaint_on else None,
                             title="Cannot make the canvas")
        masks = made["masks"] if made else []
        new_kept = {"masks": masks, "size": [canvas["width"], canvas["height"]]} if any(masks) else None
        if canvas.get("note"):
            gr.Info(canvas["note"])
        return (editor_value(canvas["image"], new_kept, n), canvas["image"], new_kept, canvas["width"],
                canvas["height"])

    size_inputs = [editor, base, kept, count, width, height, inpaint, input_image, *boxes]
    size_outputs = [editor, base, kept, width, height]
    resize_btn.click(new_canvas, inputs=size_inputs, outputs=size_outputs, **helper).then(refresh, **watch)
    inpaint.change(new_canvas, inputs=size_inputs, outputs=size_outputs, **helper).then(refresh, **watch)
    input_image.change(new_canvas, inputs=size_inputs, outputs=size_outputs, **helper).then(refresh, **watch)

    def clear(base_path):
        return editor_value(base_path, None), None

    clear_btn.click(clear, inputs=[base], outputs=[editor, kept], **helper).then(refresh, **watch)

    def save(value, base_path, kept_value, n, prompt_text, w, h, *prompts):
        made = layout_now(value, base_path, kept_value, n, *prompts)
        if not made or not any(made["masks"]):
            raise gr.Error("Nothing to save yet: paint at least one entity.", print_exception=False)
        return call_engine(engine.eligen_save_layout, made["width"], made["height"], prompt_text,
                           list(prompts[:n]), made["masks"], title="Cannot save the layout")

    save_btn.click(save, inputs=[editor, base, kept, count, prompt, width, height, *boxes], outputs=[saved],
                   **helper)

    def put_back(found, n):
        """Page updates for a layout (loaded or restored): canvas, kept masks, entity count, size, prompts, rows."""
        new_kept = {"masks": found["masks"], "size": [found["width"], found["height"]]}
        texts = [found["prompts"][k] if k < len(found["prompts"]) else "" for k in range(max_entities)]
        return [editor_value(found["canvas"], new_kept, n), found["canvas"], new_kept, n, found["width"],
                found["height"], *texts, *show_rows(n)]

    layout_outputs = [editor, base, kept, count, width, height, *boxes, *rows]

    def load_file(path):
        if not path:
            return [gr.update()] * (len(layout_outputs) + 1)
        made = call_engine(engine.eligen_load_layout, path, title="Cannot load the layout")
        gr.Info(f"Layout loaded: {len(made['prompts'])} entities, {made['width']}x{made['height']}.")
        return [*put_back(made, max(1, len(made["prompts"]))), made["prompt"]]

    load.upload(load_file, inputs=[load], outputs=[*layout_outputs, prompt], **helper).then(refresh, **watch)

    # ---------------------------------------------------------------------------------------------------- job
    def eligen_request(editor_value, variant, prompt, negative_prompt, num_inference_steps, embedded_guidance,
                       cfg_scale, seed, num_images, enable_on_negative, enable_inpaint, kept_value=None,
                       base_path=None, tea_cache_l1_thresh=0.0, entity_count=2, *entity_prompts) -> dict:
        """The engine request of the tab's controls (the run button's and "Add to queue"'s): the entity masks are
        made now, from the painted canvas."""
        base_path = base_path or (editor_value.get("background") if isinstance(editor_value, dict) else None)
        made = layout_now(editor_value, base_path, kept_value, entity_count, *entity_prompts)
        if not made:
            raise gr.Error("No canvas: set the canvas size first.", print_exception=False)
        request = {
            "variant": variant, "prompt": prompt or "", "negative_prompt": negative_prompt or "",
            "width": made["width"], "height": made["height"], "num_inference_steps": num_inference_steps,
            "embedded_guidance": embedded_guidance, "cfg_scale": cfg_scale, "seed": -1 if seed is None else seed,
            "num_images": num_images or 1, "eligen_entity_prompts": list(entity_prompts[:entity_count]),
            "eligen_entity_masks": made["masks"], "eligen_enable_on_negative": bool(enable_on_negative),
            "eligen_enable_inpaint": bool(enable_inpaint), **step_cache_request(tea_cache_l1_thresh),
        }
        if enable_inpaint:
            request["input_image"] = base_path
        return request

    @engine_job
    def generate(editor_value, variant, prompt, negative_prompt, num_inference_steps, embedded_guidance, cfg_scale,
                 seed, num_images, enable_on_negative, enable_inpaint, kept_value=None, base_path=None,
                 tea_cache_l1_thresh=0.0, live_preview=False, entity_count=2, *entity_prompts,
                 progress=gr.Progress()):
        """Generate with regional prompts (EliGen): each entity's prompt acts in its painted area.

        Args:
            editor_value: the canvas editor's value: {"background": canvas or input image file, "layers": [one
                layer painted with the entity colours]}.
            variant: the model's name (FLUX.1-dev; the demo in demo mode).
            prompt: the global prompt (the whole picture).
            negative_prompt: used only when cfg_scale > 1.
            num_inference_steps: denoising steps, 1..100.
            embedded_guidance: the distilled guidance (3.5 is typical).
            cfg_scale: 1 = off; DiffSynth-Studio's examples use 3 with a negative prompt.
            seed: -1 for a random seed, else a whole number; image k of a batch uses seed + k.
            num_images: how many images, 1..4.
            enable_on_negative: apply the regions on the negative branch of CFG too.
            enable_inpaint: repaint only the entities' areas of the canvas image (an input image).
            kept_value: masks kept by the page (a loaded layout): {"masks": [file or None per entity]}.
            base_path: the plain canvas or input image (the editor's background shows it with the kept masks).
            tea_cache_l1_thresh: the step cache (TeaCache): 0 = off; 0.2-0.6 skips more steps as it rises.
            live_preview: (the page's own State, not an API input) show the image as it denoises.
            entity_count: how many entities the page shows.
            entity_prompts: one prompt per entity, in colour order.

        Returns:
            images, info, seed: as /generate; the entity masks are saved beside each image (<name>.ent0.png, ...).
        """
        request = eligen_request(editor_value, variant, prompt, negative_prompt, num_inference_steps,
                                 embedded_guidance, cfg_scale, seed, num_images, enable_on_negative, enable_inpaint,
                                 kept_value, base_path, tea_cache_l1_thresh, entity_count, *entity_prompts)
        yield from stream_job(engine, request, progress, title="Could not generate", previews=bool(live_preview))

    start = run_btn.click(lambda wanted: (*busy(), bool(wanted)), inputs=[live.toggle],
                          outputs=[run_btn, cancel_btn, live.wanted], **helper)
    settings = [editor, model, prompt, negative_prompt, steps, guidance, cfg, seed, num_images, on_negative, inpaint,
                kept, base, step_cache]
    job = start.then(generate, inputs=[*settings, live.wanted, count, *boxes],
                     outputs=[new_images, results.info, used_seed, new_results, live.file], api_name="eligen",
                     show_progress="full", show_progress_on=[results.gallery], **ENGINE_QUEUE)

    def show_results(new, history):
        shown = add_results(new, history)
        newest = new[0] if new else None
        return (*shown, gr.update(value=newest["seed"], visible=True) if newest else gr.update(), [])

    shown_outputs = [results.gallery, results.history, results.info, results.selected, used_seed]
    job.success(show_results, inputs=[new_results, results.history], outputs=[*shown_outputs, new_results], **helper)
    # "Add to queue" (and Ctrl+Enter): the same request, run by the studio's queue; its images arrive here.
    wire_queue(ctx, TAB_ID, bar.queue, eligen_request, [*settings, count, *boxes],
               show=(lambda new, history: show_results(new, history)[:-1], [results.history], shown_outputs))
    job.then(idle, outputs=[run_btn, cancel_btn], **helper)
    job.failure(idle, outputs=[run_btn, cancel_btn], **helper)
    wire_live_preview(live, job)
    wire_cancel(cancel_btn, engine, api_name="eligen_cancel")

    targets = {"variant": model, "prompt": prompt, "negative_prompt": negative_prompt, "num_inference_steps": steps,
               "embedded_guidance": guidance, "cfg_scale": cfg, "seed": seed}

    def restore_entities(selected):
        found = call_engine(engine.eligen_restore, selected.get("path") if isinstance(selected, dict) else None,
                            title="Cannot restore")
        if not found:
            return [gr.update()] * (len(layout_outputs) + 3)
        # The inpaint mode and its input image come back too (their change events rebuild the same canvas).
        return [*put_back(found, max(1, len(found["prompts"]))), gr.update(value=found["inpaint"]),
                gr.update(value=found["input_image"]) if found["inpaint"] else gr.update(),
                gr.update(value=found["on_negative"])]

    def wire_restore_from(button, source):
        """Restore the result in ``source`` when ``button`` is clicked (this tab's gallery, or History's)."""
        wire_restore(button, source, targets, names)
        wire_step_cache_restore(button, source, step_cache)
        button.click(restore_entities, inputs=[source],
                     outputs=[*layout_outputs, inpaint, input_image, on_negative], **helper).then(refresh, **watch)

    wire_restore_from(results.restore, results.selected)
    offer_restore(ctx, TAB_ID, wire_restore_from)
    # "Send to EliGen background" (History): the image becomes the canvas, its entities' areas repainted.
    offer_input(ctx, TAB_ID, "EliGen background", input_image, also={inpaint: True})
