"""The Models & memory tab: where each model component lives (GPU, RAM, fp8, streamed), the predicted peaks, the
planner's notes, and the VRAM limit, changed here without restarting.

UI only: reads ``engine.memory_plan()`` and calls ``engine.set_vram_limit``. The model manager (every model the studio
knows: download, verify, delete) is ``studio.model_manager``'s, drawn by ``app.model_manager_panel``. No torch here.
"""
from __future__ import annotations

import html
from typing import Any

import gradio as gr

from app.common import ENGINE_QUEUE, StudioContext, call_engine
from app.model_manager_panel import build_model_manager

TITLE = "Models & memory"
TAB_ID = "settings"

MAX_LIMIT_GB = 1024  # a generous upper bound for the number box; the engine checks what the device really has

# The planner's strategies, in plain words. "{where}" is the compute device's name ("GPU", "CPU", ...).
STRATEGY_WORDS = {
    "resident": "on {where}",
    "offload": "in RAM, moved to {where} when used",
    "fp8": "on {where}, stored in fp8",
    "fp8+offload": "in RAM, stored in fp8, moved to {where} when used",
    "stream": "in RAM, streamed to {where} block by block",
}
STRATEGY_HINTS = {
    "resident": "Loaded once and kept on the device: fastest.",
    "offload": "Kept in system memory and moved to the device only for its stage of the job.",
    "fp8": "Weights stored in 8-bit float (half the memory) and computed in the compute type, layer by layer.",
    "fp8+offload": "Stored in 8-bit float in system memory and moved in for its stage.",
    "stream": "Too big for the limit: moved in one block at a time, the next block copied while this one computes.",
}
DTYPE_WORDS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float8_e4m3fn": "fp8 (e4m3)",
               "float8_e5m2": "fp8 (e5m2)"}


def device_word(device: Any) -> str:
    """"cuda:0" -> "GPU", "cpu" -> "CPU", "mps" -> "GPU (Apple)"; anything else as it is."""
    text = str(device or "").lower()
    if text.startswith("cuda") or text.startswith("rocm") or text.startswith("xpu"):
        return "GPU"
    if text.startswith("mps"):
        return "GPU (Apple)"
    if text.startswith("cpu") or not text:
        return "CPU"
    return text


def strategy_text(strategy: Any, device: Any) -> str:
    where = device_word(device)
    key = str(strategy or "")
    if where == "CPU":  # everything lives in system memory; the engine still applies the budget as if it were VRAM
        return {"resident": "in RAM", "offload": "in RAM, offloaded (a no-op on the CPU)",
                "fp8": "in RAM, stored in fp8", "fp8+offload": "in RAM, stored in fp8, offloaded",
                "stream": "in RAM, run block by block"}.get(key, key or "?")
    return STRATEGY_WORDS.get(key, key or "?").format(where=where)


def dtype_text(dtype: Any) -> str:
    text = str(dtype or "").replace("torch.", "")
    return DTYPE_WORDS.get(text, text or "-")


def gb_text(value: Any) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-"
    if value == 0:
        return "–"
    if value < 0.1:
        return f"{value * 1024:.0f} MB"
    return f"{value:.2f} GB" if value < 10 else f"{value:.1f} GB"


def limit_text(limit: Any) -> str:
    if limit in (None, 0, 0.0):
        return "no limit"
    return f"{float(limit):g} GB"


def plan_summary_html(plan: dict) -> str:
    device = plan.get("device") or "?"
    fits = plan.get("fits")
    cards = [
        ("Device", f"{html.escape(str(device))} ({html.escape(device_word(device))})", ""),
        ("VRAM limit", html.escape(limit_text(plan.get("vram_limit_gb"))), ""),
        ("Predicted peak VRAM", html.escape(gb_text(plan.get("predicted_peak_vram_gb"))),
         " mem-over" if fits is False else ""),
        ("Predicted peak RAM", html.escape(gb_text(plan.get("predicted_peak_ram_gb"))), ""),
    ]
    if plan.get("predicted_seconds"):     # the planner's time model (engine.memory.cost): seconds per image
        steps = plan.get("steps")
        cards.append(("Predicted time", html.escape(f"{float(plan['predicted_seconds']):.1f} s/image"
                                                    + (f" ({steps} steps)" if steps else "")), ""))
    items = "".join(f"<div class='mem-card{extra}'><div class='mem-card-label'>{label}</div>"
                    f"<div class='mem-card-value'>{value}</div></div>" for label, value, extra in cards)
    facts = []
    if plan.get("variant"):
        state = "loaded" if plan.get("loaded") else "not loaded yet"
        facts.append(f"Model: {html.escape(str(plan['variant']))} ({state})")
    if plan.get("resolution"):
        facts.append(f"room for images up to {html.escape(str(plan['resolution']).replace('x', '×'))}")
    if plan.get("ram_limit_gb"):
        facts.append(f"RAM budget {html.escape(gb_text(plan['ram_limit_gb']))}")
    if fits is False:
        facts.append("<strong class='mem-over-text'>the limit is too tight for this plan: see the notes</strong>")
    line = f"<div class='mem-facts'>{' · '.join(facts)}</div>" if facts else ""
    return f"<div class='mem-summary'>{items}</div>{line}"


