"""The TTSR network: sizes, gradients, parameter counts, released-checkpoint equivalence."""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ttsr import TTSR, TextureExtractor
from ttsr.checkpoints import (
    CheckpointError,
    convert_released_checkpoint,
    convert_released_state,
    load_checkpoint,
    save_checkpoint,
)
from ttsr.data.degradation import reference_pair, to_tensor, upsample
from ttsr.model.config import TTSRConfig
from ttsr.model.extractor import bundled_vgg_path

RELEASED = Path(__file__).resolve().parent / "fixtures" / "released_ttsr_small"


def small_model(search: str = "fast", extractor_init: str = "random", **config) -> TTSR:
    torch.manual_seed(0)
    config = TTSRConfig(num_res_blocks=(1, 1, 1, 1), n_feats=8, **config)
    return TTSR(config, search=search, extractor_init=extractor_init)


def inputs(batch: int, height: int, width: int, ref_height: int, ref_width: int):
    generator = torch.Generator().manual_seed(1)
    lr = torch.rand(batch, 3, height, width, generator=generator) * 2 - 1
    lrsr = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(-1, 1)
    ref = torch.rand(batch, 3, ref_height, ref_width, generator=generator) * 2 - 1
    return lr, lrsr, ref, ref.clone()


def test_default_parameter_counts_match_released_model():
    model = TTSR()
    generator = sum(p.numel() for p in model.generator.parameters())
    extractor = sum(p.numel() for p in model.extractor.parameters())
    assert round(generator / 1e6, 2) == 6.17
    assert extractor == 555_328


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (13, 6)])
def test_every_lr_size_gives_exactly_four_times_the_size(size):
    lr, lrsr, ref, refsr = inputs(2, *size, 20, 24)
    out = small_model()(lr, lrsr, ref, refsr)
    assert out.sr.shape == (2, 3, size[0] * 4, size[1] * 4)
    assert out.soft_attention.shape == (2, 1, *size)
    assert out.index.shape == (2, *size)
    assert out.sr.abs().max() <= 1


def test_reference_not_multiple_of_four_is_cropped_bottom_right():
    lr, lrsr, ref, refsr = inputs(1, 6, 5, 23, 30)
    model = small_model().eval()
    with torch.no_grad():
        odd = model(lr, lrsr, ref, refsr)
        cropped = model(lr, lrsr, ref[..., :20, :28], refsr[..., :20, :28])
    torch.testing.assert_close(odd.sr, cropped.sr)


def test_reference_of_another_size_and_several_references():
    lr, lrsr, ref, refsr = inputs(1, 6, 5, 16, 40)
    _, _, ref2, refsr2 = inputs(1, 2, 2, 28, 12)
    out = small_model()(lr, lrsr, [ref, ref2], [refsr, refsr2])
    assert out.sr.shape == (1, 3, 24, 20)
    assert int(out.index.max()) < 4 * 10 + 7 * 3


@pytest.mark.parametrize(
    ("lr_shape", "ref_shape", "message"),
    [((1, 3, 0, 5), (1, 3, 8, 8), "non-empty"), ((1, 3, 4, 4), (1, 3, 3, 8), "too small")],
)
def test_empty_or_too_small_inputs_raise_value_error(lr_shape, ref_shape, message):
    lr = torch.zeros(lr_shape)
    lrsr = torch.zeros(1, 3, lr_shape[2] * 4, lr_shape[3] * 4)
    ref = torch.zeros(ref_shape)
    with pytest.raises(ValueError, match=message):
        small_model()(lr, lrsr, ref, ref)


