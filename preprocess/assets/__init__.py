"""Bundled defaults so the project runs with no network and no downloads.

- ``tokenizer/``: a 4k-vocabulary byte-level BPE tokenizer (HF ``tokenizer.json``) trained with
  ``tokenizers`` on GSM8K train + MBPP; built by ``launch/build_default_assets.py``.
- ``sample/sample.jsonl``: a few thousand GSM8K-train and MBPP (train/validation/prompt splits)
  records in prompt/response form, with their licenses in ``sample/LICENSES.md``.
"""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
TOKENIZER_DIR = ASSETS_DIR / "tokenizer"
SAMPLE_PATH = ASSETS_DIR / "sample" / "sample.jsonl"
