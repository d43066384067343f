"""The web UI end to end in a real headless browser (Debian's chromium driven by Playwright) against a real
server on the built-in model: generate, paint a mask and inpaint, img2img/outpaint, cancel, PNG info, the queue
and reloads, the phone layout, keyboard tabs, the full-size view and the LoRA picker."""
from __future__ import annotations

import base64
import io
import os
import shutil
import time

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")


def find_chromium() -> str | None:
    """A Chromium/Chrome binary: $EASEL_CHROMIUM, else the first on PATH (Debian's package: /usr/bin/chromium)."""
    candidates = [os.environ.get("EASEL_CHROMIUM"), *(shutil.which(n) for n in
                  ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"))]
    return next((c for c in candidates if c and os.path.exists(c)), None)


CHROMIUM = find_chromium()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium found: `apt-get install chromium` (or set EASEL_CHROMIUM); .ci/run installs it")]
PROMPT = "a red star above a blue circle"


@pytest.fixture(scope="module")
def browser():
    """One headless chromium for the module (no Playwright browser download: the system's binary)."""
    args = ["--disable-dev-shm-usage"] + (["--no-sandbox"] if os.geteuid() == 0 else [])  # root has no sandbox
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=args)
        yield b
        b.close()


def open_ui(browser, server, viewport=(1280, 1000), color_scheme="dark"):
    """(context, page, errors): the UI open and ready; `errors` collects script errors."""
    context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]}, color_scheme=color_scheme)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    return context, page, errors


@pytest.fixture
def ui(browser, start_server):
    """(page, server): the UI open and ready on a fresh server; fails the test on any script error."""
    server = start_server()
    context, page, errors = open_ui(browser, server)
    yield page, server
    context.close()
    assert not errors, f"the page reported errors: {errors}"


def reload(page) -> None:
    page.reload()
    page.wait_for_selector("body[data-ready=true]")


def generate(page, timeout_s: float = 90) -> str:
    """Click Generate and wait for the job to finish; returns its id."""
    before = page.get_attribute("body", "data-finished")
    page.click("#generate")
    page.wait_for_function("b => document.body.dataset.finished && document.body.dataset.finished !== b",
                           arg=before, timeout=timeout_s * 1000)
    return page.get_attribute("body", "data-finished")


def sample_png(path) -> str:
    """A 64x64 picture with distinct left and right halves (so a repainted half is easy to tell)."""
    im = Image.new("RGB", (64, 64), (40, 120, 200))
    d = ImageDraw.Draw(im)
    d.ellipse((4, 8, 28, 32), fill=(230, 40, 40))
    d.rectangle((38, 30, 60, 58), fill=(250, 220, 30))
    im.save(path)
    return str(path)


