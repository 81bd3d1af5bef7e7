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


def build_prompt_bar(prefix: str, label: str = "Prompt", placeholder: str = "", button: str = "Generate",
                     lines: int = 2, max_lines: int = 8, negative_max_lines: int = 4,
                     interactive: bool = True) -> PromptBar:
    """Every image tab's top row: the prompt and negative prompt, and the run / cancel buttons beside them.
    Element ids: #<prefix>-prompt, -negative, -generate, -cancel (and the row #<prefix>-top, #<prefix>-actions)."""
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
    return PromptBar(prompt, negative, run, cancel)


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
    choices = []
    for v in variants:
        if v.get("demo"):
            label = v.get("label") or f"{v['name']} (random-weight demo)"
        elif v.get("available"):
            label = f"{v['name']} · downloaded"
        else:
            label = f"{v['name']} · not downloaded (fetched on first use)"
        choices.append((label, v["name"]))
    return choices, {v["name"]: v for v in variants}
