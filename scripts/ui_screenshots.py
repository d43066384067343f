"""Screenshots of every tab of the web UI, taken in headless chromium against a real server on the built-in model.

    python scripts/ui_screenshots.py                 # writes docs/ui/{desktop,queue,lightbox,img2img,...}.png
    python scripts/ui_screenshots.py --only inside   # just the Inside tab: docs/ui/inside.png, inside-phone.png
    python scripts/ui_screenshots.py --only train    # just the Train tab (a LoRA of hearts): docs/ui/train.png
    python scripts/ui_screenshots.py --only controlnet   # the ControlNet panel: docs/ui/controlnet.png
    python scripts/ui_screenshots.py --only tasks    # the X/Y/Z, Animate and Extras tabs: docs/ui/{xyz,animate,extras}.png
    python scripts/ui_screenshots.py --out /tmp/shots --chromium /usr/bin/chromium

Needs `pip install playwright` and a chromium binary (Debian: `apt-get install chromium`); no browser download.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

PROMPT = "a red star above a blue circle"


def start_server(train_root: Path | None = None, output_dir: Path | None = None):
    """The easel app on a free localhost port, served by uvicorn from a background thread; returns (url, server)."""
    import uvicorn

    from easel.serve.app import Settings, create_app
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings(port=port, train_root=str(train_root) if train_root else None,
                        output_dir=str(output_dir) if output_dir else None)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not start within 60 s")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def generate(page) -> None:
    """Click Generate and wait until the job's images are in the gallery."""
    before = page.get_attribute("body", "data-finished")
    page.click("#generate")
    page.wait_for_function("b => document.body.dataset.finished && document.body.dataset.finished !== b",
                           arg=before, timeout=600_000)
    page.wait_for_function("document.getElementById('selected-image').complete")


def shoot(page, out: Path, name: str) -> None:
    """A viewport screenshot, scrolled to the top with nothing focused."""
    path = out / f"{name}.png"
    page.evaluate("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0)")
    page.screenshot(path=str(path))
    print(f"wrote {path}")


def set_fields(page, **fields) -> None:
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))


def take_queue_and_full_view(page, out: Path, steps: int) -> None:
    """The queue with a long job running (live preview, ETA) and two waiting; the full-size view; the desktop."""
    set_fields(page, prompt=PROMPT, steps=steps, seed=7)
    generate(page)
    set_fields(page, prompt="two green triangles", seed=11)
    generate(page)
    set_fields(page, prompt="three yellow squares", steps=3 * steps, seed=3)  # the long one, caught mid-run
    page.click("#generate")
    set_fields(page, prompt="a blue circle left of a red star", steps=steps)
    page.click("#generate")
    set_fields(page, prompt="a purple star")
    page.click("#generate")
    page.wait_for_selector("#preview[src^='data:image/png']")
    page.wait_for_function("document.getElementById('progress-text').textContent.includes('ETA')")
    # two thirds into the long job: its preview already shows the picture, and two jobs wait behind it
    page.wait_for_function("n => (+(document.getElementById('progress-text').textContent.match(/Step (\\d+)/)"
                           " || [0, 0])[1]) >= n", arg=2 * steps, timeout=600_000)
    page.locator("#output").screenshot(path=str(out / "queue.png"))
    print(f"wrote {out / 'queue.png'}")
    queued = page.locator("#queue-list li[data-state=queued] .job-cancel")
    while queued.count():
        queued.first.click()
        page.wait_for_timeout(100)
    page.click("#cancel")
    page.wait_for_function("!document.querySelector('#queue-list li[data-state=running], "
                           "#queue-list li[data-state=queued]')")
    page.locator("#gallery .thumb").nth(0).click()
    page.click("#open-full")
    page.wait_for_selector("#lightbox[open]")
    page.wait_for_timeout(300)
    page.screenshot(path=str(out / "lightbox.png"))
    print(f"wrote {out / 'lightbox.png'}")
    page.keyboard.press("Escape")
    set_fields(page, prompt=PROMPT, seed=7)
    generate(page)
    shoot(page, out, "desktop")