def test_txt2img_generates_and_shows_parameters(ui):
    page, server = ui
    tabs = ["txt2img", "img2img", "Inpaint", "Outpaint", "X/Y/Z", "Animate", "Extras", "PNG info", "Inside", "Train"]
    assert page.locator("#tabs [role=tab]").all_inner_texts() == tabs
    assert "Euler a" in page.locator("#sampler option").all_inner_texts()  # lists come from the server
    assert "Karras" in page.locator("#scheduler option").all_inner_texts()
    assert page.input_value("#width") == "64"  # the built-in model's own size, read from its file header
    page.fill("#prompt", PROMPT)
    page.fill("#negative_prompt", "green")
    page.fill("#steps", "2")
    page.fill("#batch_size", "2")
    page.fill("#seed", "1234")
    assert page.is_hidden("#queue-view")  # nothing queued or finished yet
    job_id = generate(page)

    job = server.queue.get(job_id)
    assert job.state == "done" and job.request.prompt == PROMPT and job.request.negative_prompt == "green"
    assert (job.request.steps, job.request.seed, job.request.batch_size) == (2, 1234, 2)
    assert page.locator("#gallery .thumb").count() == 2
    page.wait_for_function("document.getElementById('selected-image').naturalWidth === 64")
    info = page.inner_text("#infotext")
    assert PROMPT in info and "Negative prompt: green" in info and "Steps: 2" in info and "Seed: 1234" in info
    assert page.inner_text("#progress-text").startswith("Done: 2 images in ")

    page.click("#gallery .thumb >> nth=1")  # the second image: seed 1235, and the recycle button picks it up
    assert "Seed: 1235" in page.inner_text("#infotext")
    page.click("#seed-random")
    assert page.input_value("#seed") == "-1"
    page.click("#seed-reuse")
    assert page.input_value("#seed") == "1235"
    row = page.locator("#queue-list li").first  # the finished job, listed in the queue view
    assert (row.get_attribute("data-state"), row.locator(".job-text").inner_text(),
            row.locator(".detail").inner_text()) == ("done", PROMPT, "2 images")

    # The full-size view: a modal dialog; arrows move through the results, Esc closes it and focus returns.
    page.click("#open-full")
    page.wait_for_selector("#lightbox[open]")
    assert page.get_attribute("#lightbox-image", "src") == page.get_attribute("#selected-image", "src")
    assert page.locator("#lightbox-image").bounding_box()["width"] > 500  # larger than the 384 px viewer
    assert page.evaluate("document.activeElement.id") == "lightbox-close"
    assert page.inner_text("#lightbox-caption").startswith("Seed 1235")
    page.keyboard.press("ArrowRight")
    assert page.inner_text("#lightbox-caption").startswith("Seed 1234")
    page.keyboard.press("Escape")
    page.wait_for_selector("#lightbox", state="hidden")
    assert page.evaluate("document.activeElement.id") == "open-full"
    assert "Seed: 1234" in page.inner_text("#infotext")  # the view follows what the lightbox showed

    page.click("#send-inpaint")  # the image and its prompt go to the inpaint tab
    page.wait_for_selector("#tabs [data-tab=inpaint][aria-selected=true]")
    assert page.is_visible("#mask-canvas") and page.input_value("#prompt") == PROMPT



def test_hires_fix_and_lora_picker(browser, start_server, tmp_path, monkeypatch):
    """Hires options reach the request; a LoRA picked from the server's list is written into the prompt as
    <lora:name:weight> (so the PNG's parameters carry it for A1111/civitai), its chip edits and removes the tag."""
    import torch

    from easel.weights.lora import save_lora
    from tests.serve.conftest import builtin_pipe
    model = builtin_pipe().loaded.model
    k = model.unet.middle_block[1].transformer_blocks[0].attn2.to_k.weight  # (out, in)
    g = torch.Generator().manual_seed(0)
    save_lora(tmp_path / "tinystyle.safetensors", {"middle_block.1.transformer_blocks.0.attn2.to_k": (
        torch.randn(2, k.shape[1], generator=g), torch.randn(k.shape[0], 2, generator=g), 2.0)},
        config=model.config)
    monkeypatch.setenv("EASEL_LORA_DIRS", str(tmp_path))
    server = start_server()
    context, page, errors = open_ui(browser, server)
    assert page.is_disabled("#hr_scale")  # greyed out until hires fix is on
    page.check("#enable_hr")
    page.fill("#hr_scale", "1.5")
    page.fill("#hr_second_pass_steps", "2")
    page.fill("#prompt", PROMPT)
    page.select_option("#lora-pick", "tinystyle")
    page.fill("#lora-weight", "0.8")
    page.click("#lora-add")
    assert page.input_value("#prompt") == PROMPT + " <lora:tinystyle:0.8>"
    assert page.inner_text("#lora-list").startswith("tinystyle")
    page.fill("#lora-list input", "0.5")  # the chip's weight rewrites the tag in place
    page.dispatch_event("#lora-list input", "change")
    assert page.input_value("#prompt") == PROMPT + " <lora:tinystyle:0.5>"
    page.fill("#steps", "2")
    page.fill("#batch_size", "1")
    job = server.queue.get(generate(page))
    assert job.state == "done", job.error
    assert job.request.enable_hr and (job.request.hr_scale, job.request.hr_second_pass_steps) == (1.5, 2)
    assert job.request.prompt == PROMPT + " <lora:tinystyle:0.5>" and not job.request.loras
    assert job.results[0].image.size == (96, 96)
    assert page.inner_text("#infotext").startswith(PROMPT + " <lora:tinystyle:0.5>")
    page.click("#lora-list button")  # removing the chip removes the tag
    assert page.input_value("#prompt") == PROMPT and page.locator("#lora-list li").count() == 0
    context.close()
    assert not errors, errors


