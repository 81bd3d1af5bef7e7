"""History (studio/history.py, tabs/history.py, app/send_to.py): the index of the outputs folder, search and filters,
paging, boards, and in the browser: search, restore into Generate, send to Edit."""
from __future__ import annotations

import json
import os
import pathlib
import time

import pytest
from PIL import Image

from studio import history as H
from studio import recipes as R

BASE = {"variant": "FLUX.1-dev", "negative_prompt": "", "width": 64, "height": 48, "num_inference_steps": 2,
        "embedded_guidance": 3.5, "cfg_scale": 1.0}


def _save(outputs, prompt, seed, copies=(), **extra) -> pathlib.Path:
    """A result as the studio writes it (recipes.save_image), with input copies beside it when asked."""
    path = R.save_image(Image.new("RGB", (64, 48), (seed % 255, 40, 90)), {**BASE, "prompt": prompt, "seed": seed,
                                                                          **extra}, outputs)
    for suffix in copies:
        Image.new("RGB", (16, 16)).save(R.beside(path, suffix))
    return path


@pytest.fixture
def outputs(tmp_path):
    root = tmp_path / "outputs"
    made = {
        "plain": _save(root, "A red Fox in the snow", 1, loras=[{"name": "ink.safetensors", "file": "ink.safetensors",
                                                                 "weight": 0.8}]),
        "edit": _save(root, "make the fox blue", 2, copies=(".ref0.png",),
                      variant="FLUX.1-Kontext-dev", kontext_images=[{"file": "in.png", "copy": ".ref0.png"}]),
        "inpaint": _save(root, "a hat", 3, copies=(".ref0.png", ".ref1.png", ".ctl0.png"),
                         inpaint_image={"file": "in.png", "copy": ".ref0.png"}, inpaint_mask={"copy": ".ref1.png"}),
        "eligen": _save(root, "a room", 4, copies=(".ent0.png", ".input.png"),
                        eligen_entity_prompts=["a green lamp", "a cat"],
                        loras=[{"name": "eligen.safetensors", "file": "x", "feature": "eligen"}]),
        "redux": _save(root, "", 5, copies=(".red0.png",), flux_redux_image=[{"copy": ".red0.png"}]),
    }
    # Not results: scratch files, a text file, a folder that is not a day, a copy of a copy.
    (root / ".work" / "123-abc").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / ".work" / "123-abc" / "00001-1.png")
    (root / "notes").mkdir()
    Image.new("RGB", (8, 8)).save(root / "notes" / "00001-9.png")
    (made["plain"].parent / "readme.txt").write_text("hello")
    return root, made


def _rel(root, path):
    return path.relative_to(root).as_posix()


def test_index_lists_results_newest_first_and_skips_input_copies(outputs):
    root, made = outputs
    entries = H.History(root).refresh()
    assert [e.path for e in entries] == [_rel(root, made[k]) for k in ("redux", "eligen", "inpaint", "edit", "plain")]
    by_tab = {e.seed: e.tab for e in entries}
    assert by_tab == {1: "generate", 2: "edit", 3: "inpaint", 4: "eligen", 5: "generate"}
    plain = entries[-1]
    assert (plain.prompt, plain.variant, plain.loras, plain.width, plain.height) == (
        "A red Fox in the snow", "FLUX.1-dev", ("ink.safetensors",), 64, 48)
    assert entries[1].loras == ()          # EliGen's own LoRA is not one the person chose


def test_search_and_filters(outputs):
    root, made = outputs
    history = H.History(root)
    seeds = lambda **kw: [e.seed for e in history.search(**kw)]  # noqa: E731
    assert seeds(query="fox") == [2, 1]
    assert seeds(query="SNOW red") == [1]                 # every word, any order and case
    assert seeds(query="fox hat") == []
    assert seeds(query="green lamp") == [4]               # EliGen's entity prompts are searched too
    assert seeds(variant="FLUX.1-Kontext-dev") == [2]
    assert seeds(lora="ink.safetensors") == [1]
    assert seeds(tab="inpaint") == [3] and seeds(tab="eligen") == [4] and seeds(tab="generate") == [5, 1]
    today = made["plain"].parent.name
    assert seeds(day=today) == [5, 4, 3, 2, 1] and seeds(day="1999-01-01") == []
    facets = history.facets()
    assert facets["variants"] == ["FLUX.1-Kontext-dev", "FLUX.1-dev"]
    assert facets["loras"] == ["ink.safetensors"]
    assert facets["tabs"] == ["generate", "edit", "inpaint", "eligen"] and facets["days"] == [today]


