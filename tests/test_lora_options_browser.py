"""Generate's LoRA options (encode as prompt, LoRA Fusion) and step cache (TeaCache) in the browser: ticked, run on
the demo, written in the image info, and put back by "Restore these settings"."""
from __future__ import annotations

import pathlib
import shutil

from tests.browser import set_number


def test_lora_options_and_step_cache_run_and_restore(page, studio, shots):
    from engine.demo.flux1_loras import write_flux1_demo_loras
    folder = pathlib.Path(studio.engine.models_dir) / "loras" / "demo-options"
    write_flux1_demo_loras(folder)          # LoRAs on every layer: the encoder refuses any other
    try:
        page.locator("#lora-refresh").click()
        page.locator("#lora-choose input").click()
        page.wait_for_selector("ul[role='listbox'] li:has-text('ink-random-demo')")
        for name in ("ink-random-demo", "glow-random-demo"):
            page.locator("ul[role='listbox'] li", has_text=name).first.click()
        page.locator("#gen-prompt textarea").click()            # closes the list
        page.wait_for_selector("#lora-weight-1", state="visible", timeout=180_000)   # a busy machine: see wait_for_job
        page.locator("#lora-options label", has_text="Encode as prompt").click()
        page.locator("#lora-options label", has_text="LoRA Fusion").click()
        page.locator("#gen-prompt textarea").fill("a lighthouse, encoded LoRAs")
        for key, value in (("gen-width", 64), ("gen-height", 64), ("gen-steps", 6), ("gen-seed", 909),
                           ("gen-tea-cache", 0.6)):
            set_number(page, key, value)
        page.locator("#gen-generate").click()
        page.wait_for_function("document.querySelector('#selected-info textarea').value.includes('Seed: 909,')",
                               timeout=90_000)
        info = page.locator("#selected-info textarea").input_value()
        assert "encoded as prompt tokens (LoRA Encoder)" in info and "demo-options/glow-random-demo" in info
        assert "LoRA Fusion's learned gates" in info
        assert "Step cache (TeaCache): threshold 0.6, " in info and "of 6 steps skipped" in info
        page.screenshot(path=str(shots / "lora-options-generated.png"), full_page=True)

        # Untick both and turn the step cache off; restoring the image puts them back.
        page.locator("#lora-options label", has_text="Encode as prompt").click()
        page.locator("#lora-options label", has_text="LoRA Fusion").click()
        set_number(page, "gen-tea-cache", 0)
        page.wait_for_function("document.querySelectorAll('#lora-options input:checked').length === 0")
        page.locator("#restore-selected").click()
        page.wait_for_function("document.querySelectorAll('#lora-options input:checked').length === 2")
        page.wait_for_function("document.querySelector('#gen-tea-cache input[type=number]').value === '0.6'")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