def paint(page, selector: str, strokes: list[tuple[float, float, float, float]]) -> None:
    """Drag the mouse over an element along strokes given as fractions (x0, y0, x1, y1) of its box."""
    box = page.locator(selector).bounding_box()
    for x0, y0, x1, y1 in strokes:
        page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + x1 * box["width"], box["y"] + y1 * box["height"], steps=8)
        page.mouse.up()


def test_paint_mask_and_inpaint(ui, tmp_path):
    page, server = ui
    page.click("#tabs [data-tab=inpaint]")
    page.click("#generate")  # nothing to edit yet: the page says what is missing instead of sending a request
    assert "needs an image" in page.inner_text("#error")
    page.set_input_files("#source-file", sample_png(tmp_path / "in.png"))
    page.wait_for_selector("#canvas-wrap:not([hidden])")
    page.click("#generate")
    assert "paint the area" in page.inner_text("#error")

    page.fill("#brush-size", "60")
    paint(page, "#mask-canvas", [(0.04, y, 0.36, y) for y in (0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95)])
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "2")
    page.fill("#batch_size", "1")
    page.fill("#denoising_strength", "1")
    job_id = generate(page)

    job = server.queue.get(job_id)
    assert job.state == "done", job.error
    assert job.request.mode == "inpaint" and job.request.denoising_strength == 1.0
    mask = np.asarray(job.request.mask.convert("L"))
    assert mask.shape == (64, 64)
    assert (mask[:, 4:20] == 255).mean() > 0.95 and (mask[:, 40:] == 0).all()  # painted left, untouched right
    original = np.asarray(Image.open(tmp_path / "in.png").convert("RGB")).astype(int)
    result = np.asarray(job.results[0].image.convert("RGB")).astype(int)
    assert (result[:, 48:] == original[:, 48:]).all()  # outside the (blurred) mask: the input, pixel for pixel
    assert np.abs(result[:, 4:20] - original[:, 4:20]).mean() > 10  # inside: repainted
    page.wait_for_selector("#gallery .thumb")
    assert "Mask blur: 4" in page.inner_text("#infotext")


def test_img2img_and_outpaint(ui, tmp_path):
    page, server = ui
    page.click("#tabs [data-tab=img2img]")
    page.set_input_files("#source-file", sample_png(tmp_path / "in.png"))
    page.wait_for_selector("#canvas-wrap:not([hidden])")
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "2")
    page.fill("#batch_size", "1")
    page.fill("#denoising_strength", "0.5")
    job = server.queue.get(generate(page))
    assert job.state == "done" and job.request.mode == "img2img" and job.request.denoising_strength == 0.5
    assert "Denoising strength: 0.5" in page.inner_text("#infotext")

    page.click("#tabs [data-tab=outpaint]")  # the same picture stays loaded
    page.fill("#outpaint_right", "16")
    assert page.inner_text("#source-size") == "64\u00d764 px \u2192 80\u00d764"
    job = server.queue.get(generate(page))
    assert job.state == "done", job.error
    assert job.request.mode == "outpaint" and job.request.outpaint_right == 16 and job.request.mask is None
    assert job.results[0].image.size == (80, 64)
    page.wait_for_function("document.getElementById('selected-image').naturalWidth === 80")


