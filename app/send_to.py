"""Handing an image from one tab to another: "send to" a tab's input, and "restore into" a tab's controls.

Two registries in ``ctx.shared`` (the one dict every tab's ``StudioContext`` shares), so that no tab imports another:

**Send to** (``ctx.shared["send_to"]``: tab id -> ``SendTarget``). A tab that takes an image registers its input
component once, in its ``build(ctx)``::

    offer_input(ctx, "edit", "Edit", image)                                  # the image becomes the input
    offer_input(ctx, "train", "Train dataset", upload, to_value=append_file)  # (path, current value) -> new value

A tab (or History) that shows images adds a button for a target tab with ``send_button(ctx, button, source,
"edit")``, where ``source`` is a component holding the image: a result dict ({"path", ...}, what the galleries'
``selected`` state holds) or a path. The click puts the image into the target's input and opens that tab. Either
side may be built first: a button whose target registers later is wired when it does; a target that is never built
(a studio without that tab) leaves the button unwired, so a tab shows such a button only when
``ctx.tab_ids`` lists its target.

Generate registers its img2img input image the same way (``offer_input(ctx, "generate", "Generate (img2img)",
image)``), so History and the other tabs offer "Send to Generate" without knowing the tab; a tab that registers no
input is simply not a target.

**Restore into** (``ctx.shared["restore_into"]``: tab id -> a function ``wire(button, source)``). A tab registers
how its own "Restore these settings" is wired (``app.restore.wire_restore`` over its controls, its LoRA picker, the
input images saved beside a result) as one function of a button and a source holding a result dict; History calls it
with a button of its own, so a restore from History fills the same controls as one from the tab's own gallery.
``restore_wirings(ctx)`` lists what was registered; only tabs built before the caller are there (History is built
after the tabs that make images).
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Optional

import gradio as gr

SEND_TO = "send_to"
PENDING = "send_to_pending"
RESTORE_INTO = "restore_into"
NO_IMAGE = "Select an image first."


@dataclasses.dataclass(frozen=True)
class SendTarget:
    """A tab's image input that other tabs can send an image to."""

    tab_id: str
    label: str                  # the button says "Send to <label>"
    component: Any              # the input component
    to_value: Optional[Callable[[str, Any], Any]] = None   # (path, the input's current value) -> its new value
    also: tuple = ()            # (component, value) pairs also set when an image arrives (a mode it needs)


def image_path(source: Any) -> Optional[str]:
    """The file of a result dict ({"path"}) or a path, when it exists; else None."""
    path = source.get("path") if isinstance(source, dict) else source
    if isinstance(path, str) and path and pathlib.Path(path).is_file():
        return path
    return None


def _wire(ctx: Any, button: Any, source: Any, target: SendTarget) -> None:
    def send(value, current):
        path = image_path(value)
        if not path:
            gr.Warning(NO_IMAGE)
            return [gr.update()] * (2 + len(target.also))
        new = target.to_value(path, current) if target.to_value else path
        return [new, *(value for _, value in target.also), gr.Tabs(selected=target.tab_id)]

    outputs = [target.component, *(component for component, _ in target.also), ctx.tabs]
    # Progress hidden, except on an event that writes a gr.ImageEditor (Inpaint's): there "hidden" breaks the editor
    # in the page (its layers are reset before they exist) and later uploads do not load; elsewhere a shown progress
    # overlay re-renders the target tab's outputs (Train's dataset note went missing).
    progress = "full" if isinstance(target.component, gr.ImageEditor) else "hidden"
    button.click(send, inputs=[source, target.component], outputs=outputs, show_progress=progress,
                 api_visibility="private")


def offer_input(ctx: Any, tab_id: str, label: str, component: Any,
                to_value: Optional[Callable[[str, Any], Any]] = None, also: dict | None = None) -> SendTarget:
    """Register ``component`` as the image input other tabs send to (see the module's docstring); ``also``:
    {component: value} set at the same time (EliGen's "inpaint into an image" box)."""
    target = SendTarget(tab_id=tab_id, label=label, component=component, to_value=to_value,
                        also=tuple((also or {}).items()))
    ctx.shared.setdefault(SEND_TO, {})[tab_id] = target
    waiting = ctx.shared.setdefault(PENDING, [])
    for button, source, wanted in [w for w in waiting if w[2] == tab_id]:
        _wire(ctx, button, source, target)
        waiting.remove((button, source, wanted))
    return target


def send_button(ctx: Any, button: Any, source: Any, tab_id: str) -> None:
    """Clicking ``button`` sends the image in ``source`` to tab ``tab_id``'s input (now, or once it registers)."""
    target = ctx.shared.get(SEND_TO, {}).get(tab_id)
    if target is not None:
        _wire(ctx, button, source, target)
    else:
        ctx.shared.setdefault(PENDING, []).append((button, source, tab_id))


def send_targets(ctx: Any) -> dict[str, SendTarget]:
    """The targets registered so far, by tab id, in registration order."""
    return dict(ctx.shared.get(SEND_TO, {}))


def offer_restore(ctx: Any, tab_id: str, wire: Callable[[Any, Any], None]) -> None:
    """Register how tab ``tab_id`` restores a result: ``wire(button, source)`` wires ``button`` to fill the tab's
    controls from the result dict in ``source`` (see the module's docstring)."""
    ctx.shared.setdefault(RESTORE_INTO, {})[tab_id] = wire


def restore_wirings(ctx: Any) -> dict[str, Callable[[Any, Any], None]]:
    """The tabs that can restore a result, by tab id: {tab id: wire(button, source)}."""
    return dict(ctx.shared.get(RESTORE_INTO, {}))