def test_index_rereads_only_changed_files_and_survives_a_restart(outputs, monkeypatch):
    root, made = outputs
    reads = []
    real = H.read_png_recipe
    monkeypatch.setattr(H, "read_png_recipe", lambda path: reads.append(pathlib.Path(path).name) or real(path))
    history = H.History(root)
    assert len(history.refresh()) == 5 and len(reads) == 5
    reads.clear()
    history.refresh()
    assert reads == []                                    # nothing changed: nothing read
    new = _save(root, "a new one", 6)
    assert [e.seed for e in history.refresh()][0] == 6 and reads == [new.name]
    reads.clear()
    os.utime(made["plain"], ns=(time.time_ns(), time.time_ns() + 10**9))   # a changed file is read again
    history.refresh()
    assert reads == [made["plain"].name]
    # A new process: the saved index (in the outputs folder) is used; unchanged files are not read again.
    assert (root / H.INDEX_FILE).is_file()
    reads.clear()
    again = H.History(root).refresh()
    assert len(again) == 6 and reads == []
    # A deleted image leaves the index.
    made["edit"].unlink()
    assert 2 not in [e.seed for e in H.History(root).refresh()]


def test_paging_5000_images_stays_fast(tmp_path, monkeypatch):
    root = tmp_path / "outputs"
    first = _save(root, "many", 7)
    day = first.parent
    for n in range(2, 5001):                              # hard links: 5,000 results without writing 5,000 files
        os.link(first, day / f"{n:05d}-7.png")
    history = H.History(root)
    assert len(history.refresh()) == 5000
    reads = []
    monkeypatch.setattr(H, "read_png_recipe", lambda path: reads.append(path))
    started = time.perf_counter()
    found = history.search("many")
    page = history.page(found, 3, 40)
    elapsed = time.perf_counter() - started
    assert reads == [] and elapsed < 2.0, f"a search over 5,000 indexed images took {elapsed:.2f}s"
    assert (page.number, page.pages, page.total) == (3, 125, 5000)
    assert [e.number for e in page.entries][:2] == [4920, 4919]
    assert history.page(found, 999, 40).number == 125 and history.page([], 5, 40).pages == 1


def test_boards_list_images_without_moving_them(outputs):
    root, made = outputs
    history = H.History(root)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in made.values()}
    assert history.make_board("  Best   foxes ") == "Best foxes"
    assert history.add_to_board("Best foxes", [str(made["plain"]), _rel(root, made["edit"])]) == 2
    assert history.add_to_board("Best foxes", [str(made["plain"])]) == 0          # already there
    assert history.add_to_board("Rooms", [made["eligen"]]) == 1                  # a new name makes the board
    assert history.boards() == ["Best foxes", "Rooms"]
    assert [e.seed for e in history.search(board="Best foxes")] == [2, 1]
    assert [e.seed for e in history.search(query="blue", board="Best foxes")] == [2]
    assert history.remove_from_board("Best foxes", [str(made["edit"])]) == 1
    assert [e.seed for e in history.search(board="Best foxes")] == [1]
    history.delete_board("Rooms")
    assert history.boards() == ["Best foxes"]
    saved = json.loads((root / H.BOARDS_FILE).read_text())
    assert saved["boards"]["Best foxes"]["items"] == [_rel(root, made["plain"])]
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in made.values()} == before
    assert not list(root.rglob(".*.tmp-*"))                # written atomically: no temporary file left
    with pytest.raises(H.HistoryError, match="Type a name"):
        history.make_board("   ")
    with pytest.raises(H.HistoryError, match="at most 60"):
        history.make_board("x" * 61)
    with pytest.raises(H.HistoryError, match="no board named"):
        history.search(board="Nope")


