"""Training TTSR: one LightningModule that owns the model, its losses and its optimisers.

The module sees batches of tensors only (files are the DataModule's business). Optimisation is
manual: a warm-up of ``warmup_epochs`` with the reconstruction loss only, then the full
objective ``rec + per + tpl + adv`` with ``gan_k`` WGAN-GP critic steps per generator step.

``trainer.global_step`` counts optimiser steps (Lightning's rule for manual optimisation): one per
batch while only the generator trains, ``1 + gan_k`` per batch once the critic trains too.
``every_n_train_steps`` and ``max_steps`` count the same way; the learning-rate schedule counts
generator steps (batches).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR
from torchvision.utils import make_grid

from ttsr.checkpoints import (
    CheckpointError,
    atomic_torch_save,
    load_state_strict,
    read_config,
    read_weights_only,
    save_checkpoint,
)
from ttsr.data.degradation import to_uint8
from ttsr.losses import (
    DEFAULT_WEIGHTS,
    GRADIENT_PENALTY_WEIGHT,
    PerceptualLoss,
    critic_loss,
    generator_adversarial_loss,
    reconstruction_loss,
    transferal_perceptual_loss,
)
from ttsr.metrics import psnr_y, ssim_y
from ttsr.model.config import CONFIG_ENTRIES, DEFAULT_BLOCKS, TTSRConfig
from ttsr.model.discriminator import Discriminator
from ttsr.model.ttsr import TTSR, TTSROutput
from ttsr.runtime import CPURuntime

LearningRateDecay = Literal["none", "step", "cosine"]


def learning_rate_factor(
    step: int, decay: LearningRateDecay, period: int, gamma: float, floor: float
) -> float:
    """Multiplier of the base learning rates after ``step`` generator steps.

    ``"step"``: ``gamma ** (step // period)``; ``"cosine"``: from 1 down to ``floor`` over
    ``period`` steps, then ``floor``; ``"none"``: 1.
    """
    if decay == "step":
        return gamma ** (step // period)
    if decay == "cosine":
        progress = min(step / period, 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint writer that saves to a temporary file and renames it, so a run that
    is killed while saving never leaves a truncated ``last.ckpt`` behind."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        atomic_torch_save(checkpoint, path)


class TTSRTraining(L.LightningModule):
    """TTSR with its training losses, optimisers and validation metrics.

    Model args: the entries of :class:`~ttsr.model.config.TTSRConfig`, flat (so that a YAML
    config and a training checkpoint's hyper-parameters name them directly), and the ``search``
    and ``extractor_init`` of :class:`ttsr.model.TTSR` (``extractor_init`` only matters for a new
    run: resuming and exporting load the trained weights). Loss weights: ``rec_weight`` (L1),
    ``per_weight`` (VGG19 relu5_1), ``tpl_weight`` (transferal perceptual), ``adv_weight``
    (WGAN-GP); a zero weight leaves its network unbuilt (no VGG19 without ``per_weight``, no
    discriminator without ``adv_weight``).

    Args:
        perceptual_init: VGG19 weights of the perceptual loss (see
            :func:`ttsr.losses.load_perceptual_vgg`).
        lr, extractor_lr, betas: Adam for the generator and (a second parameter group) the
            texture extractor.
        discriminator_lr, discriminator_betas: Adam for the discriminator.
        gan_k: critic steps per generator step.
        warmup_epochs: epochs of reconstruction loss only before the full objective.
        discriminator_size: side of the training patches the discriminator takes.
        lr_decay, lr_decay_steps, lr_decay_gamma, lr_decay_floor: the generator's learning-rate
            schedule in generator steps (:func:`learning_rate_factor`).
        border: pixels cropped on every side before validation PSNR/SSIM (TTSR: 0).
        log_images: validation images per validation set drawn to an image-capable logger.
    """

    def __init__(
        self,
        num_res_blocks: Sequence[int] = DEFAULT_BLOCKS,
        n_feats: int = 64,
        res_scale: float = 1.0,
        divisor: Literal["overlap", "constant"] = "overlap",
        extractor_init: str = "bundled",
        use_texture: bool = True,
        bicubic_skip: bool = False,
        search: str = "fast",
        transfer: str = "hard",
        offset_groups: int = 8,
        rec_weight: float = DEFAULT_WEIGHTS.reconstruction,
        per_weight: float = DEFAULT_WEIGHTS.perceptual,
        tpl_weight: float = DEFAULT_WEIGHTS.transferal,
        adv_weight: float = DEFAULT_WEIGHTS.adversarial,
        perceptual_init: str = "torchvision",
        lr: float = 1e-4,
        extractor_lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        discriminator_lr: float = 1e-4,
        discriminator_betas: tuple[float, float] = (0.0, 0.9),
        gan_k: int = 2,
        warmup_epochs: int = 2,
        discriminator_size: int = 160,
        lr_decay: LearningRateDecay = "none",
        lr_decay_steps: int = 100_000,
        lr_decay_gamma: float = 0.5,
        lr_decay_floor: float = 0.0,
        border: int = 0,
        log_images: int = 2,
    ) -> None:
        super().__init__()
        if tpl_weight and not use_texture:
            raise ValueError("tpl_weight needs use_texture: a texture-less model has no textures")
        if gan_k < 1 or lr_decay_steps < 1:
            raise ValueError("gan_k and lr_decay_steps must be at least 1")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.model = TTSR(
            architecture(self.hparams, source="the model arguments"),
            search=search,
            extractor_init=extractor_init,
        )
        if not use_texture or extractor_lr == 0:
            # unused, or frozen by the recipe: keep it out of autograd, DDP and Adam
            self.model.extractor.requires_grad_(False)
        self.perceptual = PerceptualLoss(perceptual_init) if per_weight else None
        self.discriminator = Discriminator(discriminator_size) if adv_weight else None
        #: Training commands of this run, oldest first (kept in checkpoints, copied on export);
        #: the command-line interface sets the current one.
        self.commands: list[str] = []
        self._runtime: CPURuntime | None = None

    @property
    def runtime(self) -> CPURuntime:
        """The CPU runtime of this module's forwards (worker threads), made on first use."""
        if self._runtime is None:
            self._runtime = CPURuntime()
        return self._runtime

    # --- optimisation --------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        extractor = list(self.model.extractor.parameters())
        in_extractor = {id(p) for p in extractor}
        # The generator and any learned transfer head (model order: same groups as before).
        trained = [
            p for p in self.model.parameters() if p.requires_grad and id(p) not in in_extractor
        ]
        groups = [{"params": trained, "lr": hp.lr}]
        if hp.use_texture and hp.extractor_lr > 0:
            groups.append({"params": extractor, "lr": hp.extractor_lr})
        generator_optimizer = torch.optim.Adam(groups, lr=hp.lr, betas=tuple(hp.betas))
        factor = partial(
            learning_rate_factor,
            decay=hp.lr_decay,
            period=hp.lr_decay_steps,
            gamma=hp.lr_decay_gamma,
            floor=hp.lr_decay_floor,
        )
        schedule = LambdaLR(generator_optimizer, factor)
        optimizers = [generator_optimizer]
        if self.discriminator is not None:
            optimizers.append(
                torch.optim.Adam(
                    self.discriminator.parameters(),
                    lr=hp.discriminator_lr,
                    betas=tuple(hp.discriminator_betas),
                )
            )
        return optimizers, [schedule]

    @property
    def full_objective(self) -> bool:
        """Past the warm-up, with at least one loss besides reconstruction."""
        hp = self.hparams
        extra = hp.per_weight or hp.tpl_weight or hp.adv_weight
        return bool(extra) and self.current_epoch >= hp.warmup_epochs

    def generator_losses(self, output: TTSROutput, hr: Tensor) -> dict[str, Tensor]:
        """The weighted terms of the generator's objective (unweighted values are logged)."""
        hp = self.hparams
        losses = {"rec": reconstruction_loss(output.sr, hr)}
        if not self.full_objective:
            return losses
        if self.perceptual is not None:
            losses["per"] = self.perceptual(output.sr, hr)
        if hp.tpl_weight:
            losses["tpl"] = transferal_perceptual_loss(
                self.model.extractor,
                output.sr,
                output.soft_attention,
                output.t_lv3,
                output.t_lv2,
                output.t_lv1,
            )
        if self.discriminator is not None:
            losses["adv"] = generator_adversarial_loss(self.discriminator, output.sr)
        return losses

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        output = self.model(
            batch["lr"], batch["lrsr"], batch["ref"], batch["refsr"], runtime=self.runtime
        )
        logs: dict[str, Tensor | float] = {}
        if self.discriminator is not None and self.full_objective:
            critic_optimizer = optimizers[1]
            for _ in range(self.hparams.gan_k):
                critic = critic_loss(
                    self.discriminator, batch["hr"], output.sr, GRADIENT_PENALTY_WEIGHT
                )
                critic_optimizer.zero_grad()
                self.manual_backward(critic.loss)
                critic_optimizer.step()
            logs.update(
                {
                    "train/critic": critic.loss.detach(),
                    "train/critic_penalty": critic.penalty.detach(),
                    "train/wasserstein": (critic.real_score - critic.fake_score).detach(),
                }
            )
        weights = {
            "rec": self.hparams.rec_weight,
            "per": self.hparams.per_weight,
            "tpl": self.hparams.tpl_weight,
            "adv": self.hparams.adv_weight,
        }
        losses = self.generator_losses(output, batch["hr"])
        total = sum(weights[name] * value for name, value in losses.items())
        generator_optimizer = optimizers[0]
        generator_optimizer.zero_grad()
        self.manual_backward(total)
        generator_optimizer.step()
        schedule = self.lr_schedulers()
        schedule.step()
        logs.update({f"train/{name}": value.detach() for name, value in losses.items()})
        logs["train/lr"] = generator_optimizer.param_groups[0]["lr"]
        self.log_dict(logs, batch_size=batch["hr"].size(0))
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=batch["hr"].size(0))
        return total.detach()

    # --- evaluation ----------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0):
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0):
        self._evaluate(batch, batch_idx, "test")

    def _evaluate(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        """Y-PSNR/SSIM of SR and of bicubic against HR, per image, averaged by Lightning."""
        output = self.model(
            batch["lr"], batch["lrsr"], batch["ref"], batch["refsr"], runtime=self.runtime
        )
        prefix = f"{stage}_{batch['reference'][0]}"
        border = self.hparams.border
        values: dict[str, list[float]] = {}
        for index in range(batch["hr"].size(0)):
            hr = to_uint8(batch["hr"][index])
            sr = to_uint8(output.sr[index])
            bicubic = to_uint8(batch["lrsr"][index])
            psnr, psnr_bicubic = psnr_y(sr, hr, border), psnr_y(bicubic, hr, border)
            for name, value in (
                ("psnr", psnr),
                ("ssim", ssim_y(sr, hr, border)),
                ("psnr_bicubic", psnr_bicubic),
                ("ssim_bicubic", ssim_y(bicubic, hr, border)),
                ("psnr_gain", psnr - psnr_bicubic),
            ):
                values.setdefault(name, []).append(value)
        for name, series in values.items():
            self.log(
                f"{prefix}/{name}",
                sum(series) / len(series),
                batch_size=len(series),
                add_dataloader_idx=False,
                sync_dist=True,
                prog_bar=name == "psnr_gain",
            )
        if batch_idx < self.hparams.log_images:
            self._log_image_grid(batch, output, f"{prefix}/{batch['name'][0]}")

    def _log_image_grid(self, batch: dict[str, Any], output: TTSROutput, tag: str) -> None:
        """LR-up | SR | HR | reference | soft attention, to every logger that draws images."""
        writers = [lg.experiment for lg in self.loggers if hasattr(lg.experiment, "add_image")]
        if not writers:
            return
        hr = batch["hr"][0]
        panels = [batch["lrsr"][0], output.sr[0], hr, fit_inside(batch["ref"][0], hr.shape[-2:])]
        if output.soft_attention is not None:
            attention = F.interpolate(output.soft_attention[:1], size=hr.shape[-2:])[0]
            panels.append(attention.clamp(0, 1).expand(3, -1, -1) * 2 - 1)
        grid = make_grid([(p.float().clamp(-1, 1) + 1) / 2 for p in panels], nrow=len(panels))
        for writer in writers:
            writer.add_image(tag, grid.cpu(), self.global_step)

    # --- checkpoints ---------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ttsr_commands"] = list(self.commands)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        earlier = [c for c in checkpoint.get("ttsr_commands", []) if isinstance(c, str)]
        self.commands = [*earlier, *self.commands[-1:]]


def architecture(hparams: Mapping[str, Any], source: str) -> TTSRConfig:
    """The :class:`TTSRConfig` among flat hyper-parameters (entries added later may be absent)."""
    return read_config({k: hparams[k] for k in CONFIG_ENTRIES if k in hparams}, source)


def fit_inside(image: Tensor, size: Sequence[int]) -> Tensor:
    """Resize ``[3, h, w]`` to fit ``size`` keeping its aspect, padded with black (display)."""
    height, width = int(size[0]), int(size[1])
    ratio = min(height / image.shape[-2], width / image.shape[-1])
    new_size = (max(1, round(image.shape[-2] * ratio)), max(1, round(image.shape[-1] * ratio)))
    resized = F.interpolate(image[None].float(), size=new_size, mode="bilinear")[0]
    canvas = resized.new_full((3, height, width), -1.0)
    canvas[:, : new_size[0], : new_size[1]] = resized
    return canvas


def export_weights(
    lightning_checkpoint: str | Path, out_path: str | Path, command: str | None = None
) -> dict[str, Any]:
    """Write the model of a training checkpoint as a ttsr checkpoint; returns its metadata.

    The Lightning file is read with ``weights_only=True``; the architecture comes from its
    hyper-parameters, the weights from its ``model.*`` entries.
    """
    content = read_weights_only(lightning_checkpoint)
    if not isinstance(content, dict) or "state_dict" not in content:
        raise CheckpointError(f"{lightning_checkpoint} is not a Lightning training checkpoint")
    hparams = content.get("hyper_parameters") or {}
    model = TTSR(architecture(hparams, source=f"{lightning_checkpoint} (a training checkpoint)"))
    state = {
        k.removeprefix("model."): v
        for k, v in content["state_dict"].items()
        if k.startswith("model.")
    }
    load_state_strict(model, state, source=str(lightning_checkpoint))
    training = {
        k: v
        for k, v in hparams.items()
        if k not in CONFIG_ENTRIES and not k.startswith("_") and isinstance(v, str | int | float)
    }
    metadata = {
        "source": "ttsr-train",
        "lightning_checkpoint": Path(lightning_checkpoint).name,
        "global_step": int(content.get("global_step", 0)),
        "epoch": int(content.get("epoch", 0)),
        "training_commands": list(content.get("ttsr_commands", [])),
        "export_command": command or "",
        "training": training,
    }
    save_checkpoint(model, out_path, metadata)
    return metadata
