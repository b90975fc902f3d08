"""Shipped models by name: ``--model real|bicubic`` on the CLIs, ``Upscaler.from_checkpoint(name)``,
and the model choice of the server. The shipped files are replaced by tiny temporary ones."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from inference_helpers import (
    assert_bad_input,
    call,
    files_in,
    save_png,
    textured,
    tiny_model,
)
from PIL import Image

from ttsr.checkpoints import CheckpointError, ShippedWeights, TTSRWeights, save_checkpoint
from ttsr.cli import eval, infer, serve
from ttsr.inference import Upscaler, shipped_model_names
from ttsr.server import ServerSettings, create_app


@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Each shipped model's file, as a distinct tiny checkpoint in a temporary folder."""
    folder = tmp_path / "pretrained"
    folder.mkdir()
    monkeypatch.setattr(ShippedWeights, "path", property(lambda weights: folder / weights.file))
    files = {}
    for seed, member in enumerate(TTSRWeights, start=1):
        files[member.value.name] = folder / member.value.file
        save_checkpoint(tiny_model(seed), files[member.value.name])
    return files


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return (
        save_png(textured(8, 10, seed=1), tmp_path / "lr.png"),
        save_png(textured(20, 24, seed=2), tmp_path / "ref.png"),
    )


def expected_sr(checkpoint: Path, pair: tuple[Path, Path]) -> np.ndarray:
    upscaler = Upscaler.from_checkpoint(checkpoint, device="cpu")
    return np.asarray(upscaler.upscale(*pair).sr)


# --- the library ----------------------------------------------------------------------------------


def test_real_is_the_default_and_bicubic_is_the_research_model() -> None:
    assert shipped_model_names() == ("real", "bicubic")
    assert TTSRWeights.DEFAULT.value.name == "real"
    assert TTSRWeights.get("bicubic").file == "ttsr_demo.pt"


def test_from_checkpoint_takes_a_name_a_path_or_nothing(shipped, pair) -> None:
    bicubic = Upscaler.from_checkpoint("bicubic", device="cpu")
    default = Upscaler.from_checkpoint(device="cpu")
    by_path = Upscaler.from_checkpoint(shipped["bicubic"], device="cpu")
    assert (bicubic.model_name, default.model_name) == ("bicubic", "real")
    assert by_path.model_name == str(shipped["bicubic"])
    sr = np.asarray(bicubic.upscale(*pair).sr)
    np.testing.assert_array_equal(sr, np.asarray(by_path.upscale(*pair).sr))
    assert not np.array_equal(sr, np.asarray(default.upscale(*pair).sr))


def test_a_named_model_that_is_not_installed_says_what_to_choose(shipped) -> None:
    shipped["real"].unlink()
    with pytest.raises(CheckpointError, match="'real' model .*not installed.*--model bicubic"):
        Upscaler.from_checkpoint("real", device="cpu")
    with pytest.raises(CheckpointError, match="'real' model"):
        Upscaler.from_checkpoint(device="cpu")


# --- the command-line tools ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["real", "bicubic"])
def test_infer_uses_and_reports_the_chosen_model(tmp_path, shipped, pair, capsys, name) -> None:
    out = tmp_path / "sr.png"
    argv = ["--lr", pair[0], "--ref", pair[1], "--out", out, "--device", "cpu", "--model", name]
    code, stdout, err = call(infer.main, [*argv, "--precision", "fp32"], capsys)
    assert code == 0, err
    assert f"with the {name} model" in stdout
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected_sr(shipped[name], pair))


def test_infer_default_is_real_and_checkpoint_takes_any_file(tmp_path, shipped, pair, capsys):
    base = ["--lr", pair[0], "--ref", pair[1], "--device", "cpu", "--precision", "fp32"]
    code, stdout, err = call(infer.main, [*base, "--out", tmp_path / "a.png"], capsys)
    assert code == 0 and "with the real model" in stdout, err
    other = tmp_path / "mine.pt"
    save_checkpoint(tiny_model(9), other)
    argv = [*base, "--out", tmp_path / "b.png", "--checkpoint", other]
    code, stdout, err = call(infer.main, argv, capsys)
    assert code == 0 and f"with checkpoint {other}" in stdout, err
    expected = expected_sr(other, pair)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b.png")), expected)


