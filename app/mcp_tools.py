"""The studio as an MCP server (``launch.py --mcp``): three tools for agents, served by Gradio's MCP server.

- ``generate_image``: text to image with any model the Generate tab offers;
- ``edit_image``: an image edited by an instruction with any model the Edit tab offers (Kontext, Step1X-Edit,
  Nexus-GenV2, FLUX.2, FLUX 3);
- ``list_models``: the model names the two tools take, with their usual settings.

Gradio derives each tool from its function: the name, the type hints (the parameters' JSON schema) and the
docstring's ``Args`` (their descriptions). The tools are ``gr.api`` endpoints in the studio's page that build the
same requests as the tabs and run them the same way (``app.jobs.run_job`` in the engine's one queue slot): checked by
``Engine.validate`` (sizes, steps, a shared studio's limits, files), saved in the outputs folder with their recipe,
owned by the caller's session, refused with the engine's own message. Only these tools are served over MCP: the
page's own events stay in its API (``only_studio_tools``). No torch here.

No ``from __future__ import annotations`` in this module: Gradio reads the tools' type hints as objects (they are
resolved through ``app.jobs.engine_job``'s wrapper, whose module would not know these names).
"""
import importlib.metadata
import json
import warnings
from typing import Any, Callable, Optional

import gradio as gr
from gradio.data_classes import FileData

from app.common import ENGINE_QUEUE, call_engine, user_error
from app.jobs import engine_job, run_job
from engine.sizes import MAX_SIZE, MIN_SIZE
from tabs.edit import MULTI_KEYS, edit_key, editor_choices
from tabs.generate import generate_request, variant_choices

TOOLS = ("generate_image", "edit_image", "list_models")    # the MCP tools, by endpoint name (= function name)
MCP_PATH = "gradio_api/mcp/"                               # where Gradio serves MCP (streamable HTTP; SSE under it)
MCP_FIX = 'pip install "mcp>=1.21,<2" (gradio 6.31\'s [mcp] extra)'

# The tools' docstrings. Gradio reads one line per argument ("name: description"), so each line is built here.
SAVED = ("saved in the studio's outputs folder as <number>-<seed>.png (the returned URL ends with that name), the "
         "settings used in its recipe (a PNG text chunk: seed, size, steps, model)")
USUAL = "0 (default) = the model's usual"
LIMITS = ("A studio shared with others may set lower limits on size and steps; a call over them is refused with a "
          "message naming the limit.")