def take_tabs(page, out: Path, steps: int) -> None:
    """img2img, inpaint with a painted mask, outpaint, PNG info, each after a run from the previous image."""
    set_fields(page, prompt=PROMPT, steps=steps, seed=7, batch_size=2)
    generate(page)
    png = page.evaluate("fetch(document.getElementById('selected-image').src).then(r => r.arrayBuffer())"
                        ".then(b => Array.from(new Uint8Array(b)))")
    page.click("#send-img2img")
    page.fill("#denoising_strength", "0.6")
    generate(page)
    shoot(page, out, "img2img")
    page.click("#send-inpaint")
    box = page.locator("#mask-canvas").bounding_box()
    page.fill("#brush-size", "70")
    page.mouse.move(box["x"] + box["width"] * 0.55, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.85, box["y"] + box["height"] * 0.45, steps=10)
    page.mouse.up()
    set_fields(page, prompt="a green triangle", denoising_strength=1)
    generate(page)
    shoot(page, out, "inpaint")
    page.click("#send-outpaint")
    set_fields(page, prompt=PROMPT, outpaint_right=32)
    page.dispatch_event("#outpaint_right", "input")
    generate(page)
    shoot(page, out, "outpaint")
    page.click("#tab-pnginfo")
    page.set_input_files("#pnginfo-file", files=[{"name": "easel.png", "mimeType": "image/png", "buffer": bytes(png)}])
    page.wait_for_selector("body[data-pnginfo=read]")
    shoot(page, out, "pnginfo")


def take_inside(page, out: Path, steps: int, name: str = "inside", full_page: bool = True) -> None:
    """The Inside tab after a generation with "Capture inside": the film strip a third of the way, "star"'s map."""
    set_fields(page, prompt=PROMPT, steps=steps, seed=3, batch_size=1)
    page.check("#inspect")
    generate(page)
    job = page.get_attribute("body", "data-finished")
    page.wait_for_function("id => document.body.dataset.inside === id", arg=job)
    page.click("#tab-inside")
    page.focus("#inside-step")
    page.keyboard.press("Home")
    for _ in range(int(page.get_attribute("#inside-step", "max")) // 3):  # a third of the way: the shapes emerge
        page.keyboard.press("ArrowRight")
    page.click("#inside-tokens .token:text-is('star')")
    page.wait_for_function("[...document.querySelectorAll('#inside-view img')].every((i) => i.complete)")
    page.evaluate("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0)")
    page.screenshot(path=str(out / f"{name}.png"), full_page=full_page)
    print(f"wrote {out / f'{name}.png'}")


def open_page(browser, url: str, viewport: dict, scale: int, scheme: str):
    """A fresh browser context (no saved form) on the UI, ready to use."""
    context = browser.new_context(viewport=viewport, device_scale_factor=scale, color_scheme=scheme)
    page = context.new_page()
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]")
    return context, page


def take_inside_views(browser, url: str, out: Path, steps: int) -> None:
    """inside.png (desktop, dark) and inside-phone.png (390 px, light)."""
    for name, viewport, scale, scheme in (("inside", {"width": 1280, "height": 900}, 1, "dark"),
                                          ("inside-phone", {"width": 390, "height": 844}, 2, "light")):
        context, page = open_page(browser, url, viewport, scale, scheme)
        take_inside(page, out, steps, name, full_page=name == "inside")  # the phone: what the first screen shows
        context.close()


HEART_COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60), "yellow": (235, 210, 40),
                 "purple": (150, 60, 200), "orange": (240, 140, 30)}


