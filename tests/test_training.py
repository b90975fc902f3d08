"""ttsr-train end to end on tiny data: the real configs, resume, validate/test, export, DDP."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ttsr import TTSR, TTSRConfig
from ttsr.checkpoints import load_checkpoint, read_weights_only, save_checkpoint
from ttsr.cli.train import main, warm_start
from ttsr.training import TTSRTraining, learning_rate_factor

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUIET = ["--trainer.enable_progress_bar", "false"]


def write_image(path: Path, height: int, width: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 4, ys * 4, (xs + ys) * 2], -1) % 200
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.clip(base + rng.integers(0, 56, (height, width, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(path)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Tiny CUFED, CUFED5, photo and validation folders; runs/ is written under tmp_path."""
    for index in range(2):
        write_image(tmp_path / "cufed" / "input" / f"{index:06d}.png", 32, 32, index)
        write_image(tmp_path / "cufed" / "ref" / f"{index:06d}.png", 32, 28, index + 10)
    for level in range(6):
        write_image(tmp_path / "cufed5" / f"000_{level}.png", 32, 32, 20 + level)
    for index in range(2):
        write_image(tmp_path / "photos" / f"p{index}.png", 48, 64, 30 + index)
    write_image(tmp_path / "val" / "v.png", 32, 48, 40)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def recipe(name: str, root: Path) -> list[str]:
    """A paper recipe layered with tiny.yaml on the CUFED folders of ``root``."""
    return [
        "--config",
        str(CONFIGS / f"{name}.yaml"),
        "--config",
        str(CONFIGS / "tiny.yaml"),
        f"--data.train_dirs={json.dumps([str(root / 'cufed')])}",
        f"--data.val_dirs={json.dumps([str(root / 'cufed5')])}",
        f"--data.test_dir={root / 'cufed5'}",
        *QUIET,
    ]


def synthetic_gan(root: Path) -> list[str]:
    """The GAN recipe on photos with synthetic references, validated with LR as reference."""
    return [
        "--config",
        str(CONFIGS / "ttsr_gan.yaml"),
        "--config",
        str(CONFIGS / "tiny.yaml"),
        "--data.train_layout=synthetic",
        f"--data.train_dirs={json.dumps([str(root / 'photos')])}",
        "--data.val_layout=folder",
        f"--data.val_dirs={json.dumps([str(root / 'val')])}",
        "--data.val_references=[lr]",
        "--data.lr_reference_probability=0.5",
        *QUIET,
    ]


def metrics(run: Path) -> list[dict[str, str]]:
    files = sorted(run.glob("csv/version_*/metrics.csv"))
    with files[-1].open() as handle:
        return list(csv.DictReader(handle))


def column(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(row[name]) for row in rows if row.get(name)]


