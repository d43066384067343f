"""Screenshots of every tab of the web UI, taken in headless chromium against a real server on the built-in model.

    python scripts/ui_screenshots.py                 # writes docs/screenshots/{txt2img,progress,img2img,...}.png
    python scripts/ui_screenshots.py --out /tmp/shots --chromium /usr/bin/chromium --light

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


def start_server():
    """The easel app on a free localhost port, served by uvicorn from a background thread; returns (url, server)."""
    import uvicorn

    from easel.serve.app import Settings, create_app
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(Settings(port=port)), host="127.0.0.1", port=port,
                                           log_level="warning"))
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
    path = out / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"wrote {path}")


def take_all(page, out: Path, steps: int) -> None:
    """txt2img (with a progress shot mid-run), img2img, inpaint with a painted mask, outpaint, PNG info."""
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "150")  # a long run, to catch the progress bar and the live preview mid-way
    page.fill("#seed", "7")
    page.click("#generate")
    page.wait_for_selector("#preview[src^='data:image/png']")
    page.wait_for_function("document.getElementById('progress-text').textContent.includes('ETA')")
    shoot(page, out, "progress")
    page.click("#cancel")
    page.wait_for_selector("body[data-finished]")

    page.fill("#steps", str(steps))
    generate(page)
    shoot(page, out, "txt2img")
    png = page.evaluate("fetch(document.getElementById('selected-image').src).then(r => r.arrayBuffer())"
                        ".then(b => Array.from(new Uint8Array(b)))")

    page.click("#send-img2img")
    page.wait_for_selector("#tabs [data-tab=img2img][aria-selected=true]")
    page.fill("#denoising_strength", "0.6")
    generate(page)
    shoot(page, out, "img2img")

    page.click("#send-inpaint")
    page.wait_for_selector("#tabs [data-tab=inpaint][aria-selected=true]")
    box = page.locator("#mask-canvas").bounding_box()
    page.fill("#brush-size", "70")
    page.mouse.move(box["x"] + box["width"] * 0.55, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.85, box["y"] + box["height"] * 0.45, steps=10)
    page.mouse.up()
    page.fill("#prompt", "a green triangle")
    page.fill("#denoising_strength", "1")
    generate(page)
    shoot(page, out, "inpaint")

    page.click("#send-outpaint")
    page.wait_for_selector("#tabs [data-tab=outpaint][aria-selected=true]")
    page.fill("#prompt", PROMPT)
    page.fill("#outpaint_right", "32")
    page.dispatch_event("#outpaint_right", "input")
    generate(page)
    shoot(page, out, "outpaint")

    page.click("#tabs [data-tab=pnginfo]")
    page.set_input_files("#pnginfo-file", files=[{"name": "easel.png", "mimeType": "image/png", "buffer": bytes(png)}])
    page.wait_for_selector("body[data-pnginfo=read]")
    shoot(page, out, "pnginfo")


def main(argv: list[str] | None = None) -> int:
    """Start a server, open the UI and save one screenshot per tab."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "screenshots")
    ap.add_argument("--chromium", default=os.environ.get("EASEL_CHROMIUM") or shutil.which("chromium"),
                    help="chromium or chrome binary (default: chromium on PATH)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--light", action="store_true", help="the light colour scheme (default: dark)")
    args = ap.parse_args(argv)
    if not args.chromium:
        sys.exit("no chromium found: apt-get install chromium, or pass --chromium PATH")
    from playwright.sync_api import sync_playwright
    args.out.mkdir(parents=True, exist_ok=True)
    url, server = start_server()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium,
                                        args=["--no-sandbox"] if os.geteuid() == 0 else [])
            page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1,
                                    color_scheme="light" if args.light else "dark")
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready=true]")
            take_all(page, args.out, args.steps)
            browser.close()
    finally:
        server.should_exit = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