def test_cancel_running_job_with_live_progress(ui):
    page, server = ui
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "150")  # long enough to still be running when the click lands
    page.fill("#batch_size", "4")
    page.click("#generate")
    page.wait_for_function("document.getElementById('progress-text').textContent.includes('ETA')", timeout=60000)
    page.wait_for_selector("#preview[src^='data:image/png']")  # a live preview arrived over server-sent events
    assert page.is_enabled("#cancel")
    assert page.is_enabled("#generate")  # another click would queue another job
    page.click("#cancel")
    page.wait_for_selector("body[data-finished]", timeout=60000)

    job = server.queue.get(page.get_attribute("body", "data-finished"))
    assert job.state == "cancelled" and job.step < job.total
    assert page.inner_text("#progress-text").startswith("Cancelled")
    assert page.is_enabled("#generate") and page.is_disabled("#cancel")
    assert page.get_attribute("#queue-list li", "data-state") == "cancelled"


def test_interrupt_from_another_client_ends_the_job_on_the_page(ui):
    """An A1111 client's /sdapi/v1/interrupt ends the job as "interrupted" (a state of its own): the page sees it end."""
    page, server = ui
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "150")
    page.fill("#batch_size", "4")
    page.click("#generate")
    page.wait_for_function("document.getElementById('progress-text').textContent.startsWith('Step')", timeout=60000)
    httpx.post(server.url + "/sdapi/v1/interrupt", timeout=30).raise_for_status()
    page.wait_for_selector("body[data-finished]", timeout=60000)
    assert server.queue.get(page.get_attribute("body", "data-finished")).state == "interrupted"
    assert page.inner_text("#progress-text").startswith("Interrupted")
    assert page.get_attribute("#queue-list li", "data-state") == "interrupted" and page.is_disabled("#cancel")


def test_png_info_of_a_dropped_generated_image(ui):
    page, server = ui
    with httpx.Client(base_url=server.url, timeout=60) as client:
        job = client.post("/api/v1/jobs", json={"prompt": PROMPT, "negative_prompt": "blurry", "steps": 2,
                                                 "batch_size": 1, "seed": 77, "cfg_scale": 5.5}).json()
        deadline = time.monotonic() + 60
        while client.get(f"/api/v1/jobs/{job['id']}").json()["state"] != "done":
            assert time.monotonic() < deadline, "the job never finished"
            time.sleep(0.05)
        png = client.get(f"/api/v1/jobs/{job['id']}/images/0.png").content

    page.click("#tabs [data-tab=pnginfo]")
    page.evaluate("""([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], name, {type: "image/png"}));
        document.getElementById("pnginfo-drop").dispatchEvent(
            new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
    }""", [base64.b64encode(png).decode(), "dropped.png"])
    page.wait_for_selector("body[data-pnginfo=read]")
    text = page.inner_text("#pnginfo-text")
    assert text.startswith(PROMPT) and "Negative prompt: blurry" in text
    assert "Seed: 77" in text and "CFG scale: 5.5" in text and "Size: 64x64" in text

    page.click("#pnginfo-txt2img")  # the parameters fill the form
    page.wait_for_selector("#tabs [data-tab=txt2img][aria-selected=true]")
    assert page.input_value("#prompt") == PROMPT and page.input_value("#negative_prompt") == "blurry"
    assert (page.input_value("#seed"), page.input_value("#steps"), page.input_value("#cfg_scale")) == ("77", "2", "5.5")

    buf = io.BytesIO()  # an image without parameters: the tab says so, and offers nothing to send
    Image.new("RGB", (16, 16), "white").save(buf, format="PNG")
    page.click("#tabs [data-tab=pnginfo]")
    assert page.is_visible("#pnginfo-actions")  # still showing the first image's buttons
    page.set_input_files("#pnginfo-file", files=[{"name": "plain.png", "mimeType": "image/png", "buffer": buf.getvalue()}])
    page.wait_for_function("document.getElementById('pnginfo-text').textContent.includes('no generation parameters')")
    assert page.is_hidden("#pnginfo-actions")