def plan_table_html(plan: dict) -> str:
    """What lives where, one row per component, and the totals."""
    device = plan.get("device")
    rows = []
    total_vram = total_ram = 0.0
    for comp in plan.get("components") or []:
        strategy = str(comp.get("strategy") or "")
        label = comp.get("label") or comp.get("role") or "?"
        role = comp.get("role") or ""
        hint = STRATEGY_HINTS.get(strategy, "")
        for key, total in (("vram_gb", "vram"), ("ram_gb", "ram")):
            try:
                value = float(comp.get(key) or 0)
            except (TypeError, ValueError):
                value = 0.0
            if total == "vram":
                total_vram += value
            else:
                total_ram += value
        rows.append(
            f"<tr data-role='{html.escape(str(role), quote=True)}' data-strategy='{html.escape(strategy, quote=True)}'>"
            f"<td class='mem-comp'>{html.escape(str(label))}"
            + (f"<span class='mem-role'>{html.escape(str(role))}</span>" if role and role != label else "")
            + "</td>"
            f"<td class='mem-where' title='{html.escape(hint, quote=True)}'>"
            f"<span class='mem-badge mem-{html.escape(strategy.replace('+', '-'), quote=True)}'>"
            f"{html.escape(strategy_text(strategy, device))}</span>"
            + (f" <span class='mem-role'>{int(comp['resident_blocks'])} of {int(comp.get('total_blocks') or 0)} "
               f"blocks resident</span>" if comp.get("resident_blocks") else "")
            + "</td>"
            f"<td>{html.escape(dtype_text(comp.get('storage_dtype')))}</td>"
            f"<td>{html.escape(dtype_text(comp.get('compute_dtype')))}</td>"
            f"<td class='num'>{html.escape(gb_text(comp.get('vram_gb')))}</td>"
            f"<td class='num'>{html.escape(gb_text(comp.get('ram_gb')))}</td>"
            "</tr>"
        )
    if not rows:
        body = "<tr><td colspan='6' class='mem-empty'>No components planned yet.</td></tr>"
        foot = ""
    else:
        body = "".join(rows)
        foot = (f"<tfoot><tr><td colspan='4'>Weights in total</td><td class='num'>{gb_text(total_vram)}</td>"
                f"<td class='num'>{gb_text(total_ram)}</td></tr></tfoot>")
    return (
        "<table class='mem-table'><thead><tr><th>Component</th><th>Where it lives</th><th>Stored as</th>"
        "<th>Computes in</th><th class='num'>VRAM</th><th class='num'>RAM</th></tr></thead>"
        f"<tbody>{body}</tbody>{foot}</table>"
    )


def plan_notes_md(plan: dict) -> str:
    notes = [str(n) for n in plan.get("notes") or [] if str(n).strip()]
    if not notes:
        return ""
    return "**Planner notes**\n\n" + "\n".join(f"- {n}" for n in notes)


def limit_value(plan: dict) -> float:
    """The number box's value: the limit in GB, 0 for no limit."""
    try:
        return float(plan.get("vram_limit_gb") or 0)
    except (TypeError, ValueError):
        return 0.0


def get_plan(engine: Any) -> dict:
    if not hasattr(engine, "memory_plan"):
        return {"device": getattr(engine, "device", None) or "?", "vram_limit_gb": getattr(engine, "vram_limit", None),
                "components": [], "notes": ["This engine does not report a memory plan."]}
    return call_engine(engine.memory_plan, title="Could not read the memory plan")


SHARED_SETTINGS_NOTE = ("This studio is shared: the VRAM limit and the speed settings apply to everyone's jobs, so "
                        "they are set by whoever starts it (launch.py --vram-limit), not from this page.")


def is_shared(engine: Any) -> bool:
    return bool(getattr(getattr(engine, "sharing", None), "shared", False))


