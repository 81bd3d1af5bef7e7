"""The model manager's panel in the Models & memory tab (``tabs.settings``): every model the studio knows -- its files,
size, licence and whether it is here -- with Download (in the background: jobs go on), Verify, Delete and the disk
used and free. The work is ``studio.model_manager``'s. UI only; no torch.
"""
from __future__ import annotations

import html
import time

import gradio as gr

from app.common import StudioContext, call_engine

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
