"""Loading diffusion LMs and calling them with one convention, whatever their family.

Convention used everywhere in the project (training, generation, evaluation)::

    logits = call_model(model, input_ids=[B, L], attention_mask=[B|1, 1, Q, K] bool, position_ids=[B, L])
    # logits[:, i] predicts token i, shape [B, L, V], for every family

Every family takes the same arguments (a 4-D boolean mask, True = may attend, or a flex
``BlockMask`` when loaded with ``attn_implementation="flex_attention"``); what still differs between
families (Dream's logit shift, the layouts each supports, ZeRO-3 leaf modules) is stated once in
:mod:`trainer.families` and applied here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Cache,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from trainer import tiny_model
from trainer.families import Family, family_for, mask_token_id_of

DEFAULT_MODEL = "tiny"


@dataclass(slots=True)
class ModelBundle:
    """A model with the ids the diffusion objective needs."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    mask_token_id: int
    eos_token_id: int
    family: Family


def build_tiny_model(tokenizer: PreTrainedTokenizerBase, seed: int = 0, **overrides) -> torch.nn.Module:
    """Random-initialised built-in default, sized from the tokenizer (``tiny_config`` preset)."""
    cfg = tiny_model.tiny_config(len(tokenizer), mask_token_id_of(object(), tokenizer),
                                 int(tokenizer.eos_token_id), **overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return tiny_model.TinyDLLMForMaskedDiffusion(cfg)


def family_in(name_or_path: str | Path) -> Family:
    """The family of a checkpoint folder or hub name, from its config.json, with its classes registered."""
    config_dict, _ = PretrainedConfig.get_config_dict(str(name_or_path))
    fam = family_for(str(config_dict.get("model_type")), where=f"{name_or_path}/config.json")
    fam.import_module()
    return fam


def load_model(name_or_path: str | Path, *, tokenizer: str | Path | None = None,
               dtype: torch.dtype = torch.float32, attn_implementation: str | None = None, seed: int = 0,
               zero3_config: dict | None = None, adapter: str | Path | None = None) -> ModelBundle:
    """Load one of our families (LLaDA, LLaDA2, Dream, an exported run) or build the tiny default.

    ``name_or_path == "tiny"`` builds the random-initialised default with the bundled tokenizer.
    ``zero3_config`` (a resolved ZeRO-3 DeepSpeed dict): the weights are partitioned while they load
    (transformers runs the model's construction under ``deepspeed.zero.Init`` while an
    ``HfDeepSpeedConfig`` is alive), so no rank ever holds the whole model.
    ``adapter`` (inference): a PEFT LoRA folder (a LoRA run's ``output_dir/adapter``) merged into the
    base weights as it loads, so the model is the family's own class, as fast as the base; the tokenizer
    is the adapter folder's when it has one (the run saves it there), else ``tokenizer`` or the base's.
    """
    from preprocess.assets import TOKENIZER_DIR

    if adapter is not None:
        if zero3_config is not None:
            raise ValueError("load_model: an adapter is merged for inference, not loaded under ZeRO-3")
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter}/adapter_config.json not found: not a PEFT adapter folder")
        from peft import PeftModel

        own_tokenizer = (Path(adapter) / "tokenizer_config.json").is_file()
        bundle = load_model(name_or_path, tokenizer=adapter if own_tokenizer else tokenizer, dtype=dtype,
                            attn_implementation=attn_implementation, seed=seed)
        bundle.model = PeftModel.from_pretrained(bundle.model, str(adapter)).merge_and_unload()
        return bundle
    if str(name_or_path) == DEFAULT_MODEL:
        tok = AutoTokenizer.from_pretrained(tokenizer or TOKENIZER_DIR)
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = build_tiny_model(tok, seed=seed, **extra).to(dtype)
        return ModelBundle(model, tok, mask_token_id_of(model.config, tok), int(tok.eos_token_id),
                           family_for("tiny_dllm"))
    fam = family_in(name_or_path)
    tok = AutoTokenizer.from_pretrained(tokenizer or name_or_path)
    config = AutoConfig.from_pretrained(name_or_path)
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with zero3_loading(zero3_config):
        model = AutoModelForCausalLM.from_pretrained(name_or_path, config=config, **kwargs)
    eos = tok.eos_token_id if tok.eos_token_id is not None else config.eos_token_id
    if eos is None:
        raise ValueError(f"{name_or_path}: neither the tokenizer nor config.json names an EOS token")
    return ModelBundle(model, tok, mask_token_id_of(config, tok), int(eos), fam)


