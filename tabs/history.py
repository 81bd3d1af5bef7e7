"""The History tab: every image in the outputs folder, newest first; search, filters, boards; restore a recipe into
the tab that made it, or send the image to another tab. In a shared studio each person's History is their own part
of the outputs folder (``engine.viewer_outputs``: their images and their boards, nobody else's).

UI only: ``studio.history`` keeps the index, searches and writes the boards. Restoring reuses each tab's own restore
wiring and "send to" each tab's registered input (``app.send_to``), so this tab is built after the tabs it serves
(``TABS`` lists it last). No torch here.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from app.common import StudioContext, user_error
from app.queue_panel import QUEUE, valid_owner
from app.recipe_text import result_info
from app.send_to import restore_wirings, send_button, send_targets
from app.visitors import bind_page
from studio import history as hist

TITLE = "History"
TAB_ID = "history"

PER_PAGE = 36
ALL = ""                     # the "no filter" value of every filter dropdown
CAPTION_CHARS = 60
BOARDS_QUEUE = {"concurrency_id": "history_boards", "concurrency_limit": 1}   # boards.json: one writer at a time
EMPTY = "No images yet: what you make in the other tabs appears here (from the outputs folder)."


def viewer_of(request: Any) -> Any:
    """Who is looking: the login name with --auth, else None (recorded as a board's owner). Which images a person
    sees is decided by the History they are handed (``Shelf``)."""
    return getattr(request, "username", None)


class Shelf:
    """One ``History`` per outputs folder: the whole folder when the studio is not shared, else one per person
    (``engine.viewer_outputs()``, asked in the event's own thread, where the engine knows who asks)."""

    def __init__(self, ctx: StudioContext):
        self._folder = getattr(ctx.engine, "viewer_outputs", None)
        self._whole = hist.History(ctx.outputs_dir)
        self._each = hist.Histories()

    def __call__(self) -> hist.History:
        folder = self._folder() if callable(self._folder) else None
        if folder is None or str(folder) == str(self._whole.root):
            return self._whole
        return self._each.get(folder)


def caption(entry: hist.Entry) -> str:
    prompt = " ".join(entry.prompt.split())
    prompt = prompt if len(prompt) <= CAPTION_CHARS else prompt[:CAPTION_CHARS - 1] + "…"
    return f"{prompt or '(no prompt)'} · seed {entry.seed}"


def page_view(history: hist.History, query: str, variant: str, lora: str, tab: str, day: str, board: str,
              number: int, viewer: Any = None) -> tuple:
    """(gallery update, page line, the page's relative names, the page number) for the filters."""
    try:
        found = history.search(query, variant or None, lora or None, tab or None, day or None, board or None,
                               viewer=viewer)
    except hist.HistoryError as exc:
        gr.Warning(str(exc))
        found = []
    page = history.page(found, number, PER_PAGE)
    items = [(gallery_file(history, e), caption(e)) for e in page.entries]
    if page.total:
        line = (f"**{page.total}** image{'s' if page.total != 1 else ''} · page {page.number} of {page.pages} "
                "· newest first")
    elif history.refresh():
        line = "No image matches these filters."
    else:
        line = EMPTY
    return gr.update(value=items, selected_index=None), line, [e.path for e in page.entries], page.number


def gallery_file(history: hist.History, entry: hist.Entry) -> str:
    """What the gallery shows for a result: its small thumbnail (the page never loads every full-size image)."""
    try:
        return str(history.thumbnail(entry.path))
    except hist.HistoryError:           # gone since the search: the page says so when it is selected
        return str(history.root / entry.path)


def filter_choices(history: hist.History, boards: list[str]) -> tuple:
    """Updates for the model, LoRA, tab, day and board filters (the current choice kept where it still exists)."""
    facets = history.facets()
    return (gr.update(choices=[("All models", ALL), *((v, v) for v in facets["variants"])]),
            gr.update(choices=[("All LoRAs", ALL), *((n, n) for n in facets["loras"])]),
            gr.update(choices=[("All tabs", ALL), *((hist.TAB_LABELS[t], t) for t in facets["tabs"])]),
            gr.update(choices=[("All dates", ALL), *((d, d) for d in facets["days"])]),
            gr.update(choices=[("All images", ALL), *((b, b) for b in boards)]))


def select_result(history: hist.History, names: list[str], index: Any, restorable: list[str]) -> tuple:
    """(info text, selected result dict, the made-in line, the full-size image, one visibility update per restore
    button)."""
    hide = [gr.update(visible=False) for _ in restorable]
    if not isinstance(index, int) or not 0 <= index < len(names or []):
        return "", None, "", None, *hide
    try:
        result = history.result(names[index])
    except hist.HistoryError as exc:
        gr.Warning(f"{exc} It was moved or deleted; press Refresh.")
        return "", None, "", None, *hide
    tab = hist.tab_of(result["recipe"])
    made = f"Made in **{hist.TAB_LABELS.get(tab, tab)}** · `{names[index]}`"
    if result["recipe"] is None:
        made += " · this image carries no settings to restore"
    elif tab not in restorable:
        made += f" · the {hist.TAB_LABELS.get(tab, tab)} tab is not in this studio, so it cannot be restored here"
    shown = [gr.update(visible=result["recipe"] is not None and t == tab) for t in restorable]
    return result_info(result), result, made, result["path"], *shown


def build(ctx: StudioContext) -> None:
    shelf = Shelf(ctx)        # the asking person's History: the whole outputs folder unless the studio is shared
    boards0 = _boards(shelf()) if not getattr(getattr(ctx.engine, "sharing", None), "shared", False) else []

    with gr.Row(equal_height=False, elem_id="hist-filters"):
        query = gr.Textbox(label="Search prompts", placeholder="words in the prompt, any order", scale=4,
                           min_width=200, elem_id="hist-search", max_lines=1)
        variant = gr.Dropdown(choices=[("All models", ALL)], value=ALL, label="Model", scale=2, min_width=140,
                              elem_id="hist-model")
        lora = gr.Dropdown(choices=[("All LoRAs", ALL)], value=ALL, label="LoRA", scale=2, min_width=120,
                           elem_id="hist-lora")
        tab = gr.Dropdown(choices=[("All tabs", ALL)], value=ALL, label="Made in", scale=2, min_width=120,
                          elem_id="hist-tab")
        day = gr.Dropdown(choices=[("All dates", ALL)], value=ALL, label="Date", scale=2, min_width=120,
                          elem_id="hist-day")
        board = gr.Dropdown(choices=[("All images", ALL), *((b, b) for b in boards0)], value=ALL, label="Board",
                            scale=2, min_width=120, elem_id="hist-board")
    with gr.Row(equal_height=False, elem_id="hist-pager"):
        line = gr.Markdown("", elem_id="hist-page-line")
    with gr.Row(equal_height=False, elem_id="hist-pager-buttons"):
        newer = gr.Button("◀ Newer", size="sm", scale=0, min_width=90, elem_id="hist-newer")
        older = gr.Button("Older ▶", size="sm", scale=0, min_width=90, elem_id="hist-older")
        refresh = gr.Button("⟳ Refresh", size="sm", scale=0, min_width=90, elem_id="hist-refresh")

    with gr.Row(equal_height=False):
        with gr.Column(scale=7, min_width=320):
            # Thumbnails (studio.history: JPEG, 256 px); the selected image is shown full size beside them.
            gallery = gr.Gallery(show_label=False, columns=6, fit_columns=False, height=620, object_fit="cover", preview=False,
                                 allow_preview=False, interactive=False, elem_id="hist-gallery",
                                 elem_classes=["results-gallery"])
        with gr.Column(scale=4, min_width=300, elem_id="hist-selected"):
            made = gr.Markdown("Select an image to see its settings.", elem_id="hist-made")
            full = gr.Image(value=None, type="filepath", label="Selected image", interactive=False, height=300,
                            buttons=["download", "fullscreen"], elem_id="hist-full")
            info = gr.Textbox(label="Image info", lines=8, max_lines=18, interactive=False, buttons=["copy"],
                              elem_id="hist-info", elem_classes=["recipe-text"])
            wirings = restore_wirings(ctx)
            restorable = list(wirings)
            with gr.Row(elem_id="hist-restore-row"):
                restore_buttons = [gr.Button(f"↺ Restore in {hist.TAB_LABELS.get(t, t)}", variant="primary",
                                             size="sm", visible=False, elem_id=f"hist-restore-{t}")
                                   for t in restorable]
            targets = send_targets(ctx)
            with gr.Row(elem_id="hist-send-row"):
                send_buttons = {t: gr.Button(f"Send to {target.label}", size="sm", elem_id=f"hist-send-{t}")
                                for t, target in targets.items()}
            with gr.Group(elem_id="hist-boards"):
                with gr.Row(equal_height=True, elem_classes=["tool-row"]):
                    board_pick = gr.Dropdown(choices=boards0, value=None, allow_custom_value=True,
                                             label="Board (pick one, or type a new name)", scale=3, min_width=160,
                                             elem_id="hist-board-pick")
                    with gr.Column(scale=2, min_width=130, elem_classes=["tool-buttons"]):
                        add_btn = gr.Button("+ Add to board", size="sm", elem_id="hist-board-add")
                        remove_btn = gr.Button("− Remove from board", size="sm", elem_id="hist-board-remove")
                        delete_btn = gr.Button("Delete board", size="sm", elem_id="hist-board-delete")
    names = gr.State([])          # the shown page's images, relative to the outputs folder
    number = gr.State(1)
    selected = gr.State(None)      # the selected result dict ({"path", "seed", "width", "height", "recipe"})

    # ------------------------------------------------------------------------------------------------ events
    helper = {"queue": False, "api_visibility": "private"}
    filters = [query, variant, lora, tab, day, board]
    shown = [gallery, line, names, number]

    def show_first(q, v, lo, t, d, b, request: gr.Request):
        return page_view(shelf(), q, v, lo, t, d, b, 1, viewer=viewer_of(request))

    def step(delta):
        def go(q, v, lo, t, d, b, page_number, request: gr.Request):
            return page_view(shelf(), q, v, lo, t, d, b, int(page_number or 1) + delta, viewer=viewer_of(request))
        return go

    # Opening the tab also says which browser this page is (the queue panel's id; app.visitors.bind_page), so a
    # reloaded page of a shared studio finds its History even before the page's own load event has told it.
    panel = ctx.shared.get(QUEUE)
    owner = panel.owner if panel is not None else gr.State(None)

    def reload(q, v, lo, t, d, b, browser, request: gr.Request):
        if valid_owner(browser):
            bind_page(ctx.engine, request, browser)
        who, history = viewer_of(request), shelf()
        return (*filter_choices(history, _boards(history, who)),
                *page_view(history, q, v, lo, t, d, b, 1, viewer=who))

    facet_outputs = [variant, lora, tab, day, board]
    for event in ((ctx.tab.select,) if ctx.tab is not None else ()) + (refresh.click,):
        event(reload, inputs=[*filters, owner], outputs=[*facet_outputs, *shown], **helper)
    query.submit(show_first, inputs=filters, outputs=shown, **helper)
    for control in (variant, lora, tab, day, board):
        control.input(show_first, inputs=filters, outputs=shown, **helper)
    newer.click(step(-1), inputs=[*filters, number], outputs=shown, **helper)
    older.click(step(+1), inputs=[*filters, number], outputs=shown, **helper)

    def on_select(page_names, evt: gr.SelectData):
        index = evt.index if isinstance(evt.index, int) else (evt.index or [None])[0]
        return select_result(shelf(), page_names, index, restorable)

    gallery.select(on_select, inputs=[names], outputs=[info, selected, made, full, *restore_buttons], **helper)

    # Restore: the tab's own wiring fills its controls; then that tab opens.
    for tab_id, button in zip(restorable, restore_buttons):
        wirings[tab_id](button, selected)
        button.click(lambda t=tab_id: gr.Tabs(selected=t), outputs=[ctx.tabs], **helper)
    for tab_id, button in send_buttons.items():
        send_button(ctx, button, selected, tab_id)

    # Boards (queued, one writer at a time: a toast says what happened).
    def add(pick, chosen, request: gr.Request):
        who, history = viewer_of(request), shelf()
        if not isinstance(chosen, dict):
            raise user_error("Select an image first, then add it to a board.", title="Nothing selected")
        try:
            added = history.add_to_board(pick, [chosen["path"]], viewer=who)
        except hist.HistoryError as exc:
            raise user_error(str(exc), title="Could not add to the board") from None
        name = history.check_board_name(pick)
        gr.Info(f"Added to the board {name!r}." if added else f"Already on the board {name!r}.")
        names_now = _boards(history, who)
        return (gr.update(choices=names_now, value=name),
                gr.update(choices=[("All images", ALL), *((b, b) for b in names_now)]))

    def remove(pick, chosen, q, v, lo, t, d, b, request: gr.Request):
        who, history = viewer_of(request), shelf()
        if not isinstance(chosen, dict):
            raise user_error("Select an image first.", title="Nothing selected")
        try:
            gone = history.remove_from_board(pick, [chosen["path"]], viewer=who)
        except hist.HistoryError as exc:
            raise user_error(str(exc), title="Could not remove from the board") from None
        gr.Info("Removed from the board (the image stays in the outputs folder)." if gone
                else "That image is not on this board.")
        return page_view(history, q, v, lo, t, d, b, 1, viewer=who)

    def delete(pick, request: gr.Request):
        who, history = viewer_of(request), shelf()
        try:
            history.delete_board(pick, viewer=who)
        except hist.HistoryError as exc:
            raise user_error(str(exc), title="Could not delete the board") from None
        gr.Info(f"Deleted the board {history.check_board_name(pick)!r}; its images stay in the outputs folder.")
        names_now = _boards(history, who)
        return (gr.update(choices=names_now, value=None),
                gr.update(choices=[("All images", ALL), *((b, b) for b in names_now)], value=ALL))

    delete_btn.click(delete, inputs=[board_pick], outputs=[board_pick, board], api_visibility="private",
                     **BOARDS_QUEUE).then(show_first, inputs=filters, outputs=shown, **helper)
    add_btn.click(add, inputs=[board_pick, selected], outputs=[board_pick, board], api_visibility="private",
                  **BOARDS_QUEUE)
    remove_btn.click(remove, inputs=[board_pick, selected, *filters], outputs=shown, api_visibility="private",
                     **BOARDS_QUEUE)


def _boards(history: hist.History, viewer: Any = None) -> list[str]:
    try:
        return history.boards(viewer=viewer)
    except hist.HistoryError as exc:   # a damaged boards.json: the images are still browsable
        gr.Warning(str(exc))
        return []
