"""Ablation grids: expansion, labels, statistics, resume and the report; a real 2-run smoke grid."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evaluation.ablation import expand, label_of, mean_ci, parse_grid, summarise, t975, write_reports

REPO = Path(__file__).resolve().parents[1]


def _grid(**extra):
    data = {"output": "out", "seeds": [0, 1, 2],
            "configs": [{"masking.mode": "uniform", "masking.complementary": False},
                        {"masking.mode": "soft", "masking.weight": [0.5, 2],
                         "masking.complementary": [True, False]}],
            "metrics": ["acc"], **extra}
    return parse_grid(data, "grid.yaml")


def test_expansion_is_the_cartesian_product_in_file_order():
    assert expand({"a": [1, 2], "b": "x", "c": [True, False]}) == [
        {"a": 1, "b": "x", "c": True}, {"a": 1, "b": "x", "c": False},
        {"a": 2, "b": "x", "c": True}, {"a": 2, "b": "x", "c": False}]
    g = _grid(base={"train.max_steps": 5})
    assert [label for label, _ in g.configs] == [
        "mode=uniform,complementary=false", "mode=soft,weight=0.5,complementary=true",
        "mode=soft,weight=0.5,complementary=false", "mode=soft,weight=2,complementary=true",
        "mode=soft,weight=2,complementary=false"]
    runs = g.runs()
    assert len(runs) == 15 and runs[0].overrides == {"train.max_steps": 5, "masking.mode": "uniform",
                                                     "masking.complementary": False, "train.seed": 0}
    assert [r.seed for r in runs[4:7]] == [0, 1, 1] and runs[5].label == runs[0].label
    assert label_of({}) == "base"


@pytest.mark.parametrize("data, msg", [
    ({"output": "o"}, "configs"), ({"configs": [{}]}, "output"),
    ({"output": "o", "configs": [{"a": 1}, {"a": 1}]}, "appears twice"),
    ({"output": "o", "configs": [{"a": []}]}, "empty list"),
    ({"output": "o", "configs": [{"a": 1}], "seeds": [1, 1]}, "seeds"),
    ({"output": "o", "configs": [{"a": 1}], "colour": 1}, "unknown"),
])
def test_bad_grids_name_file_and_field(data, msg):
    with pytest.raises(ValueError, match=msg) as e:
        parse_grid(data, "grid.yaml")
    assert str(e.value).startswith("grid.yaml:")


def test_mean_and_95_percent_interval():
    m, ci = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and ci == pytest.approx(4.303 / math.sqrt(3))  # s = 1, t(0.975, 2) = 4.303
    assert mean_ci([0.5]) == (0.5, None)
    assert t975(30) == 2.042 and t975(31) == pytest.approx(2.040, abs=1e-3)
    assert t975(120) == pytest.approx(1.980, abs=1e-3)


def test_summary_table_and_plot_skip_missing_runs(tmp_path):
    g = _grid()
    results = {("mode=uniform,complementary=false", 0): {"acc": 0.1},
               ("mode=uniform,complementary=false", 1): {"acc": 0.3},
               ("mode=soft,weight=2,complementary=true", 0): {"acc": 0.5}}
    rows = summarise(g, results)
    assert rows[0]["n"] == 2 and rows[0]["metrics"]["acc"]["mean"] == pytest.approx(0.2)
    assert rows[0]["metrics"]["acc"]["ci95"] == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2))
    assert rows[1]["n"] == 0 and rows[1]["metrics"] == {}
    paths = write_reports(g, rows, tmp_path / "results")
    md = (tmp_path / "results.md").read_text()
    assert "| `mode=uniform,complementary=false` | 2 | 0.200 ± 1.271 |" in md
    assert "| `mode=soft,weight=0.5,complementary=true` | 0 | — |" in md
    assert json.loads((tmp_path / "results.json").read_text())["rows"][3]["metrics"]["acc"]["ci95"] is None
    assert tmp_path / "results.png" in paths


def test_resume_skips_finished_runs(tmp_path):
    sys.path.insert(0, str(REPO / "launch"))
    import ablate

    g = _grid()
    g.output = tmp_path
    first = g.runs()[0]
    d = first.dir(tmp_path)
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"overrides": first.overrides, "metrics": {"acc": 0.25}}))
    assert ablate.load_results(g) == {(first.label, 0): {"acc": 0.25}}
    g.base = {"train.max_steps": 7}  # the grid was edited: the old result no longer counts
    assert ablate.load_results(g) == {}
    cmd = ablate.train_command(g, g.runs()[0])
    assert cmd[cmd.index("--masking.complementary") + 1] == "false"
    assert cmd[cmd.index("--data.path") + 1] == str(tmp_path / "data" / "default")


@pytest.mark.slow
def test_smoke_grid_two_configs_one_seed(tmp_path):
    """CI's smoke grid: 2 configurations x 1 seed, a few steps each, through the real trainer."""
    grid = {"output": str(tmp_path / "grid"), "seeds": [0],
            "base": {"train.max_steps": 2, "train.micro_batch_size": 2, "train.log_every": 1,
                     "train.save_every": 0, "task.train_size": 32, "task.eval_size": 2, "task.show": 1,
                     "task.eval_before": False,
                     "checkpoint.export_hf": True, "metrics.tensorboard": False},
            "configs": [{"masking.mode": "uniform", "masking.complementary": False},
                        {"masking.mode": "soft", "masking.weight": 2}],
            "metrics": ["accuracy_after", "loss_dense"]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    cmd = [sys.executable, str(REPO / "launch/ablate.py"), str(path)]
    p = subprocess.run([*cmd, "--jobs", "2"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.loads((tmp_path / "grid/results.json").read_text())["rows"]
    assert [r["n"] for r in rows] == [1, 1]
    # --jobs 2: each run on half the cores, counting only its own CPU time
    results = [json.loads(f.read_text()) for f in (tmp_path / "grid/runs").glob("*/seed0/result.json")]
    assert [r["threads"] for r in results] == [max(1, (os.cpu_count() or 1) // 2)] * 2
    assert all(0 < r["cpu_s"] < 3 * r["wall_s"] for r in results)
    assert all(0.0 <= r["metrics"]["accuracy_after"]["mean"] <= 1.0 for r in rows)
    assert (tmp_path / "grid/results.png").is_file()
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "2 finished" in again.stdout and "run 1/" not in again.stdout