GENERATE_DOC = {
    "summary": "Generate an image from a text prompt with a FLUX model of this studio; it is saved like any image "
               f"made in the Generate tab. {LIMITS}",
    "prompt": 'what the image shows (plain English works best, e.g. "a red fox in fresh snow, golden hour").',
    "width": "image width in pixels, 64..4096 (rounded up to a multiple of 16). Default 1024.",
    "height": "image height in pixels, 64..4096 (rounded up to a multiple of 16). Default 1024.",
    "steps": f"denoising steps, 1..200; {USUAL} number (e.g. 28 for FLUX.1-dev, 4 for FLUX.1-schnell).",
    "seed": "-1 (default) for a random seed, else a whole number from 0: the same seed and settings give the same "
            "image.",
    "guidance": f"the distilled (embedded) guidance, e.g. 3.5 for FLUX.1-dev; {USUAL} value.",
    "model": 'the model\'s name, one of: {models}. Default "{default}". list_models tells what each is.',
    "negative_prompt": "what the image should not show; used only when cfg_scale is above 1.",
    "cfg_scale": f"true classifier-free guidance, 1 = off (fast); above 1 uses the negative prompt and takes about "
                 f"twice as long; {USUAL} value.",
    "Returns": f"image: the PNG image, {SAVED}.",
}
EDIT_DOC = {
    "summary": "Edit an image by an instruction with an editing model of this studio (FLUX.1-Kontext, FLUX.2, "
               "FLUX 3, Step1X-Edit, Nexus-GenV2); the result is saved like an edit made in the Edit tab, with a "
               f"copy of the input beside it. {LIMITS}",
    "image": "the image to edit, as a http(s) URL or a data: URL (data:image/png;base64,...); images under 64 px or "
             "over 40 megapixels are refused, sides over 4096 px are downscaled.",
    "instruction": 'what to change, e.g. "make the car red", "put her in a snowy street", "remove the text".',
    "width": "output width in pixels, 64..4096; 0 (default) = follow the input's aspect ratio at megapixels.",
    "height": "output height in pixels, 64..4096; 0 (default) = follow the input's aspect ratio at megapixels.",
    "megapixels": "the output's size when width and height are 0, 0.01..4 megapixels (default 1.0), in multiples "
                  "of 16 pixels.",
    "steps": f"denoising steps, 1..200; {USUAL} number (e.g. 28 for FLUX.1-Kontext-dev).",
    "seed": "-1 (default) for a random seed, else a whole number from 0.",
    "guidance": f"the distilled (embedded) guidance, e.g. 2.5 for FLUX.1-Kontext-dev; {USUAL} value.",
    "model": 'the editing model\'s name, one of: {models}. Default "{default}". list_models tells what each is.',
    "negative_prompt": "what the result should not show; used only when cfg_scale is above 1.",
    "cfg_scale": f"true classifier-free guidance, 1 = off; {USUAL} value (6 for Step1X-Edit, else 1).",
    "Returns": f"image: the edited PNG image, {SAVED}.",
}
LIST_DOC = {
    "summary": "The models this studio's generate_image and edit_image tools take (their model argument), as JSON.",
    "Returns": 'models: JSON text: {"generate": [...], "edit": [...], "default_generate", "default_edit"}; each '
               'model has "name" (what the model argument takes), "label", "files" ("present", or "downloaded on '
               'first use"), "demo" (a random-weight model: its images are noise), "default_steps", '
               '"default_guidance", "default_cfg" and "description".',
}


def docstring(parts: dict, **values: str) -> str:
    """A tool's docstring in the form Gradio parses: the summary, "Args:" one line each, "Returns:"."""
    args = [f"    {name}: {text.format(**values)}" for name, text in parts.items()
            if name not in ("summary", "Returns")]
    return "\n".join([parts["summary"], "", *(["Args:", *args, ""] if args else []), "Returns:",
                      f"    {parts['Returns']}"])


def add_tools(demo: gr.Blocks, engine: Any) -> None:
    """Add the MCP tools to the studio's page (before it is launched with ``mcp_server=True``); a RuntimeError says
    what to install when Gradio's MCP server cannot run here."""
    problem = mcp_problem()
    if problem:
        raise RuntimeError(f"The MCP server cannot start: {problem}. Install it with {MCP_FIX}.")
    # Gradio warns of the page's events with a gr.State input as it makes every endpoint a tool; those are no tools
    # here (only_studio_tools).
    warnings.filterwarnings("ignore", message="This MCP server includes a tool that has a gr.State input")
    with demo:
        gr.api(generate_tool(engine), api_name="generate_image", **ENGINE_QUEUE)
        gr.api(edit_tool(engine), api_name="edit_image", **ENGINE_QUEUE)
        gr.api(list_tool(engine), api_name="list_models", queue=False)


def only_studio_tools(demo: gr.Blocks) -> list[str]:
    """Serve only ``TOOLS`` over MCP (after ``launch``): Gradio makes every public endpoint a tool, and the page's
    own events (its /generate, /edit, /cancel, ...) stay public for API clients but are not tools. Returns the tool
    names served. Reads Gradio 6.31's server object (pinned): its ``tool_to_endpoint`` lists the tools."""
    server = getattr(demo, "mcp_server_obj", None)
    if server is None:
        raise RuntimeError(f"Gradio's MCP server did not start ({getattr(demo, 'mcp_error', None)}); {MCP_FIX} "
                           "may fix it.")
    wanted = {"/" + name for name in TOOLS}
    server.tool_to_endpoint = {tool: endpoint for tool, endpoint in server.tool_to_endpoint.items()
                               if endpoint in wanted}
    return sorted(server.tool_to_endpoint)


