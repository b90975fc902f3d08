"""Build the wheel, install it in a fresh virtual environment away from the checkout, use it.

    python scripts/check_wheel.py                  # build from this checkout, check, report size
    python scripts/check_wheel.py --wheel dist/ttsr-0.1.0-py3-none-any.whl
    python scripts/check_wheel.py --model bicubic  # the CLIs with that shipped model

Checks, failing with one line each: the wheel holds the shipped checkpoint, the VGG19 weights,
the demo pair, their READMEs and the licence, byte for byte as in the checkout; its size is the
one the README states (within 0.5 MB); installed with
``pip install --no-deps`` into a new venv (``--system-site-packages``, to reuse the installed
torch and the other dependencies) and run from an empty folder with no ``PYTHONPATH``, ``ttsr``
imports from the venv, ``ttsr-infer --demo`` writes the x4 image and ``ttsr-serve`` serves its
page and upscales the demo pair through ``POST /api/upscale``. The wheel is built from a copy of
the checkout's files, so no ``build/`` folder is left in the checkout.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
#: Wheel member -> the checkout file it must equal (and every ``checkpoints/*.pt``, see
#: :func:`shipped_files`).
SHIPPED = {
    "ttsr/pretrained/README.md": "checkpoints/README.md",
    "ttsr/weights/vgg19_relu3_1_imagenet.pth": "ttsr/weights/vgg19_relu3_1_imagenet.pth",
    "ttsr/weights/README.md": "ttsr/weights/README.md",
    "ttsr/assets/demo_lr.png": "ttsr/assets/demo_lr.png",
    "ttsr/assets/demo_ref.png": "ttsr/assets/demo_ref.png",
    "ttsr/assets/README.md": "ttsr/assets/README.md",
}
#: The demo LR is 96x64: its x4 result.
DEMO_SR_SIZE = (384, 256)
#: How far the wheel's size may drift from the size the README states, in MB.
SIZE_TOLERANCE_MB = 0.5


class CheckFailed(Exception):
    """One check did not hold; the message says which."""


def checkout_files(root: Path) -> list[str]:
    """The files git tracks or would track (not ignored), as in the working tree."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and os.path.lexists(root / name)]


def copy_checkout(root: Path, destination: Path) -> Path:
    """Copy the checkout's files (links kept as links) to ``destination``."""
    for name in checkout_files(root):
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target, follow_symlinks=False)
    return destination


def build_wheel(source: Path, out_dir: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out_dir), "."],
        cwd=source,
        check=True,
    )
    wheels = sorted(out_dir.glob("ttsr-*.whl"))
    if len(wheels) != 1:
        raise CheckFailed(f"expected one ttsr wheel in {out_dir}, found {wheels}")
    return wheels[0]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shipped_files() -> dict[str, str]:
    """Wheel member -> checkout file: :data:`SHIPPED` and the checkpoints (``ttsr/pretrained``
    is a link to ``checkpoints/``; the wheel must hold the files, not the link)."""
    checkpoints = sorted((ROOT / "checkpoints").glob("*.pt"))
    if not checkpoints:
        raise CheckFailed("no checkpoints/*.pt in the checkout")
    pretrained = {f"ttsr/pretrained/{p.name}": f"checkpoints/{p.name}" for p in checkpoints}
    return {**pretrained, **SHIPPED}


def check_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for member, original in shipped_files().items():
            if member not in names:
                raise CheckFailed(f"{wheel.name} lacks {member}")
            if sha256(archive.read(member)) != sha256((ROOT / original).read_bytes()):
                raise CheckFailed(f"{wheel.name}: {member} differs from {original}")
        if not any(name.endswith(".dist-info/licenses/LICENSE") for name in names):
            raise CheckFailed(f"{wheel.name} carries no LICENSE in its .dist-info")
        if any("ablation" in name for name in names):
            raise CheckFailed(f"{wheel.name} holds the ablation checkpoint, which is not shipped")


def check_documented_size(size_mb: float) -> None:
    """The README's "Development" section states the wheel's size: it must still be right."""
    stated = re.search(r"py3-none-any\.whl`, \*\*([\d.]+) MB\*\*", (ROOT / "README.md").read_text())
    if stated is None:
        raise CheckFailed("README.md does not state the wheel's size (`...whl`, **N MB**)")
    if abs(float(stated.group(1)) - size_mb) > SIZE_TOLERANCE_MB:
        raise CheckFailed(f"README.md says {stated.group(1)} MB; the wheel is {size_mb:.1f} MB")


