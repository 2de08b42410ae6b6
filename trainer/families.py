"""The one table of per-family conventions, read by training, generation and evaluation alike.

A family is keyed by the ``model_type`` of its published ``config.json``.  Every family here is our
own transformers-5 implementation (``trainer.tiny_model``, ``trainer.models.*``): importing its
module registers it with the Auto classes, so ``from_pretrained`` needs no remote code.  All of them
take the same call (:func:`trainer.modeling.call_model`): a 4-D boolean mask (True = may attend),
``position_ids`` and ``logits_to_keep``.  What still differs is stated here, once:

- ``logit_shift``: 0 when the logit at position i predicts token i (LLaDA, LLaDA2, the tiny default);
  1 when it predicts token i + 1 (Dream, initialised from an autoregressive Qwen2.5; its own
  generation shifts the logits right by one, position 0 keeping its own).  ``call_model`` undoes the
  shift, so every caller sees logit i for token i.
- ``layouts``: the training/decoding layouts that are correct for the family.  Dream supports 'full'
  only: in the block layout [x_t ; x_0] the first token of noisy block b would be predicted from the
  last position of noisy block b-1, which may not attend to block b nor to clean block b-1, so that
  token would be learnt from the wrong context (docs/models/conventions.md).
- ``kv_cache``: whether block-by-block decoding may reuse finished blocks' keys/values.  Dream may
  not: with the shift, the first token of a block is predicted from the previous block's last
  position, which the cached decode step does not recompute.
- ``z3_leaf_modules``: class names DeepSpeed ZeRO-3 must treat as leaves (gather all their
  parameters at once): an MoE block where a rank's tokens may route to no token of some expert, so
  that expert's parameters would otherwise be fetched on some ranks and not on others (a hang).
- ``lora_targets``: the modules LoRA adapts by default (``lora.target_modules`` empty), as regular
  expressions matched in full against module names: every attention projection and every dense MLP
  projection (LLaDA2's first dense layer and its shared experts, which every token passes through), as
  the dllm / NeMo LoRA recipes do.  ``lora_expert_targets``: the routed MoE experts, added only with
  ``lora.experts`` (docs/training.md says why they are off by default).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

LAYOUTS = ("block", "full")


@dataclass(frozen=True, slots=True)
class Family:
    """How one model family is called, decoded and partitioned."""

    model_type: str
    """``config.model_type`` as published (the key of :data:`FAMILIES`)."""
    module: str
    """Our implementation; importing it registers the Auto classes."""
    logit_shift: int = 0
    """1: logit i predicts token i + 1 (undone by ``call_model``); 0: logit i predicts token i."""
    layouts: tuple[str, ...] = LAYOUTS
    """Layouts (``objective.layout``, decoding) that are correct for this family; the first is its default."""
    kv_cache: bool = True
    """Block decoding may keep finished blocks' keys/values in a ``DynamicCache``."""
    z3_leaf_modules: tuple[str, ...] = ()
    """Module class names ZeRO-3 gathers as a whole (MoE blocks)."""
    lora_targets: tuple[str, ...] = ()
    """Default LoRA targets: full-match regexes over module names (attention + dense MLP projections)."""
    lora_expert_targets: tuple[str, ...] = ()
    """The routed MoE experts' projections, adapted only with ``lora.experts``."""

    def import_module(self) -> None:
        importlib.import_module(self.module)

    def check_layout(self, layout: str, key: str) -> None:
        """Raise naming ``key`` when ``layout`` is not correct for this family."""
        if layout not in self.layouts:
            why = LAYOUT_REASONS.get(self.model_type)
            raise ValueError(f"{key}: layout {layout!r} is not supported for {self.model_type} "
                             f"(supported: {', '.join(self.layouts)})" + (f": {why}" if why else ""))

    def leaf_classes(self, model: torch.nn.Module) -> list[type]:
        """The classes of ``model`` named by ``z3_leaf_modules``; a name absent from the model is an error
        (a renamed class must not silently drop the leaf marking and hang ZeRO-3)."""
        by_name = {type(m).__name__: type(m) for m in model.modules()}
        missing = [n for n in self.z3_leaf_modules if n not in by_name]
        if missing:
            raise ValueError(f"{self.model_type}: ZeRO-3 leaf module class(es) {missing} not found in "
                             f"{type(model).__name__}")
        return [by_name[n] for n in self.z3_leaf_modules]


_LLAMA_LORA = (r"model\.layers\.\d+\.self_attn\.[qkvo]_proj", r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj")

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family(model_type="tiny_dllm", module="trainer.tiny_model", lora_targets=_LLAMA_LORA),
    Family(model_type="llada", module="trainer.models.llada",
           lora_targets=(r"model\.transformer\.blocks\.\d+\.([qkv]_proj|attn_out|ff_proj|up_proj|ff_out)",)),
    Family(model_type="Dream", module="trainer.models.dream", logit_shift=1, layouts=("full",),
           kv_cache=False, lora_targets=_LLAMA_LORA),
    Family(model_type="llada2_moe", module="trainer.models.llada2",
           z3_leaf_modules=("LLaDA2MoeSparseMoeBlock",),
           lora_targets=(r"model\.layers\.\d+\.attention\.(query_key_value|dense)",
                         r"model\.layers\.\d+\.mlp\.(shared_experts\.)?(gate|up|down)_proj"),
           lora_expert_targets=(r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj",)),
)}

LAYOUT_REASONS = {
    "Dream": "its logit i predicts token i+1, so in the block layout the first token of each noisy block "
             "would be predicted from the previous noisy block, which cannot see it; use layout 'full'",
}


def family_for(model_type: str, where: str = "model") -> Family:
    """The family of a ``config.model_type``; an unknown type is an error naming the known ones."""
    fam = FAMILIES.get(model_type)
    if fam is None:
        raise ValueError(f"{where}: model_type {model_type!r} is not a diffusion-LM family this project "
                         f"implements (known: {', '.join(FAMILIES)})")
    return fam


def mask_token_id_of(config, tokenizer) -> int:
    """The mask token id: the tokenizer's and the config's (LLaDA and Dream store it there) must agree
    when both are set; either alone is used; neither is an error."""
    from_tok = getattr(tokenizer, "mask_token_id", None)
    from_cfg = getattr(config, "mask_token_id", None)
    if from_tok is not None and from_cfg is not None and int(from_tok) != int(from_cfg):
        raise ValueError(f"mask token: the tokenizer's mask token is id {from_tok} but config.mask_token_id "
                         f"is {from_cfg}; the model was trained with another tokenizer (model.tokenizer)")
    tid = from_tok if from_tok is not None else from_cfg
    if tid is None:
        raise ValueError("mask token: neither the tokenizer's mask_token nor config.mask_token_id is set")
    return int(tid)
