"""Screenshot an offline HTML page (e.g. `easel inspect report`'s index.html) in headless Chromium.

    python3 scripts/page_screenshot.py inside/report/index.html docs/inspect/report.png [--selector '#judge']

Prints the page's console errors and any request that left the file system (there should be none), and exits 1
if there were any, so it doubles as a check of the page.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Open the page, record console errors and non-file requests, save the screenshot."""
    from playwright.sync_api import sync_playwright
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("page")
    p.add_argument("out")
    p.add_argument("--selector", default=None, help="screenshot only this element (CSS selector)")
    p.add_argument("--width", type=int, default=1100)
    p.add_argument("--height", type=int, default=900)
    args = p.parse_args(argv)
    url = Path(args.page).resolve().as_uri()
    errors, external = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium" if Path("/usr/bin/chromium").exists()
                                     else None)
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("request", lambda r: external.append(r.url) if not r.url.startswith("file:") else None)
        page.goto(url)
        page.wait_for_load_state("networkidle")
        target = page.locator(args.selector) if args.selector else page
        target.screenshot(path=args.out)
        browser.close()
    for e in errors:
        print(f"console error: {e}", file=sys.stderr)
    for u in external:
        print(f"external request: {u}", file=sys.stderr)
    print(args.out)
    return 1 if errors or external else 0


if __name__ == "__main__":
    raise SystemExit(main())