def test_nothing_outside_the_outputs_folder_is_read(outputs, tmp_path):
    root, made = outputs
    history = H.History(root)
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    (made["plain"].parent / "00999-1.png").symlink_to(secret)    # a link out of the folder is not a result
    refused = [secret, "/etc/passwd", "../secret.png", f"{made['plain'].parent.name}/../../secret.png",
               R.beside(made["edit"], ".ref0.png"), root / ".work" / "123-abc" / "00001-1.png",
               made["plain"].parent / "00999-1.png"]
    for item in refused:
        with pytest.raises(H.HistoryError, match="is not an image in the outputs folder"):
            history.resolve(item)
        with pytest.raises(H.HistoryError):
            history.add_to_board("b", [item])
    assert all(e.path != f"{made['plain'].parent.name}/00999-1.png" for e in history.refresh())
    # A hand-edited boards file naming outside paths shows none of them.
    (root / H.BOARDS_FILE).write_text(json.dumps({"boards": {"b": {"items": ["../secret.png", "/etc/passwd",
                                                                           _rel(root, made["plain"])]}}}))
    assert history.board_items("b") == [_rel(root, made["plain"])]
    result = history.result(_rel(root, made["edit"]))
    assert result["path"] == str(made["edit"].resolve()) and result["recipe"]["prompt"] == "make the fox blue"
    assert result["seed"] == 2 and (result["width"], result["height"]) == (64, 48)


