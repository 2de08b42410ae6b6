"""The bundled tokenizer, sample and tiny model: what the offline default path relies on."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from preprocess.assets import SAMPLE_PATH, TOKENIZER_DIR
from trainer.tiny_model import TinyDLLMForMaskedDiffusion, tiny_config


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def test_tokenizer_special_tokens_and_template(tok) -> None:
    assert tok.eos_token == "<|endoftext|>" and tok.mask_token == "<|mask|>"
    assert tok.pad_token_id == tok.eos_token_id
    assert len(tok) == 4096
    text = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_offsets_cover_text_including_non_ascii(tok) -> None:
    text = "Natalia sold 48/2 = <<48/2=24>>24 clips, café 中文 ✓"
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    assert tok.decode(enc["input_ids"]) == text
    # offsets are monotone and every character is covered by some token
    covered = set()
    prev_end = 0
    for s, e in enc["offset_mapping"]:
        assert s >= 0 and e <= len(text) and s <= e and e >= prev_end
        covered.update(range(s, e))
        prev_end = e
    assert covered == set(range(len(text)))


def test_sample_has_both_domains_and_no_benchmark_test_items() -> None:
    rows = [json.loads(line) for line in SAMPLE_PATH.read_text(encoding="utf-8").split("\n") if line]
    assert len(rows) == 2974
    domains = {r["domain"] for r in rows}
    assert domains == {"math", "code"}
    assert len({r["id"] for r in rows}) == len(rows)
    mbpp_ids = {int(r["id"].split("-")[1]) for r in rows if r["id"].startswith("mbpp-")}
    assert not mbpp_ids & set(range(11, 511)), "MBPP test split must stay out of the sample"
    assert all(r["prompt"].strip() and r["response"].strip() for r in rows)


def test_tiny_model_is_bidirectional_and_round_trips(tmp_path, tok) -> None:
    cfg = tiny_config(len(tok), tok.mask_token_id, tok.eos_token_id)
    torch.manual_seed(0)
    model = TinyDLLMForMaskedDiffusion(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e6 <= n_params <= 10e6
    x = torch.randint(0, len(tok), (2, 12))
    y = model(x).logits
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % len(tok)
    # a change at the last position reaches the first one: attention is not causal
    assert (model(x2).logits[:, 0] - y[:, 0]).abs().max() > 1e-4
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again) is TinyDLLMForMaskedDiffusion
    assert torch.allclose(again(x).logits, y, atol=1e-5)
    assert again.config.mask_token_id == tok.mask_token_id
