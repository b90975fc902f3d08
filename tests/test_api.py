"""The Python API: ``from ttsr import Upscaler`` and the README snippet, run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from inference_helpers import save_png, textured, write_tiny_checkpoint
from PIL import Image

import ttsr
from ttsr import inference

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- api-snippet -->"
SNIPPET_SOURCES = [REPO / "README.md", REPO / "docs" / "api_snippet.md"]


def api_snippet(document: Path) -> str:
    """The first ```python block after the marker comment in ``document``."""
    text = document.read_text(encoding="utf-8")
    found = re.search(re.escape(MARKER) + r"\s*```python\n(.*?)\n```", text, re.DOTALL)
    assert found, f"{document}: no ```python block right after {MARKER}"
    return found.group(1)


def test_upscaler_is_exported_lazily() -> None:
    assert ttsr.Upscaler is inference.Upscaler and ttsr.UpscaleResult is inference.UpscaleResult
    assert "Upscaler" in ttsr.__all__
    with pytest.raises(AttributeError):
        _ = ttsr.NoSuchThing
    probe = "import sys, ttsr; print('ttsr.inference' in sys.modules)"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "False"


def test_both_search_transfers_are_exported_and_documented() -> None:
    from ttsr import model

    assert ttsr.SearchTransfer is model.SearchTransfer
    assert ttsr.FastSearchTransfer is model.FastSearchTransfer
    assert {"SearchTransfer", "FastSearchTransfer"} <= set(ttsr.__all__) & set(model.__all__)
    assert issubclass(ttsr.FastSearchTransfer, ttsr.SearchTransfer)
    assert "the definition" in ttsr.SearchTransfer.__doc__.splitlines()[0]
    assert "fast equivalent" in ttsr.FastSearchTransfer.__doc__.splitlines()[0]


@pytest.mark.parametrize(
    "document",
    [path for path in SNIPPET_SOURCES if path.is_file() and MARKER in path.read_text("utf-8")],
    ids=lambda path: path.name,
)
def test_readme_snippet_runs(
    document: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    if not inference.default_checkpoint_path().is_file():  # not shipped yet: a small random one
        tiny = write_tiny_checkpoint(tmp_path)
        monkeypatch.setattr(inference, "default_checkpoint_path", lambda: tiny)
    save_png(textured(8, 12, seed=1), tmp_path / "lr.png")
    save_png(textured(16, 16, seed=2), tmp_path / "ref.png")
    monkeypatch.chdir(tmp_path)

    exec(compile(api_snippet(document), str(document), "exec"), {"__name__": "__snippet__"})

    with Image.open(tmp_path / "sr.png") as sr:
        assert sr.size == (48, 32)
    for name in ("attention", "correspondence", "comparison"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert "48x32 in 1 tile(s)" in capsys.readouterr().out


def test_snippet_is_in_the_api_doc() -> None:
    assert "from ttsr import Upscaler" in api_snippet(REPO / "docs" / "api_snippet.md")
