"""The Train tab: train a LoRA (or full weights) on your images, watch it learn, stop and resume, and find the LoRA
in the Generate tab's LoRA list when it is done.

UI only: the form goes to ``engine.training.start`` as plain values; a 1-second timer reads ``engine.training.poll``
while a run is active (loss plot, step and ETA, samples, log). The run trains in its own process; image jobs are
refused while it holds the device. No torch here.
"""
from __future__ import annotations

import pathlib

import gradio as gr

from app.common import StudioContext, call_engine
from app.send_to import offer_input
from app.train_views import (CAPTION_HEADERS, TARGET_HINTS, base_choices, base_info, base_note, caption_frame,
                             caption_notes, checkpoint_updates, failure_text, gallery_update, loss_frame,
                             model_for_lora, run_choices, runs_frame, sample_steps_for, table_rows, caches_frame)

TITLE = "Train"
TAB_ID = "train"

# Start / Stop / Resume / dataset events share one slot of their own: never behind an image job (ENGINE_QUEUE).
TRAIN_QUEUE = {"concurrency_id": "train", "concurrency_limit": 1}
POLL_SECONDS = 1.0
UPLOAD, FOLDER = "Upload images", "Folder or metadata file"
LORA, FULL, DIFF = "LoRA", "Full weights", "Differential LoRA"
KIND_OF = {LORA: "lora", FULL: "full", DIFF: "differential"}
METHODS = [("Standard", "standard"), ("Cache first (split)", "split"), ("Direct distill", "distill")]
METHOD_HINTS = {
    "standard": "",
    "split": "The dataset is encoded once (text encoders and VAE) into a cache, then the transformer trains alone "
             "from it: less memory and faster epochs; a later run on the same data and model reuses the cache.",
    "distill": "Few-step distillation: the sampler runs its few steps from each image's seed and learns to land on "
               "the image a teacher made. Needs a metadata file with image, prompt, seed (and num_inference_steps, "
               "cfg_scale) columns.",
}
CUSTOM = "custom"
CUSTOM_PLAN = "Custom"
RESUMABLE = ("stopped", "failed", "interrupted")


