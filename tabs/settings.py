"""The Models & memory tab: where each model component lives (GPU, RAM, fp8, streamed), the predicted peaks, the
planner's notes, and the VRAM limit, changed here without restarting.

UI only: reads ``engine.memory_plan()`` and calls ``engine.set_vram_limit``. The model manager (every model the studio
knows: download, verify, delete) is ``studio.model_manager``'s, drawn by ``build_model_manager``. No torch here.
"""
from __future__ import annotations

import html
import time
from typing import Any

import gradio as gr

from app.common import ENGINE_QUEUE, StudioContext, call_engine

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


# ------------------------------------------------------------------------------------------------ model manager
MM_SOURCES = [("ModelScope", "ModelScope"), ("Hugging Face", "HuggingFace")]
MM_TICK_S = 1.0


def mm_table_html(rows: list) -> str:
    """The model manager's table: name, kind, files, size, licence, status (one row per variant, ControlNet, adapter)."""
    body = []
    for r in rows:
        files = html.escape("\n".join(r.get("file_list") or []), quote=True)
        lic = html.escape(str(r.get("licence") or "")) + (" <span class='mm-gated'>(gated: a token is needed)</span>"
                                                          if r.get("gated") else "")
        status = str(r.get("status") or "")
        state = "installed" if r.get("installed") else "partial" if status.startswith("partial") else "missing"
        body.append(f"<tr data-name='{html.escape(str(r['name']), quote=True)}' data-status='{state}'>"
                    f"<td class='mm-name'>{html.escape(str(r['name']))}</td><td>{html.escape(str(r['kind']))}</td>"
                    f"<td class='num' title='{files}'>{int(r.get('files') or 0)}</td>"
                    f"<td class='num'>{html.escape(str(r.get('size') or ''))}</td><td>{lic}</td>"
                    f"<td class='mm-status mm-{state}'>{html.escape(status)}</td></tr>")
    return ("<table class='mem-table mm-table'><thead><tr><th>Model</th><th>Kind</th><th class='num'>Files</th>"
            "<th class='num'>Size</th><th>Licence</th><th>Status</th></tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def mm_disk_html(disk: dict) -> str:
    from studio.model_manager import size_text
    return (f"<div class='mem-facts' id='mm-disk-line'>Models folder {html.escape(str(disk.get('folder')))}: "
            f"{size_text(disk.get('used'))} used · {size_text(disk.get('free'))} free of "
            f"{size_text(disk.get('total'))} on its disk</div>")


def mm_progress_html(state: dict) -> str:
    """The progress line: a bar and bytes while a task runs, then its result."""
    from studio.model_manager import size_text
    phase, message = state.get("phase") or "idle", html.escape(str(state.get("message") or ""))
    if phase == "idle":
        return "<div class='mm-line' data-phase='idle'></div>"
    if phase != "running":
        mark = {"done": "✓", "failed": "✗", "cancelled": "■"}.get(phase, "")
        return f"<div class='mm-line mm-{phase}' data-phase='{phase}'>{mark} {message}</div>"
    done, total = int(state.get("done") or 0), state.get("total")
    seconds = max(time.time() - float(state.get("started") or time.time()), 1e-3)
    amount = f"{size_text(done)} of {size_text(total)} ({100 * done / total:.0f}%)" if total else size_text(done)
    bar = f"<progress max='{int(total)}' value='{min(done, int(total))}'></progress> " if total else ""
    rate = f" · {size_text(done / seconds)}/s" if done else ""
    where = f" · {html.escape(str(state.get('file')))}" if state.get("file") else ""
    return (f"<div class='mm-line' data-phase='running'>{bar}{html.escape(str(state.get('task')))} "
            f"{html.escape(str(state.get('name')))}: {amount}{where}{rate}"
            f"{' · ' + message if message else ''}</div>")


def build_model_manager(ctx: StudioContext) -> None:
    """Every model the studio knows, downloaded or not: download (in the background: jobs go on), verify, delete."""
    from engine.downloads import download_source
    from studio.model_manager import ModelManager, entries

    sharing = getattr(ctx.engine, "sharing", None)      # a shared studio (link, login, Space): list and verify only
    manager = ModelManager(getattr(ctx.engine, "models_dir", None) or ctx.models_dir,
                           writable=not getattr(sharing, "shared", False))
    names = [(f"{e.name} · {e.kind}", e.name) for e in entries()]
    try:
        first = ctx.engine.default_variant()
        source = download_source()
    except Exception:  # noqa: BLE001 - a bad DIFFSYNTH_DOWNLOAD_SOURCE is refused when a download starts
        first, source = names[0][1], "ModelScope"
    with gr.Accordion("Model manager", open=False, elem_id="mm-accordion"):
        gr.Markdown("Every model the studio knows, its files, size, licence and whether it is in the models folder. "
                    "Downloads run in the background (jobs go on) and resume where they stopped; Verify checks the "
                    "sizes and, where the hub publishes them, the sha256 hashes (offline: the sizes recorded at "
                    "download).", elem_classes=["hint"])
        disk = gr.HTML("", elem_id="mm-disk")
        table = gr.HTML("", elem_id="mm-table")
        with gr.Row(equal_height=False, elem_id="mm-row"):
            model = gr.Dropdown(names, value=first if first in dict(map(reversed, names)) else names[0][1],
                                label="Model", elem_id="mm-model", scale=3, min_width=260)
            hub = gr.Radio(MM_SOURCES, value=source, label="Download from", elem_id="mm-source", scale=2,
                           min_width=220)
            token = gr.Textbox(type="password", label="Access token (gated models such as FLUX.1-dev; used for this "
                               "download only, never saved)", placeholder="hf_…", elem_id="mm-token", scale=3,
                               min_width=260)
        if not manager.writable:
            gr.Markdown("This studio is shared: downloading and deleting models is for its owner.",
                        elem_id="mm-read-only", elem_classes=["hint"])
        with gr.Row(elem_id="mm-buttons"):
            download = gr.Button("Download", variant="primary", size="md", elem_id="mm-download", min_width=110,
                                 visible=manager.writable)
            verify = gr.Button("Verify", size="md", elem_id="mm-verify", min_width=100)
            delete = gr.Button("Delete…", variant="stop", size="md", elem_id="mm-delete", min_width=100,
                               visible=manager.writable)
            cancel = gr.Button("Cancel", size="md", elem_id="mm-cancel", min_width=100)
            refresh = gr.Button("↻ Refresh", size="md", elem_id="mm-refresh", min_width=110)
        with gr.Row(visible=False, elem_id="mm-confirm") as confirm:
            confirm_text = gr.Markdown("", elem_id="mm-confirm-text")
            yes = gr.Button("Delete these files", variant="stop", size="md", elem_id="mm-delete-yes", min_width=150)
            no = gr.Button("Keep them", size="md", elem_id="mm-delete-no", min_width=110)
        progress = gr.HTML(mm_progress_html(manager.state()), elem_id="mm-progress")
        timer = gr.Timer(MM_TICK_S, active=False)

    def listing():
        return mm_table_html(manager.rows()), mm_disk_html(manager.disk())

    def started(state):
        return mm_progress_html(state), gr.Timer(active=True)

    def start_download(name, src, tok):
        return started(call_engine(manager.start_download, name, src, tok, title="Could not start the download"))

    def start_verify(name, src, tok):
        return started(call_engine(manager.start_verify, name, src, tok, title="Could not start the check"))

    def tick():
        state = manager.state()
        if state["phase"] == "running":
            return mm_progress_html(state), gr.skip(), gr.skip(), gr.Timer(active=True)
        return (mm_progress_html(state), *listing(), gr.Timer(active=False))

    def ask_delete(name):
        plan = call_engine(manager.delete_plan, name, title="Could not plan the deletion")
        from studio.model_manager import size_text
        if not plan["files"]:
            raise gr.Error(f"{name} has no files in the models folder that only it uses.", print_exception=False)
        kept = f" ({len(plan['kept'])} shared file(s) other installed models use are kept)" if plan["kept"] else ""
        also = f" {html.escape(', '.join(plan['also']))} use the same files and go too." if plan["also"] else ""
        text = (f"**Delete {html.escape(name)}?** {len(plan['files'])} file(s), {size_text(plan['bytes'])}, from "
                f"the models folder{kept}.{also}")
        return gr.Row(visible=True), text

    def do_delete(name):
        message = call_engine(manager.delete, name, title="Could not delete")
        gr.Info(message)
        return (gr.Row(visible=False), f"<div class='mm-line mm-done' data-phase='deleted'>✓ "
                f"{html.escape(message)}</div>", *listing())

    private = {"api_visibility": "private", "show_progress": "hidden"}
    download.click(start_download, inputs=[model, hub, token], outputs=[progress, timer], **private)
    verify.click(start_verify, inputs=[model, hub, token], outputs=[progress, timer], **private)
    cancel.click(lambda: mm_progress_html(manager.cancel()), outputs=[progress], **private)
    timer.tick(tick, outputs=[progress, table, disk, timer], **private)
    delete.click(ask_delete, inputs=[model], outputs=[confirm, confirm_text], **private)
    no.click(lambda: gr.Row(visible=False), outputs=[confirm], **private)
    yes.click(do_delete, inputs=[model], outputs=[confirm, progress, table, disk], **private)
    refresh.click(listing, outputs=[table, disk], **private)
    def opened():                 # the list, and a download that runs on (after a reload, in another browser)
        state = manager.state()
        return (*listing(), mm_progress_html(state), gr.Timer(active=state["phase"] == "running"))

    if ctx.tab is not None:       # read when the tab opens (a walk of the models folder)
        ctx.tab.select(opened, outputs=[table, disk, progress, timer], **private)
