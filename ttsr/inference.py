"""Inference: one :class:`Upscaler` owns preprocessing, the memory budget, tiling and references.

::

    upscaler = Upscaler.from_checkpoint()            # the default shipped model ("real")
    upscaler = Upscaler.from_checkpoint("bicubic")   # another shipped model, by name
    result = upscaler.upscale("lr.png", ["ref1.jpg", "ref2.jpg"])
    result.sr.save("sr.png"); result.attention_map().save("attention.png")

Preprocessing is TTSR's (:mod:`ttsr.data.degradation`): LR-up is the PIL bicubic x4 of the LR,
each reference is cropped to a multiple of 4 and paired with its PIL bicubic down-up version, all in
[-1, 1]. Several references are searched jointly. The LR is processed in tiles when the whole image
does not fit the memory budget; tile margins cover the receptive field, the LR-up is computed once
for the whole image and the reference features once for all tiles, so tiles give the whole-image
result up to float rounding.
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ttsr import visualize
from ttsr.album import DEFAULT_TOP_K, Album, AlbumMatches
from ttsr.checkpoints import CheckpointError, TTSRWeights, load_checkpoint
from ttsr.data.degradation import SCALE, reference_pair, to_tensor, to_uint8, upsample
from ttsr.imaging import (
    ImageSource,
    InputError,
    describe,
    image_size,
    load_rgb,
    require_min_side,
)
from ttsr.memory import (
    MemoryBudgetError,
    MemoryEstimate,
    default_budget,
    estimate_peak,
    format_size,
)
from ttsr.model.flow import flow_from_index
from ttsr.model.ttsr import MIN_REFERENCE_SIDE, TTSR, check_inputs
from ttsr.reference_alignment import ALIGNMENTS, Alignment, align_reference
from ttsr.runtime import CPURuntime
from ttsr.runtime.precision import precision_name, resolve_precision
from ttsr.tiling import Tile, padded_extent, receptive_radius, tile_grid

#: Smallest LR side accepted (a 16x16 output); smaller images hold no texture worth searching.
MIN_LR_SIDE = 4

#: Smallest tile core (LR pixels) tried before a run is refused for memory.
MIN_TILE_CORE = 8

#: Progress callback: ``(tiles done, tiles in total)``.
Progress = Callable[[int, int], None]


def default_checkpoint_path() -> Path:
    """Where the default shipped model's file lives (it may not be installed)."""
    return TTSRWeights.DEFAULT.value.path


def shipped_model_names() -> tuple[str, ...]:
    """Names of the shipped models (``--model``), the default first."""
    default = TTSRWeights.DEFAULT.value.name
    return (default, *(w.value.name for w in TTSRWeights if w.value.name != default))


def resolve_model(checkpoint: str | os.PathLike | None) -> tuple[str, Path]:
    """``(name, file)`` of a shipped model name, ``None`` (the default) or a checkpoint path.

    Raises :class:`CheckpointError` when a shipped model's file is not installed.
    """
    if checkpoint is not None and not (
        isinstance(checkpoint, str) and checkpoint in shipped_model_names()
    ):
        return str(checkpoint), Path(checkpoint)
    if checkpoint is None:
        name, path = TTSRWeights.DEFAULT.value.name, default_checkpoint_path()
    else:
        name, path = checkpoint, TTSRWeights.get(str(checkpoint)).path
    if not path.is_file():
        others = [n for n in shipped_model_names() if n != name]
        raise CheckpointError(
            f"the {name!r} model ({path}) is not installed in this build; choose "
            + "".join(f"--model {n} or " for n in others)
            + "pass --checkpoint PATH (convert released TTSR weights with ttsr-convert)"
        )
    return name, path


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available, else CPU; refuses CUDA when there is none."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was requested but PyTorch sees no CUDA GPU here; use --device cpu")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise InputError(
            f"{resolved} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
        )
    return resolved