def build(ctx: StudioContext) -> None:
    engine = ctx.engine
    # No plan while the page is built: planning imports torch and reads the model files' headers (~3 s of start-up);
    # opening the tab (ctx.tab.select below) shows it.
    first = {"device": getattr(engine, "device", None) or "", "vram_limit_gb": getattr(engine, "vram_limit", None),
             "components": [], "notes": []}

    gr.Markdown("### Models & memory\nWhere each part of the model lives during a job, and how much memory the "
                "engine expects to use. Lower the VRAM limit to make room on a small card or beside other programs; "
                "the engine re-plans at once (no restart) and the next job uses the new plan.",
                elem_classes=["hint", "mem-intro"])
    summary = gr.HTML(plan_summary_html(first), elem_id="mem-summary", js_on_load=None)
    owner = not is_shared(engine)      # a shared studio's visitors do not change what applies to everyone's jobs
    if not owner:
        gr.Markdown(SHARED_SETTINGS_NOTE, elem_classes=["hint"], elem_id="mem-shared-note")
    with gr.Row(equal_height=False, elem_classes=["tool-row"], elem_id="mem-limit-row"):
        limit = gr.Number(value=limit_value(first), minimum=0, maximum=MAX_LIMIT_GB, step=0.5,
                          label="VRAM limit in GB (0 or empty = no limit)", scale=2, min_width=240,
                          interactive=owner, elem_id="mem-limit")
        apply_btn = gr.Button("Apply limit", variant="primary", size="md", scale=0, min_width=130,
                              interactive=owner, elem_id="mem-apply")
        clear_btn = gr.Button("No limit", size="md", scale=0, min_width=110, interactive=owner,
                              elem_id="mem-no-limit")
        refresh_btn = gr.Button("↻ Refresh", size="md", scale=0, min_width=120, elem_id="mem-refresh")
        gr.HTML("", scale=3, min_width=0)  # keeps the controls compact on wide screens
    table = gr.HTML(plan_table_html(first), elem_id="mem-table", js_on_load=None)
    notes = gr.Markdown(plan_notes_md(first), elem_id="mem-notes", elem_classes=["mem-notes"])
    plan_json = gr.JSON(value=None, visible=False, elem_id="mem-plan-json")

    def show(plan: dict):
        return plan_summary_html(plan), plan_table_html(plan), plan_notes_md(plan), limit_value(plan)

    def memory_plan() -> dict:
        """The engine's memory plan: device, VRAM limit, each component's placement and the predicted peaks.

        Returns:
            plan: {"device", "vram_limit_gb" (None = no limit), "components": [{"role", "label", "strategy"
                ("resident" | "offload" | "fp8" | "fp8+offload" | "stream"), "storage_dtype", "compute_dtype",
                "vram_gb", "ram_gb"}], "predicted_peak_vram_gb", "predicted_peak_ram_gb", "notes"}.
        """
        return get_plan(engine)

    def set_vram_limit(gb):
        """Change the VRAM limit without restarting; the engine re-plans and the next job uses the new plan.

        Args:
            gb: the limit in GB; 0 or empty for no limit (all free GPU memory).

        Returns:
            plan: the new memory plan (as /memory_plan returns it).
        """
        try:
            value = None if gb in (None, "") else float(gb)
        except (TypeError, ValueError):
            raise gr.Error(f"The VRAM limit must be a number of GB, got {gb!r}.", print_exception=False) from None
        if value is not None and value < 0:
            raise gr.Error("The VRAM limit cannot be negative (0 = no limit).", print_exception=False)
        if value == 0:
            value = None
        if not hasattr(engine, "set_vram_limit"):
            raise gr.Error("This engine cannot change its VRAM limit while running.", print_exception=False)
        plan = call_engine(engine.set_vram_limit, value, title="Could not change the VRAM limit")
        return plan if isinstance(plan, dict) else get_plan(engine)

    def refresh_view():
        return show(get_plan(engine))

    def applied(plan):
        plan = plan or {}
        gr.Info(f"VRAM limit: {limit_text(plan.get('vram_limit_gb'))}. The next job uses the new plan.")
        title = [ctx.title_html()] if ctx.title is not None else []
        return (*show(plan), *title)

    outputs = [summary, table, notes, limit]
    after = outputs + ([ctx.title] if ctx.title is not None else [])
    # Changing the limit waits for a running job (the engine's queue slot); the view follows once it is done.
    change = {"inputs": [limit], "outputs": [plan_json], "show_progress": "minimal", "show_progress_on": [table],
              **ENGINE_QUEUE}
    then_show = {"inputs": [plan_json], "outputs": after, "show_progress": "hidden", "api_visibility": "private"}
    apply_btn.click(set_vram_limit, api_name="set_vram_limit", **change).success(applied, **then_show)
    limit.submit(set_vram_limit, api_visibility="private", **change).success(applied, **then_show)
    clear_btn.click(lambda: None, outputs=[limit], queue=False, api_visibility="private").then(
        set_vram_limit, api_visibility="private", **change).success(applied, **then_show)

    # Reading the plan is cheap and must not wait behind a running job: its own queue slot.
    refresh_btn.click(refresh_view, outputs=outputs, api_visibility="private", show_progress="hidden")
    if ctx.tab is not None:  # opening the tab shows the current plan (after jobs, model switches, limit changes)
        ctx.tab.select(refresh_view, outputs=outputs, api_visibility="private", show_progress="hidden")
    gr.api(memory_plan, api_name="memory_plan", queue=False)  # read-only, for API clients
    build_speed(ctx)
    build_model_manager(ctx)