def test_page_works_behind_a_token(browser, start_server):
    """With --token, /?token=... once: the page, its scripts, images and event streams then authenticate with the
    HttpOnly cookie the server set, no later URL carries the token, and the address bar drops it."""
    from easel.serve.app import Settings
    server = start_server(Settings(token="s3cret"))
    context = browser.new_context()
    page = context.new_page()
    failed, urls = [], []
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.on("request", lambda r: urls.append(r.url))
    page.goto(server.url + "/?token=s3cret")
    page.wait_for_selector("body[data-ready=true]")
    assert page.url == server.url + "/"
    assert page.is_hidden("#error") and page.locator("#sampler option").count() > 5
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "2")
    page.fill("#batch_size", "1")
    generate(page)
    page.wait_for_function("document.getElementById('selected-image').naturalWidth === 64")
    reload(page)  # the cookie alone
    page.wait_for_function("document.getElementById('selected-image').naturalWidth === 64")
    assert any("/events" in u for u in urls) and any(u.endswith("/images/0.png") for u in urls)
    assert [u for u in urls if "s3cret" in u] == [server.url + "/?token=s3cret"]
    assert "s3cret" not in page.content() and not page.evaluate("document.cookie")  # HttpOnly: not for scripts
    context.close()
    assert not failed, failed


def job_rows(page) -> list[tuple[str, str]]:
    """(state, job id) of each row of the queue list, top to bottom."""
    return page.eval_on_selector_all("#queue-list li", "rows => rows.map((r) => [r.dataset.state, r.dataset.id])")


def test_queue_survives_reloads(ui):
    """Several jobs queue up; a reload keeps the form, follows the running job again and lists the queue;
    each job cancels from its row; finished jobs' images are back in the gallery after the next reload."""
    page, server = ui
    page.fill("#prompt", PROMPT)
    page.fill("#negative_prompt", "green")
    page.fill("#steps", "150")  # a long first job, so the others wait behind it
    page.fill("#batch_size", "4")
    page.click("#generate")
    page.fill("#steps", "2")
    page.fill("#batch_size", "1")
    page.fill("#seed", "99")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#queue-list li').length === 2")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#queue-list li').length === 3")
    long_id = page.get_attribute("body", "data-job")
    page.wait_for_function("document.getElementById('progress-text').textContent.startsWith('Step')", timeout=60000)

    reload(page)
    assert (page.input_value("#prompt"), page.input_value("#negative_prompt")) == (PROMPT, "green")
    assert (page.input_value("#steps"), page.input_value("#batch_size"), page.input_value("#seed")) == ("2", "1", "99")
    rows = job_rows(page)
    assert [state for state, _ in rows] == ["running", "queued", "queued"] and rows[0][1] == long_id
    assert page.get_attribute("body", "data-job") == long_id and page.is_enabled("#cancel")
    page.wait_for_function("document.getElementById('progress-text').textContent.startsWith('Step')", timeout=60000)
    assert "1 running \u00b7 2 queued" in page.inner_text("#queue-counts")

    last = rows[2][1]
    page.click(f"#queue-list li[data-id='{last}'] .job-cancel")  # a queued job: removed from the queue
    page.wait_for_selector(f"#queue-list li[data-id='{last}'][data-state=cancelled]")
    page.click("#cancel")  # the running job (the one in the progress bar)
    middle = rows[1][1]
    page.wait_for_function("id => document.body.dataset.finished === id", arg=middle, timeout=60000)
    states = {i: server.queue.get(i).state for i in (long_id, middle, last)}
    assert states == {long_id: "cancelled", middle: "done", last: "cancelled"}
    assert page.is_disabled("#cancel")

    reload(page)
    assert page.locator(f"#gallery .thumb[data-job='{middle}']").count() == 1
    assert len(server.queue.get(long_id).results) == page.locator(f"#gallery .thumb[data-job='{long_id}']").count()
    assert [state for state, _ in job_rows(page)] == ["cancelled", "done", "cancelled"]
    assert page.get_attribute("#gallery .thumb.selected", "data-job") == middle and page.is_visible("#open-full")