def write_hearts(folder: Path) -> Path:
    """A small dataset: 64x64 hearts (two discs and a triangle) in six colours and two sizes, captioned."""
    from PIL import Image, ImageDraw
    folder.mkdir(parents=True, exist_ok=True)
    for colour, rgb in HEART_COLOURS.items():
        for size, r in (("small", 9), ("large", 14)):
            im = Image.new("RGB", (64, 64), (0, 0, 0))
            d = ImageDraw.Draw(im)
            cx, cy = 32, 28
            d.ellipse((cx - 2 * r, cy - r, cx, cy + r), fill=rgb)
            d.ellipse((cx, cy - r, cx + 2 * r, cy + r), fill=rgb)
            d.polygon([(cx - 2 * r + 1, cy + r // 3), (cx + 2 * r - 1, cy + r // 3), (cx, cy + 2 * r + 2)], fill=rgb)
            im.save(folder / f"{colour}_{size}.png")
            (folder / f"{colour}_{size}.txt").write_text(f"a {size} {colour} heart")
    return folder


def take_train(browser, url: str, out: Path, steps: int) -> None:
    """train.png: the Train tab after a LoRA run on the hearts (loss curve, sample sheets), desktop, dark."""
    context, page = open_page(browser, url, {"width": 1280, "height": 1000}, 1, "dark")
    page.click("#tab-train")
    page.select_option("#train-dataset", "hearts")
    set_fields(page, **{"train-name": "heart", "train-steps": steps, "train-lr": "0.001", "train-rank": 8,
                        "train-batch_size": 2, "train-sample_every": max(1, steps // 6),
                        "train-sample_prompts": "a red heart\na blue heart\na green heart"})
    page.check("#train-overwrite")
    page.click("#train-start")
    page.wait_for_selector("body[data-trained]", timeout=1_800_000)
    page.wait_for_function("n => document.getElementById('train-sample').complete && "
                           "document.getElementById('train-curve').dataset.points === String(n)", arg=steps)
    shoot(page, out, "train")
    context.close()


CONTROLNET = "random-cn-builtin"  # --only controlnet: a random-weight ControlNet for the built-in model


def write_controlnet_setup(scratch: Path) -> None:
    """A models dir with ControlNet/random-cn-builtin.safetensors (random weights) and a styles.csv, found by the
    server through $EASEL_MODELS and $EASEL_STYLES."""
    import easel
    from easel.pipelines.control_sheet import random_controlnet_file
    folder = scratch / "models" / "ControlNet"
    folder.mkdir(parents=True, exist_ok=True)
    random_controlnet_file(easel.load().config, folder / f"{CONTROLNET}.safetensors")
    os.environ["EASEL_MODELS"] = str(scratch / "models")
    styles = scratch / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\nSharp,"{prompt}, sharp focus",blurry\n'
                      'Flat colours,"{prompt}, flat colours",\nOn black,"{prompt}, on a black background",\n')
    os.environ["EASEL_STYLES"] = str(styles)


def sketch_png(path: Path) -> Path:
    """A black-on-white sketch of a star and a circle (what canny turns into outlines)."""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (64, 64), "white")
    d = ImageDraw.Draw(im)
    d.polygon([(18, 6), (22, 17), (33, 17), (24, 24), (28, 35), (18, 28), (8, 35), (12, 24), (3, 17), (14, 17)],
              fill="black")
    d.ellipse((34, 34, 58, 58), fill="black")
    im.save(path)
    return path


def take_controlnet(browser, url: str, out: Path, steps: int) -> None:
    """controlnet.png: the ControlNet panel with two blobs drawn for the built-in layout ControlNet
    (shapeworld-layout) beside the job's result (element screenshots side by side: the panel is below the fold)."""
    import io

    from PIL import Image
    context, page = open_page(browser, url, {"width": 1280, "height": 1500}, 1, "dark")
    set_fields(page, prompt="a red star and a blue circle", steps=steps, seed=8, batch_size=2)
    page.click("#controlnet > summary")
    page.click("#cn0-draw")
    page.check("#cn0-enabled")
    page.select_option("#cn0-model", "shapeworld-layout")
    page.fill("#cn0-brush", "44")
    box = page.locator("#cn0-canvas").bounding_box()
    for (x0, y0), (x1, y1) in (((0.18, 0.62), (0.3, 0.7)), ((0.68, 0.25), (0.8, 0.33))):  # two rough blobs
        page.mouse.move(box["x"] + box["width"] * x0, box["y"] + box["height"] * y0)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * x1, box["y"] + box["height"] * y1, steps=6)
        page.mouse.up()
    generate(page)
    page.evaluate("document.activeElement && document.activeElement.blur()")
    panel = Image.open(io.BytesIO(page.locator("#controlnet").screenshot()))  # the panel beside the result
    result = Image.open(io.BytesIO(page.locator("#output").screenshot()))
    sheet = Image.new("RGB", (panel.width + result.width + 48, max(panel.height, result.height) + 32), "#17171c")
    sheet.paste(panel, (16, 16))
    sheet.paste(result, (panel.width + 32, 16))
    sheet.save(out / "controlnet.png")
    print(f"wrote {out / 'controlnet.png'}")
    context.close()


def take_xyz(browser, url: str, out: Path, steps: int) -> None:
    """xyz.png: the X/Y/Z tab after a plot of seeds (X) by the star's colour (Y, Prompt S/R), a cell picked."""
    context, page = open_page(browser, url, {"width": 1280, "height": 1180}, 1, "dark")
    page.click("#tab-xyz")
    set_fields(page, prompt=PROMPT, steps=steps, seed=7, cfg_scale=7)
    page.select_option("#xyz-x-field", "seed")
    page.fill("#xyz-x-values", "1,2,3")
    page.select_option("#xyz-y-field", "prompt_sr")
    page.fill("#xyz-y-values", "red star, green star, yellow star")
    page.select_option("#xyz-z-field", "")
    page.click("#generate")
    page.wait_for_selector("body[data-plotted]", timeout=600_000)
    page.wait_for_function("document.getElementById('xyz-grid').complete && "
                           "[...document.querySelectorAll('#xyz-cells img')].every((i) => i.complete)")
    shoot(page, out, "xyz")
    context.close()


def take_animate(browser, url: str, out: Path, steps: int) -> None:
    """animate.png: the Animate tab after a 16-frame prompt travel with a slow zoom, the animation playing."""
    context, page = open_page(browser, url, {"width": 1280, "height": 1000}, 1, "dark")
    page.click("#tab-animate")
    page.fill("#anim-prompts", "a red circle above a blue square\na yellow star left of a green triangle")
    set_fields(page, **{"anim-frames": 16, "anim-steps": steps, "anim-seed": 11, "anim-zoom": "0:(1.0), 15:(1.04)",
                        "anim-strength": "0:(0.7)"})
    page.click("#anim-start")
    page.wait_for_function("(+document.getElementById('anim-counter').textContent.split(' / ')[0]) >= 9",
                           timeout=600_000)
    shoot(page, out, "animate-running")  # the frame counter and the newest frame, mid-run
    page.wait_for_selector("body[data-animated]", timeout=600_000)
    page.wait_for_function("document.getElementById('anim-view').complete && "
                           "[...document.querySelectorAll('#anim-strip img')].every((i) => i.complete)")
    shoot(page, out, "animate")
    context.close()


def take_extras(browser, url: str, out: Path, steps: int) -> None:
    """extras.png: the Extras tab after a generated 64 px image was upscaled 4x with Lanczos."""
    context, page = open_page(browser, url, {"width": 1280, "height": 620}, 1, "dark")
    set_fields(page, prompt=PROMPT, steps=steps, seed=7, batch_size=1)
    generate(page)
    png = page.evaluate("fetch(document.getElementById('selected-image').src).then(r => r.arrayBuffer())"
                        ".then(b => Array.from(new Uint8Array(b)))")
    page.click("#tab-extras")
    page.set_input_files("#extras-file", files=[{"name": "easel.png", "mimeType": "image/png", "buffer": bytes(png)}])
    page.fill("#extras-scale", "4")
    page.dispatch_event("#extras-scale", "input")
    page.click("#extras-start")
    page.wait_for_selector("body[data-upscaled]", timeout=600_000)
    page.wait_for_function("document.getElementById('extras-result').complete")
    shoot(page, out, "extras")
    context.close()


def take_task_tabs(browser, url: str, out: Path, steps: int) -> None:
    """The X/Y/Z, Animate and Extras tabs."""
    for take in (take_xyz, take_animate, take_extras):
        take(browser, url, out, steps)


def take_all(browser, url: str, out: Path, steps: int) -> None:
    """Every picture of the README's web UI section: desktop, queue, full-size view, tabs, phone (dark, light),
    the Inside tab."""
    desktop = {"width": 1280, "height": 1000}
    for take in (take_queue_and_full_view, take_tabs):
        context, page = open_page(browser, url, desktop, 1, "dark")
        take(page, out, steps)
        context.close()
    for scheme in ("dark", "light"):
        context, page = open_page(browser, url, {"width": 390, "height": 844}, 2, scheme)
        set_fields(page, prompt=PROMPT, steps=steps, seed=7)
        generate(page)
        shoot(page, out, f"phone-{scheme}")
        context.close()
    take_inside_views(browser, url, out, steps)
    take_train(browser, url, out, 4 * steps)
    take_task_tabs(browser, url, out, steps)


def main(argv: list[str] | None = None) -> int:
    """Start a server, open the UI and save one screenshot per tab."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "ui")
    ap.add_argument("--chromium", default=os.environ.get("EASEL_CHROMIUM") or shutil.which("chromium"),
                    help="chromium or chrome binary (default: chromium on PATH)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--only", choices=["inside", "train", "controlnet", "xyz", "animate", "extras", "tasks"],
                    help="take only these pictures")
    args = ap.parse_args(argv)
    if not args.chromium:
        sys.exit("no chromium found: apt-get install chromium, or pass --chromium PATH")
    from playwright.sync_api import sync_playwright
    args.out.mkdir(parents=True, exist_ok=True)
    import tempfile
    scratch = Path(tempfile.mkdtemp(prefix="easel_shots_"))  # the training data, run folder and LoRA go here
    os.environ["EASEL_LORA_DIRS"] = str(scratch / "loras")
    if args.only == "controlnet":
        write_controlnet_setup(scratch)
    url, server = start_server(train_root=write_hearts(scratch / "root" / "hearts").parent, output_dir=scratch)
    take = {"inside": take_inside_views,
            "train": lambda b, u, o, s: take_train(b, u, o, 4 * s),
            "controlnet": take_controlnet, "xyz": take_xyz, "animate": take_animate, "extras": take_extras,
            "tasks": take_task_tabs}.get(args.only, take_all)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium,
                                        args=["--disable-dev-shm-usage"] + (["--no-sandbox"] if os.geteuid() == 0 else []))
            take(browser, url, args.out, args.steps)
            browser.close()
    finally:
        server.should_exit = True
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