# ------------------------------------------------------------------------------------------------------- speed
SPEED_TITLES = {"compile": "Compile", "attention_backend": "Attention backend", "fp8_compute": "fp8 compute",
                "step_cache": "Step cache"}
ATTENTION_WORDS = [("auto (the library picks)", "auto"), ("SDPA (torch)", "sdpa"), ("flash", "flash"),
                   ("cuDNN", "cudnn"), ("memory-efficient", "efficient")]


def speed_owner(engine: Any):
    """The studio engine when it has speed settings (``Engine.set_acceleration``), else None."""
    return engine if hasattr(engine, "set_acceleration") else None


def speed_notes_md(info: dict) -> str:
    """When each setting cannot help on this machine (or what it costs), and what the loaded model did."""
    notes = info.get("notes") or {}
    lines = [f"- **{SPEED_TITLES[k]}**: {notes[k]}" for k in SPEED_TITLES if notes.get(k)]
    lines += [f"- {n}" for n in info.get("applied") or []]
    return "\n".join(lines)


def build_speed(ctx: StudioContext) -> None:
    """The Speed group: compile, attention backend, fp8 compute, step cache threshold (``engine.acceleration``).
    Applied by the next job; each image's recipe records them."""
    owner = speed_owner(ctx.engine)
    if owner is None:
        return
    now = owner.speed_settings()             # no torch while the page is built: the notes come with the tab
    with gr.Group(elem_id="speed-group"):
        gr.Markdown("#### Speed\nFaster compute from the libraries. The next job uses these; each image's recipe "
                    "records them.", elem_classes=["hint"])
        with gr.Row(equal_height=False, elem_id="speed-row"):
            compile_box = gr.Checkbox(value=bool(now["compile"]), label="Compile the transformer (torch.compile)",
                                      elem_id="speed-compile", min_width=200)
            attention = gr.Dropdown(ATTENTION_WORDS, value=now["attention_backend"], label="Attention backend",
                                    elem_id="speed-attention", min_width=200)
            fp8 = gr.Checkbox(value=bool(now["fp8_compute"]), label="fp8 compute (torchao)", elem_id="speed-fp8",
                              min_width=160)
            threshold = gr.Slider(0, 0.5, value=float(now["step_cache"]), step=0.01, elem_id="speed-step-cache",
                                  label="Step cache threshold (0 = off)", min_width=220)
            apply = gr.Button("Apply", variant="primary", size="md", scale=0, min_width=100,
                              interactive=not is_shared(ctx.engine), elem_id="speed-apply")
        notes = gr.Markdown("", elem_id="speed-notes", elem_classes=["mem-notes"])

    def set_acceleration(compile_on, backend, fp8_on, step_cache):
        """Change the speed settings; the next job applies them.

        Args:
            compile_on: regional torch.compile of the transformer's blocks (helps on CUDA GPUs).
            backend: the attention backend: auto, sdpa, flash, cudnn or efficient (one this machine has).
            fp8_on: fp8 matmuls through torchao (GPUs of compute capability 8.9 and up).
            step_cache: the first-block step cache threshold, 0 (off) to 0.5.

        Returns:
            notes: when each setting cannot help on this machine, as markdown.
        """
        call_engine(owner.set_acceleration, compile=bool(compile_on), attention_backend=backend or "auto",
                    fp8_compute=bool(fp8_on), step_cache=float(step_cache or 0),
                    title="Could not change the speed settings")
        return show_notes()

    def show_notes():
        return speed_notes_md(call_engine(owner.speed_notes, title="Could not read the speed settings"))

    apply.click(set_acceleration, inputs=[compile_box, attention, fp8, threshold], outputs=[notes],
                api_name="set_acceleration", show_progress="minimal")
    if ctx.tab is not None:
        ctx.tab.select(show_notes, outputs=[notes], api_visibility="private", show_progress="hidden")
