"""Every recipe shipped under launch/configs/ loads and validates (unknown keys and bad values are errors)."""

from pathlib import Path

import pytest

from trainer.config_io import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "launch" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_loads(path):
    cfg = load_config(["--config", str(path)])
    assert cfg.data.max_length % cfg.masking.block_size == 0


def test_paper_recipe_has_the_paper_settings():
    cfg = load_config(["--config", str(CONFIGS[0].parent / "llada2_mini_paper.yaml")])
    assert (cfg.masking.mode, cfg.masking.weight, cfg.masking.complementary) == ("soft", 2.0, True)
    assert (cfg.masking.sigma_min, cfg.masking.sigma_max, cfg.masking.block_size) == (0.3, 0.8, 32)
    assert cfg.data.max_length == 2048 and cfg.train.micro_batch_size * 8 * cfg.train.grad_accum == 16
