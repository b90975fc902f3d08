"""One architecture config, stored on the model and in checkpoints; the shipped models by name."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ttsr import TTSR, TTSRConfig
from ttsr.checkpoints import CheckpointError, TTSRWeights, load_checkpoint, save_checkpoint
from ttsr.model.config import CONFIG_ENTRIES

SMALL = TTSRConfig(num_res_blocks=(1, 2, 1, 1), n_feats=8, bicubic_skip=True)


def test_the_model_keeps_its_config_and_a_checkpoint_gives_it_back(tmp_path):
    model = TTSR(SMALL)
    assert model.config is SMALL
    save_checkpoint(model, tmp_path / "small.pt")
    assert load_checkpoint(tmp_path / "small.pt").config == SMALL


def test_config_round_trips_through_plain_data():
    entries = SMALL.to_dict()
    assert list(entries) == list(CONFIG_ENTRIES)
    assert entries["num_res_blocks"] == [1, 2, 1, 1]  # plain data, as the files hold it
    assert TTSRConfig.from_dict(entries) == SMALL


def test_config_entries_added_later_default_to_what_older_files_meant():
    entries = SMALL.to_dict()
    del entries["transfer"], entries["offset_groups"]
    assert TTSRConfig.from_dict(entries) == replace(SMALL, transfer="hard", offset_groups=8)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"colour": "red"}, "unknown config entries"),
        ({"n_feats": None}, "missing: n_feats"),
        ({"transfer": "soft"}, "transfer must be one of"),
        ({"divisor": "nine"}, "divisor must be one of"),
        ({"num_res_blocks": [1, 1]}, "num_res_blocks must be 4"),
    ],
)
def test_config_refuses_unknown_missing_and_invalid_entries(entries, message):
    given = {**SMALL.to_dict(), **entries}
    given = {k: v for k, v in given.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        TTSRConfig.from_dict(given)


def test_the_fast_search_is_the_default_and_the_definition_is_a_choice():
    assert TTSR(SMALL).search == "fast"
    assert TTSR(SMALL, search="straightforward").search == "straightforward"
    with pytest.raises(ValueError, match="search must be one of"):
        TTSR(SMALL, search="slow")


def test_shipped_models_are_described_by_name_config_recipe_metrics_and_file():
    names = [member.value.name for member in TTSRWeights]
    assert names == ["real", "bicubic"]
    for member in TTSRWeights:
        weights = member.value
        assert isinstance(weights.config, TTSRConfig)
        assert weights.file.endswith(".pt") and weights.path.name == weights.file
        assert weights.recipe and weights.preprocessing and weights.description
    assert TTSRWeights.get("bicubic").file == "ttsr_demo.pt"
    assert TTSRWeights.get("real").file == "ttsr_real.pt"


def test_an_unknown_model_name_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="unknown model 'best'.*real, bicubic"):
        TTSRWeights.get("best")


def test_a_shipped_model_whose_file_is_missing_says_so_by_name():
    missing = replace(TTSRWeights.get("real"), file="not_shipped_yet.pt")
    with pytest.raises(CheckpointError, match="the .real. model .*not_shipped_yet.pt.*installed"):
        missing.load()


@pytest.mark.parametrize("member", list(TTSRWeights), ids=lambda m: m.value.name)
def test_each_installed_shipped_file_holds_the_config_it_is_described_with(member):
    weights = member.value
    if not weights.path.is_file():
        pytest.skip(f"{weights.file} is not installed")
    model = weights.load()
    assert model.config == weights.config
    assert all(torch.isfinite(p).all() for p in model.parameters())
