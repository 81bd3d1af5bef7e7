"""The Generate tab's "Reference images" panel in the browser (issue 15, "What it must do" 3): IP-Adapter images and
their scale, an identity photo for InfiniteYou and its guidance, on the demo models; the image info names them, the
copies are saved beside the result, and a restore brings them back after the panel was cleared."""
from __future__ import annotations

import pathlib

import pytest
from PIL import Image, ImageDraw

from tests.browser import set_number

TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("references")
    for name, colour in (("style-a.png", (200, 60, 40)), ("style-b.png", (40, 90, 200))):
        Image.new("RGB", (96, 80), colour).save(root / name)
    face = Image.new("RGB", (112, 112), (230, 200, 170))
    draw = ImageDraw.Draw(face)
    draw.ellipse((30, 40, 46, 52), fill=(40, 30, 20))
    draw.ellipse((66, 40, 82, 52), fill=(40, 30, 20))
    draw.arc((38, 62, 74, 88), 20, 160, fill=(120, 40, 40), width=4)
    face.save(root / "face.png")
    return root


def _info(page) -> str:
    return page.locator("#selected-info textarea").input_value()


def test_reference_images_run_show_and_restore(page, studio, pictures, shots):
    page.locator("#gen-prompt textarea").fill("a portrait in a garden")
    for elem, value in (("gen-width", 64), ("gen-height", 64), ("gen-steps", 2), ("gen-seed", 321)):
        set_number(page, elem, value)
    page.locator("#gen-references").click()
    page.locator("#gen-ipa-images input[type='file']").set_input_files(
        [str(pictures / "style-a.png"), str(pictures / "style-b.png")])
    page.wait_for_function("document.querySelectorAll('#gen-ipa-images img').length >= 2")
    set_number(page, "gen-ipa-scale", 0.6)
    page.get_by_role("tab", name="Identity (InfiniteYou)").click()
    page.locator("#gen-id-image input[type='file']").set_input_files(str(pictures / "face.png"))
    page.locator("#gen-id-preview img").wait_for()                  # the photo is shown
    # insightface is not installed here: the panel says what to install and where the face models go.
    setup = page.locator("#gen-id-setup").inner_text()
    assert "requirements-infiniteyou.txt" in setup and "antelopev2" in setup and "stand-in" in setup, setup
    set_number(page, "gen-id-guidance", 0.8)
    page.locator("#gen-references").screenshot(path=str(shots / "references-panel.png"))

    page.locator("#gen-generate").click()
    page.wait_for_function("document.querySelector('#selected-info textarea')?.value?.includes('Seed: 321,')",
                           timeout=TIMEOUT_MS)
    info = _info(page)
    assert "IP-Adapter), scale 0.6" in info and "style-a.png" in info and "style-b.png" in info, info
    assert "face.png" in info and "0.8" in info, info
    result = pathlib.Path(sorted(studio.outputs.rglob("*-321.png"), key=lambda p: p.stat().st_mtime)[-1])
    assert result.with_name(result.stem + ".ipa0.png").is_file() and result.with_name(result.stem + ".ipa1.png").is_file()
    page.screenshot(path=str(shots / "references-generated.png"), full_page=True)

    # Change and clear the panel, then restore it from the result.
    set_number(page, "gen-id-guidance", 1.2)
    page.locator("#gen-id-image button[aria-label='Clear']").first.click()
    page.locator("#gen-id-preview img").wait_for(state="detached")
    page.get_by_role("tab", name="Style / subject (IP-Adapter)").click()
    set_number(page, "gen-ipa-scale", 1.5)
    page.locator("#restore-selected").click()
    page.wait_for_function("document.querySelector('#gen-ipa-scale input[type=number]')?.value === '0.6'")
    page.wait_for_function("[...document.querySelectorAll('#gen-ipa-images img')].some(i => i.src.includes('ipa1'))")
    srcs = [img.get_attribute("src") for img in page.locator("#gen-ipa-images img").all()]
    assert any("ipa0" in s for s in srcs) and any("ipa1" in s for s in srcs), srcs
    page.get_by_role("tab", name="Identity (InfiniteYou)").click()
    page.wait_for_function("document.querySelector('#gen-id-guidance input[type=number]')?.value === '0.8'")
    page.locator("#gen-id-preview img").wait_for()
    page.locator("#gen-references").screenshot(path=str(shots / "references-restored.png"))