def build(ctx: StudioContext) -> None:
    engine = ctx.engine
    jobs = engine.training
    bases = call_engine(jobs.base_models, title="Could not list the models")
    choices = base_choices(bases)
    default = choices[0][1] if choices else None
    first = base_info(bases, default)
    demo = bool(first.get("demo"))
    # The demo model is tiny: small images and few steps keep a try-out run to seconds on a CPU.
    start_steps, start_res, start_save, start_sample = (20, 256, 10, 10) if demo else (1000, 1024, 250, 250)
    target_choices = [(label, key) for key, label in jobs.target_presets()]
    target_choices.append(("Custom module names…", CUSTOM))
    runs = call_engine(jobs.runs, title="Could not list the runs")
    presets = jobs.vram_presets()
    gpu_count = call_engine(jobs.gpu_count, title="Could not count the GPUs")

    with gr.Row(equal_height=False, elem_id="train-top"):
        # ---------------------------------------------------------------------------------------------- the form
        with gr.Column(scale=5, min_width=340, elem_id="train-form"):
            with gr.Group():
                base = gr.Dropdown(choices=choices, value=default, label="Base model", interactive=True,
                                   elem_id="train-base")
                with gr.Row(equal_height=True):
                    what = gr.Radio([LORA, FULL, DIFF], value=LORA, label="What to train", elem_id="train-what",
                                    info="A LoRA is small and quick; full training rewrites the transformer; a "
                                         "differential LoRA learns over another LoRA fused into the base.")
                    rank = gr.Slider(1, 128, value=16, step=1, label="LoRA rank", elem_id="train-rank",
                                     info="16 is usual; higher learns more detail, files grow")
                fused = gr.Dropdown(choices=call_engine(jobs.loras, title="Could not list the LoRAs"), value=None,
                                    label="LoRA fused into the base first", visible=False, elem_id="train-fused",
                                    info="The new LoRA learns only what this one does not already give.")
                targets = gr.Dropdown(choices=target_choices, value=target_choices[0][1], label="LoRA targets",
                                      elem_id="train-targets")
                custom_targets = gr.Textbox(label="Target modules", visible=False, elem_id="train-custom-targets",
                                            placeholder=TARGET_HINTS[first.get("family") or "FLUX.1"])
            base_md = gr.Markdown(base_note(bases, default), elem_classes=["hint"], elem_id="train-base-note")

            gr.Markdown("**Dataset**")
            source = gr.Radio([UPLOAD, FOLDER], value=UPLOAD, show_label=False, elem_id="train-source")
            upload = gr.File(file_count="multiple", file_types=["image", ".txt"], type="filepath", height=140,
                             label="Training images (.txt files with the same names are read as captions)",
                             elem_id="train-upload")
            with gr.Row(visible=False, equal_height=False, elem_classes=["tool-row"]) as path_row:
                path = gr.Textbox(label="Folder of images with .txt captions, or a metadata file (.csv / .json / "
                                        ".jsonl)", scale=5, elem_id="train-path")
                with gr.Column(scale=1, min_width=90, elem_classes=["tool-buttons"]):
                    load = gr.Button("Load", size="sm", elem_id="train-load")
            trigger = gr.Textbox(label="Trigger word", elem_id="train-trigger", max_lines=1,
                                 placeholder="e.g. sks (empty: none)",
                                 info="Put before every caption while training (\"sks, a dog on grass\"), so a "
                                      "prompt with it calls up what was trained: use it in the sample prompts too. "
                                      "Saved with the run; the .txt captions stay as written.")
            dataset_md = gr.Markdown("", elem_classes=["hint"], elem_id="train-dataset-note")
            captions = gr.Dataframe(value=caption_frame([]), headers=CAPTION_HEADERS, datatype=["str", "str"],
                                    interactive=True, static_columns=[0], wrap=True, max_height=320,
                                    column_widths=["30%", "70%"], label="Captions (click a caption to edit it; "
                                    "saved to the .txt files when the run starts)", elem_id="train-captions")
            with gr.Row(equal_height=True, elem_id="train-draft-row"):
                draft_btn = gr.Button("Draft captions", size="sm", scale=1, elem_id="train-draft",
                                      variant="secondary")
                redo = gr.Checkbox(value=False, label="Redo written captions too", scale=2, elem_id="train-redo",
                                   info="Qwen2.5-VL (Step1X-Edit's) writes the empty ones; yours are kept unless "
                                        "ticked")
            dataset = gr.State({"folder": None, "metadata": None})

            gr.Markdown("**Training**")
            method = gr.Radio(METHODS, value="standard", label="Method", elem_id="train-method")
            method_md = gr.Markdown("", elem_classes=["hint"], elem_id="train-method-note")
            preset = gr.Radio([CUSTOM_PLAN, *[p["key"] for p in presets]], value=CUSTOM_PLAN, label="VRAM preset",
                              elem_id="train-preset", info="Sets the rank, resolution and memory savers for your "
                                                           "card; change any of them after.")
            preset_md = gr.Markdown("", elem_classes=["hint"], elem_id="train-preset-note")
            with gr.Group():
                with gr.Row():
                    unit = gr.Radio(["steps", "epochs"], value="steps", label="Train for", elem_id="train-unit")
                    length = gr.Number(value=start_steps, precision=0, minimum=1, label="Steps / epochs",
                                       elem_id="train-length")
                    repeat = gr.Number(value=1, precision=0, minimum=1, label="Repeats per epoch",
                                       elem_id="train-repeat")
                with gr.Row():
                    lr = gr.Number(value=1e-4, label="Learning rate", elem_id="train-lr",
                                   info="1e-4 for a LoRA, 1e-5 for full training")
                    resolution = gr.Slider(64, 2048, value=start_res, step=64, label="Resolution",
                                           info="pixel budget: side × side, aspect kept", elem_id="train-resolution")
                with gr.Row():
                    save_every = gr.Number(value=start_save, precision=0, minimum=0, elem_id="train-save-every",
                                           label="Save every N steps (0 = each epoch)")
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="train-seed")
                    fixed = gr.Checkbox(value=False, label="Crop to a square", elem_id="train-fixed")
            with gr.Accordion("Samples while training", open=True, elem_id="train-samples-accordion") as samples_box:
                prompts = gr.Textbox(label="Sample prompts (one per line; empty = no samples)", lines=2,
                                     elem_id="train-prompts", placeholder="a photo of sks dog on a beach")
                with gr.Row():
                    sample_every = gr.Number(value=start_sample, precision=0, minimum=0, elem_id="train-sample-every",
                                             label="Every N steps (0 = at the end)")
                    sample_seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="train-sample-seed")
                    sample_size = gr.Number(value=min(start_res, 1024), precision=0, minimum=64, label="Size",
                                            elem_id="train-sample-size")
                    sample_steps = gr.Number(value=sample_steps_for(first), precision=0, minimum=1, label="Steps",
                                             elem_id="train-sample-steps")
            with gr.Accordion("Memory", open=False, elem_id="train-memory"):
                checkpointing = gr.Checkbox(value=not demo, label="Gradient checkpointing (less memory, ~30% slower)",
                                            elem_id="train-checkpointing")
                fp8 = gr.Checkbox(value=False, label="Store the frozen base in fp8 (LoRA only; half the memory)",
                                  elem_id="train-fp8")
                offload = gr.Checkbox(value=False, label="Keep the checkpointed activations in CPU memory (with "
                                      "gradient checkpointing; less VRAM, slower)", elem_id="train-offload")
                with gr.Row(equal_height=False, elem_classes=["tool-row"]):
                    vram = gr.Number(value=engine.vram_limit, minimum=0, label="Train within (GB of VRAM)", scale=3,
                                     elem_id="train-vram", info="Empty: the whole card. Set: the run is planned to "
                                     "fit (blocks streamed, encoders offloaded, checkpointing, fp8 where needed).")
                    with gr.Column(scale=2, min_width=120, elem_classes=["tool-buttons"]):
                        plan_btn = gr.Button("Show the plan", size="sm", elem_id="train-plan-btn")
                plan_md = gr.Markdown("", elem_id="train-plan")
                gpus = gr.Slider(1, max(2, gpu_count), value=1, step=1, visible=gpu_count > 1,
                                 label="GPUs (one process each, the dataset shared out)", elem_id="train-gpus")
            run_name = gr.Textbox(label="Run name", placeholder="from the dataset's name; a new folder every run",
                                  elem_id="train-run-name")

        # ------------------------------------------------------------------------------------------ the progress
        with gr.Column(scale=6, min_width=360, elem_id="train-progress"):
            with gr.Row():
                start_btn = gr.Button("Start training", variant="primary", size="lg", elem_id="train-start")
                stop_btn = gr.Button("Stop (saves, resumable)", variant="stop", size="lg", visible=False,
                                     elem_id="train-stop")
            # A refused start or resume is said here, once; the status, plot, samples and log keep the last run.
            message = gr.Markdown("", elem_id="train-message")
            status = gr.Markdown("No run yet.", elem_id="train-status")
            plot = gr.LinePlot(value=None, x="step", y="loss", color="series",
                               x_title="step", y_title="loss", label="Loss", elem_id="train-loss",
                               color_map={"loss": "#a5b4fc", "average (last 20)": "#3730a3"})
            # Preview mode: the newest sample large with its step, the others as thumbnails (a grid would stretch
            # one or two small samples to the column's width).
            gallery = gr.Gallery(label="Samples (newest first)", columns=6, height=320, object_fit="contain",
                                 preview=True, interactive=False, elem_id="train-gallery")
            with gr.Accordion("Checkpoints: the samples of each save, and try one in Generate", open=True,
                              elem_id="train-checkpoints-accordion"):
                ckpt_grid = gr.Image(label="Samples at each saved checkpoint (rows: oldest first; columns: the "
                                           "sample prompts)", type="pil", interactive=False, visible=False,
                                     elem_id="train-checkpoints")
                with gr.Row(equal_height=False, elem_classes=["tool-row"]):
                    ckpt_pick = gr.Dropdown(choices=[], value=None, label="Checkpoint", scale=4,
                                            elem_id="train-checkpoint-pick")
                    with gr.Column(scale=2, min_width=120, elem_classes=["tool-buttons"]):
                        try_btn = gr.Button("Try it in Generate", size="sm", elem_id="train-try")
            log = gr.Textbox(label="Log (newest first)", lines=6, max_lines=6, interactive=False, autoscroll=True,
                             elem_id="train-log", elem_classes=["recipe-text"])
            with gr.Accordion("Past runs: resume or view", open=bool(runs),
                              elem_id="train-runs-accordion") as runs_accordion:
                runs_table = gr.Dataframe(value=runs_frame(runs), interactive=False, wrap=True, max_height=240,
                                          elem_id="train-runs")
                with gr.Row(equal_height=False, elem_classes=["tool-row"]):
                    pick = gr.Dropdown(choices=run_choices(runs), value=None, label="Run", scale=4,
                                       elem_id="train-pick")
                    with gr.Column(scale=2, min_width=120, elem_classes=["tool-buttons"]):
                        resume_btn = gr.Button("Resume", size="sm", elem_id="train-resume")
                        view_btn = gr.Button("View", size="sm", elem_id="train-view")
            caches = call_engine(jobs.caches, title="Could not list the cached datasets")
            with gr.Accordion("Cached datasets (cache-first training)", open=False,
                              elem_id="train-caches-accordion"):
                caches_table = gr.Dataframe(value=caches_frame(caches), interactive=False, wrap=True,
                                            max_height=200, elem_id="train-caches")
                gr.Markdown("Each is a dataset encoded once for one model and size; runs with the same data, model "
                            "and size reuse it. Delete a folder under the models folder's train/caches/ to free "
                            "its space.", elem_classes=["hint"])
            with gr.Accordion("The same run from the command line", open=False, elem_id="train-command-accordion"):
                command = gr.Code(value="", language="shell", interactive=False, elem_id="train-command")
    timer = gr.Timer(POLL_SECONDS, active=jobs.running())
    shown = gr.State({"run": None, "samples": -1, "log": -1, "loss": None, "active": False})

    # ------------------------------------------------------------------------------------------------ events
    helper = {"queue": False, "api_visibility": "private"}

    def progress_updates(seen: dict, force: bool = False) -> list:
        """Updates of ``progress_outputs`` from ``poll()``: the plot, gallery and log only when they changed, the
        runs list when a run ends (a run that can be resumed is chosen in it)."""
        p = call_engine(jobs.poll, title="Could not read the run's progress")
        seen = dict(seen or {})
        same_run = seen.get("run") == p["run"] and not force
        new_samples = len(p["samples"]) != seen.get("samples") or not same_run
        new_log = p["log_count"] != seen.get("log") or not same_run
        loss_key = [len(p["loss"]), p["loss"][-1]["step"] if p["loss"] else None]
        new_loss = loss_key != seen.get("loss") or not same_run
        ended = seen.get("active") and not p["active"]
        ckpt_key = [[c["path"], len(c["samples"])] for c in p["checkpoints"]]
        new_ckpts = ckpt_key != seen.get("ckpts") or not same_run
        text = p["text"]
        if p.get("busy") and p["active"]:
            text += "\n\nImage jobs are refused while it trains."
        out = [
            text,
            loss_frame(p["loss"]) if new_loss else gr.skip(),
            gallery_update(p["samples"]) if new_samples else gr.skip(),
            "\n".join(p["log"][::-1][:200]) if new_log else gr.skip(),   # newest first: no scrolling needed
            gr.update(visible=not p["active"]),
            gr.update(visible=p["active"]),
            gr.Timer(active=p["active"]),
        ]
        if ended or force:
            runs_now = call_engine(jobs.runs, title="Could not list the runs")
            out.append(runs_frame(runs_now))
            if p["status"] in RESUMABLE and p["run_dir"]:   # ready to resume: the run chosen, the list open
                out += [gr.update(choices=run_choices(runs_now), value=p["run_dir"]), gr.update(open=True)]
            else:
                out += [gr.update(choices=run_choices(runs_now)), gr.skip()]
            out.append(caches_frame(call_engine(jobs.caches, title="Could not list the cached datasets")))
        else:
            out += [gr.skip(), gr.skip(), gr.skip(), gr.skip()]
        out += checkpoint_updates(p["checkpoints"]) if new_ckpts else [gr.skip()] * 2
        seen.update(run=p["run"], samples=len(p["samples"]), log=p["log_count"], active=p["active"], loss=loss_key,
                    ckpts=ckpt_key)
        out.append(seen)
        return out

    progress_outputs = [status, plot, gallery, log, start_btn, stop_btn, timer, runs_table, pick, runs_accordion,
                        caches_table, ckpt_grid, ckpt_pick, shown]

    def tick(seen):
        return progress_updates(seen)

    # The timer never takes a queue slot: it must not wait behind an image job or a starting run.
    timer.tick(tick, inputs=[shown], outputs=progress_outputs, **helper)

    # Dataset
    def on_source(choice):
        return gr.update(visible=choice == UPLOAD), gr.update(visible=choice == FOLDER)

    source.change(on_source, inputs=[source], outputs=[upload, path_row], **helper)

    def dataset_note(data: dict) -> str:
        rows = data.get("rows") or []
        where = data.get("metadata") or data.get("folder")
        lines = [f"{len(rows)} image{'s' if len(rows) != 1 else ''} in `{where}`"]
        if data.get("columns"):      # kontext_images, edit_image, the distill settings...
            lines.append(f"Other columns: {', '.join(data['columns'])}.")
        lines += [f"⚠️ {n}" for n in data.get("notes") or []]
        return "  \n".join(lines)

    def on_edit(data, table):
        """The note under the dataset follows the table: how many captions are still empty."""
        rows = table_rows(table)
        if not (data or {}).get("folder"):
            return gr.skip()
        others = [n for n in data.get("notes") or [] if "caption" not in n]   # skipped files stay noted
        return dataset_note({**data, "rows": rows, "notes": others + caption_notes(rows)})

    captions.input(on_edit, inputs=[dataset, captions], outputs=[dataset_md], **helper)

    def on_files(files, table, data):
        """Uploading (or removing one of the uploads) makes a new dataset copy of the files now in the list;
        captions already written in the table go with their images."""
        if not files:
            return caption_frame([]), {"folder": None, "metadata": None}, ""
        originals = (data or {}).get("originals") or {}
        typed = {originals.get(name, name): caption for name, caption in table_rows(table) if caption.strip()}
        made = call_engine(jobs.prepare_dataset, files, typed, title="Could not use these files")
        state = {"folder": made["folder"], "metadata": None, "notes": made["notes"], "originals": made["originals"]}
        return caption_frame(made["rows"]), state, dataset_note(made)

    upload.change(on_files, inputs=[upload, captions, dataset], outputs=[captions, dataset, dataset_md],
                  api_visibility="private", show_progress="minimal", **TRAIN_QUEUE)
    # "Send to Train dataset" (History): the image joins the uploaded ones (a new dataset copy is made as for uploads).
    offer_input(ctx, TAB_ID, "Train dataset", upload, to_value=lambda path, files: [*(files or []), path],
                also={source: UPLOAD})

    def on_load(text):
        data = call_engine(jobs.read_dataset, text, title="Could not read the dataset")
        return (caption_frame(data["rows"]), {"folder": data["folder"], "metadata": data["metadata"],
                                              "notes": data["notes"]}, dataset_note(data))

    load.click(on_load, inputs=[path], outputs=[captions, dataset, dataset_md], api_visibility="private",
               **TRAIN_QUEUE)
    path.submit(on_load, inputs=[path], outputs=[captions, dataset, dataset_md], api_visibility="private",
                **TRAIN_QUEUE)

    def on_draft(data, table, overwrite):
        """Captions drafted into the table (the note says how many, or why not: never an error badge)."""
        data = data or {}
        try:
            made = call_engine(jobs.draft_captions, data.get("folder"), table_rows(table), overwrite,
                               data.get("metadata"), title="Could not draft captions")
        except gr.Error as exc:
            return gr.skip(), failure_text(exc, "draft captions")
        others = [n for n in data.get("notes") or [] if "caption" not in n]
        note = dataset_note({**data, "rows": made["rows"], "notes": others + caption_notes(made["rows"])})
        return caption_frame(made["rows"]), f"{made['note']}  \n{note}"

    draft_btn.click(on_draft, inputs=[dataset, captions, redo], outputs=[captions, dataset_md],
                    api_visibility="private", show_progress="minimal", **TRAIN_QUEUE)

    # What to train
    def on_what(choice, target_key):
        lora = choice != FULL
        return (gr.update(visible=lora), gr.update(visible=lora), gr.update(visible=lora and target_key == CUSTOM),
                gr.update(value=1e-4 if lora else 1e-5), gr.update(interactive=lora, value=False),
                gr.update(visible=choice == DIFF))

    what.input(on_what, inputs=[what, targets], outputs=[rank, targets, custom_targets, lr, fp8, fused], **helper)
    # Cache-first runs train without the text encoders: no samples while they train (try a checkpoint instead).
    method.change(lambda m: (METHOD_HINTS.get(m, ""), gr.update(visible=m != "split")), inputs=[method],
                  outputs=[method_md, samples_box], **helper)

    def on_preset(key, what_value):
        """A VRAM preset sets its plan into the form's controls (each stays editable) and says what it set."""
        if key == CUSTOM_PLAN:
            return [gr.skip()] * 6 + [""]
        kind = "full" if what_value == FULL else "lora"
        chosen = next(p for p in jobs.vram_presets(kind) if p["key"] == key)
        v = chosen["settings"]
        return [v["lora_rank"], v["resolution"], v["gradient_checkpointing"], v["gradient_checkpointing_offload"],
                v["fp8_base"], v["vram_limit"], chosen["text"]]

    preset.input(on_preset, inputs=[preset, what],
                 outputs=[rank, resolution, checkpointing, offload, fp8, vram, preset_md], **helper)
    targets.change(lambda t: gr.update(visible=t == CUSTOM), inputs=[targets], outputs=[custom_targets], **helper)
    def on_base(name):
        """The note, the sample steps (klein: 4) and the custom targets' hint follow the model's family."""
        info = base_info(bases, name)
        return (base_note(bases, name), sample_steps_for(info) if info else gr.skip(),
                gr.update(placeholder=TARGET_HINTS[info.get("family") or "FLUX.1"]))

    base.change(on_base, inputs=[base], outputs=[base_md, sample_steps, custom_targets], **helper)

    # Start / stop / resume
    form_inputs = [base, what, rank, targets, custom_targets, dataset, captions, unit, length, repeat, lr, resolution,
                   fixed, save_every, seed, prompts, sample_every, sample_seed, sample_size, sample_steps,
                   checkpointing, offload, fp8, run_name, trigger, fused, method, vram, gpus]

    def form_of(base_name, what_value, rank_value, target_key, custom, data, table, unit_value, length_value,
                repeat_value, lr_value, res_value, fixed_value, save_value, seed_value, prompt_text, every_value,
                sample_seed_value, size_value, steps_value, checkpoint_value, offload_value, fp8_value, name_value,
                trigger_value, fused_value=None, method_value="standard", vram_value=None, gpus_value=1) -> dict:
        """The form's plain values, in the keys ``engine.training.start`` takes."""
        data = data or {}
        return {
            "base_model": base_name, "train": KIND_OF.get(what_value, "lora"), "lora_rank": rank_value,
            "targets": custom if target_key == CUSTOM else target_key, "dataset": data.get("folder"),
            "metadata": data.get("metadata"), "captions": table_rows(table), "repeat": repeat_value,
            "steps" if unit_value == "steps" else "epochs": length_value, "learning_rate": lr_value,
            "resolution": res_value, "fixed_size": fixed_value, "save_every": save_value, "seed": seed_value,
            "sample_prompts": prompt_text, "sample_every": every_value, "sample_seed": sample_seed_value,
            "sample_size": size_value, "sample_steps": steps_value, "gradient_checkpointing": checkpoint_value,
            "gradient_checkpointing_offload": offload_value,
            "fp8_base": fp8_value, "run_name": name_value, "trigger_word": trigger_value,
            "preset_lora": fused_value, "method": method_value or "standard", "vram_limit": vram_value,
            "gpus": gpus_value or 1,
        }

    def start(*values):
        *fields, seen = values
        try:
            started = call_engine(jobs.start, form_of(*fields), title="Could not start training")
        except gr.Error as exc:      # a message of its own, not an error badge over every output
            return [*[gr.skip()] * (len(progress_outputs) + 1), failure_text(exc)]
        for note in started["notes"]:
            gr.Info(note)
        return [*progress_updates(seen, force=True), started["command"], ""]

    def show_plan(*fields):
        """The run's memory plan under the Memory settings (or why there is none), before it starts."""
        try:
            return call_engine(jobs.plan, form_of(*fields), title="No plan")["text"]
        except gr.Error as exc:
            return failure_text(exc, "plan the run")

    plan_btn.click(show_plan, inputs=form_inputs, outputs=[plan_md], api_visibility="private",
                   show_progress="minimal", **TRAIN_QUEUE)
    vram.submit(show_plan, inputs=form_inputs, outputs=[plan_md], api_visibility="private",
                show_progress="minimal", **TRAIN_QUEUE)

    start_btn.click(start, inputs=[*form_inputs, shown], outputs=[*progress_outputs, command, message], api_name="train_start",
                    show_progress="minimal", **TRAIN_QUEUE)

    def stop():
        gr.Info(call_engine(jobs.stop, title="Could not stop"))

    stop_btn.click(stop, api_name="train_stop", **TRAIN_QUEUE)

    def resume(run_dir, seen):
        try:
            done = call_engine(jobs.resume, run_dir, title="Could not resume")
        except gr.Error as exc:
            return [*[gr.skip()] * len(progress_outputs), failure_text(exc, "resume the run")]
        gr.Info(f"Resuming '{done['name']}' from step {done['step']} of {done['total']}.")
        return [*progress_updates(seen, force=True), ""]

    resume_btn.click(resume, inputs=[pick, shown], outputs=[*progress_outputs, message], api_name="train_resume",
                     show_progress="minimal", **TRAIN_QUEUE)

    def view(run_dir, seen):
        if not run_dir:
            return [*[gr.skip()] * len(progress_outputs), "⚠️ Choose a run to view in the list above."]
        try:
            call_engine(jobs.show, run_dir, title="Could not show the run")
        except gr.Error as exc:
            return [*[gr.skip()] * len(progress_outputs), failure_text(exc, "show the run")]
        return [*progress_updates(seen, force=True), ""]

    view_btn.click(view, inputs=[pick, shown], outputs=[*progress_outputs, message], api_visibility="private",
                   show_progress="minimal", **TRAIN_QUEUE)

    # Checkpoints: "try" puts the chosen one in the LoRA list, ticks it in Generate's LoRA picker (registered there in
    # ctx.shared: no tab imports another) at weight 1, and opens Generate.
    open_generate = ctx.tabs is not None and "generate" in ctx.tab_ids
    gen_loras = ctx.shared.get("lora_picker:generate") if open_generate else None
    tried = gr.State(None)      # {"name": its name in the LoRA list, "drop": the run's other saves in that list}

    def try_checkpoint(path):
        try:
            got = call_engine(jobs.try_checkpoint, path, title="Could not use this checkpoint")
        except gr.Error as exc:
            return [failure_text(exc, "use this checkpoint"), None] + ([gr.skip()] if open_generate else [])
        name = got["lora_name"].removesuffix(".safetensors")
        if gen_loras is None:
            gr.Info(f"{name} is in the LoRA list: choose it under LoRAs (↻ Refresh if it is not there).")
            return [f"✓ {name} is in the LoRA list.", None] + ([gr.Tabs(selected="generate")] if open_generate else [])
        # Two saves of one run would stack: the run's other checkpoints are unticked.
        folder, run = got["lora_name"][: -len(pathlib.Path(got["path"]).name)], pathlib.Path(path).parent
        drop = [f"{folder}{run.name}.safetensors", *(f"{folder}{run.name}-{c.stem}.safetensors"
                                                     for c in run.glob("*.safetensors"))]
        gr.Info(f"{name} is chosen in Generate's LoRAs at weight 1.")
        return [f"✓ {name} is chosen in the Generate tab's LoRAs (weight 1).",
                {"name": got["lora_name"], "drop": drop, "family": got.get("family")}, gr.Tabs(selected="generate")]

    tried_event = try_btn.click(try_checkpoint, inputs=[ckpt_pick],
                                outputs=[message, tried] + ([ctx.tabs] if open_generate else []),
                                api_visibility="private", show_progress="minimal", **TRAIN_QUEUE)
    if gen_loras is not None:
        def tick_in_generate(value, *picked):
            if not value:
                return [gr.skip() for _ in gen_loras.outputs]
            return gen_loras.pick_updates(value["name"], *picked, weight=1.0, drop=value["drop"])

        gen_model = ctx.shared.get("model:generate")
        if gen_model is not None:     # a LoRA of the other family than Generate's model: its family's model first
            tried_event = tried_event.success(lambda value, current, chosen: model_for_lora(value, current, chosen,
                                                                                            gen_model[1]),
                                              inputs=[tried, gen_model[0], base],
                                              outputs=[gen_model[0], *ctx.shared["model defaults:generate"]],
                                              **helper)
        tried_event.then(tick_in_generate, inputs=[tried, *gen_loras.inputs], outputs=gen_loras.outputs, **helper)

    # Opening the tab: the models and runs as they are now, and the timer on again if a run is going on (a page
    # reloaded while it trains).
    if ctx.tab is not None:
        def on_open(seen):
            fresh = call_engine(jobs.base_models, title="Could not list the models")
            bases[:] = fresh
            return [*progress_updates(seen, force=True), gr.update(choices=base_choices(fresh)),
                    gr.update(choices=call_engine(jobs.loras, title="Could not list the LoRAs"))]

        ctx.tab.select(on_open, inputs=[shown], outputs=[*progress_outputs, base, fused], **helper)