def test_gradients_reach_generator_and_extractor_through_soft_attention():
    lr, lrsr, ref, refsr = inputs(2, 4, 4, 16, 16)
    model = small_model()
    out = model(lr, lrsr, ref, refsr)
    out.soft_attention.sum().backward()
    first_conv = model.extractor.features[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    model.zero_grad()
    out = model(lr, lrsr, ref, refsr)
    out.sr.mean().backward()
    assert all(p.grad is not None for p in model.generator.parameters())
    assert model.extractor.features[10].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("search", ["straightforward", "fast"])
def test_bf16_autocast_searches_in_float32_and_stays_close_to_float32(search):
    lr, lrsr, ref, refsr = inputs(2, 6, 6, 24, 24)
    model = small_model(search=search, extractor_init="bundled").eval()
    with torch.no_grad():
        exact = model(lr, lrsr, ref, refsr)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(lr, lrsr, ref, refsr)
    # Texture maps come out of the search in float32 (the generator then takes bf16 copies).
    assert mixed.t_lv1.dtype == mixed.soft_attention.dtype == torch.float32
    # bf16 features move a few near-tie matches at most; the image stays close.
    assert (mixed.index == exact.index).float().mean() > 0.9
    assert (mixed.sr.float() - exact.sr).abs().mean() < 0.02


def test_float64_model_searches_and_generates_in_float64():
    lr, lrsr, ref, refsr = (t.double() for t in inputs(1, 4, 4, 16, 16))
    model = small_model(search="fast").double().eval()
    with torch.no_grad():
        out = model(lr, lrsr, ref, refsr)
    assert out.sr.dtype == out.t_lv1.dtype == out.soft_attention.dtype == torch.float64


def test_bf16_autocast_training_step_reaches_the_generator():
    lr, lrsr, ref, refsr = inputs(2, 6, 6, 24, 24)
    model = small_model(search="fast", bicubic_skip=True)
    model.extractor.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = (model(lr, lrsr, ref, refsr).sr.float() - lrsr).abs().mean()
    loss.backward()
    grads = [p.grad for p in model.generator.parameters()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert torch.isfinite(loss) and sum(g.abs().sum() for g in grads) > 0


def test_texture_free_ablation_has_no_fusion_layers_and_runs():
    model = small_model(use_texture=False, bicubic_skip=True)
    names = {name for name, _ in model.generator.named_parameters()}
    assert not any("head" in name and "conv_head" not in name for name in names)
    lr, lrsr, ref, refsr = inputs(1, 3, 4, 8, 8)
    out = model(lr, lrsr, ref, refsr)
    assert out.sr.shape == (1, 3, 12, 16) and out.soft_attention is None


def test_bicubic_skip_with_zero_tail_returns_the_bicubic_image():
    model = small_model(bicubic_skip=True)
    torch.nn.init.zeros_(model.generator.merge_tail.conv_tail2.weight)
    torch.nn.init.zeros_(model.generator.merge_tail.conv_tail2.bias)
    lr, lrsr, ref, refsr = inputs(1, 3, 4, 8, 8)
    torch.testing.assert_close(model(lr, lrsr, ref, refsr).sr, lrsr)


def test_bundled_imagenet_extractor_differs_from_random_and_loads_all_layers():
    bundled = TextureExtractor("bundled")
    state = torch.load(bundled_vgg_path(), weights_only=True)
    torch.testing.assert_close(bundled.features[10].bias, state["features.10.bias"])
    assert not torch.equal(
        TextureExtractor("random").features[0].weight, bundled.features[0].weight
    )


def test_torchvision_weights_without_network_fail_naming_alternatives(monkeypatch):
    import torchvision.models

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models, "vgg19", offline)
    with pytest.raises(RuntimeError, match="bundled.*random.*path"):
        TextureExtractor("torchvision")


def test_unknown_extractor_init_is_refused(tmp_path):
    with pytest.raises(ValueError, match="neither"):
        TextureExtractor(tmp_path / "missing.pth")


# --- checkpoints --------------------------------------------------------------------------------


def released_format_state(model: TTSR) -> dict[str, torch.Tensor]:
    """Rename our keys to researchmm/TTSR's (MainNet.*, LTE.sliceN.K.*, LTE_copy.*)."""
    slices = {0: 1, 2: 2, 5: 2, 7: 3, 10: 3}
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("generator."):
            state["MainNet." + key.removeprefix("generator.")] = value
        elif key.startswith("extractor.features."):
            layer, kind = key.split(".")[2:4]
            for prefix in ("LTE", "LTE_copy"):
                state[f"{prefix}.slice{slices[int(layer)]}.{layer}.{kind}"] = value
    for prefix in ("LTE", "LTE_copy"):
        state[f"{prefix}.sub_mean.weight"] = torch.eye(3).view(3, 3, 1, 1) / 0.229
        state[f"{prefix}.sub_mean.bias"] = torch.zeros(3)
    return state


def test_conversion_round_trip_of_official_format_state_dict(tmp_path):
    model = TTSR(TTSRConfig(num_res_blocks=(2, 3, 1, 2), n_feats=12, divisor="constant")).eval()
    official = tmp_path / "official.pt"
    torch.save(released_format_state(model), official)
    config = convert_released_checkpoint(official, tmp_path / "converted.pt")
    assert config == TTSRConfig(num_res_blocks=(2, 3, 1, 2), n_feats=12, divisor="constant")
    converted = load_checkpoint(tmp_path / "converted.pt").eval()
    for key, value in model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("problem", "message"),
    [("unknown", "unknown keys"), ("missing", "missing keys"), ("misshaped", "mis-shaped")],
)
def test_conversion_reports_bad_keys_clearly(problem, message):
    state = released_format_state(small_model())
    if problem == "unknown":
        state["SearchNet.weight"] = torch.zeros(1)
    elif problem == "missing":
        del state["MainNet.merge_tail.conv_tail2.bias"]
    else:
        state["MainNet.conv11_tail.weight"] = torch.zeros(8, 8, 1, 1)
    with pytest.raises(CheckpointError, match=message):
        convert_released_state(state)


