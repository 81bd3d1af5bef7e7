"""Controls every image tab shares: the prompt bar (prompt, negative prompt, run and cancel buttons), the hint
under a CFG slider, and a model dropdown's choices."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import gradio as gr


@dataclasses.dataclass
class PromptBar:
    prompt: Any
    negative: Any
    run: Any
    cancel: Any
    queue: Any       # "Add to queue" (app.queue_panel.wire_queue); Ctrl+Enter in the prompt presses it


def build_prompt_bar(prefix: str, label: str = "Prompt", placeholder: str = "", button: str = "Generate",
                     lines: int = 2, max_lines: int = 8, negative_max_lines: int = 4,
                     interactive: bool = True) -> PromptBar:
    """Every image tab's top row: the prompt and negative prompt, and the run / cancel buttons beside them.
    Element ids: #<prefix>-prompt, -negative, -generate, -cancel, -queue, -limits (and the row #<prefix>-top,
    #<prefix>-actions)."""
    with gr.Row(equal_height=False, elem_id=f"{prefix}-top"):
        with gr.Column(scale=6, min_width=320):
            prompt = gr.Textbox(value="", label=label, lines=lines, max_lines=max_lines, elem_id=f"{prefix}-prompt",
                                placeholder=placeholder)
            negative = gr.Textbox(value="", label="Negative prompt", lines=1, max_lines=negative_max_lines,
                                  elem_id=f"{prefix}-negative", placeholder="Used only when CFG scale > 1")
        with gr.Column(scale=1, min_width=170, elem_id=f"{prefix}-actions"):
            run = gr.Button(button, variant="primary", size="lg", elem_id=f"{prefix}-generate",
                            interactive=interactive)
            cancel = gr.Button("Cancel", variant="stop", size="lg", visible=False, elem_id=f"{prefix}-cancel")
            queue = gr.Button("Add to queue", size="sm", elem_id=f"{prefix}-queue", interactive=interactive)
            # A shared studio's limits ("This studio allows up to 1 MP, ..."): filled by app.visitors.apply_limits.
            gr.Markdown("", visible=False, elem_id=f"{prefix}-limits", elem_classes=["hint", "studio-limits"])
    return PromptBar(prompt, negative, run, cancel, queue)


CFG_HINT = "CFG scale above 1 turns on true CFG with the negative prompt (each step runs twice: 2× slower)."


def cfg_line(cfg_scale: Any, negative_prompt: str) -> str:
    """The hint under a CFG slider: whether the negative prompt is used, and what it costs."""
    try:
        cfg = float(cfg_scale)
    except (TypeError, ValueError):
        return ""
    if cfg > 1:
        return "True CFG is on: the negative prompt is used, and each step runs twice (about 2× slower)."
    if (negative_prompt or "").strip():
        return "The negative prompt is ignored while CFG scale is 1; raise it above 1 to use it."
    return CFG_HINT


def model_choices(engine: Any, keep: Callable[[dict], Any]) -> tuple[list[tuple[str, str]], dict[str, dict]]:
    """A model dropdown's choices (label, name) among the engine's variants that ``keep`` accepts and that are
    downloaded or downloadable: downloaded first, demos last; labels say which is which. Also {name: variant}."""
    variants = [v for v in engine.variants() if keep(v) and (v.get("available") or v.get("downloadable"))]
    variants.sort(key=lambda v: (not v.get("available"), bool(v.get("demo"))))
    return [(variant_label(v), v["name"]) for v in variants], {v["name"]: v for v in variants}


NOT_DOWNLOADED = "not downloaded (fetched on first use)"    # one wording for every tab's model lists


def variant_label(v: dict) -> str:
    """A model's label in a dropdown: the demo's own label, else its name and whether its files are here."""
    if v.get("demo"):
        return v.get("label") or f"{v['name']} (random-weight demo)"
    return file_label(v["name"], bool(v.get("available")))


def file_label(name: str, available: bool) -> str:
    """A downloadable item's label: "<name> · downloaded" or "<name> · not downloaded (fetched on first use)"."""
    return f"{name} · downloaded" if available else f"{name} · {NOT_DOWNLOADED}"


