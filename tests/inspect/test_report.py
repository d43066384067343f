"""`easel inspect report` on the built-in model (64 px, two steps: fast): one offline page, every figure a file."""
from __future__ import annotations

import re

import pytest

from easel.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red star above a blue circle"
FAST = ["--steps", "2", "--seed", "7", "--sampler", "euler"]
SECTIONS = ("prompt", "tokens", "embeddings", "steps", "attention", "decode", "image", "judge", "noise", "clip")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EASEL_CACHE", str(tmp_path / "cache"))


def make_page(tmp_path, *extra: str) -> tuple[str, object]:
    """Run the report and return (the page's HTML, its folder)."""
    out = tmp_path / "report"
    assert main(["inspect", "report", PROMPT, *FAST, "-o", str(out), *extra]) == 0
    return (out / "index.html").read_text(encoding="utf-8"), out


def test_the_page_has_every_section_in_order_and_only_local_files(tmp_path, capsys):
    page, out = make_page(tmp_path)
    assert "index.html" in capsys.readouterr().out
    positions = [page.index(f'<section id="{s}"') for s in SECTIONS]
    assert positions == sorted(positions)  # the story's order
    assert "http://" not in page and "https://" not in page and "<script" not in page
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert len(sources) >= len(SECTIONS)
    for src in sources:
        assert not src.startswith(("/", "..")) and ":" not in src and (out / src).is_file(), src  # inside the folder
    assert "Did it follow the prompt?" in page and ("&#10003; red" in page or "&#10007; red" in page)
    assert "Cross-attention per word" in page and "red star" in page


def test_lang_zh_gives_chinese_captions(tmp_path):
    page, _ = make_page(tmp_path, "--lang", "zh")
    assert 'lang="zh"' in page and "交叉注意力" in page and "前向扩散" in page
    assert "Cross-attention per word" not in page


def test_bad_lang_is_a_one_line_error(tmp_path, capsys):
    assert main(["inspect", "report", PROMPT, "--lang", "fr", "-o", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == "easel: error: --lang must be one of en, zh (got 'fr')"
    assert not (tmp_path / "r").exists()


def chromium() -> str | None:
    """A Chromium binary ($EASEL_CHROMIUM or the first on PATH), as tests/serve/test_ui_browser.py finds it."""
    import os
    import shutil
    candidates = [os.environ.get("EASEL_CHROMIUM"), *(shutil.which(n) for n in ("chromium", "chromium-browser",
                                                                             "google-chrome", "google-chrome-stable"))]
    return next((c for c in candidates if c and os.path.exists(c)), None)


@pytest.mark.slow
def test_the_page_opens_offline_in_a_browser_without_errors(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    binary = chromium()
    if binary is None:
        pytest.skip("no chromium found: `apt-get install chromium` (or set EASEL_CHROMIUM)")
    import os
    _, out = make_page(tmp_path)
    errors, requests = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, args=["--disable-dev-shm-usage"] + (
            ["--no-sandbox"] if os.geteuid() == 0 else []))
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto((out / "index.html").as_uri())
        page.wait_for_load_state("load")
        broken = page.evaluate("[...document.images].filter(i => !i.complete || i.naturalWidth === 0).length")
        browser.close()
    assert errors == [] and broken == 0
    assert requests and all(u.startswith("file://") for u in requests), requests