def test_tabs_follow_the_arrow_keys(ui):
    """WAI-ARIA tabs: one tab in the Tab order; Left/Right (wrapping), Home and End select and focus."""
    page, _ = ui

    def selected():
        tabs = page.eval_on_selector_all("#tabs [role=tab]", "ts => ts.map((t) => [t.dataset.tab, "
                                         "t.getAttribute('aria-selected'), t.tabIndex])")
        on = [name for name, sel, _ in tabs if sel == "true"]
        assert len(on) == 1 and [name for name, _, index in tabs if index == 0] == on  # roving tabindex
        assert page.evaluate("document.activeElement.dataset.tab") == on[0]
        return on[0]

    page.focus("#tab-txt2img")
    for key, want in [("ArrowRight", "img2img"), ("ArrowRight", "inpaint"), ("End", "train"),
                      ("ArrowRight", "txt2img"), ("ArrowLeft", "train"), ("Home", "txt2img"),
                      ("ArrowLeft", "train"), ("ArrowLeft", "inside"), ("ArrowLeft", "pnginfo"),
                      ("ArrowLeft", "extras"), ("ArrowLeft", "animate"), ("ArrowLeft", "xyz"),
                      ("ArrowLeft", "outpaint")]:
        page.keyboard.press(key)
        assert selected() == want, key
    assert page.is_visible("#outpaint_left") and page.get_attribute("#generate-view", "aria-labelledby") == "tab-outpaint"
    page.keyboard.press("Tab")  # out of the tab list, into the panel
    assert page.evaluate("document.activeElement.getAttribute('role')") != "tab"
    reload(page)  # the tab is part of what a reload keeps
    assert page.get_attribute("#tab-outpaint", "aria-selected") == "true"


def rgb(css: str) -> str:
    """'rgb(r, g, b)' (a computed style) -> '#rrggbb'."""
    return "#" + "".join(f"{int(v):02x}" for v in css[css.index("(") + 1:css.index(")")].split(",")[:3])


def test_phone_layout(browser, start_server):
    """At 390x844 (light scheme): nothing wider than the screen, every tab on it, the result right under the
    Generate button; the Generate button's and an error's colours as drawn meet WCAG AA."""
    from tests.serve.test_ui import contrast
    server = start_server()
    context, page, errors = open_ui(browser, server, viewport=(390, 844), color_scheme="light")
    width = 390

    def assert_fits():
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        for box in (page.locator("#tabs [role=tab]").nth(i).bounding_box() for i in range(7)):
            assert box["x"] >= 0 and box["x"] + box["width"] <= width, box

    assert_fits()
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "2")
    page.fill("#batch_size", "2")
    page.check("#inspect")
    job_id = generate(page)
    page.wait_for_function("document.getElementById('selected-image').naturalWidth === 64")
    assert_fits()
    button, image = page.locator("#generate").bounding_box(), page.locator("#selected-image").bounding_box()
    assert image["y"] > button["y"] and image["y"] + image["height"] <= 844, (button, image)  # seen without scrolling
    style = "([id, p]) => getComputedStyle(document.getElementById(id))[p]"
    colour = lambda i, prop: rgb(page.evaluate(style, [i, prop]))  # noqa: E731
    assert contrast(colour("generate", "color"), colour("generate", "backgroundColor")) >= 4.5
    for tab in ("inpaint", "outpaint", "pnginfo", "train", "inside"):
        page.click(f"#tab-{tab}")
        assert_fits()
        if tab == "train":  # a server without --train-root: the tab says how to turn training on
            assert page.is_visible("#train-off") and "--train-root" in page.inner_text("#train-off")
            assert page.is_disabled("#train-start")
    page.wait_for_function("id => document.body.dataset.inside === id", arg=job_id)
    assert_fits()  # the Inside tab's film strip, maps and token table in one column (the table scrolls by itself)
    film, tokens = page.locator(".film").bounding_box(), page.locator("#inside-tokens").bounding_box()
    assert tokens["y"] > film["y"] + film["height"]
    page.click("#tab-inpaint")
    page.click("#generate")  # no image: an error shows
    assert colour("output", "backgroundColor") == "#ffffff"  # light scheme
    assert contrast(colour("error", "color"), colour("output", "backgroundColor")) >= 4.5
    context.close()
    assert not errors, errors


