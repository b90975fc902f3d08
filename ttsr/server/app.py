"""The ``ttsr-serve`` application: a page to upscale images and ``POST /api/upscale``.

Safe by default: every upload is limited in size (streamed bytes are counted, so a missing or
false ``Content-Length`` does not help), must decode as an image, and lives only in a temporary
folder of its request; work over the memory budget is refused by the :class:`~ttsr.Upscaler`'s own
check before it is queued; one job runs at a time on a single worker thread and a bounded number
wait; errors are ``{"error": "..."}`` with a 4xx status, never a stack trace. All assets are served
from the package (no CDN): the page and ``/docs`` work offline.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import torch
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ttsr.album import DEFAULT_TOP_K, Album
from ttsr.checkpoints import CheckpointError
from ttsr.imaging import InputError, image_size, require_min_side
from ttsr.inference import MIN_LR_SIDE, Upscaler
from ttsr.memory import format_size

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
MB = 2**20
DEFAULT_MAX_UPLOAD_MB = 20
DEFAULT_MAX_REFERENCES = 8
DEFAULT_MAX_ALBUM = 60
DEFAULT_MAX_QUEUE = 8

#: Host names that mean "this machine" (accepted in the ``Host`` header of a loopback server).
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")

#: Room for the multipart framing and small fields on top of the image bytes.
FORM_OVERHEAD_BYTES = 64 * 1024

#: The page may load only its own assets (and show the images it made): no CDN, no inline code.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

UPLOAD_HINT = (
    "send multipart/form-data with one 'lr' image file and one or more 'ref' image files (or "
    "'album' photos for ttsr to choose the references from)"
)

T = TypeVar("T")


@dataclass(frozen=True)
class ServerSettings:
    """Limits of one server.

    ``max_upload_bytes``: largest image file accepted; ``max_references``: most references per
    request; ``max_album``: most album photos per request (references chosen by ttsr);
    ``max_queue``: most requests waiting behind the running one (more get 429);
    ``allowed_hosts``: names accepted in the ``Host`` header (``None``: any; a loopback server
    accepts only loopback names, which defeats DNS rebinding); ``temp_dir``: where the per-request
    upload folders are made (``None``: the system's temporary folder).
    """

    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * MB
    max_references: int = DEFAULT_MAX_REFERENCES
    max_album: int = DEFAULT_MAX_ALBUM
    max_queue: int = DEFAULT_MAX_QUEUE
    allowed_hosts: tuple[str, ...] | None = None
    temp_dir: Path | None = None

    @property
    def max_request_bytes(self) -> int:
        """Largest request body: every image at its limit, plus the multipart framing."""
        images = 1 + max(self.max_references, self.max_album)
        return self.max_upload_bytes * images + FORM_OVERHEAD_BYTES


class ErrorBody(BaseModel):
    """Every error: one line saying what is wrong and what to do."""

    error: str = Field(examples=["ref-1/notes.txt is not an image file ttsr can read (PNG, ...)"])


class UpscaleJSON(BaseModel):
    """The result with the pictures that explain it (``?format=json``); images are base64 PNGs."""

    filename: str = Field(description="suggested file name of the x4 image")
    width: int = Field(description="width of the x4 image (pixels)")
    height: int = Field(description="height of the x4 image (pixels)")
    seconds: float = Field(description="time spent upscaling (queue excluded)")
    tiles: int = Field(description="tiles the image was processed in (1: whole image)")
    sr: str = Field(description="the x4 image (base64 PNG)")
    bicubic: str = Field(description="bicubic x4 of the input, for comparison (base64 PNG)")
    attention: str | None = Field(
        description="soft-attention heat map at the x4 size, bright where a reference held a "
        "close match (base64 PNG); null for a model without references"
    )
    correspondence: str | None = Field(
        description="each output patch coloured by the reference position its texture came "
        "from, beside the colour key (base64 PNG); null for a model without references"
    )
    references: list[str] | None = Field(
        default=None,
        description="with 'album': the file names of the photos chosen as references, best first",
    )


class ServerInfo(BaseModel):
    """What this server runs and accepts."""

    model: str = Field(description="the model used when a request names none")
    models: list[str] = Field(description="the models a request may choose (?model=NAME)")
    device: str
    uses_references: bool
    max_upload_bytes: int
    max_references: int
    max_album: int
    max_memory_bytes: int
    jobs_in_progress: int = Field(description="requests running or waiting now")


class ApiError(Exception):
    """A request that cannot be served: HTTP ``status`` and a message for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# --- the model and its worker -------------------------------------------------------------------


class _UpscalerHolder:
    """Builds the :class:`Upscaler` once, on first use (thread-safe)."""

    def __init__(self, source: Upscaler | Callable[[], Upscaler]) -> None:
        self._source = source
        self._upscaler = source if isinstance(source, Upscaler) else None
        self._lock = threading.Lock()

    def get(self) -> Upscaler:
        if self._upscaler is None:
            with self._lock:
                if self._upscaler is None:
                    assert callable(self._source)
                    self._upscaler = self._source()
        return self._upscaler

    async def aget(self) -> Upscaler:
        return self._upscaler if self._upscaler is not None else await run_in_threadpool(self.get)


class _Worker:
    """Runs jobs one at a time on a single thread; refuses new jobs when too many wait."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ttsr-upscale")
        self._lock = threading.Lock()
        self.in_progress = 0

    async def run(self, job: Callable[[], T]) -> T:
        with self._lock:
            if self.in_progress > self.max_queue:
                raise ApiError(
                    429,
                    f"the server is busy ({self.in_progress} images running or waiting); "
                    "try again in a moment",
                )
            self.in_progress += 1
        try:
            return await asyncio.wrap_future(self._executor.submit(job))
        finally:
            with self._lock:
                self.in_progress -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# --- request guard (pure ASGI, so that it sees the raw byte stream) -----------------------------


class _BodyTooLarge(Exception):
    pass


class RequestGuard:
    """Host and origin checks, the request body limit, and security headers on every response."""

    def __init__(self, app: ASGIApp, settings: ServerSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await error_response(*refusal)(scope, receive, send)
            return
        limit = self.settings.max_request_bytes
        received = 0
        exceeded = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if exceeded:  # whatever the app made of the interrupted body, the answer is 413
                return
            if message["type"] == "http.response.start":
                response_started = True
                message["headers"] = [*message.get("headers", []), *_security_headers()]
            await send(message)

        with suppress(_BodyTooLarge):
            await self.app(scope, limited_receive, guarded_send)
        if exceeded and not response_started:
            await error_response(413, self._too_large_message())(scope, receive, send)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        host = headers.get("host", "")
        allowed = self.settings.allowed_hosts
        if allowed is not None and _host_name(host) not in allowed:
            return 400, (
                f"this server answers requests for {', '.join(allowed)} only, not {host!r} "
                "(restart ttsr-serve with --host to serve other names)"
            )
        origin = headers.get("origin")
        cross_site = origin is not None and urlsplit(origin).netloc.lower() != host.lower()
        if scope["method"] not in ("GET", "HEAD") and cross_site:
            return 403, f"requests from other sites ({origin}) are refused"
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.settings.max_request_bytes:
            return 413, self._too_large_message()
        return None

    def _too_large_message(self) -> str:
        return (
            f"the upload is larger than this server accepts (at most "
            f"{format_size(self.settings.max_upload_bytes)} per image and "
            f"{self.settings.max_references} references); send smaller images"
        )


def _security_headers() -> list[tuple[bytes, bytes]]:
    return [
        (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
    ]


def _host_name(host_header: str) -> str:
    """``Host`` header -> host name without port or IPv6 brackets, lower case."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


# --- uploads ------------------------------------------------------------------------------------


def safe_file_name(name: str | None, fallback: str) -> str:
    """A client's file name reduced to a harmless base name (letters, digits, ``._-``)."""
    base = re.split(r"[\\/]", name or "")[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")[:80]
    return cleaned or fallback


def _stage(upload: UploadFile, folder: Path, role: str, max_bytes: int) -> Path:
    """Copy one upload into ``folder/role/<safe name>``, refusing it past ``max_bytes``."""
    target = folder / role / safe_file_name(upload.filename, "image")
    target.parent.mkdir()
    copied = 0
    upload.file.seek(0)
    with target.open("wb") as out:
        while chunk := upload.file.read(MB):
            copied += len(chunk)
            if copied > max_bytes:
                raise ApiError(
                    413,
                    f"{role}/{target.name} is larger than {format_size(max_bytes)}, the limit per "
                    "image on this server; send a smaller image",
                )
            out.write(chunk)
    if copied == 0:
        raise ApiError(422, f"{role}/{target.name} is empty; choose an image file")
    return target


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _b64_png(image: Image.Image) -> str:
    return base64.b64encode(_png(image)).decode("ascii")


@dataclass(frozen=True)
class _Rendered:
    png: bytes | None
    payload: dict[str, Any] | None


def _render(
    upscaler: Upscaler,
    lr: Path,
    refs: list[Path],
    filename: str,
    as_json: bool,
    album: Path | None = None,
    top_k: int = DEFAULT_TOP_K,
) -> _Rendered:
    """Upscale and encode (runs on the worker thread); with ``album``, references chosen there."""
    started = time.perf_counter()
    if album is None:
        result = upscaler.upscale(lr, refs)
    else:  # the index lives only in this request (no cache on disk)
        result = upscaler.upscale(lr, album=Album(album, cache_dir=False), top_k=top_k)
    seconds = time.perf_counter() - started
    if not as_json:
        return _Rendered(_png(result.sr), None)
    texture = result.soft_attention is not None
    payload = UpscaleJSON(
        filename=filename,
        width=result.sr.width,
        height=result.sr.height,
        seconds=round(seconds, 3),
        tiles=len(result.plan.tiles),
        sr=_b64_png(result.sr),
        bicubic=_b64_png(result.bicubic),
        attention=_b64_png(result.attention_map()) if texture else None,
        correspondence=_b64_png(result.correspondence_map()) if texture else None,
        references=None
        if result.matches is None
        else [_original_name(p.name) for p in result.matches.chosen],
    )
    return _Rendered(None, payload.model_dump())


def _original_name(staged: str) -> str:
    """An album photo's upload name, without the number :func:`_stage_album` put before it."""
    return staged.split("-", 1)[1] if "-" in staged else staged


def _client_message(failure: BaseException, folder: Path) -> str:
    """The error message without the server's temporary folder in it."""
    return str(failure).replace(f"{folder}{os.sep}", "")


def _validation_message(errors: Any) -> str:
    parts = []
    about_body = False
    for error in errors:
        location = [str(part) for part in error.get("loc", ())]
        about_body = about_body or (location[:1] == ["body"])
        field = location[1] if len(location) > 1 else (location[0] if location else "request")
        if error.get("type") == "missing":
            parts.append(f"missing field {field!r}")
        else:
            parts.append(f"field {field!r}: {error.get('msg', 'invalid')}")
    message = "; ".join(parts) or "invalid request"
    return f"{message}; {UPLOAD_HINT}" if about_body else message


# --- the application ----------------------------------------------------------------------------

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "missing or wrong fields, too many references"},
    413: {"model": ErrorBody, "description": "an image over the size limit"},
    422: {
        "model": ErrorBody,
        "description": "an upload that is not a usable image (not an image, corrupt, too "
        "small), or work over the server's memory budget",
    },
    429: {"model": ErrorBody, "description": "too many requests waiting; try again"},
}