@pytest.mark.slow
def test_rec_recipe_fits_resumes_validates_tests_and_exports(workdir, capsys):
    run = workdir / "runs" / "ttsr_rec"
    main(["fit", *recipe("ttsr_rec", workdir), "--trainer.max_epochs=2"])
    last = run / "checkpoints" / "last.ckpt"
    first = torch.load(last, weights_only=True)
    assert (first["global_step"], first["epoch"]) == (2, 2)  # epoch: epochs completed
    assert (run / "tensorboard" / "version_0" / "config.yaml").is_file()
    rows = metrics(run)
    assert column(rows, "val_level1/psnr") and column(rows, "val_level1/psnr_bicubic")
    assert column(rows, "train/rec") and not column(rows, "train/adv")

    main(["fit", *recipe("ttsr_rec", workdir), "--trainer.max_epochs=3", "--ckpt_path=last"])
    resumed = torch.load(last, weights_only=True)
    assert (resumed["global_step"], resumed["epoch"]) == (3, 3)
    assert resumed["optimizer_states"][0]["state"][0]["step"].item() == 3
    assert resumed["lr_schedulers"][0]["last_epoch"] == 3
    assert len(resumed["ttsr_commands"]) == 2 and "--ckpt_path=last" in resumed["ttsr_commands"][1]

    capsys.readouterr()
    main(["validate", *recipe("ttsr_rec", workdir), f"--ckpt_path={last}"])
    main(["test", *recipe("ttsr_rec", workdir), f"--ckpt_path={last}"])
    printed = capsys.readouterr().out
    assert "val_level1/psnr_gain" in printed and "test_level1/ssim" in printed

    exported = workdir / "model.pt"
    main(["export", "--ckpt", str(last), "--out", str(exported)])
    model = load_checkpoint(exported).eval()
    metadata = read_weights_only(exported)["metadata"]
    assert metadata["global_step"] == 3 and len(metadata["training_commands"]) == 2
    assert "export" in metadata["export_command"]
    module = TTSRTraining(
        **{k: v for k, v in resumed["hyper_parameters"].items() if not k.startswith("_")}
    )
    module.load_state_dict(resumed["state_dict"])
    inputs = [torch.rand(1, 3, 8, 8) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1]
    ref = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = module.model.eval()(*inputs, ref, ref).sr
        assert torch.equal(model(*inputs, ref, ref).sr, expected)

    # A new run warm-started from the exported weights (learning rate 0: nothing moves) ends
    # with exactly those weights, not with the seeded fresh initialisation.
    last.unlink()
    frozen = ["--model.lr=0", "--model.extractor_lr=0", "--trainer.max_epochs=1"]
    main(["fit", *recipe("ttsr_rec", workdir), *frozen, f"--init_weights={exported}"])
    started = torch.load(last, weights_only=True)["state_dict"]
    for key, value in model.state_dict().items():
        assert torch.equal(started["model." + key], value), key


@pytest.mark.slow
def test_gan_recipe_warms_up_then_trains_critic_and_generator(workdir):
    run = workdir / "runs" / "ttsr_gan"
    main(
        [
            "fit",
            *synthetic_gan(workdir),
            "--model.warmup_epochs=1",
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=1",
        ]
    )
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    # 1 warm-up batch (generator only), then 1 batch of 2 critic steps + 1 generator step.
    assert checkpoint["global_step"] == 4
    generator_state, critic_state = (s["state"] for s in checkpoint["optimizer_states"])
    assert generator_state[0]["step"].item() == 2 and critic_state[0]["step"].item() == 2
    assert checkpoint["hyper_parameters"]["discriminator_size"] == 32
    rows = metrics(run)
    for name in ("train/per", "train/tpl", "train/adv", "train/critic", "val_lr/psnr"):
        assert column(rows, name), name
    assert all(np.isfinite(column(rows, "train/loss")))


def test_demo_recipe_trains_in_bf16_mixed_precision_with_float32_weights(workdir):
    run = workdir / "runs" / "demo"
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "demo.yaml"),
            "--config",
            str(CONFIGS / "tiny.yaml"),
            f"--data.train_dirs={json.dumps([str(workdir / 'photos')])}",
            f"--data.val_dirs={json.dumps([str(workdir / 'val')])}",
            "--trainer.max_steps=2",
            "--trainer.limit_train_batches=2",
            "--trainer.callbacks=[]",
            *QUIET,
        ]
    )
    config = (run / "tensorboard" / "version_0" / "config.yaml").read_text()
    assert "precision: bf16-mixed" in config
    rows = metrics(run)
    assert len(column(rows, "train/rec")) == 2 and all(np.isfinite(column(rows, "train/rec")))
    assert all(np.isfinite(column(rows, "val_lr/psnr") + column(rows, "val_hr/psnr")))
    (saved,) = run.rglob("*.ckpt")  # Lightning's default checkpoint: the weights stay float32
    state = torch.load(saved, weights_only=True)["state_dict"]
    assert {value.dtype for value in state.values() if value.is_floating_point()} == {torch.float32}


def test_learning_rate_schedules():
    assert learning_rate_factor(5, "none", 10, 0.5, 0.0) == 1.0
    assert learning_rate_factor(25, "step", 10, 0.5, 0.0) == 0.25
    assert learning_rate_factor(0, "cosine", 10, 0.5, 0.1) == pytest.approx(1.0)
    assert learning_rate_factor(5, "cosine", 10, 0.5, 0.1) == pytest.approx(0.55)
    assert learning_rate_factor(50, "cosine", 10, 0.5, 0.1) == pytest.approx(0.1)