def test_thumbnails_are_small_jpegs_inside_the_outputs_folder_and_follow_the_image(tmp_path):
    import shutil
    root = tmp_path / "outputs"
    big = R.save_image(Image.effect_noise((1024, 768), 60).convert("RGB"),
                       {**BASE, "prompt": "noise", "seed": 9, "width": 1024, "height": 768}, root)
    history = H.History(root)
    rel = _rel(root, big)
    thumb = history.thumbnail(rel)
    assert thumb == root / H.THUMBS / big.parent.name / f"{big.stem}.jpg"
    with Image.open(thumb) as image:
        assert image.format == "JPEG" and image.size == (256, 192)
    assert thumb.stat().st_size < big.stat().st_size / 4
    made = thumb.stat().st_mtime_ns
    assert history.thumbnail(rel) == thumb and thumb.stat().st_mtime_ns == made      # kept while the image is
    # The image rewritten (newer than its thumbnail): a new thumbnail.
    Image.new("RGB", (1024, 768), (250, 0, 0)).save(big)
    os.utime(big, ns=(made + 10 ** 9, made + 10 ** 9))
    assert history.thumbnail(rel) == thumb
    with Image.open(thumb) as image:
        assert image.convert("RGB").getpixel((128, 96))[0] > 200
    assert [e.path for e in history.refresh()] == [rel]                  # thumbnails are not results
    assert history.result(rel)["path"] == str(big.resolve())             # restore / send to: the image itself
    with pytest.raises(H.HistoryError):
        history.thumbnail("../secret.png")
    # Never written outside the outputs folder: a .thumbs that links out of it is not followed.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(root / H.THUMBS)
    (root / H.THUMBS).symlink_to(elsewhere)
    assert history.thumbnail(rel) == big.resolve()
    assert list(elsewhere.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- browser
def _generate(page, prompt, seed):
    from tests.browser import set_number
    page.locator("#gen-prompt textarea").fill(prompt)
    for elem_id, value in (("gen-width", 64), ("gen-height", 64), ("gen-steps", 2), ("gen-seed", seed)):
        set_number(page, elem_id, value)
    page.locator("#gen-generate").click()
    page.wait_for_function(f"document.querySelector('#selected-info textarea').value.includes('Seed: {seed},')")


def _search(page, words):
    """Search History for ``words`` (one image must match) and select that image."""
    box = page.locator("#hist-search textarea, #hist-search input").first
    box.fill(words)
    box.press("Enter")
    page.wait_for_function("""(words) => {
        const alts = Array.from(document.querySelectorAll('#hist-gallery button.thumbnail-lg img'), i => i.alt);
        return alts.length === 1 && alts[0].includes(words);
    }""", arg=words)
    assert page.locator("#hist-page-line").inner_text().startswith("1 image")
    page.locator("#hist-gallery button.thumbnail-item:visible").first.click()   # in the grid or an open image's strip
    page.wait_for_function("document.querySelector('#hist-info textarea').value.includes('Seed: ')")


def test_history_in_the_browser(browser, studio, tmp_path_factory):
    from tests.browser import set_number, studio_page
    shots = pathlib.Path(os.environ.get("FLUX_UI_SHOTS") or tmp_path_factory.mktemp("history-shots"))
    shots.mkdir(parents=True, exist_ok=True)
    with studio_page(browser, studio.url, 60_000) as page:
        _generate(page, "a violet zeppelin over hills", 4101)
        _generate(page, "an orange submarine", 4102)
        page.locator("#gen-prompt textarea").fill("something else")
        page.locator("button[role='tab']", has_text="History").click()
        page.wait_for_selector("#hist-gallery img")
        _search(page, "violet zeppelin")
        page.wait_for_function("document.querySelector('#hist-info textarea').value.includes('Seed: 4101,')")
        assert "Generate" in page.locator("#hist-made").inner_text()
        # The gallery shows the thumbnail (the JPEG under <outputs>/.thumbs, Gradio serves a copy); the selected image
        # beside it is the PNG itself.
        srcs = [i.get_attribute("src") for i in page.locator("#hist-gallery button.thumbnail-lg img").all()]
        assert len(srcs) == 1 and srcs[0].endswith("-4101.jpg"), srcs
        thumbs = list((studio.outputs / ".thumbs").glob("*/*-4101.jpg"))
        assert len(thumbs) == 1 and Image.open(thumbs[0]).format == "JPEG"
        page.wait_for_function("document.querySelector('#hist-full img')?.src?.endsWith('-4101.png')")
        page.screenshot(path=str(shots / "history-01-search.png"), full_page=True)

        # Restore into Generate: the Generate tab opens with the image's prompt and seed.
        page.locator("#hist-restore-generate").click()
        page.wait_for_selector("#gen-generate", state="visible")
        page.wait_for_function("document.querySelector('#gen-seed input').value === '4101'")
        assert page.locator("#gen-prompt textarea").input_value() == "a violet zeppelin over hills"

        # Send the other image to Edit: it becomes the image to edit.
        page.locator("button[role='tab']", has_text="History").click()
        _search(page, "orange submarine")
        page.wait_for_function("document.querySelector('#hist-info textarea').value.includes('Seed: 4102,')")
        page.locator("#hist-send-edit").click()
        page.wait_for_selector("#edit-input img")
        sent = page.locator("#edit-input img").first.get_attribute("src")
        assert sent.endswith("-4102.png"), sent                       # the image itself, not its thumbnail
        page.wait_for_selector("#edit-generate", state="visible")
        page.wait_for_function("document.querySelector('#edit-size-line').innerText.includes('(64x64)')")
        page.screenshot(path=str(shots / "history-02-sent-to-edit.png"), full_page=True)

        # An edit is listed as made in Edit, and restores into Edit (not Generate): instruction and input image.
        page.locator("#edit-prompt textarea").fill("paint it teal 4103")
        set_number(page, "edit-steps", 2)
        page.locator("#edit-generate").click()
        page.wait_for_function("document.querySelector('#edit-selected-info textarea').value.includes('teal 4103')")
        page.locator("#edit-prompt textarea").fill("")
        page.locator("button[role='tab']", has_text="History").click()
        _search(page, "teal 4103")
        page.wait_for_function("document.querySelector('#hist-made').innerText.includes('Made in Edit')")
        assert page.locator("#hist-restore-generate").is_hidden()
        page.locator("#hist-restore-edit").click()
        page.wait_for_selector("#edit-generate", state="visible")
        page.wait_for_function("document.querySelector('#edit-prompt textarea').value === 'paint it teal 4103'")