@contextlib.contextmanager
def zero3_loading(ds_config: dict | None):
    """Keep an ``HfDeepSpeedConfig`` alive for the block (transformers holds it by weak reference only)."""
    if ds_config is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del keep


def family_of(model: torch.nn.Module) -> Family:
    """The family of a model or of a DeepSpeed engine wrapping it (whose own ``config`` is the DeepSpeed
    dict, so the model's is read through ``engine.module``)."""
    inner = getattr(model, "module", model)
    return family_for(str(getattr(inner.config, "model_type", "")))


def mark_z3_leaf_modules(model: torch.nn.Module) -> list[type]:
    """Mark the family's MoE blocks as ZeRO-3 leaves (call before ``deepspeed.initialize``)."""
    classes = family_of(model).leaf_classes(model)
    if classes:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, classes)
    return classes


def call_model(model: torch.nn.Module, *, input_ids: torch.Tensor, attention_mask, position_ids: torch.Tensor,
               keep: slice | torch.Tensor | None = None, cache: Cache | None = None) -> torch.Tensor:
    """Forward pass -> logits aligned so that logit i predicts token i, for every family.

    ``keep``: the positions whose logits are needed, passed on as ``logits_to_keep`` so the LM head runs
    on those positions only; None = all (-> [B, L, V]).  A contiguous slice (the block layout's noisy
    half, ``slice(0, L)`` of ``2L``) -> [B, n, V]; a [B, L] bool tensor (the masked tokens the loss
    reads) -> [N, V] for its True entries in row-major order.  For a shifted family (Dream: raw logit
    j predicts token j + 1) the logit for token i is the raw logit i - 1 (token 0 keeps its own, as
    Dream's generation does), so the head runs on those predecessors instead.  ``cache``: a
    transformers ``Cache`` the model reads and extends (block decoding); the positions and the mask
    then cover the new tokens only (queries) and the cached plus new ones (keys).
    """
    shift = family_of(model).logit_shift
    cache_kw = {"cache": cache, "use_cache": True} if cache is not None else {}
    if isinstance(keep, torch.Tensor):
        if keep.dtype != torch.bool or keep.shape != input_ids.shape:
            raise ValueError(f"call_model: a tensor keep must be bool {tuple(input_ids.shape)}, got "
                             f"{keep.dtype} {tuple(keep.shape)}")
        raw = keep
        if shift:  # the head runs on the predecessors: raw j for token j + 1, raw 0 for token 0 too
            raw = torch.zeros_like(keep)
            raw[:, :-1] = keep[:, 1:]
            raw[:, 0] |= keep[:, 0]
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    logits_to_keep=raw, **cache_kw)
        if not shift:
            return out.logits  # [N, V]
        b, length = keep.shape
        rank = raw.flatten().cumsum(0) - 1  # row of each raw kept position in out.logits
        src = (torch.arange(length, device=keep.device) - 1).clamp_min(0)
        flat_src = torch.arange(b, device=keep.device)[:, None] * length + src[None, :]  # [B, L]
        return out.logits[rank[flat_src[keep]]]  # [N, V]
    length = input_ids.shape[1]
    keep = slice(None) if keep is None else keep
    if keep.step not in (None, 1):
        raise ValueError(f"call_model: keep must be a contiguous slice, got {keep}")
    start, stop = keep.start or 0, length if keep.stop is None else keep.stop
    lo = max(start - shift, 0)
    raw_keep = 0 if (lo, stop) == (0, length) else slice(lo, stop)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=raw_keep, **cache_kw)
    logits = out.logits  # [B, stop - lo, V]
    if not shift:
        return logits
    if start == 0:  # [B, stop, V]: token 0 from raw 0, token i from raw i - 1
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    return logits[:, :-1]  # raw [start - 1, stop - 1) -> tokens [start, stop)