def test_texture_model_needs_texture_for_tpl():
    with pytest.raises(ValueError, match="use_texture"):
        TTSRTraining(num_res_blocks=[1, 1, 1, 1], n_feats=8, use_texture=False, tpl_weight=0.1)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["fit", "--config", "missing.yaml"], "missing.yaml"),
        (["fit", "--model.n_feats", "many"], "n_feats"),
        (["export", "--ckpt", "missing.ckpt", "--out", "x.pt"], "missing.ckpt"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(workdir, capsys, arguments, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in errors[0]


def test_bad_training_folder_is_named(workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *recipe("ttsr_rec", workdir), "--data.train_dirs=[nowhere]"])
    assert exit_info.value.code == 2
    assert "nowhere" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("subcommand", "listed"),
    [
        ([], ["fit", "validate", "export"]),
        (["fit"], ["--config", "--model.n_feats", "--data.patch_size", "--init_weights"]),
        (["export"], ["--ckpt", "--out"]),
    ],
)
def test_help_lists_the_subcommands_and_their_options(subcommand, listed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*subcommand, "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert shown.lower().startswith("usage: ttsr-train")
    assert all(option in shown for option in listed), shown


@pytest.mark.slow
def test_two_process_ddp_on_cpu(workdir):
    command = [
        sys.executable,
        "-m",
        "ttsr.cli.train",
        "fit",
        *synthetic_gan(workdir),
        "--model.warmup_epochs=0",
        "--trainer.strategy=ddp_find_unused_parameters_true",
        "--trainer.devices=2",
        "--trainer.max_epochs=1",
        "--data.repeats=2",  # 4 samples: one batch of 2 on each process
    ]
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = torch.load(
        workdir / "runs" / "ttsr_gan" / "checkpoints" / "last.ckpt", weights_only=True
    )
    assert checkpoint["global_step"] == 3
    assert column(metrics(workdir / "runs" / "ttsr_gan"), "val_lr/psnr")


def test_warm_start_of_a_deformable_run_from_hard_weights_keeps_the_head_start(tmp_path):
    torch.manual_seed(0)
    hard = TTSR(TTSRConfig(num_res_blocks=(1, 1, 1, 1), n_feats=8))
    save_checkpoint(hard, tmp_path / "hard.pt")
    module = TTSRTraining(
        num_res_blocks=(1, 1, 1, 1),
        n_feats=8,
        extractor_init="random",
        transfer="deformable",
        per_weight=0,
        tpl_weight=0,
        adv_weight=0,
    )
    head_start = {k: v.clone() for k, v in module.model.deformable_transfer.state_dict().items()}
    warm_start(module, str(tmp_path / "hard.pt"))
    for key, value in hard.state_dict().items():
        assert torch.equal(module.model.state_dict()[key], value), key
    for key, value in module.model.deformable_transfer.state_dict().items():
        assert torch.equal(value, head_start[key]), key
    lr = torch.rand(1, 3, 6, 5) * 2 - 1
    lrsr = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic").clamp(-1, 1)
    ref = torch.rand(1, 3, 16, 12) * 2 - 1
    with torch.no_grad():  # the head starts as the hard transfer: same output
        expected = hard.eval()(lr, lrsr, ref, ref).sr
        torch.testing.assert_close(module.model.eval()(lr, lrsr, ref, ref).sr, expected)


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_config_parses(config: Path, capsys: pytest.CaptureFixture) -> None:
    """Each recipe in configs/ is valid for ttsr-train: every key names a real option."""
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config), "--print_config"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed and "trainer:" in printed


def test_config_with_a_misspelt_option_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    text = (CONFIGS / "real.yaml").read_text()
    assert "    noise_probability:" in text
    config = tmp_path / "typo.yaml"
    config.write_text(text.replace("    noise_probability:", "    noise_probabilty:"))
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config), "--print_config"])
    assert stop.value.code == 2
    assert "noise_probabil" in capsys.readouterr().err