UpscalerSource = Upscaler | Callable[[], Upscaler]


class _Models:
    """The models a server offers, by name, each built on first use; the first is the default."""

    def __init__(self, sources: Mapping[str, UpscalerSource]) -> None:
        if not sources:
            raise ValueError("a server needs at least one model")
        self.holders = {name: _UpscalerHolder(source) for name, source in sources.items()}
        self.default = next(iter(self.holders))

    async def get(self, name: str | None = None) -> tuple[str, Upscaler]:
        """The model called ``name`` (``None``: the default); 400 for an unknown name, 503 for
        one that cannot be loaded."""
        name = self.default if name is None else name
        holder = self.holders.get(name)
        if holder is None:
            offered = ", ".join(self.holders)
            raise ApiError(400, f"unknown model {name!r}; this server offers {offered}")
        try:
            return name, await holder.aget()
        except CheckpointError as failure:
            if name == self.default:
                raise
            logger.error("cannot load the %s model: %s", name, failure)
            raise ApiError(
                503, f"the {name!r} model is not available on this server; choose another"
            ) from None


def create_app(
    upscaler: UpscalerSource | Mapping[str, UpscalerSource] | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    device: str = "auto",
    max_memory: int | None = None,
    settings: ServerSettings | None = None,
) -> FastAPI:
    """The web application.

    ``upscaler``: a ready :class:`Upscaler` or a function that builds one (called on first use),
    or several of them by name (the page and ``?model=NAME`` choose; the first is the default);
    ``None``: ``Upscaler.from_checkpoint(checkpoint, device, max_memory)``, by default the shipped
    ``real`` model. ``settings``: the upload, reference, queue and host limits.
    """
    settings = settings or ServerSettings()
    if settings.temp_dir is not None:
        settings.temp_dir.mkdir(parents=True, exist_ok=True)
    if upscaler is None:
        upscaler = partial(
            Upscaler.from_checkpoint, checkpoint, device=device, max_memory=max_memory
        )
    sources = upscaler if isinstance(upscaler, Mapping) else {_model_name(upscaler): upscaler}
    models = _Models(sources)
    worker = _Worker(settings.max_queue)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.shutdown()

    app = FastAPI(
        title="ttsr",
        summary="Reference-based x4 super-resolution (TTSR) on this machine.",
        description="Upscale a low-resolution image x4 with textures found in one or more "
        "reference images. The page at / does it interactively; `POST /api/upscale` does it "
        "for programs, e.g. `curl -F lr=@photo.png -F ref=@other.jpg "
        "http://127.0.0.1:8000/api/upscale -o photo_x4.png`.",
        version=_version(),
        docs_url=None,  # FastAPI's /docs and /redoc load scripts from a CDN: see docs() below
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.worker = worker
    app.add_middleware(RequestGuard, settings=settings)
    _add_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        """The API reference, rendered in the page from /openapi.json (offline)."""
        return FileResponse(STATIC_DIR / "docs.html")

    @app.get("/api/info", response_model=ServerInfo, summary="What this server runs and accepts")
    async def info() -> ServerInfo:
        name, model = await models.get()
        return ServerInfo(
            model=name,
            models=list(models.holders),
            device=str(model.device),
            uses_references=bool(model.model.config.use_texture),
            max_upload_bytes=settings.max_upload_bytes,
            max_references=settings.max_references,
            max_album=settings.max_album,
            max_memory_bytes=model.max_memory,
            jobs_in_progress=worker.in_progress,
        )

    @app.post(
        "/api/upscale",
        summary="Upscale an image x4 with textures from reference images",
        response_class=Response,
        responses={
            200: {
                "description": "the x4 image as a PNG download, or (format=json) the image "
                "with its bicubic version, attention and correspondence maps",
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                "model": UpscaleJSON,
            },
            **_ERRORS,
        },
    )
    async def upscale(
        lr: Annotated[UploadFile, File(description="the low-resolution image to upscale")],
        ref: Annotated[
            list[UploadFile],
            File(
                description="reference image(s) of similar content (another view, a sharper "
                "photo); repeat the field for several references, searched jointly"
            ),
        ] = [],  # noqa: B006 (FastAPI copies defaults)
        album: Annotated[
            list[UploadFile],
            File(
                description="instead of 'ref': many photos (repeat the field) for ttsr to "
                "choose the references from (files that are not images are skipped)"
            ),
        ] = [],  # noqa: B006
        top_k: Annotated[
            int,
            Query(ge=1, le=8, description="with 'album': references chosen at most"),
        ] = DEFAULT_TOP_K,
        output_format: Annotated[
            Literal["png", "json"],
            Query(
                alias="format",
                description="png: the x4 image; json: the image and the maps as base64 PNGs",
            ),
        ] = "png",
        model_name: Annotated[
            str | None,
            Query(
                alias="model",
                description="the model to use, one of /api/info's models (default: the "
                "server's model)",
            ),
        ] = None,
    ) -> Response:
        """One job at a time per server process; others wait in a bounded queue. Every upload
        is kept only in a temporary folder deleted when the request ends."""
        if ref and album:
            raise ApiError(400, "send 'ref' images or 'album' photos, not both")
        if not ref and not album:
            raise ApiError(
                400,
                "missing field 'ref': send one or more 'ref' images, or 'album' photos for ttsr "
                "to choose the references from",
            )
        if len(album) > settings.max_album:
            raise ApiError(
                400,
                f"{len(album)} album photos sent; this server accepts at most "
                f"{settings.max_album} per image",
            )
        if len(ref) > settings.max_references:
            raise ApiError(
                400,
                f"{len(ref)} references sent; this server accepts at most "
                f"{settings.max_references} per image",
            )
        stem = Path(safe_file_name(lr.filename, "image")).stem
        filename = f"{stem}_x4.png"
        _, model = await models.get(model_name)
        with tempfile.TemporaryDirectory(prefix="ttsr-serve-", dir=settings.temp_dir) as temp:
            folder = Path(temp)
            try:
                lr_path, ref_paths = await run_in_threadpool(
                    _stage_all, lr, ref, folder, settings.max_upload_bytes
                )
                album_path = None
                if album:
                    album_path = await run_in_threadpool(
                        _stage_album, album, folder, settings.max_upload_bytes
                    )
                    await run_in_threadpool(_check_lr, lr_path)
                else:
                    # Header checks and the memory budget, before the job waits in the queue.
                    await run_in_threadpool(model.check_sizes, lr_path, ref_paths)
                as_json = output_format == "json"
                rendered = await worker.run(
                    lambda: _render(model, lr_path, ref_paths, filename, as_json, album_path, top_k)
                )
            except (InputError, ApiError) as failure:
                raise _relocated(failure, folder) from None
        if rendered.payload is not None:
            return JSONResponse(rendered.payload)
        return Response(
            rendered.png,
            media_type="image/png",
            headers={"content-disposition": f'attachment; filename="{filename}"'},
        )

    return app


def _model_name(source: UpscalerSource) -> str:
    return source.model_name if isinstance(source, Upscaler) else "default"


def _stage_all(
    lr: UploadFile, refs: list[UploadFile], folder: Path, max_bytes: int
) -> tuple[Path, list[Path]]:
    lr_path = _stage(lr, folder, "lr", max_bytes)
    ref_paths = [_stage(r, folder, f"ref-{i}", max_bytes) for i, r in enumerate(refs, start=1)]
    return lr_path, ref_paths


def _check_lr(path: Path) -> None:
    """The LR's size from its header (the references are not chosen yet)."""
    require_min_side(image_size(path), MIN_LR_SIDE, path.name, "low-resolution input")


def _stage_album(photos: list[UploadFile], folder: Path, max_bytes: int) -> Path:
    """Copy the album photos into ``folder/album/`` as ``NNN-<safe name>`` (names stay unique)."""
    album = folder / "album"
    album.mkdir()
    for number, photo in enumerate(photos, start=1):
        staged = _stage(photo, folder, f"album-{number}", max_bytes)
        staged.rename(album / f"{number:03d}-{staged.name}")
        staged.parent.rmdir()
    return album


def _relocated(failure: InputError | ApiError, folder: Path) -> ApiError:
    """An :class:`ApiError` whose message does not show the temporary folder."""
    status = failure.status if isinstance(failure, ApiError) else 422
    return ApiError(status, _client_message(failure, folder))


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure becomes ``{"error": "..."}``: 4xx for the client's, 500 for the server's."""

    def respond(make: Callable[[Any], JSONResponse]) -> Callable[..., Awaitable[JSONResponse]]:
        async def handler(_: Request, failure: Any) -> JSONResponse:
            return make(failure)

        return handler

    def http_error(failure: StarletteHTTPException) -> JSONResponse:
        detail = failure.detail if isinstance(failure.detail, str) else str(failure.detail)
        response = error_response(failure.status_code, detail)
        response.headers.update(failure.headers or {})
        return response

    def internal_error(failure: Exception) -> JSONResponse:
        logger.error("internal error", exc_info=failure)
        name = type(failure).__name__
        return error_response(500, f"internal error ({name}); see the server's log")

    def checkpoint_error(failure: CheckpointError) -> JSONResponse:
        logger.error("cannot load the model: %s", failure)
        return error_response(500, "the server cannot load its model; see the server's log")

    out_of_memory = error_response(
        422, "the server ran out of memory on this image; send a smaller image or fewer references"
    )
    handlers: dict[type[BaseException], Callable[[Any], JSONResponse]] = {
        ApiError: lambda failure: error_response(failure.status, failure.message),
        StarletteHTTPException: http_error,
        RequestValidationError: lambda failure: error_response(
            400, _validation_message(jsonable_encoder(failure.errors()))
        ),
        InputError: lambda failure: error_response(422, str(failure)),
        MemoryError: lambda _: out_of_memory,
        torch.cuda.OutOfMemoryError: lambda _: out_of_memory,
        CheckpointError: checkpoint_error,
        Exception: internal_error,
    }
    for kind, make in handlers.items():
        app.add_exception_handler(kind, respond(make))


def _version() -> str:
    from ttsr import __version__

    return __version__
