"""Config tree: presets, YAML and CLI mapping, validation messages, DeepSpeed "auto" resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.config import Config, tiny_default
from trainer.config_io import (
    apply_overrides,
    field_docs,
    find_deepspeed_config,
    help_text,
    load_config,
    parse_cli,
    resolve_deepspeed_config,
    to_dict,
)
from trainer.masking import MaskingConfig

REPO = Path(__file__).resolve().parents[1]


def test_default_is_the_papers_masking_on_one_block_samples():
    """The demo trains the full layout, which equals the block layout only because every sample of the
    built-in task is one block (tests/test_builtin_task.py compares the two layouts' losses)."""
    cfg = tiny_default()
    assert cfg.masking == MaskingConfig(mode="soft", weight=2.0, sigma_min=0.3, sigma_max=0.8, block_size=32,
                                        per_block=True, complementary=True)
    assert cfg.objective.layout == "full" and cfg.task.name == "chain" and cfg.model.name == "tiny"
    assert Config().objective.layout == "block"
    assert cfg.data.max_length % cfg.masking.block_size == 0
    assert cfg.deepspeed == "ds_configs/zero3.json"


def test_cli_overrides_both_syntaxes_and_types():
    cfg = load_config(["--masking.weight", "0.5", "--train.max_steps=50", "--masking.complementary", "false",
                       "--optim.betas", "[0.9, 0.99]", "--model.tokenizer", "null", "--local_rank=1",
                       "--train.sample_prompts", '["a", "b c"]', "--data.shuffle"])
    assert cfg.masking.weight == 0.5 and isinstance(cfg.masking.weight, float)
    assert cfg.train.max_steps == 50 and isinstance(cfg.train.max_steps, int)
    assert cfg.masking.complementary is False
    assert cfg.optim.betas == (0.9, 0.99)
    assert cfg.model.tokenizer is None
    assert cfg.train.sample_prompts == ["a", "b c"]
    assert cfg.data.shuffle is True


def test_yaml_then_cli_precedence(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("masking:\n  weight: 5.0\n  mode: hard\ntrain:\n  max_steps: 7\n")
    cfg = load_config(["--config", str(y), "--masking.weight", "1.5"])
    assert cfg.masking.mode == "hard" and cfg.masking.weight == 1.5 and cfg.train.max_steps == 7


@pytest.mark.parametrize("argv, needle", [
    (["--optim.lr", "-1"], "optim.lr"),
    (["--masking.weight", "abc"], "masking.weight"),
    (["--train.max_steps", "2.5"], "train.max_steps"),
    (["--masking.mode", "fuzzy"], "masking.mode"),
    (["--masking.sigma_min", "0.9"], "sigma_min"),
    (["--objective.layout", "diag"], "objective.layout"),
    (["--data.max_length", "100"], "data.max_length"),
    (["--train.nope", "1"], "train.nope"),
    (["--masking", "1"], "masking"),
    (["stray"], "stray"),
])
def test_bad_values_name_the_field(argv, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        load_config(argv)


def test_yaml_errors_name_the_file(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("optim:\n  clip: -3\n")
    with pytest.raises(ValueError, match=r"optim\.clip.*bad\.yaml"):
        load_config(["--config", str(y)])


def test_roundtrip_through_dict():
    cfg = load_config(["--masking.weight", "0.5", "--optim.betas", "[0.8, 0.9]"])
    again = apply_overrides(Config(), to_dict(cfg))
    assert again == cfg


def test_help_lists_every_key_with_its_docstring():
    text = help_text()
    assert "--masking.weight 2.0" in text and "--checkpoint.resume \"auto\"" in text
    assert "Bias weight w" in text  # MaskingConfig's field docstring, read from another engineer's file
    assert "train.stop_at_step" in text
    assert "max_length" in field_docs(type(tiny_default().data))


def test_parse_cli_meta():
    meta, dotted = parse_cli(["--config", "x.yaml", "--preset", "tiny_smoke", "--a.b", "1"])
    assert meta == {"config": "x.yaml", "preset": "tiny_smoke"} and dotted == {"a.b": "1"}


def test_deepspeed_auto_values_are_filled():
    cfg = load_config(["--train.micro_batch_size", "3", "--train.grad_accum", "2", "--optim.clip", "0.5",
                       "--optim.lr", "2e-4"])
    ds = json.loads(find_deepspeed_config("ds_configs/zero3.json").read_text())
    out = resolve_deepspeed_config(cfg, ds, world_size=4, bf16=False)
    assert out["train_micro_batch_size_per_gpu"] == 3
    assert out["gradient_accumulation_steps"] == 2
    assert out["train_batch_size"] == 24
    assert out["gradient_clipping"] == 0.5
    assert out["bf16"]["enabled"] is False
    assert out["optimizer"]["params"]["lr"] == 2e-4
    assert out["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert out["zero_optimization"]["stage"] == 3
    assert ds["train_batch_size"] == "auto"  # the input dict is not modified


def test_deepspeed_contradiction_names_both_values():
    cfg = load_config(["--train.micro_batch_size", "3"])
    ds = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}
    msg = r"train_micro_batch_size_per_gpu = 8 contradicts train\.micro_batch_size = 3"
    with pytest.raises(ValueError, match=msg):
        resolve_deepspeed_config(cfg, ds, world_size=1, bf16=False, source="my.json")
    # an agreeing explicit value is fine
    ok = resolve_deepspeed_config(cfg, {"train_micro_batch_size_per_gpu": 3, "gradient_clipping": 1.0},
                                  world_size=1, bf16=False)
    assert ok["train_batch_size"] == 3
    with pytest.raises(ValueError, match=r"optimizer\.params\.lr = 0\.1 contradicts optim\.lr"):
        resolve_deepspeed_config(cfg, {"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, world_size=1,
                                 bf16=False)
    with pytest.raises(ValueError, match="scheduler"):
        resolve_deepspeed_config(cfg, {"scheduler": {"type": "WarmupLR"}}, world_size=1, bf16=False)


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json", "zero2.json"])
def test_shipped_deepspeed_configs_resolve(name):
    ds = json.loads((REPO / "ds_configs" / name).read_text())
    out = resolve_deepspeed_config(tiny_default(), ds, world_size=2, bf16=True)
    assert "auto" not in json.dumps(out)


def test_schema_does_not_import_the_io_module():
    """trainer.config is the schema only: importing it alone leaves trainer.config_io unloaded (no
    loop between the two), and the io module loads in a fresh interpreter on its own."""
    import subprocess
    import sys

    code = ("import sys, trainer.config; assert 'trainer.config_io' not in sys.modules; "
            "from trainer.config_io import load_config; "
            "c = load_config(['--preset', 'tiny_smoke', '--train.max_steps', '3']); print(c.train.max_steps)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "3", out.stderr


def test_smoke_preset_does_not_follow_the_demo_tuning():
    """tiny_smoke pins its batch shape and optimizer (the CI/SLURM smoke curve is stored), while the
    tuned demo values live in the field defaults that tiny_default uses."""
    from trainer.config import tiny_smoke

    smoke, demo = tiny_smoke(), tiny_default()
    assert (smoke.train.micro_batch_size, smoke.optim.lr, smoke.optim.warmup_ratio, smoke.data.max_length,
            smoke.train.max_steps) == (2, 1e-3, 0.03, 256, 6)
    assert (demo.train.micro_batch_size, demo.optim.lr, demo.optim.warmup_ratio, demo.data.max_length,
            demo.train.max_steps) == (16, 5e-4, 0.05, 256, 1000)
    assert smoke.masking == demo.masking and smoke.objective.layout == "block"
