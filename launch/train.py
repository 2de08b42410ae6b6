"""Fine-tune a masked diffusion LM with complementary priority masking under DeepSpeed.

Run commands (from the repository root)::

    # the main command: preprocess the bundled sample if needed, train the tiny default (ZeRO-3),
    # checkpoint, export a HF folder, print generated samples
    deepspeed launch/train.py --deepspeed ds_configs/zero3.json
    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero3.json   # 2 ranks (CPU: gloo)

    # a YAML file and dotted overrides on top of a preset
    deepspeed launch/train.py --config my.yaml --masking.weight 0.5 --train.max_steps 50
    python launch/train.py --help                                  # every key, default and meaning

Exit codes: 0 done; 75 checkpointed after SIGTERM/SIGUSR1 (pre-emption: run the same command again
to resume); 2 bad configuration; anything else is a crash.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from trainer.config_io import help_text, load_config  # noqa: E402


def main(argv: list[str]) -> int:
    try:
        cfg = load_config(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "-h" in argv or "--help" in argv:
        print(help_text(cfg))
        return 0
    from trainer.loop import Trainer

    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