def clean_environment() -> dict[str, str]:
    """This process's environment without anything that points Python at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.pop("VIRTUAL_ENV", None)
    return env


def make_venv(folder: Path, wheel: Path, env: dict[str, str]) -> Path:
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(folder)], check=True
    )
    python = folder / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--ignore-installed"]
        + ["--no-index", str(wheel)],
        check=True,
        env=env,
    )
    return python


def run_checked(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise CheckFailed(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def check_import(python: Path, venv: Path, work: Path, env: dict[str, str]) -> Path:
    """``ttsr`` imports from the venv (not from the checkout): its package folder."""
    probe = "import ttsr; print(ttsr.__file__)"
    module = Path(run_checked([str(python), "-c", probe], work, env, 120).strip())
    if not module.resolve().is_relative_to(venv.resolve()):
        raise CheckFailed(f"ttsr was imported from {module}, not from the wheel in {venv}")
    return module.parent


def check_infer_demo(venv: Path, work: Path, env: dict[str, str], model: list[str]) -> float:
    started = time.perf_counter()
    out = work / "demo_sr.png"
    argv = [str(venv / "bin" / "ttsr-infer"), "--demo", "--out", str(out), "--device", "cpu"]
    argv += model
    run_checked(argv, work, env, 600)
    with Image.open(out) as image:
        if image.size != DEMO_SR_SIZE:
            raise CheckFailed(f"ttsr-infer --demo wrote {image.size}, expected {DEMO_SR_SIZE}")
    return time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def multipart(files: list[tuple[str, Path]]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with one part per ``(field, file)``."""
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for field, path in files:
        body.write(f"--{boundary}\r\n".encode())
        disposition = f'form-data; name="{field}"; filename="{path.name}"'
        body.write(f"Content-Disposition: {disposition}\r\n".encode())
        body.write(b"Content-Type: image/png\r\n\r\n" + path.read_bytes() + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def wait_for_page(url: str, server: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise CheckFailed(f"ttsr-serve exited {server.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode()
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    raise CheckFailed(f"ttsr-serve did not answer {url} within {timeout:.0f} s")


def check_serve(
    venv: Path, package: Path, work: Path, env: dict[str, str], model: list[str]
) -> float:
    started = time.perf_counter()
    port = free_port()
    argv = [str(venv / "bin" / "ttsr-serve"), "--port", str(port), "--device", "cpu", *model]
    log = (work / "serve.log").open("w")
    server = subprocess.Popen(argv, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        page = wait_for_page(f"http://127.0.0.1:{port}/", server, 300)
        if "<html" not in page.lower():
            raise CheckFailed("ttsr-serve's page is not HTML")
        assets = package / "assets"
        body, content_type = multipart(
            [("lr", assets / "demo_lr.png"), ("ref", assets / "demo_ref.png")]
        )
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/upscale",
            data=body,
            headers={"Content-Type": content_type},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=300) as response:
            image = Image.open(io.BytesIO(response.read()))
            if image.size != DEMO_SR_SIZE:
                raise CheckFailed(f"ttsr-serve returned {image.size}, expected {DEMO_SR_SIZE}")
    except urllib.error.HTTPError as failure:
        raise CheckFailed(f"ttsr-serve answered {failure.code}: {failure.read()[:200]!r}") from None
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help="check this wheel instead of building one")
    parser.add_argument(
        "--model", help="run the CLIs with --model NAME (default: their default model)"
    )
    args = parser.parse_args()
    model = ["--model", args.model] if args.model else []
    with tempfile.TemporaryDirectory(prefix="ttsr-wheel-") as temporary:
        tmp = Path(temporary)
        try:
            wheel = args.wheel or build_wheel(copy_checkout(ROOT, tmp / "src"), tmp / "dist")
            check_contents(wheel)
            size = wheel.stat().st_size
            print(f"check_wheel: {wheel.name}: {size / 1e6:.1f} MB ({size} bytes)")
            check_documented_size(size / 1e6)
            env = clean_environment()
            venv = tmp / "venv"
            python = make_venv(venv, wheel, env)
            work = tmp / "work"
            work.mkdir()
            package = check_import(python, venv, work, env)
            infer_seconds = check_infer_demo(venv, work, env, model)
            serve_seconds = check_serve(venv, package, work, env, model)
        except CheckFailed as failure:
            print(f"check_wheel: error: {failure}", file=sys.stderr)
            return 2
    print(
        f"check_wheel: installed from the wheel: ttsr-infer --demo ({infer_seconds:.0f} s) and "
        f"ttsr-serve (page and /api/upscale, {serve_seconds:.0f} s) work"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
