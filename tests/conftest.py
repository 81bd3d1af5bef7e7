"""Test-wide settings: one thread (the CI machine has 2 cores), no telemetry, no network."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gc  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
MANIFESTS = pathlib.Path(os.environ.get("FLUX_MANIFESTS", REPO.parent / "shared" / "checkpoint-manifests"))


def _freeze_what_lives_for_the_session():
    """Move every object alive now to the collector's permanent generation (``gc.freeze``).

    The engine collects fully when it loads or unloads models and after a failed job (modules with hooks hold
    reference cycles), and Python runs full collections of its own; each pass walks every tracked object in the
    process. In a test process that is torch, gradio, transformers, diffusers and the session's studio UI: ~600k
    objects, ~0.4 s a pass on the 2-core machine (tests/test_held.py: 84 passes, 35 s of its 59 s; 6 s with these freezes). What is frozen here lives for
    the whole session anyway (imported modules; the studio, called right after it starts). Everything a test or a
    job makes afterwards is collected exactly as before, so a leak (a model kept, a pipeline per job, a cycle made by
    a job) still shows in the memory tests. (Frozen objects that became cyclic garbage would never be collected: so
    freeze only at these two points, never between tests.)"""
    gc.collect()
    gc.freeze()


# Python's own collections: a full one walks every object alive (tests keep models and studio pages in fixtures), and
# at the default thresholds one may come every ~70k net allocations: the suite made 210 full passes, ~1 minute.
# Young objects are collected ~30x less often here (the engine itself still collects what a job left, and fully when
# models load or unload, so the memory tests see what a user would).
gc.set_threshold(20_000, 10, 10)

# What the engine, the studio and the browser tests import; imported before freezing when a test will need them.
_HEAVY = ("torch", "gradio", "transformers", "diffusers", "safetensors.torch", "studio.engine", "engine.pipeline",
          "app.studio")
_NEEDS_ENGINE = {"demo_dir", "studio", "page", "browser", "client"}


def pytest_collection_finish(session):
    if any(_NEEDS_ENGINE.intersection(getattr(item, "fixturenames", ())) for item in session.items):
        import importlib
        for name in _HEAVY:
            importlib.import_module(name)
    _freeze_what_lives_for_the_session()


@pytest.fixture(scope="session")
def manifests_dir():
    # The manifests are part of the project's shared folder; CI lays it beside the clone. Missing is an error, not a skip.
    assert MANIFESTS.is_dir(), f"checkpoint manifests not found at {MANIFESTS} (set FLUX_MANIFESTS)"
    return MANIFESTS


@pytest.fixture(scope="module")
def reference_rates():
    """The memory planner's time model on fixed rates (the reference cards'), so plans do not depend on this machine
    (``pytestmark = pytest.mark.usefixtures("reference_rates")`` in a module that compares plans)."""
    from engine.memory import cost
    cost.set_constants(cost.REFERENCE, "cuda")
    cost.set_constants(cost.CPU_REFERENCE, "cpu")
    yield
    cost.set_constants(None, "cuda")
    cost.set_constants(None, "cpu")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The random-weight demo model in the official layouts, written once per session."""
    from engine.demo import write_demo_model
    return write_demo_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def demo_tokenizers(demo_dir):
    from engine.text_encoding import load_tokenizer
    return load_tokenizer(demo_dir / "tokenizer", "CLIP"), load_tokenizer(demo_dir / "tokenizer_2", "T5")


@pytest.fixture(scope="session")
def browser():
    """One headless chromium for every browser test (playwright's sync API allows one instance per thread)."""
    from tests.browser import CHROMIUM, CHROMIUM_ARGS
    assert pathlib.Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def studio(tmp_path_factory, request):
    """The session's one demo studio (the real engine with the demo models, served on 127.0.0.1), shared by the
    client, browser and job tests (``tests.test_app_client.running_studio``)."""
    from tests import test_app_client
    starting = "server" not in test_app_client._studio
    server = test_app_client.running_studio(tmp_path_factory, request)
    if starting:      # just started, no job run yet: its UI (blocks, config) lives as long as the session
        _freeze_what_lives_for_the_session()
    return server


@pytest.fixture
def page(browser, studio):
    """A fresh browser page on the studio (1440x1000), which must ask no outside host for anything."""
    from tests.browser import studio_page
    with studio_page(browser, studio.url, 60_000) as page:
        yield page


@pytest.fixture(scope="session")
def shots(tmp_path_factory):
    """Where browser tests put their screenshots (copied to $FLUX_UI_SHOTS at the end, when set)."""
    import shutil
    folder = tmp_path_factory.mktemp("screenshots")
    yield folder
    extra = os.environ.get("FLUX_UI_SHOTS")
    if extra:
        pathlib.Path(extra).mkdir(parents=True, exist_ok=True)
        for shot in folder.glob("*.png"):
            shutil.copy(shot, pathlib.Path(extra) / shot.name)
