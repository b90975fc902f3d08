"""The ttsr-serve page end to end in a real headless browser (Debian's Chromium via Playwright).

Drives the page with the functions of ``scripts/screenshot_page.py`` (which makes
docs/screenshot.png), so the documented screenshot and this test take the same path.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from inference_helpers import save_png, textured, tiny_model

from ttsr.inference import Upscaler
from ttsr.server import ServerSettings, create_app

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_page.py"
CHROMIUM = Path("/usr/bin/chromium")

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (apt-get install chromium)"
)


def screenshot_script() -> ModuleType:
    """``scripts/screenshot_page.py`` as a module."""
    name = "screenshot_page"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_page_upscales_a_pair_in_a_real_browser(tmp_path: Path) -> None:
    script = screenshot_script()
    lr = save_png(textured(12, 16, seed=1), tmp_path / "holiday.png")
    ref = save_png(textured(24, 24, seed=2), tmp_path / "reference.png")
    uploads = tmp_path / "uploads"
    upscaler = Upscaler(tiny_model(), "cpu", max_memory=2**34)
    app = create_app(upscaler, settings=ServerSettings(temp_dir=uploads))
    screenshot = tmp_path / "page.png"

    with script.serve(app) as url:
        run = script.upscale_in_page(url, lr, [ref], screenshot, timeout_s=60)

    assert run.status.startswith("Done"), run.status
    assert run.visible == dict.fromkeys(script.RESULT_ELEMENTS, True)
    assert run.download_name == "holiday_x4.png" and run.download_size == (64, 48)
    assert run.split_after_slider == "25%"
    assert run.off_site_requests == () and run.page_errors == ()
    assert screenshot.stat().st_size > 10_000
    assert list(uploads.iterdir()) == []
