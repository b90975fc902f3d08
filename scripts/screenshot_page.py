"""Screenshot of the ttsr-serve page after an upscale, taken in headless Chromium (Playwright).

python scripts/screenshot_page.py                 # docs/screenshot.png: shipped model, demo pair
python scripts/screenshot_page.py --checkpoint my.pt --lr a.png --ref b.png --out page.png
python scripts/screenshot_page.py --random-model  # the layout only, before a checkpoint exists

Uses Debian's Chromium (/usr/bin/chromium), never a downloaded browser, and nothing off this
machine. tests/test_browser.py drives the page with the same functions.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image

if TYPE_CHECKING:
    from ttsr.inference import Upscaler

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
#: What must be on screen once a result is shown.
RESULT_ELEMENTS = ("#compare", "#compare-slider", "#attention-map", "#correspondence-map")


def wait_until(page: Any, predicate: str, timeout_s: float) -> None:
    """Poll the JavaScript function ``predicate`` until it returns true. (``page.evaluate`` calls
    it through the DevTools protocol; Playwright's ``wait_for_function`` would ``eval`` it in the
    page, which the page's Content-Security-Policy forbids.)"""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(predicate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {predicate}")
        time.sleep(0.1)


@contextmanager
def serve(app: FastAPI, host: str = "127.0.0.1", timeout_s: float = 30) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread on a free loopback port; yields its base URL."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((host, 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            listener.close()
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()


@dataclass(frozen=True)
class PageRun:
    """What the page showed: final status line, which result elements were visible, the
    downloaded file, the slider's effect, and anything that went wrong in the page."""

    status: str
    visible: dict[str, bool]
    download_name: str
    download_size: tuple[int, int]
    split_after_slider: str
    off_site_requests: tuple[str, ...]
    page_errors: tuple[str, ...]


def upscale_in_page(
    base_url: str,
    lr: Path,
    refs: Sequence[Path],
    screenshot: Path,
    timeout_s: float = 120,
    viewport: tuple[int, int] = (1100, 900),
) -> PageRun:
    """Open the page, choose the files, upscale, check the result, and save a screenshot."""
    from playwright.sync_api import sync_playwright

    off_site: list[str] = []
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS), headless=True
        )
        try:
            context = browser.new_context(
                viewport={"width": viewport[0], "height": viewport[1]}, accept_downloads=True
            )
            page = context.new_page()
            page.set_default_timeout(timeout_s * 1000)
            page.on(
                "request",
                lambda r: (
                    None
                    if r.url.startswith((base_url, "data:", "blob:"))
                    else off_site.append(r.url)
                ),
            )
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(f"{base_url}/")
            wait_until(
                page, "() => document.getElementById('limits').textContent !== ''", timeout_s
            )
            page.set_input_files("#lr-input", str(lr))
            page.set_input_files("#ref-input", [str(ref) for ref in refs])
            page.click("#upscale-button")
            page.wait_for_selector("#progress-panel.done, #progress-panel.error")
            status = page.inner_text("#status-text")
            if page.is_visible("#progress-panel.error"):
                raise RuntimeError(f"the page reported an error: {status}")
            wait_until(
                page,
                "() => ['sr-image', 'bicubic-image', 'attention-map', 'correspondence-map']"
                ".every((id) => document.getElementById(id).naturalWidth > 0)",
                timeout_s,
            )
            visible = {selector: page.is_visible(selector) for selector in RESULT_ELEMENTS}
            with page.expect_download() as download_info:
                page.click("#download-link")
            download = download_info.value
            with tempfile.TemporaryDirectory() as folder:
                saved = Path(folder) / "download.png"
                download.save_as(saved)
                with Image.open(saved) as image:
                    download_size = image.size
            split = page.evaluate(
                """() => {
                    const slider = document.getElementById('compare-slider');
                    slider.value = '25';
                    slider.dispatchEvent(new Event('input'));
                    const compare = document.getElementById('compare');
                    return getComputedStyle(compare).getPropertyValue('--split').trim();
                }"""
            )
            page.evaluate(
                """() => {
                    const slider = document.getElementById('compare-slider');
                    slider.value = '50';
                    slider.dispatchEvent(new Event('input'));
                }"""
            )
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            return PageRun(
                status=status,
                visible=visible,
                download_name=download.suggested_filename,
                download_size=download_size,
                split_after_slider=split,
                off_site_requests=tuple(off_site),
                page_errors=tuple(errors),
            )
        finally:
            browser.close()


def random_upscaler() -> Upscaler:
    """An Upscaler with a small random model: shows the page's layout, not real results."""
    from ttsr.inference import Upscaler
    from ttsr.model import TTSR, TTSRConfig

    torch.manual_seed(0)
    model = TTSR(TTSRConfig(num_res_blocks=(1, 1, 1, 1), n_feats=8, bicubic_skip=True))
    return Upscaler(model, "cpu")


def main(argv: Sequence[str] | None = None) -> int:
    from ttsr.cli.infer import demo_paths
    from ttsr.inference import Upscaler
    from ttsr.server import create_app

    demo_lr, demo_ref = demo_paths()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshot.png")
    parser.add_argument("--checkpoint", help="ttsr checkpoint (default: the shipped one)")
    parser.add_argument(
        "--random-model", action="store_true", help="a small random model (layout only)"
    )
    parser.add_argument("--lr", type=Path, default=demo_lr, help="LR image (default: demo)")
    parser.add_argument(
        "--ref", type=Path, action="append", help="reference image(s) (default: demo)"
    )
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        print(f"screenshot_page: {CHROMIUM} is missing: apt-get install chromium", file=sys.stderr)
        return 2
    upscaler = random_upscaler() if args.random_model else Upscaler.from_checkpoint(args.checkpoint)
    with serve(create_app(upscaler)) as url:
        run = upscale_in_page(url, args.lr, args.ref or [demo_ref], args.out)
    print(f"screenshot_page: {run.status} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