@pytest.mark.parametrize("search", ["fast", "straightforward"])
def test_converted_fixture_reproduces_released_outputs(search):
    state = torch.load(RELEASED / "released_format_state_dict.pt", weights_only=True)
    config, converted = convert_released_state(state)
    model = TTSR(config, search=search)
    model.load_state_dict(converted)
    model.eval()
    lr = np.asarray(Image.open(RELEASED / "lr.png"))
    ref, refsr = reference_pair(np.asarray(Image.open(RELEASED / "ref.png")))
    given = [to_tensor(image)[None] for image in (lr, upsample(lr), ref, refsr)]
    expected = torch.load(RELEASED / "outputs.pt", weights_only=True)
    with torch.no_grad():
        out = model(*given)
    torch.testing.assert_close(out.sr, expected["sr"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.soft_attention, expected["S"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.t_lv3, expected["T_lv3"], rtol=1e-4, atol=1e-4)
    assert (out.index != expected["index"]).sum() <= 1  # one documented near-tie


def test_checkpoint_round_trip_keeps_weights_and_architecture(tmp_path):
    model = small_model(divisor="constant", bicubic_skip=True)
    save_checkpoint(model, tmp_path / "model.pt", metadata={"note": "test"})
    loaded = load_checkpoint(tmp_path / "model.pt")
    assert loaded.config.divisor == "constant" and loaded.generator.bicubic_skip
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_checkpoint_loading_refuses_pickled_code_corrupt_and_foreign_files(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    unsafe = tmp_path / "unsafe.pt"
    with unsafe.open("wb") as handle:
        pickle.dump({"format": "ttsr", "x": Payload()}, handle)
    torch.save({"format": "ttsr", "x": Payload()}, tmp_path / "unsafe_zip.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    released = tmp_path / "released.pt"
    torch.save(released_format_state(small_model()), released)
    for path, message in [
        (tmp_path / "unsafe_zip.pt", "arbitrary code"),
        (corrupt, "corrupt"),
        (tmp_path / "absent.pt", "does not exist"),
        (tmp_path, "directory"),
        (released, "ttsr-convert"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)


def test_checkpoint_of_another_architecture_is_reported(tmp_path):
    model = small_model()
    save_checkpoint(model, tmp_path / "model.pt")
    content = torch.load(tmp_path / "model.pt", weights_only=True)
    content["config"]["n_feats"] = 16
    torch.save(content, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_checkpoint(tmp_path / "other.pt")
