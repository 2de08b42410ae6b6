"""Rebuild the bundled tokenizer and sample dataset from the public GSM8K and MBPP files.

Run once by maintainers (the outputs are committed, so users never need it):

    python launch/build_default_assets.py --data ../shared/data

Why a home-made tokenizer: model weights and hub tokenizers cannot be downloaded in an offline
sandbox, yet the default path must exercise the same code as real models (byte-level BPE with
offsets, special mask/EOS tokens, a chat template).  4,096 entries keep the tiny model small.

Test-set hygiene: MBPP tasks 11-510 are the benchmark's test split, and GSM8K's test file is the
benchmark; neither enters the tokenizer corpus or the sample.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "preprocess" / "assets"

SPECIAL_TOKENS = ["<|endoftext|>", "<|mask|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MBPP_TEST_IDS = range(11, 511)
GSM8K_SAMPLE = 2500


def mbpp_prompt(text: str, tests: list[str]) -> str:
    """The usual MBPP instruction: task text plus the asserts the code must pass."""
    return text.strip() + "\nYour code should pass these tests:\n" + "\n".join(tests)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_sample(data: Path) -> list[dict]:
    rows: list[dict] = []
    for i, rec in enumerate(read_jsonl(data / "gsm8k" / "train.jsonl")[:GSM8K_SAMPLE]):
        rows.append({"id": f"gsm8k-train-{i}", "domain": "math",
                     "prompt": rec["question"], "response": rec["answer"]})
    for rec in read_jsonl(data / "mbpp" / "mbpp.jsonl"):
        if rec["task_id"] in MBPP_TEST_IDS:
            continue
        code = rec["code"].replace("\r\n", "\n").replace("\t", "    ").rstrip()
        rows.append({"id": f"mbpp-{rec['task_id']}", "domain": "code",
                     "prompt": mbpp_prompt(rec["text"], rec["test_list"]),
                     "response": f"```python\n{code}\n```"})
    return rows


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps leading spaces inside a token's offsets (see tokenizers#1553).
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--vocab-size", type=int, default=4096)
    args = ap.parse_args()

    rows = build_sample(args.data)
    (ASSETS / "sample").mkdir(parents=True, exist_ok=True)
    with open(ASSETS / "sample" / "sample.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

    tok = train_tokenizer([r["prompt"] + "\n" + r["response"] for r in rows], args.vocab_size)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", mask_token="<|mask|>",
                                   bos_token=None, unk_token=None,
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 4096
    fast.save_pretrained(ASSETS / "tokenizer")
    print(f"sample: {len(rows)} records; tokenizer: {tok.get_vocab_size()} entries")


if __name__ == "__main__":
    main()
