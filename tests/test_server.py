"""ttsr-serve: the HTTP API (FastAPI TestClient, tiny model, small generated images) and its CLI."""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from inference_helpers import assert_bad_input, call, textured, tiny_model, write_tiny_checkpoint
from PIL import Image

from ttsr.cli import serve
from ttsr.inference import Upscaler
from ttsr.server import ServerSettings, create_app
from ttsr.server.app import LOOPBACK_NAMES, STATIC_DIR

BIG_BUDGET = 2**34
LR = textured(8, 12, seed=1)
REF = textured(16, 16, seed=2)
REF_2 = textured(12, 20, seed=3)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def files(lr: bytes | None = None, *refs: bytes, lr_name: str = "photo.png") -> list:
    """Multipart ``files=`` for the TestClient: one ``lr`` and each of ``refs`` as ``ref``."""
    parts = [] if lr is None else [("lr", (lr_name, lr, "image/png"))]
    parts += [("ref", (f"ref{i}.png", ref, "image/png")) for i, ref in enumerate(refs, start=1)]
    return parts


@pytest.fixture(scope="module")
def upscaler() -> Upscaler:
    return Upscaler(tiny_model(), "cpu", max_memory=BIG_BUDGET)


@pytest.fixture
def uploads(tmp_path: Path) -> Path:
    return tmp_path / "uploads"


@pytest.fixture
def client(upscaler: Upscaler, uploads: Path) -> Iterator[TestClient]:
    settings = ServerSettings(
        max_upload_bytes=40_000, max_references=3, max_album=3, temp_dir=uploads
    )
    with TestClient(create_app(upscaler, settings=settings)) as test_client:
        yield test_client
    assert list(uploads.iterdir()) == [], "an upload folder was left behind"