# ------------------------------------------------------------------------------------------- range fields
# Gradio refuses a number outside a slider's range before any handler runs ("Value -7 is less than minimum value
# -1", shown as a bare "Error" badge on the outputs), and the page itself puts a typed slider value back in range
# when the box loses focus, so 17 silently becomes 64. These fields let the typed value reach a handler that says,
# next to the field, what will be used; the engine still refuses a value it cannot use (an API call).
class FreeSlider(gr.Slider):
    """``gr.Slider`` whose out-of-range value reaches the handlers (see ``clamp_note``) instead of a bare refusal."""

    is_template = True      # drawn as gr.Slider

    def preprocess(self, payload):
        return None if payload is None else gr.Number.round_to_precision(payload, self.precision)


class FreeNumber(gr.Number):
    """``gr.Number`` whose out-of-range value reaches the handlers (see ``seed_note``) instead of a bare refusal."""

    is_template = True      # drawn as gr.Number

    def preprocess(self, payload):
        return None if payload is None else gr.Number.round_to_precision(payload, self.precision)


# Field checks run in order, one at a time, so the state they keep (the typed value) is seen by the next one.
FIELD_CHECK = {"queue": True, "concurrency_id": "field-checks", "concurrency_limit": 1, "show_progress": "hidden",
               "trigger_mode": "multiple", "api_visibility": "private"}


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def clamp_note(name: str, value: Any, low: float, high: float, typed: Any = None,
               unit: str = "") -> tuple[Any, str, Any]:
    """What a range field will use: (value used, note, typed value still explained).

    A value outside [low, high] is used as the nearest bound, and the note says so. The page then puts the box at
    that bound (when it loses focus): ``typed``, the value explained before, keeps the note while the box shows the
    bound it became; any other value drops it. The note is '' when there is nothing to say.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None, f"⚠️ {name}: type a number from {_number_text(low)} to {_number_text(high)}.", None
    used = min(max(number, low), high)
    if used != number:
        typed = number
    elif typed is None or min(max(float(typed), low), high) != number:
        typed = None
    if typed is None:
        return used, "", None
    bound = (f"below the minimum, {_number_text(low)}{unit}" if typed < low
             else f"above the maximum, {_number_text(high)}{unit}")
    return used, f"⚠️ {name} {_number_text(typed)}{unit} is {bound}: {_number_text(used)}{unit} will be used.", typed


def steps_note(steps: Any, typed: Any, low: int = 1, high: int = 100) -> tuple[str, Any]:
    """The note under a Steps slider, and the typed value it still explains (see ``clamp_note``)."""
    _, note, typed = clamp_note("Steps", steps, low, high, typed)
    return note, typed


SEED_LIMIT = 2 ** 63


def seed_note(seed: Any) -> str:
    """The note under a Seed field: '' for -1 (random) or a whole number from 0 up, else what is wrong and what to do
    (a seed box does not correct itself: Generate refuses such a seed as it is)."""
    if seed is None:
        return "Seed: the box is empty, so a random seed will be used (as with -1)."
    try:
        value = float(seed)
    except (TypeError, ValueError):
        return "⚠️ Seed: type a whole number, -1 for a random one or 0 and up."
    if value == -1 or (value.is_integer() and 0 <= value < SEED_LIMIT):
        return ""
    return f"⚠️ Seed {_number_text(value)} cannot be used: type -1 for a random seed, or a whole number from 0 up."


def wire_steps_and_seed_notes(steps: Any, steps_md: Any, seed: Any, seed_md: Any, max_steps: int = 100) -> None:
    """Notes beside a tab's Steps slider and Seed field (FreeSlider / FreeNumber): what a typed value out of range
    becomes, and why a seed cannot be used."""
    steps_typed = gr.State(None)
    steps.change(lambda value, typed: steps_note(value, typed, 1, max_steps), inputs=[steps, steps_typed],
                 outputs=[steps_md, steps_typed], **FIELD_CHECK)
    seed.change(seed_note, inputs=[seed], outputs=[seed_md], **FIELD_CHECK)


# ------------------------------------------------------------------------------------------- the step cache
STEP_CACHE_INFO = ("TeaCache: 0 = off. 0.2-0.4 reuses about half the steps' transformer work (faster; the image "
                   "changes a little), higher skips more. FLUX.1 models.")


def build_step_cache(prefix: str, info: Any = None) -> gr.Slider:
    """Every image tab's step cache (the request's ``tea_cache_l1_thresh``, ``studio.features.tea_cache``):
    #<prefix>-tea-cache, shown for the models that take it (``info``: the first model's)."""
    return gr.Slider(0, 1, value=0, step=0.05, label="Step cache (TeaCache threshold)", info=STEP_CACHE_INFO,
                     visible=takes_step_cache(info), elem_id=f"{prefix}-tea-cache")