@dataclass(frozen=True)
class TilePlan:
    """How a run is split: LR ``tiles``, their ``core`` size and ``margin``, and its memory;
    planned for ``lr_size`` and ``reference_sizes`` (H, W; references cropped to multiples of 4)."""

    tiles: tuple[Tile, ...]
    core: int
    margin: int
    estimate: MemoryEstimate
    budget: int
    lr_size: tuple[int, int] = (0, 0)
    reference_sizes: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Correspondence:
    """Where each LR position's texture came from (TTSR's hard attention), at LR resolution.

    ``reference_id`` ``[H, W]``: which reference; ``y``, ``x`` ``[H, W]``: centre of the matched
    4x4 patch in that reference's pixel coordinates (pixel centres at integers, after cropping to a
    multiple of 4); ``displacement`` ``[H, W, 2]``: ``(dy, dx)`` from the output patch centre (SR
    pixels) to the matched patch centre, a flow field when the reference is another view.
    """

    reference_id: np.ndarray
    y: np.ndarray
    x: np.ndarray
    displacement: np.ndarray
    reference_sizes: tuple[tuple[int, int], ...]

    @classmethod
    def from_index(
        cls, index: np.ndarray, reference_sizes: Sequence[tuple[int, int]]
    ) -> Correspondence:
        """Decode TTSR's ``index`` ``[H, W]`` (row-major over the references' relu3_1 grids)."""
        grids = [(h // SCALE, w // SCALE) for h, w in reference_sizes]
        flow, reference_id = flow_from_index(torch.from_numpy(index)[None].long(), grids)
        dx, dy = (flow[0, 0] * SCALE).numpy(), (flow[0, 1] * SCALE).numpy()
        centre = (SCALE - 1) / 2
        height, width = index.shape
        out_y = np.arange(height, dtype=np.float32)[:, None] * SCALE + centre
        out_x = np.arange(width, dtype=np.float32)[None, :] * SCALE + centre
        displacement = np.stack([dy, dx], axis=-1)
        return cls(
            reference_id[0].numpy(),
            out_y + dy,
            out_x + dx,
            displacement,
            tuple(tuple(s) for s in reference_sizes),
        )


@dataclass(frozen=True)
class UpscaleResult:
    """One upscaled image with what explains it.

    ``sr`` and ``bicubic`` (the LR-up) are PIL images; ``soft_attention`` ``[H, W]`` float32 is
    the relevance of the best reference match at each LR position; ``correspondence`` says where
    that match is. Both are ``None`` for a model without a texture path. ``references`` are the
    references as used (cropped to multiples of 4); ``matches``: how they were chosen, when they
    came from an album.
    """

    sr: Image.Image
    bicubic: Image.Image
    soft_attention: np.ndarray | None
    correspondence: Correspondence | None
    references: tuple[np.ndarray, ...]
    plan: TilePlan
    matches: AlbumMatches | None = None

    def _require_texture(self) -> Correspondence:
        if self.correspondence is None or self.soft_attention is None:
            raise InputError("this model does not use references: no attention to show")
        return self.correspondence

    def flow_fields(self) -> dict[str, np.ndarray]:
        """The correspondence as arrays at LR resolution: ``flow`` ``[2, H, W]`` (dx, dy) in
        output pixels from each LR position's 4x4 output patch centre to its match,
        ``reference_id``, ``match_x``, ``match_y`` (match centres in reference pixels) and
        ``reference_sizes`` ``[R, 2]``."""
        found = self._require_texture()
        return {
            "flow": np.stack([found.displacement[..., 1], found.displacement[..., 0]]).astype(
                np.float32
            ),
            "reference_id": found.reference_id.astype(np.int16),
            "match_x": found.x.astype(np.float32),
            "match_y": found.y.astype(np.float32),
            "reference_sizes": np.asarray(found.reference_sizes, dtype=np.int32),
        }

    def attention_map(self) -> Image.Image:
        """Soft-attention heat map at the SR size."""
        self._require_texture()
        assert self.soft_attention is not None
        return visualize.attention_heatmap(self.soft_attention, SCALE)

    def correspondence_map(self) -> Image.Image:
        """Output patches coloured by their reference position, beside the colour key."""
        found = self._require_texture()
        mapped = visualize.correspondence_map(
            found.reference_id, found.y, found.x, found.reference_sizes, SCALE
        )
        key = visualize.correspondence_key(self.references)
        return visualize.side_by_side(
            [mapped, key], ["source of each patch", "reference colour key"]
        )

    def comparison(self) -> Image.Image:
        """LR-up | SR | reference(s), side by side."""
        return visualize.comparison(self.bicubic, self.sr, self.references)


@dataclass(frozen=True)
class PreparedInputs:
    """TTSR's inputs in [-1, 1]: ``lr`` ``[1, 3, H, W]``, ``lrsr`` ``[1, 3, 4H, 4W]``, ``refs``
    and ``refsrs`` ``[1, 3, Hr, Wr]`` each (cropped to multiples of 4), and the uint8 LR-up and
    references they were made from."""

    lr: torch.Tensor
    lrsr: torch.Tensor
    refs: list[torch.Tensor]
    refsrs: list[torch.Tensor]
    lrsr_rgb: np.ndarray
    references_rgb: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class RawOutput:
    """Network output of a whole image: ``sr`` ``[3, 4H, 4W]`` float in [-1, 1]; soft attention
    ``[H, W]`` float32 and index ``[H, W]`` int64 (``None`` without a texture path)."""

    sr: torch.Tensor
    soft_attention: np.ndarray | None
    index: np.ndarray | None


def _as_list(refs: ImageSource | Sequence[ImageSource] | None) -> list[ImageSource]:
    if refs is None:
        return []
    if isinstance(refs, list | tuple):
        return list(refs)
    return [refs]


def _weight_bytes(model: torch.nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class Upscaler:
    """x4 reference-based super-resolution with a TTSR model, within a memory budget.

    Args:
        model: the network (moved to ``device`` and set to eval mode).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a ``torch.device``.
        max_memory: budget in bytes for one run; ``None``: half of the available memory.
        tile_size: force LR tile cores of this size (pixels); ``None``: as large as the budget
            allows (the whole image when it fits).
        reference_alignment: match each reference's colours to the LR's before the search
            (:mod:`ttsr.reference_alignment`): ``"none"``, ``"meanstd"`` or ``"histogram"``.
        model_name: what the model is called in messages (a shipped name or a file).
        precision: ``"fp32"`` (default: exact, reproducible), ``"bf16"``, ``"fp16"`` or
            ``"auto"`` (bfloat16 on a CPU with native bfloat16 and on CUDA, else float16 on CUDA
            and float32 elsewhere: :mod:`ttsr.runtime.precision`). A reduced precision runs a
            converted copy of ``model`` (converted once), several times faster where the hardware
            computes it natively; the texture search still compares relevances in float32.
    """

    def __init__(
        self,
        model: TTSR,
        device: str | torch.device = "auto",
        max_memory: int | None = None,
        tile_size: int | None = None,
        reference_alignment: Alignment = "none",
        model_name: str = "custom model",
        precision: str = "fp32",
    ) -> None:
        self.model_name = model_name
        if reference_alignment not in ALIGNMENTS:
            raise InputError(
                f"unknown reference alignment {reference_alignment!r}; use one of "
                + ", ".join(ALIGNMENTS)
            )
        self.reference_alignment = reference_alignment
        self.device = resolve_device(device)
        self._runtimes = threading.local()
        try:
            self.dtype = resolve_precision(precision, self.device)
        except ValueError as error:
            raise InputError(str(error)) from error
        if model.compute_dtype != self.dtype:
            model = copy.deepcopy(model)  # the caller's model stays as it is
            model.set_precision(self.dtype)
        self.model = model.to(self.device).eval()
        self.max_memory = int(max_memory) if max_memory else default_budget(self.device)
        if tile_size is not None and tile_size < 1:
            raise InputError(f"tile size must be at least 1 LR pixel, got {tile_size}")
        self.tile_size = tile_size
        config = model.config
        self.margin = receptive_radius(config.num_res_blocks, config.use_texture, config.transfer)
        self._weight_bytes = _weight_bytes(model)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike | None = None,
        device: str | torch.device = "auto",
        max_memory: int | None = None,
        tile_size: int | None = None,
        reference_alignment: Alignment = "none",
        precision: str = "fp32",
    ) -> Upscaler:
        """A shipped model by name, or a ttsr checkpoint file (weights only).

        ``checkpoint``: ``"real"`` or ``"bicubic"`` (:class:`~ttsr.checkpoints.TTSRWeights`),
        ``None`` for the default shipped model (``"real"``), or the path of any ttsr checkpoint
        (a ``str`` that names a shipped model is that model: pass a ``Path`` for a file so named).
        """
        name, path = resolve_model(checkpoint)
        model = load_checkpoint(path)
        return cls(
            model,
            device,
            max_memory,
            tile_size,
            reference_alignment,
            model_name=name,
            precision=precision,
        )

    @property
    def precision(self) -> str:
        """The precision the model runs in: ``"fp32"``, ``"bf16"`` or ``"fp16"``."""
        return precision_name(self.dtype)

    @property
    def runtime(self) -> CPURuntime:
        """The CPU runtime of the calling thread's runs (worker threads, scratch memory), kept
        between calls; one per thread, so that threads sharing this upscaler do not interfere."""
        runtime = getattr(self._runtimes, "runtime", None)
        if runtime is None:
            runtime = self._runtimes.runtime = CPURuntime()
        return runtime

    # --- planning --------------------------------------------------------------------------------

    def estimate(
        self, lr_size: tuple[int, int], reference_sizes: Sequence[tuple[int, int]], core: int
    ) -> MemoryEstimate:
        """Peak-memory estimate with LR tile cores of ``core`` pixels."""
        height, width = lr_size
        tile = (
            padded_extent(height, core, self.margin),
            padded_extent(width, core, self.margin),
        )
        return estimate_peak(
            lr_size,
            tile,
            reference_sizes,
            n_feats=self.model.generator.n_feats,
            weight_bytes=self._weight_bytes,
            use_texture=self.model.config.use_texture,
            implementation=self.model.search,
            activation_bytes=self.dtype.itemsize,
        )

    def plan(
        self, lr_size: tuple[int, int], reference_sizes: Sequence[tuple[int, int]]
    ) -> TilePlan:
        """Choose the largest tiles that fit the budget; :class:`MemoryBudgetError` if none does.

        ``reference_sizes`` are (H, W) after cropping to multiples of 4.
        """
        height, width = lr_size
        longest = max(height, width)
        if self.tile_size is not None:
            core = min(self.tile_size, longest)
        else:
            core = self._largest_fitting_core(lr_size, reference_sizes)
        estimate = self.estimate(lr_size, reference_sizes, core)
        if estimate.peak > self.max_memory:
            raise self._budget_error(lr_size, reference_sizes, estimate)
        tiles = tuple(tile_grid(height, width, core, self.margin))
        sizes = tuple((int(h), int(w)) for h, w in reference_sizes)
        return TilePlan(tiles, core, self.margin, estimate, self.max_memory, (height, width), sizes)

    def _largest_fitting_core(
        self, lr_size: tuple[int, int], reference_sizes: Sequence[tuple[int, int]]
    ) -> int:
        longest = max(lr_size)
        low = min(MIN_TILE_CORE, longest)
        if self.estimate(lr_size, reference_sizes, longest).peak <= self.max_memory:
            return longest
        if self.estimate(lr_size, reference_sizes, low).peak > self.max_memory:
            return low  # plan() reports the error with this smallest estimate
        high = longest  # invariant: low fits, high does not
        while high - low > 1:
            middle = (low + high) // 2
            if self.estimate(lr_size, reference_sizes, middle).peak <= self.max_memory:
                low = middle
            else:
                high = middle
        return low

    def _budget_error(
        self,
        lr_size: tuple[int, int],
        reference_sizes: Sequence[tuple[int, int]],
        estimate: MemoryEstimate,
    ) -> MemoryBudgetError:
        height, width = lr_size
        references = ", ".join(f"{w}x{h}" for h, w in reference_sizes) or "none"
        return MemoryBudgetError(
            f"upscaling a {width}x{height} image with references of {references} needs about "
            f"{format_size(estimate.peak)} even in the smallest tiles (reference features: "
            f"{format_size(estimate.reference_features)}), more than the memory budget of "
            f"{format_size(self.max_memory)}; raise --max-memory, or use smaller or fewer "
            "references (or a smaller image)"
        )

    # --- running ---------------------------------------------------------------------------------

    def check_sizes(
        self, lr: ImageSource, refs: ImageSource | Sequence[ImageSource] | None
    ) -> TilePlan:
        """Validate inputs from their headers (no decoding) and plan the run."""
        references = _as_list(refs)
        if self.model.config.use_texture and not references:
            raise InputError("give at least one reference image")
        lr_size = image_size(lr)
        require_min_side(lr_size, MIN_LR_SIDE, describe(lr), "low-resolution input")
        reference_sizes = []
        for ref in references:
            size = image_size(ref)
            require_min_side(size, MIN_REFERENCE_SIDE, describe(ref), "reference")
            reference_sizes.append((size[0] // SCALE * SCALE, size[1] // SCALE * SCALE))
        return self.plan(lr_size, reference_sizes)

    def prepare(
        self,
        lr: ImageSource,
        refs: ImageSource | Sequence[ImageSource] | None,
        alignment: Alignment | None = None,
    ) -> PreparedInputs:
        """Decode the images and make TTSR's inputs (LR-up, cropped references, Ref-down-up).

        ``alignment`` overrides the upscaler's ``reference_alignment`` for this call.
        """
        alignment = self.reference_alignment if alignment is None else alignment
        lr_rgb = load_rgb(lr)
        lrsr_rgb = upsample(lr_rgb)
        pairs = [
            reference_pair(align_reference(load_rgb(ref), lr_rgb, alignment))
            for ref in _as_list(refs)
        ]
        inputs = PreparedInputs(
            lr=to_tensor(lr_rgb)[None],
            lrsr=to_tensor(lrsr_rgb)[None],
            refs=[to_tensor(ref)[None] for ref, _ in pairs],
            refsrs=[to_tensor(refsr)[None] for _, refsr in pairs],
            lrsr_rgb=lrsr_rgb,
            references_rgb=tuple(ref for ref, _ in pairs),
        )
        if self.model.config.use_texture:
            check_inputs(inputs.lr, inputs.lrsr, inputs.refs, inputs.refsrs)
        return inputs

    def choose_references(
        self, lr: ImageSource, album: Album | str | os.PathLike, top_k: int = DEFAULT_TOP_K
    ) -> AlbumMatches:
        """Up to ``top_k`` references for ``lr`` from an album (a folder or an :class:`Album`,
        whose cached index is read or made first): see :mod:`ttsr.album`."""
        if not self.model.config.use_texture:
            raise InputError("this checkpoint's model uses no references: an album cannot help")
        album = album if isinstance(album, Album) else Album(album)
        return album.select(lr, self.model, top_k)

    def upscale(
        self,
        lr: ImageSource,
        refs: ImageSource | Sequence[ImageSource] | None = None,
        progress: Progress | None = None,
        alignment: Alignment | None = None,
        *,
        album: Album | str | os.PathLike | None = None,
        top_k: int = DEFAULT_TOP_K,
    ) -> UpscaleResult:
        """Super-resolve ``lr`` x4 using ``refs`` (one or several; paths, PIL images or arrays),
        or up to ``top_k`` references chosen from ``album`` (:meth:`choose_references`).

        ``alignment`` overrides the upscaler's ``reference_alignment`` for this call.

        Raises :class:`~ttsr.imaging.InputError` (a ``ValueError``) for unusable images, sizes
        or a run that does not fit the memory budget, before any heavy work.
        """
        matches = None
        if album is not None:
            if _as_list(refs):
                raise InputError("give references or an album to choose them from, not both")
            matches = self.choose_references(lr, album, top_k)
            refs = list(matches.chosen)
        plan = self.check_sizes(lr, refs)  # refuses early, from the headers
        inputs = self.prepare(lr, refs, alignment)
        lr_size = (int(inputs.lr.shape[-2]), int(inputs.lr.shape[-1]))
        sizes = tuple((int(r.shape[0]), int(r.shape[1])) for r in inputs.references_rgb)
        if (plan.lr_size, plan.reference_sizes) != (lr_size, sizes):
            plan = self.plan(lr_size, sizes)  # a PNG's EXIF rotation found only when decoded
        output = self.run(inputs, plan, progress)
        references = inputs.references_rgb if self.model.config.use_texture else ()
        correspondence = None
        if output.index is not None:
            correspondence = Correspondence.from_index(
                output.index, [r.shape[:2] for r in references]
            )
        return UpscaleResult(
            sr=Image.fromarray(_to_uint8_by_rows(output.sr)),
            bicubic=Image.fromarray(inputs.lrsr_rgb),
            soft_attention=output.soft_attention,
            correspondence=correspondence,
            references=references,
            plan=plan,
            matches=matches,
        )

    @torch.inference_mode()
    def run(
        self, inputs: PreparedInputs, plan: TilePlan, progress: Progress | None = None
    ) -> RawOutput:
        """Run the network tile by tile: reference features once, LR-up cropped per tile."""
        device = self.device
        height, width = inputs.lr.shape[-2:]
        use_texture = self.model.config.use_texture
        features = None
        if use_texture:
            features = self.model.extract_reference_features(
                [r.to(device) for r in inputs.refs], [r.to(device) for r in inputs.refsrs]
            )
        sr = torch.empty(3, SCALE * height, SCALE * width)
        attention = np.empty((height, width), np.float32) if use_texture else None
        index = np.empty((height, width), np.int64) if use_texture else None
        for done, tile in enumerate(plan.tiles, start=1):
            top, bottom, left, right = tile.padded
            lr_tile = inputs.lr[..., top:bottom, left:right].to(device)
            lrsr_tile = inputs.lrsr[..., SCALE * top : SCALE * bottom, SCALE * left : SCALE * right]
            lrsr_tile = lrsr_tile.to(device)
            rows, cols = tile.core_in_padded
            core = (slice(tile.core[0], tile.core[1]), slice(tile.core[2], tile.core[3]))
            if features is not None:
                output = self.model.forward_with_reference_features(
                    lr_tile, lrsr_tile, features, runtime=self.runtime, lean=True
                )
                tile_sr = output.sr
                assert output.soft_attention is not None and output.index is not None
                attention[core] = output.soft_attention[0, 0, rows, cols].float().cpu().numpy()
                index[core] = output.index[0, rows, cols].cpu().numpy()
            else:
                tile_sr = self.model.generator(lr_tile, lrsr=lrsr_tile, lean=True)
            sr[:, _scaled(core[0]), _scaled(core[1])] = (
                tile_sr[0, :, _scaled(rows), _scaled(cols)].float().cpu()
            )
            if progress is not None:
                progress(done, len(plan.tiles))
        return RawOutput(sr=sr, soft_attention=attention, index=index)


def _to_uint8_by_rows(image: torch.Tensor, rows: int = 256) -> np.ndarray:
    """:func:`~ttsr.data.degradation.to_uint8` of ``[3, H, W]`` a band of rows at a time, so that
    its float temporaries stay small for large images."""
    out = np.empty((image.shape[1], image.shape[2], 3), np.uint8)
    for top in range(0, image.shape[1], rows):
        out[top : top + rows] = to_uint8(image[:, top : top + rows])
    return out


def _scaled(span: slice) -> slice:
    """LR rows/columns -> the SR rows/columns they produce."""
    return slice(SCALE * span.start, SCALE * span.stop)