def assert_error(response, status: int, *fragments: str) -> str:
    """A JSON ``{"error": ...}`` with ``status``, mentioning ``fragments``, without a trace."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    message = body["error"]
    assert "Traceback" not in message and "ttsr-serve-" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_one_pair_gives_the_png_of_the_python_api(client: TestClient, upscaler: Upscaler) -> None:
    response = client.post("/api/upscale", files=files(png(LR), png(REF)))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert 'filename="photo_x4.png"' in response.headers["content-disposition"]
    assert "default-src 'self'" in response.headers["content-security-policy"]
    served = np.asarray(decode(response.content))
    expected = np.asarray(upscaler.upscale(LR, [REF]).sr)
    assert served.shape == (32, 48, 3)
    assert np.array_equal(served, expected)


def test_several_references_and_json_with_the_maps(client: TestClient) -> None:
    response = client.post("/api/upscale?format=json", files=files(png(LR), png(REF), png(REF_2)))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["filename"] == "photo_x4.png" and (body["width"], body["height"]) == (48, 32)
    assert body["tiles"] == 1 and body["seconds"] >= 0
    images = {key: decode(base64.b64decode(body[key])) for key in ("sr", "bicubic", "attention")}
    assert all(image.size == (48, 32) for image in images.values())
    correspondence = decode(base64.b64decode(body["correspondence"]))
    assert correspondence.width > 48  # the map beside the colour key of both references


@pytest.mark.parametrize(
    ("field", "data", "name", "expected"),
    [
        ("lr", b"just some notes", "notes.txt", "lr/notes.txt is not an image"),
        ("ref", png(REF)[:80], "cut.png", "ref-1/cut.png could not be decoded"),
        ("ref", png(np.zeros((2, 2, 3), np.uint8)), "tiny.png", "too small"),
    ],
    ids=["not-an-image", "truncated", "too-small"],
)
def test_unusable_image_is_422(
    client: TestClient, field: str, data: bytes, name: str, expected: str
) -> None:
    parts = {"lr": ("photo.png", png(LR), "image/png"), "ref": ("ref.png", png(REF), "image/png")}
    parts[field] = (name, data, "application/octet-stream")
    response = client.post("/api/upscale", files=list(parts.items()))
    assert_error(response, 422, expected)


def test_image_over_the_size_limit_is_413(client: TestClient) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    assert len(png(noise)) > 40_000
    response = client.post("/api/upscale", files=files(png(LR), png(noise)))
    assert_error(response, 413, "ref-1/ref1.png is larger than", "limit")


def test_request_over_the_total_limit_is_413_even_without_content_length(
    client: TestClient,
) -> None:
    response = client.post("/api/upscale", files=files(bytes(600_000), png(REF)))
    assert_error(response, 413, "larger than this server accepts")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        yield b'--x\r\nContent-Disposition: form-data; name="lr"; filename="a.png"\r\n\r\n'
        for _ in range(20):
            yield bytes(50_000)

    response = client.post(
        "/api/upscale",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "larger than this server accepts")


@pytest.mark.parametrize(
    ("request_kwargs", "expected"),
    [
        ({"files": files(png(LR))}, "missing field 'ref'"),
        ({"files": [("image", ("a.png", png(LR), "image/png"))]}, "missing field 'lr'"),
        ({"data": {"lr": "photo.png"}, "files": files(None, png(REF))}, "field 'lr'"),
        ({"files": files(png(LR), *[png(REF)] * 4)}, "at most 3"),
        ({"files": files(png(LR), png(REF)), "params": {"format": "xml"}}, "field 'format'"),
    ],
    ids=["no-ref", "wrong-name", "lr-not-a-file", "too-many-refs", "bad-format"],
)
def test_missing_or_wrong_fields_are_400(
    client: TestClient, request_kwargs: dict, expected: str
) -> None:
    assert_error(client.post("/api/upscale", **request_kwargs), 400, expected)


def test_work_over_the_memory_budget_is_refused(uploads: Path) -> None:
    app = create_app(Upscaler(tiny_model(), "cpu", max_memory=1), settings=ServerSettings())
    with TestClient(app) as client:
        response = client.post("/api/upscale", files=files(png(LR), png(REF)))
    assert_error(response, 422, "memory budget")


class GatedUpscaler(Upscaler):
    """Upscales nothing: waits for ``release`` and records how many jobs ran at once."""

    def __init__(self) -> None:
        super().__init__(tiny_model(), "cpu", max_memory=BIG_BUDGET)
        self.running = 0
        self.most_at_once = 0
        self.count_lock = threading.Lock()
        self.release = threading.Event()

    def upscale(self, lr, refs, progress=None):  # noqa: ANN001, ANN201 (a stub)
        with self.count_lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        self.release.wait(timeout=20)
        time.sleep(0.02)
        with self.count_lock:
            self.running -= 1
        return SimpleNamespace(sr=Image.new("RGB", (4, 4)))


def test_one_job_at_a_time_and_a_bounded_queue(uploads: Path) -> None:
    gated = GatedUpscaler()
    app = create_app(gated, settings=ServerSettings(max_queue=1, temp_dir=uploads))
    statuses: list[int] = []
    with TestClient(app) as client:

        def send() -> None:
            statuses.append(client.post("/api/upscale", files=files(png(LR), png(REF))).status_code)

        senders = [threading.Thread(target=send) for _ in range(2)]
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + 20
        while app.state.worker.in_progress < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = client.post("/api/upscale", files=files(png(LR), png(REF)))
        gated.release.set()
        for sender in senders:
            sender.join(timeout=20)
    assert_error(busy, 429, "busy")
    assert statuses == [200, 200]
    assert gated.most_at_once == 1
    assert list(uploads.iterdir()) == []


def test_loopback_server_refuses_other_hosts_and_other_sites(upscaler: Upscaler) -> None:
    settings = ServerSettings(allowed_hosts=LOOPBACK_NAMES)
    with TestClient(create_app(upscaler, settings=settings), base_url="http://127.0.0.1") as client:
        assert client.get("/").status_code == 200
        assert_error(client.get("/", headers={"host": "rebound.example"}), 400, "127.0.0.1")
        cross_site = client.post(
            "/api/upscale",
            files=files(png(LR), png(REF)),
            headers={"origin": "http://evil.example"},
        )
        assert_error(cross_site, 403, "other sites")


def test_page_docs_and_assets_are_served_offline(client: TestClient) -> None:
    page = client.get("/")
    assert (
        page.status_code == 200 and 'id="lr-input"' in page.text and 'id="ref-input"' in page.text
    )
    for asset in sorted(STATIC_DIR.iterdir()):
        response = client.get(f"/static/{asset.name}")
        assert response.status_code == 200, asset.name
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", response.text), asset.name
    assert client.get("/docs").status_code == 200
    assert_error(client.get("/redoc"), 404)
    info = client.get("/api/info").json()
    assert info["max_upload_bytes"] == 40_000 and info["uses_references"] is True
    operation = client.get("/openapi.json").json()["paths"]["/api/upscale"]["post"]
    assert {"image/png", "application/json"} <= set(operation["responses"]["200"]["content"])
    assert {"400", "413", "422"} <= set(operation["responses"])
    assert [p["name"] for p in operation["parameters"]] == ["top_k", "format", "model"]


def test_serve_cli_help_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = call(serve.main, ["--help"], capsys)
    assert code == 0 and "--max-upload-mb" in out and "127.0.0.1" in out
    code, _, err = call(serve.main, ["--checkpoint", tmp_path / "missing.pt"], capsys)
    assert_bad_input(code, err, "ttsr-serve", "missing.pt")
    checkpoint = write_tiny_checkpoint(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = call(serve.main, ["--port", port, "--checkpoint", checkpoint], capsys)
    assert_bad_input(code, err, "ttsr-serve", f"cannot listen on 127.0.0.1:{port}", "--port")


def test_serve_cli_serves_until_interrupted(tmp_path: Path) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path)
    command = [sys.executable, "-m", "ttsr.cli.serve", "--port", "0", "--checkpoint", checkpoint]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [str(part) for part in command], stderr=subprocess.PIPE, text=True, env=environment
    )
    try:
        assert server.stderr is not None
        lines = [server.stderr.readline() for _ in range(1)]
        while not (found := re.search(r"serving (http://127\.0\.0\.1:\d+/)", lines[-1])):
            assert lines[-1] and len(lines) < 50, "".join(lines)
            lines.append(server.stderr.readline())
        with urllib.request.urlopen(f"{found.group(1)}api/info", timeout=30) as answer:
            assert b'"uses_references":true' in answer.read()
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
        assert "ttsr-serve: stopped" in server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
