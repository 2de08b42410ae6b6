"""Repository-wide checks that keep main shippable: lint, no machine paths, credited data."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean() -> None:
    ruff = shutil.which("ruff")
    cmd = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    res = subprocess.run([*cmd, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _tracked_files() -> list[Path]:
    res = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / f for f in res.stdout.splitlines()]


# Built from parts so that this file does not itself contain the paths it looks for.
MACHINE_PATH_MARKERS = tuple(f"/{name}/" for name in ("work", "farm", "home", "Users"))


def test_no_machine_paths_committed() -> None:
    bad = []
    for f in _tracked_files():
        if f.suffix not in {".py", ".md", ".sh", ".json", ".yaml", ".yml", ".sbatch", ".toml", ".txt", ""}:
            continue
        if not f.is_file():
            continue
        text = f.read_text(encoding="utf-8", errors="ignore")
        for marker in MACHINE_PATH_MARKERS:
            if marker in text:
                bad.append(f"{f.relative_to(ROOT)}: {marker}")
    assert not bad, bad


def test_bundled_sample_credits_licenses() -> None:
    lic = (ROOT / "preprocess" / "assets" / "sample" / "LICENSES.md").read_text(encoding="utf-8")
    assert "MIT" in lic and "CC BY 4.0" in lic
