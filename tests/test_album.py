"""References from an album: ranking, the cached index, bad files, the API and ttsr-infer."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from inference_helpers import (
    assert_bad_input,
    call,
    files_in,
    save_png,
    textured,
    write_tiny_checkpoint,
)
from PIL import Image

from ttsr.album import Album
from ttsr.album.index import load_index
from ttsr.album.selection import choose_greedily
from ttsr.cli import eval as eval_cli
from ttsr.cli import infer
from ttsr.data.degradation import downsample
from ttsr.inference import Upscaler
from ttsr.model.config import TTSRConfig
from ttsr.model.ttsr import TTSR
from ttsr.server import ServerSettings, create_app

PROG = "ttsr-infer"


def scene(seed: int, height: int = 160, width: int = 224) -> np.ndarray:
    """A synthetic photo of its own: noise of a random grain, coloured blocks and edges."""
    rng = np.random.default_rng(seed)
    grain = int(rng.integers(2, 6))
    noise = rng.uniform(0, 255, size=(height // grain + 1, width // grain + 1, 3))
    image = np.asarray(
        Image.fromarray(noise.astype(np.uint8)).resize(
            (width + grain, height + grain), Image.BICUBIC
        )
    )[:height, :width].astype(np.int16)
    for _ in range(12):
        top, left = rng.integers(0, height - 8), rng.integers(0, width - 8)
        size = rng.integers(8, 48, size=2)
        image[top : top + size[0], left : left + size[1]] //= 2
        image[top : top + size[0], left : left + size[1]] += rng.integers(0, 128, size=3)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def model() -> TTSR:
    """A small network with the ImageNet VGG19 head shipped with ttsr as its extractor."""
    torch.manual_seed(0)
    return TTSR(TTSRConfig(num_res_blocks=(1, 1, 1, 1), n_feats=8), extractor_init="bundled").eval()


@pytest.fixture
def album_with_view(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """An album of 7 photos: another view (shifted crop) of the LR's scene and 6 other scenes;
    returns the album, the true reference and the LR."""
    album = tmp_path / "album"
    world = scene(100, 192, 384)
    target = world[:, :256]  # the photo to upscale
    true_reference = save_png(world[:, 128:], album / "holiday_031.png")  # overlaps by half
    for seed in range(6):
        save_png(scene(seed, 192, 256), album / f"holiday_{seed:03d}.png")
    return album, true_reference, downsample(target)


def test_ranking_picks_the_other_view_of_the_scene_among_distractors(
    tmp_path, model, album_with_view
) -> None:
    folder, true_reference, lr = album_with_view
    matches = Album(folder, tmp_path / "cache").select(lr, model, top_k=3)
    assert matches.chosen[0] == true_reference
    best = matches.candidates[0]
    assert best.path == true_reference and best.fine_score is not None
    others = [c.fine_score for c in matches.candidates[1:] if c.fine_score is not None]
    assert others and best.fine_score > max(others)


def test_greedy_choice_adds_a_photo_only_for_what_the_others_missed() -> None:
    left = np.zeros((4, 8), np.float32)
    left[:, :4] = 0.95
    right = np.zeros((4, 8), np.float32)
    right[:, 4:] = 0.9
    same_as_left = left * 0.99
    maps = {0: same_as_left, 1: left, 2: right}
    chosen, gains = choose_greedily(maps, top_k=3)
    assert chosen in ([1, 2], [0, 2])  # the second half of the image comes from the other photo
    assert gains[chosen[1]] == pytest.approx(0.5)
    assert choose_greedily(maps, top_k=1)[0] == [1]  # ties broken by mean relevance


def test_index_is_cached_reused_and_refreshed_when_a_file_changes(tmp_path, model) -> None:
    folder, cache = tmp_path / "album", tmp_path / "cache"
    for seed in range(4):
        save_png(scene(seed, 48, 64), folder / f"p{seed}.png")
    reads: list[int] = []
    first = Album(folder, cache).index(model, progress=lambda done, total: reads.append(total))
    assert reads and reads[-1] == 4
    assert files_in(folder) == ["p0.png", "p1.png", "p2.png", "p3.png"]  # album left untouched
    assert len(list(cache.rglob("index.json"))) == 1

    reads.clear()
    again = Album(folder, cache).index(model, progress=lambda done, total: reads.append(total))
    assert reads == []  # nothing read again: the index came from the cache
    np.testing.assert_array_equal(again.descriptors, first.descriptors)

    save_png(scene(9, 48, 64), folder / "p2.png")
    stamp = (folder / "p2.png").stat()
    os.utime(folder / "p2.png", ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    (folder / "p3.png").unlink()
    reads.clear()
    refreshed = Album(folder, cache).index(model, progress=lambda done, total: reads.append(total))
    assert reads == [1]  # only the changed photo was read
    assert [p.name for p in refreshed.photos] == ["p0.png", "p1.png", "p2.png"]
    np.testing.assert_array_equal(refreshed.descriptors[:2], first.descriptors[:2])
    assert not np.allclose(refreshed.descriptors[2], first.descriptors[2])


def test_cached_index_is_never_unpickled(tmp_path, model) -> None:
    folder, cache = tmp_path / "album", tmp_path / "cache"
    save_png(scene(1, 48, 64), folder / "a.png")
    album = Album(folder, cache)
    index = album.index(model)
    assert album.location is not None
    np.save(album.location / "descriptors.npy", np.array([object()], dtype=object))
    assert load_index(album.location, index.fingerprint) is None  # refused, not unpickled
    rebuilt = Album(folder, cache).index(model)
    np.testing.assert_array_equal(rebuilt.descriptors, index.descriptors)


def test_bad_files_are_skipped_with_one_warning_each(tmp_path, model, caplog) -> None:
    folder = tmp_path / "album"
    save_png(scene(1, 48, 64), folder / "good.png")
    save_png(scene(2, 48, 64), folder / "trip" / "also_good.jpg")
    (folder / "notes.txt").write_text("not a photo")
    good = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 3])
    save_png(textured(2, 2, 3), folder / "tiny.png")
    with caplog.at_level(logging.WARNING, logger="ttsr"):
        index = Album(folder, tmp_path / "cache").index(model)
    assert [p.name for p in index.photos] == ["good.png", "trip/also_good.jpg"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name in ("notes.txt", "truncated.png", "tiny.png"):
        assert sum(name in message for message in warned) == 1, warned
    assert len(warned) == 3


def test_upscale_with_an_album_uses_the_chosen_references(tmp_path, model, album_with_view):
    folder, true_reference, lr = album_with_view
    upscaler = Upscaler(model, device="cpu")
    result = upscaler.upscale(lr, album=Album(folder, tmp_path / "cache"), top_k=2)
    assert result.matches is not None and result.matches.chosen[0] == true_reference
    direct = upscaler.upscale(lr, list(result.matches.chosen))
    np.testing.assert_array_equal(np.asarray(result.sr), np.asarray(direct.sr))
    with pytest.raises(ValueError, match="not both"):
        upscaler.upscale(lr, [true_reference], album=folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint"))


def test_cli_chooses_references_and_saves_the_matches(tmp_path, checkpoint, capsys) -> None:
    folder = tmp_path / "album"
    for seed in range(3):
        save_png(scene(seed, 48, 64), folder / f"p{seed}.png")
    (folder / "readme.txt").write_text("photos of the trip")
    lr = save_png(downsample(scene(1, 48, 64)), tmp_path / "in" / "photo.png")
    save_png(downsample(scene(2, 48, 64)), tmp_path / "in" / "other.png")
    argv = ["--checkpoint", checkpoint, "--album-cache", tmp_path / "cache", "--top-k", "2"]
    code, out, err = call(
        infer.main,
        ["--lr", lr, "--ref-dir", folder, "--out", tmp_path / "sr.png", "--save-matches", *argv],
        capsys,
    )
    assert code == 0, err
    assert Image.open(tmp_path / "sr.png").size == (64, 48)
    matches = json.loads((tmp_path / "sr_references.json").read_text())
    assert 1 <= len(matches["references"]) <= 2
    assert matches["references"][0] == matches["candidates"][0]["path"]
    assert {"global_score", "global_rank", "fine_score"} <= matches["candidates"][0].keys()
    assert sum("readme.txt" in line for line in err.splitlines()) == 1
    assert "photo.png: reference" in out

    code, out, err = call(
        infer.main,
        ["--lr", tmp_path / "in", "--ref-dir", folder, "--out", tmp_path / "sr", *argv],
        capsys,
    )
    assert code == 0, err
    assert files_in(tmp_path / "sr") == ["other.png", "photo.png"]


def test_cli_album_without_usable_image_is_a_clear_error(tmp_path, checkpoint, capsys) -> None:
    folder = tmp_path / "album"
    folder.mkdir()
    (folder / "notes.txt").write_text("no photos here")
    lr = save_png(textured(8, 8, 1), tmp_path / "lr.png")
    code, _, err = call(
        infer.main,
        ["--lr", lr, "--ref-dir", folder, "--out", tmp_path / "out" / "sr.png"]
        + ["--checkpoint", checkpoint, "--album-cache", tmp_path / "cache"],
        capsys,
    )
    assert_bad_input(code, err, PROG, "no usable image")
    assert not (tmp_path / "out").exists() or files_in(tmp_path / "out") == []


def test_cli_refuses_references_and_an_album_together(tmp_path, checkpoint, capsys) -> None:
    lr = save_png(textured(8, 8, 1), tmp_path / "lr.png")
    code, _, err = call(
        infer.main,
        ["--lr", lr, "--ref", lr, "--ref-dir", tmp_path, "--out", tmp_path / "sr.png"],
        capsys,
    )
    assert code == 2 and "not both" in err
    code, _, err = call(
        infer.main,
        ["--lr", lr, "--ref", lr, "--out", tmp_path / "sr.png", "--save-matches"],
        capsys,
    )
    assert code == 2 and "--ref-dir" in err
    code, _, err = call(
        infer.main,
        ["--lr", lr, "--ref-dir", tmp_path / "nowhere", "--out", tmp_path / "sr.png"],
        capsys,
    )
    assert_bad_input(code, err, PROG, "not a folder")


def test_eval_pairs_against_an_album_reports_top1_and_both_psnrs(
    tmp_path, checkpoint, capsys
) -> None:
    pairs, distractors = tmp_path / "pairs", tmp_path / "others"
    for seed in (10, 11):
        world = scene(seed, 48, 96)
        save_png(world[:, :64], pairs / f"scene{seed}" / "target.png")
        save_png(world[:, 32:], pairs / f"scene{seed}" / "ref.png")
    for seed in range(3):
        save_png(scene(seed, 48, 64), distractors / f"d{seed}.png")
    out = tmp_path / "eval"
    argv = ["--pairs", pairs, "--album-distractors", distractors, "--album-size", "4"]
    code, stdout, err = call(
        eval_cli.main, [*argv, "--out", out, "--checkpoint", checkpoint], capsys
    )
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["photos"] == 4  # two references and two distractors
    assert [r["name"] for r in results["rows"]] == ["scene10", "scene11"]
    assert {"top1_accuracy", "mean_true_reference_psnr", "mean_album_psnr"} <= set(
        results["summary"]
    )
    assert "top-1" in stdout
    code, _, err = call(eval_cli.main, ["--pairs", pairs, "--album-timing", "scene10"], capsys)
    assert code == 2 and "--album-distractors" in err


def test_web_api_chooses_references_from_album_photos(tmp_path, model, album_with_view) -> None:
    folder, true_reference, lr = album_with_view
    settings = ServerSettings(max_upload_bytes=1 << 20, max_album=10, temp_dir=tmp_path / "up")
    lr_png = save_png(lr, tmp_path / "lr.png").read_bytes()
    photos = [
        p for p in sorted(folder.iterdir()) if p.name in ("holiday_000.png", "holiday_031.png")
    ]
    album = [("album", (p.name, p.read_bytes(), "image/png")) for p in photos]
    album.append(("album", ("notes.txt", b"not a photo", "text/plain")))
    with TestClient(
        create_app(Upscaler(model, "cpu", max_memory=1 << 34), settings=settings)
    ) as client:
        response = client.post(
            "/api/upscale?format=json", files=[("lr", ("lr.png", lr_png, "image/png")), *album]
        )
        assert response.status_code == 200, response.text
        assert response.json()["references"][0] == true_reference.name
        both = [("ref", ("r.png", lr_png, "image/png")), *album]
        response = client.post(
            "/api/upscale", files=[("lr", ("lr.png", lr_png, "image/png")), *both]
        )
        assert response.status_code == 400 and "not both" in response.json()["error"]
    assert list((tmp_path / "up").iterdir()) == []  # nothing kept
