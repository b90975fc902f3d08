"""The album index: one global descriptor per photo, cached on disk, refreshed by file stamps.

An index lives in ``CACHE/albums/<key>/`` where ``CACHE`` is :func:`default_cache_dir` and
``<key>`` is a hash of the album's absolute path. It holds ``descriptors.npy`` (``[N, D]``
float32, read with ``allow_pickle=False``) and ``index.json`` (the photos' relative paths, sizes,
file stamps and row numbers, the files skipped and why, and what the descriptors were made with).
Nothing is ever unpickled. A photo is read again only when its size or modification time changed;
deleted photos drop out; a different descriptor (other extractor weights, other settings) rebuilds
the whole index. The user's photo folder is never written to.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ttsr.files import atomic_write
from ttsr.imaging import InputError

logger = logging.getLogger(__name__)

#: Bump when the layout of the index files changes.
INDEX_VERSION = 1

#: Progress callback: ``(photos indexed, photos to index)``.
Progress = Callable[[int, int], None]

#: ``descriptor(path) -> (vector [D] float32, (height, width))``; raises ``InputError`` for a file
#: that is not a usable image.
Describe = Callable[[Path], tuple[np.ndarray, tuple[int, int]]]


def default_cache_dir() -> Path:
    """``$TTSR_CACHE_DIR``, else ``$XDG_CACHE_HOME/ttsr``, else ``~/.cache/ttsr``."""
    explicit = os.environ.get("TTSR_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ttsr"


@dataclass(frozen=True)
class Stamp:
    """What tells that a file changed: its size in bytes and modification time (ns)."""

    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> Stamp:
        stat = path.stat()
        return cls(stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class Photo:
    """One usable album photo: path relative to the album, its stamp and size (H, W)."""

    name: str
    stamp: Stamp
    height: int
    width: int


@dataclass(frozen=True)
class Skipped:
    """A file of the album that is not a usable image, and why."""

    name: str
    stamp: Stamp
    reason: str


@dataclass
class AlbumIndex:
    """Photos (in name order), their descriptors ``[N, D]`` (row ``i`` is ``photos[i]``), the
    files skipped, and the ``fingerprint`` of what made the descriptors."""

    photos: list[Photo]
    descriptors: np.ndarray
    skipped: list[Skipped]
    fingerprint: str


def album_files(folder: Path) -> Iterator[Path]:
    """Every regular file under ``folder`` (sub-folders included), hidden ones left out, sorted."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                path = Path(root) / name
                if path.is_file():
                    yield path


def cache_location(folder: Path, cache_dir: Path) -> Path:
    """The folder holding the index of album ``folder`` under ``cache_dir``."""
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:20]
    return cache_dir / "albums" / key


def load_index(location: Path, fingerprint: str) -> AlbumIndex | None:
    """The cached index at ``location`` if it is there, readable and made with ``fingerprint``."""
    try:
        document = json.loads((location / "index.json").read_text())
        if document.get("version") != INDEX_VERSION or document["fingerprint"] != fingerprint:
            return None
        descriptors = np.load(location / "descriptors.npy", allow_pickle=False)
        photos = [
            Photo(p["name"], Stamp(**p["stamp"]), int(p["height"]), int(p["width"]))
            for p in document["photos"]
        ]
        skipped = [
            Skipped(s["name"], Stamp(**s["stamp"]), s["reason"]) for s in document["skipped"]
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or damaged: rebuilt
    if descriptors.ndim != 2 or descriptors.shape[0] != len(photos):
        return None
    return AlbumIndex(photos, descriptors.astype(np.float32, copy=False), skipped, fingerprint)


def save_index(index: AlbumIndex, location: Path, folder: Path) -> None:
    """Write the index (descriptors first, then the JSON that names them), each atomically."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(index.descriptors, np.float32), allow_pickle=False)
    atomic_write(location / "descriptors.npy", lambda stream: stream.write(buffer.getvalue()))
    document = {
        "version": INDEX_VERSION,
        "album": str(folder.resolve()),
        "fingerprint": index.fingerprint,
        "photos": [asdict(p) for p in index.photos],
        "skipped": [asdict(s) for s in index.skipped],
    }
    text = json.dumps(document, indent=1).encode()
    atomic_write(location / "index.json", lambda stream: stream.write(text))


def refresh_index(
    folder: Path,
    previous: AlbumIndex | None,
    describe: Describe,
    fingerprint: str,
    progress: Progress | None = None,
) -> tuple[AlbumIndex, bool]:
    """The index of ``folder`` now: entries of ``previous`` whose file is unchanged are kept, new
    or changed files are described. Returns the index and whether anything changed."""
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; give the folder of album photos")
    known: dict[str, tuple[Stamp, int | None, Photo | Skipped]] = {}
    if previous is not None and previous.fingerprint == fingerprint:
        for row, photo in enumerate(previous.photos):
            known[photo.name] = (photo.stamp, row, photo)
        for skipped in previous.skipped:
            known[skipped.name] = (skipped.stamp, None, skipped)
    current = [(path, path.relative_to(folder).as_posix()) for path in album_files(folder)]
    stamps = {}
    for path, name in current:
        try:
            stamps[name] = Stamp.of(path)
        except OSError:
            continue  # vanished while listing
    stale = [
        (path, name)
        for path, name in current
        if name in stamps and (name not in known or known[name][0] != stamps[name])
    ]
    fresh: dict[str, tuple[np.ndarray | None, Photo | Skipped]] = {}
    for done, (path, name) in enumerate(stale, start=1):
        try:
            vector, (height, width) = describe(path)
            fresh[name] = (vector, Photo(name, stamps[name], height, width))
        except (InputError, OSError) as failure:
            fresh[name] = (None, Skipped(name, stamps[name], _reason(failure, path)))
        if progress is not None:
            progress(done, len(stale))
    photos, rows, skipped = [], [], []
    for _, name in current:
        if name in fresh:
            vector, entry = fresh[name]
        elif name in known:
            _, row, entry = known[name]
            vector = None if row is None else previous.descriptors[row]  # type: ignore[union-attr]
        else:
            continue
        if isinstance(entry, Skipped):
            skipped.append(entry)
        else:
            photos.append(entry)
            rows.append(vector)
    changed = bool(stale) or previous is None or len(photos) + len(skipped) != len(known)
    dims = previous.descriptors.shape[1] if previous is not None and not rows else 0
    descriptors = np.stack(rows).astype(np.float32) if rows else np.zeros((0, dims), np.float32)
    return AlbumIndex(photos, descriptors, skipped, fingerprint), changed


def _reason(failure: BaseException, path: Path) -> str:
    """The failure's message without the file's path (the warning names the file itself)."""
    message = str(failure) if isinstance(failure, InputError) else (failure.strerror or "")
    message = message.replace(str(path), "").strip(" :")
    return message or type(failure).__name__