def takes_step_cache(info: Any) -> bool:
    """Whether a model (its catalogue entry) takes the step cache: its family's features name it (None: all)."""
    features = info.get("features") if isinstance(info, dict) else None
    return features is None or "tea_cache" in features


def wire_step_cache_option(model: Any, infos: dict, slider: gr.Slider) -> None:
    """The slider shows for the models that take the step cache; another model hides it and turns it off."""
    def shown(name):
        takes = takes_step_cache(infos.get(name))
        return gr.update(visible=True) if takes else gr.update(visible=False, value=0)
    model.change(shown, inputs=[model], outputs=[slider], queue=False, api_visibility="private")


def step_cache_request(value: Any) -> dict:
    """The request key for the slider's value: none when it is off (0)."""
    try:
        number = float(value or 0)
    except (TypeError, ValueError):
        return {"tea_cache_l1_thresh": value}       # the studio names what is wrong with it
    return {"tea_cache_l1_thresh": number} if number > 0 else {}


def wire_step_cache_restore(button: Any, source: Any, slider: gr.Slider) -> None:
    """Restoring a result sets the step cache to its recipe's (off for a recipe without one)."""
    def restore(value):
        recipe = value.get("recipe") if isinstance(value, dict) and "recipe" in value else value
        if not isinstance(recipe, dict):
            return gr.update()
        try:
            return min(max(float(recipe.get("tea_cache_l1_thresh") or 0), 0.0), 1.0)
        except (TypeError, ValueError):
            return 0
    button.click(restore, inputs=[source], outputs=[slider], queue=False, show_progress="hidden",
                 api_visibility="private")


# --------------------------------------------------------------------------------------- the prompt upsampler
UPSAMPLE_INFO = ("BFL's prompt upsampler (FLUX 3): the prompt -- or the instruction with the reference images -- "
                 "becomes the detailed caption the model was trained on; the image info shows it. Its model "
                 "(black-forest-labs/flux-3-image-klein-pup, about 19 GB) is downloaded on first use.")


def build_upsample_option(prefix: str, visible: bool = False) -> gr.Checkbox:
    """The FLUX 3 models' "Upsample the prompt" (the request's ``upsample_prompt``): #<prefix>-upsample."""
    return gr.Checkbox(value=False, label="Upsample the prompt", info=UPSAMPLE_INFO, visible=visible,
                       elem_id=f"{prefix}-upsample")


def is_flux3(info: Any) -> bool:
    return isinstance(info, dict) and info.get("family") == "FLUX 3"


def upsample_request(value: Any) -> dict:
    """The request key, when the box is ticked (it is unticked and hidden while the model is not a FLUX 3 one)."""
    return {"upsample_prompt": True} if value else {}


def wire_upsample_option(model: Any, infos: dict, box: gr.Checkbox) -> None:
    """The box shows for FLUX 3 models only (another model unticks it)."""
    def shown(name):
        flux3 = is_flux3(infos.get(name))
        return gr.update(visible=flux3) if flux3 else gr.update(visible=False, value=False)
    model.change(shown, inputs=[model], outputs=[box], queue=False, api_visibility="private")


def wire_upsample_restore(button: Any, source: Any, box: gr.Checkbox) -> None:
    """Restoring a result sets the box as its recipe had it."""
    if button is not None:
        def restore(value):
            recipe = value.get("recipe") if isinstance(value, dict) and "recipe" in value else value
            return bool(recipe.get("upsample_prompt")) if isinstance(recipe, dict) else gr.update()
        button.click(restore, inputs=[source], outputs=[box], queue=False, show_progress="hidden",
                     api_visibility="private")