def mcp_problem() -> Optional[str]:
    """Why Gradio's MCP server cannot run here (the mcp package missing, or a 2.x it does not work with), or None."""
    try:
        version = importlib.metadata.version("mcp")
    except importlib.metadata.PackageNotFoundError:
        return "the mcp package is not installed"
    if not version.startswith("1."):
        return f"mcp {version} is installed, and Gradio 6.31's MCP server works with mcp 1.x only"
    return None


def mcp_url(demo: gr.Blocks) -> str:
    """The MCP server's address (streamable HTTP): the share link's when there is one, else the local one."""
    base = getattr(demo, "share_url", None) or getattr(demo, "local_url", None) or "http://127.0.0.1:7860/"
    return base.rstrip("/") + "/" + MCP_PATH


# ----------------------------------------------------------------------------------------------------- the tools
def generate_tool(engine: Any) -> Callable:
    """The generate_image tool: the Generate tab's request (its models: ``generating_models``), one image."""
    names = generating_models(engine)[0]
    default = names[0] if names else ""

    @engine_job
    def generate_image(prompt: str, width: int = 1024, height: int = 1024, steps: int = 0, seed: int = -1,
                       guidance: float = 0.0, model: str = default, negative_prompt: str = "",
                       cfg_scale: float = 0.0) -> FileData:
        info = _model_info(model, generating_models(engine), "generate_image")
        steps, guidance, cfg_scale = _usual(info, steps, guidance, cfg_scale)
        request = generate_request(model, prompt, negative_prompt, width, height, steps, guidance, cfg_scale,
                                   seed, 1)
        return _run(engine, request, "Could not generate")

    generate_image.__doc__ = docstring(GENERATE_DOC, models=_listed(names), default=default)
    return generate_image


def edit_tool(engine: Any) -> Callable:
    """The edit_image tool: the Edit tab's request (its models: ``editing_models``) for one image, one result."""
    names = editing_models(engine)[0]
    default = names[0] if names else ""

    @engine_job
    def edit_image(image: FileData, instruction: str, width: int = 0, height: int = 0, megapixels: float = 1.0,
                   steps: int = 0, seed: int = -1, guidance: float = 0.0, model: str = default,
                   negative_prompt: str = "", cfg_scale: float = 0.0) -> FileData:
        info = _model_info(model, editing_models(engine), "edit_image")
        path = _file_path(image)
        _check_side("width", width)
        _check_side("height", height)
        steps, guidance, cfg_scale = _usual(info, steps, guidance, cfg_scale)
        size = call_engine(engine.edit_size, path, width=width or None, height=height or None,
                           megapixels=megapixels or 1.0, title="Cannot use this image")
        key = edit_key(info)
        request = {"variant": model, "prompt": instruction or "", "negative_prompt": negative_prompt or "",
                   "width": size["width"], "height": size["height"], "num_inference_steps": steps,
                   "embedded_guidance": guidance, "cfg_scale": cfg_scale, "seed": seed, "num_images": 1,
                   key: [path] if key in MULTI_KEYS else path}
        return _run(engine, request, "Could not edit")

    edit_image.__doc__ = docstring(EDIT_DOC, models=_listed(names), default=default)
    return edit_image


def list_tool(engine: Any) -> Callable:
    """The list_models tool: the models of the two others, as they are now (a download since the start counts)."""

    def list_models() -> str:
        gen_names, gen_infos = generating_models(engine)
        edit_names, edit_infos = editing_models(engine)
        return json.dumps({
            "generate": [_described(gen_infos[name]) for name in gen_names],
            "edit": [_described(edit_infos[name]) for name in edit_names],
            "default_generate": gen_names[0] if gen_names else None,
            "default_edit": edit_names[0] if edit_names else None,
        }, indent=1)

    list_models.__doc__ = docstring(LIST_DOC)
    return list_models


