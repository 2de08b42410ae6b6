"""Loading our families and calling them through one convention (trainer.modeling, trainer.families)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from preprocess.assets import TOKENIZER_DIR
from trainer.attention import block_diffusion_mask
from trainer.families import FAMILIES, family_for, mask_token_id_of
from trainer.modeling import build_tiny_model, call_model, family_of, load_model


def save_tiny_folder(folder, seed: int = 0):
    """The tiny default saved as a HF folder with the bundled tokenizer (loads by path, no remote code)."""
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    build_tiny_model(tok, seed=seed, hidden_size=64, num_layers=2).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_tiny_default_ids_and_determinism():
    a, b = load_model("tiny", seed=0), load_model("tiny", seed=0)
    assert a.family is FAMILIES["tiny_dllm"] and a.mask_token_id == 1 and a.eos_token_id == 0
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    other = load_model("tiny", seed=1).model
    assert not all(torch.equal(p, q) for p, q in zip(a.model.parameters(), other.parameters()))


def test_folder_loads_and_obeys_a_custom_4d_mask(tmp_path):
    bundle = load_model(save_tiny_folder(tmp_path / "tiny"))
    assert bundle.family.model_type == "tiny_dllm" and bundle.mask_token_id == 1 and bundle.eos_token_id == 0
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


def test_an_unknown_architecture_is_refused_by_name(tmp_path):
    """A stock autoregressive Llama is not a diffusion family: refused naming its model_type and the known
    ones, rather than trained with an unknown logit alignment."""
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"config.json: model_type 'llama' is not a diffusion-LM family"
                                         r".*llada2_moe"):
        load_model(tmp_path / "llama")


def test_family_table_layouts_and_refusals():
    assert set(FAMILIES) == {"tiny_dllm", "llada", "Dream", "llada2_moe"}
    dream = family_for("Dream")
    assert dream.logit_shift == 1 and dream.layouts == ("full",) and not dream.kv_cache
    with pytest.raises(ValueError, match="objective.layout: layout 'block' is not supported for Dream.*"
                                         "predicts token i\\+1"):
        dream.check_layout("block", "objective.layout")
    for name in ("tiny_dllm", "llada", "llada2_moe"):
        fam = family_for(name)
        assert fam.logit_shift == 0 and fam.layouts == ("block", "full") and fam.kv_cache
        fam.check_layout("block", "objective.layout")
    assert family_for("llada2_moe").z3_leaf_modules
    model = load_model("tiny").model
    assert family_of(model) is FAMILIES["tiny_dllm"] and family_for("tiny_dllm").leaf_classes(model) == []
    with pytest.raises(ValueError, match="ZeRO-3 leaf module class"):
        family_for("llada2_moe").leaf_classes(model)


def test_mask_token_from_tokenizer_and_config_must_agree():
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    assert mask_token_id_of(object(), tok) == 1

    class NoMask:
        mask_token_id = None

    class Cfg:
        mask_token_id = 126336  # LLaDA keeps it in the config

    assert mask_token_id_of(Cfg(), NoMask()) == 126336
    with pytest.raises(ValueError, match="tokenizer's mask token is id 1 but config.mask_token_id is 126336"):
        mask_token_id_of(Cfg(), tok)
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
    """logits_to_keep: all T columns, the noisy segments (a slice) or the masked tokens (a bool [R, T],
    -> [N, V]) give the same loss and gradients."""
    model = load_model("tiny", seed=0).model
    tb = _training_batch()
    width = tb.model_inputs["input_ids"].shape[1]
    noisy = tb.row.views * tb.row.noisy_width
    results = []
    for keep in (None, slice(0, noisy), tb.picked):
        model.zero_grad()
        logits = call_model(model, **tb.model_inputs, keep=keep)
        expected = {type(None): (width,), slice: (noisy,), torch.Tensor: ()}[type(keep)]
        assert logits.shape[1:-1] == expected and (keep is not tb.picked or len(logits) == tb.picked.sum())
        loss = tb.loss(logits, weighting).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert tb.keep is tb.picked  # the default is the masked-only head
    l_full, g_full = results[0]
    for l_keep, g_keep in (results[1], results[2]):
        torch.testing.assert_close(l_keep, l_full, rtol=1e-5, atol=1e-6)
        for a, b in zip(g_keep, g_full):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
