"""One code path for the tiny default and HF models loaded from a folder (random-weight Llama/Qwen2)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from preprocess.assets import TOKENIZER_DIR
from trainer.attention import block_diffusion_mask
from trainer.modeling import call_model, load_model, mask_token_id_of


def save_random_hf_model(folder, arch: str = "llama", seed: int = 0):
    """A ~0.3M-parameter random model of a stock HF architecture plus the bundled tokenizer."""
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, tie_word_embeddings=True)
    cfg = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = (LlamaForCausalLM if arch == "llama" else Qwen2ForCausalLM)(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_tiny_default_ids_and_determinism():
    a, b = load_model("tiny", seed=0), load_model("tiny", seed=0)
    assert a.family == "tiny_dllm" and a.mask_token_id == 1 and a.eos_token_id == 0
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    other = load_model("tiny", seed=1).model
    assert not all(torch.equal(p, q) for p, q in zip(a.model.parameters(), other.parameters()))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_folder_loads_and_obeys_a_custom_4d_mask(tmp_path, arch):
    bundle = load_model(save_random_hf_model(tmp_path / arch, arch))
    assert bundle.family == arch and bundle.mask_token_id == 1 and bundle.eos_token_id == 0
    model = bundle.model.eval()
    length, blk = 8, 4
    ids = torch.randint(2, 4000, (1, 2 * length))
    pos = torch.arange(length).repeat(2)[None]
    mask = block_diffusion_mask(length, blk)[None, None]
    with torch.no_grad():
        base = call_model(model, input_ids=ids, attention_mask=mask, position_ids=pos)
        changed = ids.clone()
        changed[0, length + 6] += 1  # a clean token of block 1
        out = call_model(model, input_ids=changed, attention_mask=mask, position_ids=pos)
        full = call_model(model, input_ids=changed, attention_mask=torch.ones_like(mask), position_ids=pos)
    assert base.shape == (1, 2 * length, model.config.vocab_size)
    # noisy block 0 and clean block 0 cannot see clean block 1: unchanged; noisy block 1 cannot see it either
    assert torch.allclose(out[0, :length], base[0, :length], atol=1e-5)
    assert torch.allclose(out[0, length:length + blk], base[0, length:length + blk], atol=1e-5)
    # with an all-True mask (not the causal default) the first position does see the change
    assert not torch.allclose(full[0, 0], base[0, 0], atol=1e-5)


def test_mask_token_comes_from_tokenizer_then_config():
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    assert mask_token_id_of(object(), tok) == 1

    class NoMask:
        mask_token_id = None

    class Cfg:
        mask_token_id = 126336  # LLaDA keeps it in the config only

    assert mask_token_id_of(Cfg(), NoMask()) == 126336
    with pytest.raises(ValueError, match="mask token"):
        mask_token_id_of(object(), NoMask())


def _training_batch(seed: int = 0, b: int = 2, length: int = 64):
    from trainer.masking import MaskingConfig
    from trainer.objective import make_training_batch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 4000, (b, length), generator=g)
    sup = torch.ones(b, length, dtype=torch.bool)
    sup[:, :10] = False  # a prompt
    dense = torch.rand(b, length, generator=g) < 0.3
    return make_training_batch({"input_ids": ids, "supervised": sup, "dense": dense},
                               MaskingConfig(block_size=16), 1, g)


@pytest.mark.parametrize("weighting", ["masked_mean", "elbo"])
def test_keep_noisy_half_gives_the_same_loss_and_grads(weighting):
    """logits_to_keep=slice(0, L): only [B, L, V] logits, same loss and gradients as the full [B, 2L, V]."""
    model = load_model("tiny", seed=0).model
    tb = _training_batch()
    length = tb.targets.shape[1]
    results = []
    for keep in (None, slice(0, length)):
        model.zero_grad()
        logits = call_model(model, **tb.model_inputs, keep=keep)
        assert logits.shape[1] == (2 * length if keep is None else length)
        loss = tb.loss(logits, weighting).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l_full, g_full), (l_keep, g_keep) = results
    torch.testing.assert_close(l_keep, l_full, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_keep, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_keep_falls_back_to_slicing_without_logits_to_keep():
    """A model whose forward has no logits_to_keep (remote-code families) gets its full logits sliced."""
    from trainer.modeling import supports_logits_to_keep

    inner = load_model("tiny", seed=0).model.eval()

    class NoKeep(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, attention_mask, position_ids):
            return inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    wrapped = NoKeep()
    assert supports_logits_to_keep(inner) and not supports_logits_to_keep(wrapped)
    tb = _training_batch(seed=1)
    length = tb.targets.shape[1]
    with torch.no_grad():
        full = call_model(inner, **tb.model_inputs)
        native = call_model(inner, **tb.model_inputs, keep=slice(0, length))
        sliced = call_model(wrapped, **tb.model_inputs, keep=slice(0, length))
    assert sliced.shape == native.shape == (full.shape[0], length, full.shape[2])
    torch.testing.assert_close(native, full[:, :length], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sliced, full[:, :length], rtol=0, atol=0)