def test_inside_tab_after_a_captured_generation(ui):
    """Generate with "Capture inside": the Inside tab shows the run's film strip (the slider moves by keyboard
    and mouse, sigma follows the schedule), a click on a token shows its map, and the token table."""
    page, server = ui
    page.click("#tab-inside")
    assert page.is_visible("#inside-empty") and page.is_hidden("#inside-content")
    page.click("#tab-txt2img")
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "6")
    page.fill("#seed", "3")
    page.fill("#batch_size", "1")
    page.check("#inspect")
    job_id = generate(page)
    page.wait_for_function("id => document.body.dataset.inside === id", arg=job_id)
    job = server.queue.get(job_id)
    assert job.inspect and job.inside is not None
    sigmas = job.inside.data["passes"][0]["sigmas"]

    page.click("#tab-inside")
    assert page.is_visible("#inside-content") and page.is_hidden("#inside-empty")
    assert page.get_attribute("#inside-step", "max") == "5"
    assert page.inner_text("#inside-step-text") == f"6/6 \u00b7 sigma {sigmas[5]:.3g}"  # the last step first
    page.focus("#inside-step")
    page.keyboard.press("Home")
    assert page.inner_text("#inside-step-text") == f"1/6 \u00b7 sigma {sigmas[0]:.3g}"
    page.keyboard.press("ArrowRight")
    assert page.inner_text("#inside-step-text").startswith("2/6")
    assert page.get_attribute("#inside-x0", "src").endswith("/inside/pass0-step1-x0.png")
    page.wait_for_function("['x0', 'latent', 'noise'].every((k) => document.getElementById('inside-' + k)"
                           ".naturalWidth > 0)")
    marker = page.locator("#inside-schedule .now")
    assert marker.get_attribute("cx") == page.locator("#inside-schedule .dot").nth(1).get_attribute("cx")
    box = page.locator("#inside-step").bounding_box()  # a click at the right end: the last step
    page.mouse.click(box["x"] + box["width"] - 2, box["y"] + box["height"] / 2)
    assert page.inner_text("#inside-step-text").startswith("6/6")
    page.click("#inside-strip .frame >> nth=2")  # a frame of the strip
    assert page.inner_text("#inside-step-text").startswith("3/6")

    red = page.locator("#inside-tokens .token[data-key='2']")
    assert red.inner_text().split() == ["2", "red"]
    red.click()
    assert red.get_attribute("aria-pressed") == "true"
    assert page.get_attribute("#inside-map", "src").endswith("/inside/token-2.png")
    assert "token 2: red" in page.inner_text("#inside-map-caption")
    page.wait_for_function("document.getElementById('inside-map').naturalWidth > 0")
    page.keyboard.press("Tab")  # the next token takes focus; Enter shows it
    page.keyboard.press("Enter")
    assert page.get_attribute("#inside-map", "src").endswith("/inside/token-3.png")
    rows = page.locator("#inside-table tbody tr")
    assert rows.count() == len(job.inside.data["tokens"])
    assert rows.nth(2).locator("td").all_inner_texts()[:4] == ["2", "549", "red", "red"]
    assert rows.last.locator("td").nth(2).inner_text() == "<pad> \u00d768"
    reload(page)  # the capture is the server's: a reload shows it again
    page.wait_for_function("id => document.body.dataset.inside === id", arg=job_id)
    page.click("#tab-inside")
    assert page.input_value("#inside-job") == job_id and page.is_visible("#inside-content")
    assert page.is_checked("#inspect")  # the option is part of the form a reload keeps


