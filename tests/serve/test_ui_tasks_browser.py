"""The web UI's X/Y/Z, Animate and Extras tabs in a real headless browser against a real server on the built-in model:
each tab reached from the keyboard, its job run to the end and its result shown (grid with clickable cells, the
animation with its frames, the upscaled image with a download), its errors shown inline, and a phone layout that
does not scroll sideways."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.serve.test_ui_browser import CHROMIUM, open_ui, sync_api

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium found: `apt-get install chromium` (or set EASEL_CHROMIUM)")]
PROMPT = "a red star above a blue circle"
TABS = ["txt2img", "img2img", "Inpaint", "Outpaint", "X/Y/Z", "Animate", "Extras", "PNG info", "Inside", "Train"]


@pytest.fixture(scope="module")
def browser():
    import os
    args = ["--disable-dev-shm-usage"] + (["--no-sandbox"] if os.geteuid() == 0 else [])
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=args)
        yield b
        b.close()


@pytest.fixture
def ui(browser, start_server):
    """(page, server): the UI open and ready on a fresh server; fails the test on any script error."""
    server = start_server()
    context, page, errors = open_ui(browser, server)
    yield page, server
    context.close()
    assert not unexpected(errors), f"the page reported errors: {errors}"


def unexpected(errors: list[str]) -> list[str]:
    """The page's errors but Chromium's own console line for a 4xx answer: these tests send bad input on purpose
    (and check that the page shows the server's message)."""
    return [e for e in errors if not (e.startswith("console: Failed to load resource") and
                                      ("status of 400" in e or "status of 422" in e))]


def tab_by_keyboard(page, name: str) -> None:
    """Move to a tab with the arrow keys from the first one (the WAI-ARIA tabs pattern)."""
    page.focus("#tabs [role=tab][aria-selected=true]")
    page.keyboard.press("Home")
    for _ in range(TABS.index(name)):
        page.keyboard.press("ArrowRight")
    assert page.inner_text("#tabs [role=tab][aria-selected=true]") == name


def png_bytes(w: int = 20, h: int = 12) -> bytes:
    im = Image.new("RGB", (w, h), "navy")
    im.paste((250, 200, 0), (4, 3, w // 2, h - 2))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_xyz_tab_plots_the_form_over_axes(ui):
    page, server = ui
    assert page.locator("#tabs [role=tab]").all_inner_texts() == TABS
    tab_by_keyboard(page, "X/Y/Z")
    assert page.is_visible("#xyz-axes") and page.is_hidden("#gallery") and page.is_hidden("#inspect")
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "2")
    page.fill("#seed", "4")
    page.select_option("#xyz-x-field", "cfg_scale")
    page.fill("#xyz-x-values", "3,7")
    page.select_option("#xyz-y-field", "steps")
    page.click("#generate")  # Y has a field but no values: said inline, nothing queued
    assert "Y axis: write the values of steps" in page.inner_text("#error")
    assert server.queue.jobs() == []
    page.fill("#xyz-y-values", "1-2")
    assert page.inner_text("#xyz-count").startswith("4 cells (2 \u00d7 2)")
    page.click("#generate")
    page.wait_for_selector("body[data-plotted]", timeout=90_000)
    job = server.queue.jobs()[-1]
    assert job.kind == "xyz" and job.state == "done" and job.task.cells[(1, 1, 0)].cfg_scale == 7
    page.wait_for_function("document.getElementById('xyz-grid').naturalWidth > 128")
    assert page.is_hidden("#error") and page.inner_text("#progress-text").startswith("Done: 4 cells and the grid")
    cells = page.locator("#xyz-cells button")
    assert cells.count() == 4
    assert page.locator("#xyz-cells th[scope=col]").all_inner_texts() == ["CFG Scale: 3", "CFG Scale: 7"]
    cells.nth(1).focus()
    page.keyboard.press("Enter")  # a cell, from the keyboard: shown with its parameters
    assert "CFG scale: 7" in page.inner_text("#xyz-infotext") and "Steps: 1" in page.inner_text("#xyz-infotext")
    assert page.get_attribute("#xyz-grid", "src").endswith("/cells/1.png")
    assert page.get_attribute("#xyz-download-cell", "href").endswith("/cells/1.png")
    cells.nth(1).click()  # again: back to the grid
    assert page.get_attribute("#xyz-grid", "src").endswith("/grid.png") and page.is_hidden("#xyz-info")
    row = page.locator("#queue-list li").first
    assert row.locator(".job-text").inner_text().startswith("X/Y/Z plot, 4 cells") and "4/4 cells" in row.inner_text()


def test_animate_tab_shows_frames_and_the_animation(ui):
    page, server = ui
    tab_by_keyboard(page, "Animate")
    assert page.is_visible("#animate-view") and page.is_hidden("#generate-view")
    page.fill("#anim-prompts", "a red circle\na blue square")
    set_fields = {"#anim-frames": "3", "#anim-steps": "2", "#anim-seed": "5", "#anim-zoom": "0:(foo)"}
    for selector, value in set_fields.items():
        page.fill(selector, value)
    page.click("#anim-start")  # a bad schedule: the server's message, inline
    page.wait_for_selector("#anim-error:not([hidden])")
    assert "unknown name 'foo' in zoom" in page.inner_text("#anim-error") and server.queue.jobs() == []
    page.fill("#anim-zoom", "0:(1.0), 2:(1.1)")
    page.focus("#anim-prompts")
    page.keyboard.press("Control+Enter")  # starts from the keyboard
    page.wait_for_selector("body[data-animated]", timeout=90_000)
    job = server.queue.jobs()[-1]
    assert job.kind == "animate" and job.state == "done" and len(job.task.frames) == 3
    assert page.is_hidden("#anim-error")
    assert page.inner_text("#anim-counter") == "3 / 3" and page.inner_text("#anim-status").startswith("Done: 3 frames")
    page.wait_for_function("document.getElementById('anim-view').naturalWidth === 64")
    assert page.get_attribute("#anim-view", "src").endswith(f"/animate/{job.id}/animation")
    assert page.locator("#anim-strip button").count() == 3
    assert page.get_attribute("#anim-download", "download") == f"easel-{job.id}.gif"
    page.click("#anim-strip button >> nth=2")
    assert page.get_attribute("#anim-view", "src").endswith("/frames/2.png")
    page.click("#anim-play")
    assert page.get_attribute("#anim-view", "src").endswith("/animation")
    page.reload()  # the newest animation is shown again after a reload
    page.wait_for_selector("body[data-ready=true]")
    page.wait_for_selector("body[data-animated]")
    assert page.inner_text("#anim-counter") == "3 / 3"


def test_extras_tab_upscales_an_upload(ui):
    page, server = ui
    tab_by_keyboard(page, "Extras")
    assert page.locator("#extras-upscaler option").all_inner_texts()[:2] == ["lanczos", "nearest"]
    page.click("#extras-start")  # no image yet: said inline
    assert "choose an image first" in page.inner_text("#extras-error")
    page.set_input_files("#extras-file", files=[{"name": "small.png", "mimeType": "image/png", "buffer": png_bytes()}])
    page.wait_for_function("document.getElementById('extras-source-size').textContent.includes('20\u00d712')")
    page.fill("#extras-scale", "100")
    page.click("#extras-start")  # over the schema's bound: the server's message, inline
    page.wait_for_function("document.getElementById('extras-error').textContent.includes('scale')")
    page.fill("#extras-scale", "3")
    assert "\u2192 60\u00d736" in page.inner_text("#extras-source-size")
    page.focus("#extras-start")
    page.keyboard.press("Enter")
    page.wait_for_selector("body[data-upscaled]", timeout=60_000)
    job = server.queue.jobs()[-1]
    assert job.kind == "extras" and job.state == "done"
    page.wait_for_function("document.getElementById('extras-result').naturalWidth === 60")
    assert page.is_hidden("#extras-error") and page.inner_text("#extras-status") == "Done: 60\u00d736 with lanczos"
    assert page.get_attribute("#extras-download", "href") == f"/api/v1/extras/{job.id}/image.png"


def test_phone_layout_of_the_new_tabs(browser, start_server):
    server = start_server()
    context, page, errors = open_ui(browser, server, viewport=(390, 844), color_scheme="light")
    for name in ("X/Y/Z", "Animate", "Extras"):
        page.click(f"#tabs [role=tab]:text-is('{name}')")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the {name} tab scrolls sideways on a phone ({width} px)"
    context.close()
    assert not errors, errors


def test_animate_tab_counts_frames_live_and_cancels(browser, start_server):
    """Held at its second frame: the counter says 1 / 4 and shows the first frame; Cancel keeps that frame."""
    from easel.serve.jobs import JobQueue
    from tests.serve.conftest import builtin_pipe
    from tests.serve.test_task_jobs import LIMITS, GatedTask
    gated = GatedTask(builtin_pipe(), hold_at=1)
    server = start_server(LIMITS, JobQueue(max_queued=8, loader=lambda name, device: gated))
    context, page, errors = open_ui(browser, server)
    page.click("#tab-animate")
    page.fill("#anim-prompts", "a red circle")
    for selector, value in {"#anim-frames": "4", "#anim-steps": "2", "#anim-seed": "3", "#anim-zoom": ""}.items():
        page.fill(selector, value)
    page.click("#anim-start")
    assert gated.reached.wait(60)
    page.wait_for_function("document.getElementById('anim-counter').textContent === '1 / 4'")
    assert page.inner_text("#anim-status").startswith("Frame 2 of 4")
    page.wait_for_function("document.getElementById('anim-view').src.startsWith('data:image/png')")  # frame 0
    assert page.locator("#anim-strip button").count() == 1
    assert page.locator("#queue-list li[data-state=running] .detail").inner_text() == "frame 1/4"
    page.click("#anim-cancel")
    page.wait_for_function("document.getElementById('anim-status').textContent.startsWith('Cancelling')")
    gated.gate.set()
    page.wait_for_selector("body[data-animated]", timeout=60_000)
    assert page.inner_text("#anim-status") == "Cancelled: kept the 1 frame(s) made"
    assert page.get_attribute("#anim-view", "src").endswith("/animation") and page.is_disabled("#anim-cancel")
    context.close()
    assert not unexpected(errors), errors