def test_missing_named_model_and_conflicting_options_exit_2(tmp_path, shipped, pair, capsys):
    shipped["real"].unlink()
    out = tmp_path / "out" / "sr.png"
    base = ["--lr", pair[0], "--ref", pair[1], "--out", out, "--device", "cpu"]
    code, _, err = call(infer.main, base, capsys)
    assert_bad_input(code, err, "ttsr-infer", "'real' model", "not installed", "--model bicubic")
    code, _, err = call(infer.main, [*base, "--model", "bicubic", "--checkpoint", out], capsys)
    assert_bad_input(code, err, "ttsr-infer", "--model", "--checkpoint", "not both")
    code, _, err = call(infer.main, [*base, "--model", "best"], capsys)
    assert code == 2 and "invalid choice" in err
    assert not out.parent.exists() or files_in(out.parent) == []


def test_eval_records_the_model(tmp_path, shipped, capsys) -> None:
    save_png(textured(24, 24, 3), tmp_path / "hr" / "a.png")
    out = tmp_path / "out"
    argv = [tmp_path / "hr", "--model", "bicubic", "--device", "cpu", "--out", out]
    code, stdout, err = call(eval.main, argv, capsys)
    assert code == 0, err
    assert "with the bicubic model" in stdout.splitlines()[-1]
    assert json.loads((out / "results.json").read_text())["settings"]["model"] == "bicubic"


def test_serve_offers_the_installed_shipped_models(shipped) -> None:
    args = serve.build_parser().parse_args(["--model", "bicubic", "--device", "cpu"])
    upscaler = Upscaler.from_checkpoint("bicubic", device="cpu")
    assert list(serve.offered_models(args, upscaler)) == ["bicubic", "real"]
    shipped["real"].unlink()
    assert list(serve.offered_models(args, upscaler)) == ["bicubic"]
    args = serve.build_parser().parse_args(["--checkpoint", str(shipped["bicubic"])])
    assert list(serve.offered_models(args, upscaler)) == ["bicubic"]


def test_serve_refuses_a_missing_default_model_before_listening(shipped, capsys) -> None:
    shipped["real"].unlink()
    code, _, err = call(serve.main, ["--port", "0", "--device", "cpu"], capsys)
    assert_bad_input(code, err, "ttsr-serve", "'real' model", "not installed")


# --- the server ----------------------------------------------------------------------------------


def png(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "image/png")


def test_server_upscales_with_the_model_a_request_names(shipped, pair, tmp_path) -> None:
    models = {
        "real": Upscaler.from_checkpoint("real", device="cpu"),
        "bicubic": lambda: Upscaler.from_checkpoint("bicubic", device="cpu"),
        "broken": lambda: Upscaler.from_checkpoint(tmp_path / "gone.pt", device="cpu"),
    }
    app = create_app(models, settings=ServerSettings(temp_dir=tmp_path / "uploads"))
    files = [("lr", png(pair[0])), ("ref", png(pair[1]))]
    with TestClient(app) as client:
        info = client.get("/api/info").json()
        assert info["model"] == "real" and info["models"] == ["real", "bicubic", "broken"]
        for name in ("real", "bicubic"):
            answer = client.post(f"/api/upscale?model={name}", files=files)
            assert answer.status_code == 200, answer.text
            sr = np.asarray(Image.open(io.BytesIO(answer.content)))
            np.testing.assert_array_equal(sr, expected_sr(shipped[name], pair))
        default = client.post("/api/upscale", files=files)
        real = np.asarray(Image.open(io.BytesIO(default.content)))
        np.testing.assert_array_equal(real, expected_sr(shipped["real"], pair))
        unknown = client.post("/api/upscale?model=best", files=files)
        assert unknown.status_code == 400 and "real, bicubic" in unknown.json()["error"]
        broken = client.post("/api/upscale?model=broken", files=files)
        assert broken.status_code == 503 and "gone.pt" not in broken.json()["error"]
    page = (Path(__file__).parents[1] / "ttsr" / "server" / "static" / "index.html").read_text()
    assert 'id="model-select"' in page
