"""Evaluate checkpoints on HumanEval / MBPP / GSM8K / MATH500 and build the paper's Table 1.

    # smoke test on the built-in tiny default (CPU, a few minutes)
    python launch/evaluate.py run --model tiny --benchmarks gsm8k,mbpp --limit 8 --gen-length 64 \
        --out outputs/eval

    # a trainer export at the paper's decoding settings (gen 512, block 32, 32 steps, threshold 0.95)
    python launch/evaluate.py run --model runs/ours/hf --name "Ours (w=2)" --device cuda --dtype bfloat16 \
        --out outputs/eval

    # merge runs into one table + chart
    python launch/evaluate.py report outputs/eval/Original.json outputs/eval/Baseline.json \
        outputs/eval/Ours_w_2.json --out outputs/eval/table1

Same as the ``dm-evaluate`` console script; see ``evaluation/cli.py`` for every option.
"""

import sys
from pathlib import Path

# launch/ holds scripts named like packages (launch/preprocess.py); Python puts launch/ first on
# sys.path, which would shadow the `preprocess` package.  Put the repository root there instead.
_LAUNCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _LAUNCH_DIR]
sys.path.insert(0, str(_LAUNCH_DIR.parent))

from evaluation.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