def test_train_tab_trains_a_lora_shows_its_curve_and_samples_and_cancels(browser, start_server, tmp_path,
                                                                         monkeypatch):
    """The Train tab on a server with --train-root: pick the dataset, train a LoRA for 3 steps (the live loss curve
    gets a point per step, the sample sheets a frame each, keyboard-selectable), use it in txt2img; a long run is
    cancelled at a step; a reload shows the newest training job again."""
    from easel.serve.app import Settings
    from tests.serve.test_train import write_dataset
    root = tmp_path / "root"
    write_dataset(root / "circles")
    monkeypatch.setenv("EASEL_LORA_DIRS", str(tmp_path / "loras"))
    monkeypatch.chdir(tmp_path)
    server = start_server(Settings(train_root=str(root)))
    context, page, errors = open_ui(browser, server)
    page.click("#tab-train")
    assert page.is_hidden("#train-off") and page.is_visible("#train-form")
    assert page.locator("#train-dataset option").all_inner_texts() == ["circles (4 images)"]
    assert page.input_value("#train-steps") == "500" and page.input_value("#train-rank") == "8"
    assert page.is_visible("#train-rank") and page.is_hidden("#train-init_word")
    page.select_option("#train-kind", "embedding")  # the kind's own settings, and its default steps and rate
    assert page.is_visible("#train-init_word") and page.is_hidden("#train-rank")
    assert page.input_value("#train-steps") == "1000" and page.input_value("#train-lr") == "0.005"
    page.select_option("#train-kind", "lora")
    page.click("#train-start")  # no name yet: said, and nothing queued
    assert "Name" in page.inner_text("#train-error") and not server.queue.jobs()
    page.fill("#train-name", "dots")
    page.fill("#train-steps", "3")
    page.fill("#train-batch_size", "2")
    page.fill("#train-rank", "2")
    page.fill("#train-sample_prompts", "a red circle")
    page.fill("#train-sample_every", "1")
    page.click("#train-start")
    page.wait_for_selector("body[data-trained]", timeout=300_000)
    job_id = page.get_attribute("body", "data-trained")
    assert server.queue.get(job_id).state == "done"
    page.wait_for_function("document.getElementById('train-curve').dataset.points === '3'")
    assert page.locator("#train-curve svg polyline").count() == 2
    assert "3 steps" in page.get_attribute("#train-curve svg", "aria-label")
    assert page.inner_text("#train-status").startswith("Done: 3 steps")
    assert page.locator("#train-strip .frame").count() == 4  # steps 0, 1, 2 and the end
    page.wait_for_function("document.getElementById('train-sample').naturalWidth === 64")
    assert page.inner_text("#train-sample-step") == "at step 3"
    page.focus("#train-strip .frame >> nth=0")
    page.keyboard.press("Enter")
    assert page.inner_text("#train-sample-step") == "at step 0"
    assert "<lora:dots:1>" in page.inner_text("#train-result-text")
    page.click("#train-use")
    assert page.get_attribute("#tab-txt2img", "aria-selected") == "true"
    assert "<lora:dots:1>" in page.input_value("#prompt")
    assert "dots" in page.locator("#lora-pick option").all_inner_texts()
    row = page.locator(f"#queue-list li[data-id='{job_id}']")
    assert row.locator(".job-text").inner_text() == "train lora dots on circles"

    page.click("#tab-train")
    page.fill("#train-name", "long")
    page.fill("#train-steps", "400")
    page.fill("#train-sample_every", "0")
    page.click("#train-start")
    page.wait_for_function("document.getElementById('train-status').textContent.startsWith('Step ')",
                           timeout=120_000)
    page.click("#train-cancel")
    page.wait_for_function("id => document.body.dataset.trained !== id", arg=job_id, timeout=120_000)
    assert page.inner_text("#train-status").startswith("Cancelled at step")
    assert not (tmp_path / "loras" / "long.safetensors").exists()
    reload(page)
    page.click("#tab-train")
    page.wait_for_function("document.getElementById('train-status').textContent.startsWith('Cancelled')")
    assert page.input_value("#train-name") == "long"  # the form is kept too
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: one column, the run above the form
    page.wait_for_function("document.documentElement.scrollWidth <= 390")
    curve, form = page.locator("#train-curve").bounding_box(), page.locator("#train-form").bounding_box()
    assert curve["x"] >= 0 and curve["x"] + curve["width"] <= 390 and curve["y"] < form["y"]
    context.close()
    assert not errors, errors
