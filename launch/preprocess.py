"""Preprocess records into memory-mapped shards (thin entry point; the logic is preprocess/cli/).

    python launch/preprocess.py run --input preprocess/assets/sample/sample.jsonl --output data/pp
    python launch/preprocess.py verify data/pp
    python launch/preprocess.py inspect data/pp --index 0
    python launch/preprocess.py stats data/pp --rejects 10
    python launch/preprocess.py cost --input data.jsonl --model gpt-4o --fraction code=0.1,math=0.5
    python launch/preprocess.py batch status --option cache_dir=cache/llm

The ``__main__`` guard matters: datatrove's local executor starts workers through a forkserver,
which re-imports this module.
"""

import sys
from pathlib import Path

# This file is named like the `preprocess` package; Python puts launch/ first on sys.path, which
# would make `import preprocess` find this script.  Put the repository root there instead.
_LAUNCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _LAUNCH_DIR]
sys.path.insert(0, str(_LAUNCH_DIR.parent))

from preprocess.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
