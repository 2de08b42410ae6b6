"""Loading diffusion LMs and calling them with one convention, whatever their family.

Convention used everywhere in the project (training, generation, evaluation)::

    logits = call_model(model, input_ids=[B, L], attention_mask=[B|1, 1, Q, K] bool, position_ids=[B, L])
    # logits[:, i] predicts token i (no shift), shape [B, L, V]

Families differ in how they take a custom attention mask; the difference lives in one table
(``MASK_STYLE``) rather than in branches scattered over the trainer:

- ``bool``: transformers-native 4-D boolean mask, True = may attend (the built-in ``tiny_dllm``,
  Dream, and any Llama/Qwen2 body);
- ``additive``: a float mask with 0 / -inf (LLaDA2 MoE, whose remote code adds it to scores);
- ``bias``: LLaDA v1 takes the additive mask through ``attention_bias``.

A flex-attention ``BlockMask`` is passed through unchanged (the model must be loaded with
``attn_implementation="flex_attention"``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from trainer import tiny_model  # noqa: F401  (registers the tiny_dllm Auto classes)

MASK_STYLE: dict[str, str] = {"tiny_dllm": "bool", "dream": "bool", "llada2_moe": "additive",
                              "llada": "bias"}
DEFAULT_MODEL = "tiny"


@dataclass(slots=True)
class ModelBundle:
    """A model with the ids the diffusion objective needs."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    mask_token_id: int
    eos_token_id: int
    family: str


def mask_token_id_of(config, tokenizer: PreTrainedTokenizerBase) -> int:
    """The mask token id from the tokenizer, else from the config (LLaDA stores it there only)."""
    tid = getattr(tokenizer, "mask_token_id", None)
    if tid is None:
        tid = getattr(config, "mask_token_id", None)
    if tid is None:
        raise ValueError("cannot find a mask token: neither the tokenizer's mask_token nor "
                         "config.mask_token_id is set; pass it explicitly (model.mask_token_id)")
    return int(tid)


def build_tiny_model(tokenizer: PreTrainedTokenizerBase, seed: int = 0, **overrides) -> torch.nn.Module:
    """Random-initialised built-in default, sized from the tokenizer (``tiny_config`` preset)."""
    cfg = tiny_model.tiny_config(len(tokenizer), mask_token_id_of(object(), tokenizer),
                                 int(tokenizer.eos_token_id), **overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return tiny_model.TinyDLLMForMaskedDiffusion(cfg)


def load_model(name_or_path: str | Path, *, tokenizer: str | Path | None = None,
               dtype: torch.dtype = torch.float32, trust_remote_code: bool = True,
               attn_implementation: str | None = None, seed: int = 0) -> ModelBundle:
    """Load an HF diffusion LM (LLaDA, LLaDA2, Dream, an exported checkpoint) or the tiny default.

    ``name_or_path == "tiny"`` builds the random-initialised default with the bundled tokenizer.
    Remote-code models register either ``AutoModelForCausalLM`` (LLaDA2) or only ``AutoModel``
    (Dream, LLaDA v1), so both are tried in that order.
    """
    from preprocess.assets import TOKENIZER_DIR

    if str(name_or_path) == DEFAULT_MODEL:
        tok = AutoTokenizer.from_pretrained(tokenizer or TOKENIZER_DIR)
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = build_tiny_model(tok, seed=seed, **extra).to(dtype)
        return ModelBundle(model, tok, mask_token_id_of(model.config, tok), int(tok.eos_token_id),
                           "tiny_dllm")
    tok = AutoTokenizer.from_pretrained(tokenizer or name_or_path, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, config=config, **kwargs)
    except ValueError:
        model = AutoModel.from_pretrained(name_or_path, config=config, **kwargs)
    eos = tok.eos_token_id if tok.eos_token_id is not None else config.eos_token_id
    return ModelBundle(model, tok, mask_token_id_of(config, tok), int(eos), family_of(model))


def family_of(model: torch.nn.Module) -> str:
    """The config's model_type (through a DeepSpeed engine too), the key of ``MASK_STYLE``."""
    return str(getattr(model.config, "model_type", "")).lower()


def supports_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (transformers' Llama/Qwen2-style heads do).

    A DeepSpeed engine is looked through to its module.  Remote-code families (LLaDA v1, some Dream
    revisions) lack it; :func:`call_model` then slices the full logits instead.
    """
    inner = getattr(model, "module", model)
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def call_model(model: torch.nn.Module, *, input_ids: torch.Tensor, attention_mask, position_ids: torch.Tensor,
               keep: slice | None = None) -> torch.Tensor:
    """Forward pass with a 4-D boolean mask (or flex BlockMask) in the family's own form -> logits.

    ``keep``: the sequence positions whose logits are needed (the block layout's loss reads only the
    noisy half, ``slice(0, L)`` of ``2L``).  Where the model takes ``logits_to_keep`` the LM head runs
    on those positions only, which saves the [B, 2L, V] -> [B, L, V] half of the largest activation
    and of the head's matmul; otherwise the full logits are sliced (same values, no saving).  None
    returns all positions, as before.
    """
    style = MASK_STYLE.get(family_of(model), "bool")
    kwargs = {"input_ids": input_ids, "position_ids": position_ids}
    if isinstance(attention_mask, torch.Tensor) and style != "bool":
        dtype = next(model.parameters()).dtype
        additive = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
        additive.masked_fill_(~attention_mask, torch.finfo(dtype).min)
        kwargs["attention_bias" if style == "bias" else "attention_mask"] = additive
    else:
        kwargs["attention_mask"] = attention_mask
    native = keep is not None and supports_logits_to_keep(model)
    if native:
        kwargs["logits_to_keep"] = keep
    out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if keep is not None and not native:
        logits = logits[:, keep]
    return logits