def generating_models(engine: Any) -> tuple[list, dict]:
    """(names, {name: variant}) of the models generate_image takes: the Generate tab's, the default model first."""
    return _choices(variant_choices(engine), engine.default_variant())


def editing_models(engine: Any) -> tuple[list, dict]:
    """(names, {name: variant}) of the models edit_image takes: the Edit tab's, in its order (its default first)."""
    return _choices(editor_choices(engine), None)


# --------------------------------------------------------------------------------------------------- helpers
def _choices(choices: tuple, first: Optional[str]) -> tuple[list, dict]:
    """(names, {name: variant}) of a tab's model choices, ``first`` (the default model) first when offered."""
    labelled, infos = choices
    names = [name for _, name in labelled]
    if first in names:
        names.remove(first)
        names.insert(0, first)
    return names, infos


def _listed(names: list) -> str:
    return ", ".join(f'"{name}"' for name in names) or "(none: no model of this kind is installed or downloadable)"


def _described(info: dict) -> dict:
    return {"name": info["name"], "label": info.get("label") or info["name"],
            "files": "present" if info.get("available") else "downloaded on first use",
            "demo": bool(info.get("demo")), "default_steps": info.get("default_steps"),
            "default_guidance": info.get("default_guidance"), "default_cfg": info.get("default_cfg"),
            "description": info.get("description", "")}


def _model_info(model: str, models: tuple, tool: str) -> dict:
    names, infos = models
    if model not in names:
        raise user_error(f"model {model!r:.80} is not one {tool} takes; use one of: {_listed(names)} "
                         f"(list_models describes them).", title="Unknown model")
    return infos[model]


def _check_side(name: str, value: Any) -> None:
    """Say at once what is wrong with an edit's size (before the image is read for its aspect ratio)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise user_error(f"{name} must be a whole number of pixels, got {value!r:.40}.", title="Bad size")
    if value and not MIN_SIZE <= value <= MAX_SIZE:
        raise user_error(f"{name} {value} is outside {MIN_SIZE}..{MAX_SIZE} pixels; choose a size in that range "
                         f"(or 0 to follow the input image).", title="Bad size")


def _usual(info: dict, steps: Any, guidance: Any, cfg_scale: Any) -> tuple:
    """steps, guidance and CFG with 0 replaced by the model's usual values (as the tabs set them)."""
    steps = steps or int(info.get("default_steps") or 28)
    guidance = guidance or float(info.get("default_guidance", 3.5))
    if not cfg_scale:
        cfg = info.get("default_cfg")
        cfg_scale = float(cfg) if cfg is not None else (6.0 if edit_key(info) == "step1x_reference_image" else 1.0)
    return steps, guidance, cfg_scale


def _file_path(image: Any) -> str:
    """The local file of an image argument (Gradio hands the uploaded file over as FileData or its dict)."""
    path = image.get("path") if isinstance(image, dict) else getattr(image, "path", image)
    if not path or not isinstance(path, str):
        raise user_error("image is missing: pass the image to edit as a http(s) URL or a data: URL.",
                         title="No image")
    return path


def _run(engine: Any, request: dict, title: str) -> FileData:
    """Run ``request`` as the tabs do (progress, cancel, the engine's messages); the image made.

    One output only: Gradio 6.31's MCP server hands a tool with several outputs to a client that asks for no
    progress as one text (the outputs' list printed), so the settings travel in the image's recipe, not beside it."""
    _, info, _, made = run_job(engine, request, gr.Progress(), title)
    if not made:
        raise user_error(info or "The job made no image.", title="Cancelled" if info == "Cancelled." else title)
    return FileData(path=str(made[0]["path"]))
