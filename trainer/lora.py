"""LoRA fine-tuning on ``peft``: which modules get adapters, and the two exports (adapter, merged model).

Why ``peft``: its adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) is what the
tools downstream load (``PeftModel.from_pretrained``, LoRA serving in vLLM / SGLang), and its LoRA layer
(scaling, dropout, ``get_delta_weight``) is used as is rather than re-derived here.

ZeRO-3: the base model is partitioned while it loads (``trainer.modeling.load_model``);
:func:`apply_lora` freezes it and injects the adapters (small full tensors, the same on every rank since
every rank seeds alike), and ``deepspeed.initialize`` partitions those too, broadcasting rank 0's values.
Only the adapters require grad, so the optimizer (fp32 masters, Adam moments) and the checkpoints
(``trainer.checkpoint.save_checkpoint(trainable_only=True)``) hold the adapters only.

Exports (collective; rank 0 writes):

- :func:`export_adapter`: every adapter parameter gathered in turn -> a PEFT folder plus the tokenizer;
- :func:`export_merged`: module by module; an adapted linear layer's base weight and its adapters are
  gathered together, ``W + (alpha / r) B A`` is computed with peft's ``get_delta_weight`` and the
  partitions are released before the next module, so no rank ever gathers more than one module.  The
  CPU state dict rank 0 writes is the whole model, as for the full fine-tuning export
  (``trainer.checkpoint.gather_state_dict``).  The folder is the family's published layout (no
  ``base_layer`` / ``lora_`` names) and loads with ``AutoModelForCausalLM`` without peft.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import ConfigError, LoraConfig
from trainer.families import Family

ADAPTER = "default"
"""peft's name of the one adapter we train."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def target_modules(model: nn.Module, family: Family, cfg: LoraConfig) -> list[str]:
    """Full names of the linear layers to adapt: ``lora.target_modules`` or the family's defaults, plus
    the routed experts with ``lora.experts``.  A pattern matching nothing, matching a non-linear module,
    or (without ``lora.experts``) matching a routed expert is a ConfigError naming the pattern."""
    key = "lora.target_modules" + ("" if cfg.target_modules else f" (default of {family.model_type})")
    patterns = list(cfg.target_modules or family.lora_targets)
    if not patterns:
        raise ConfigError(f"lora.target_modules: {family.model_type} has no default; name the modules")
    if cfg.experts:
        if not family.lora_expert_targets:
            raise ConfigError(f"lora.experts: {family.model_type} has no routed MoE experts")
        patterns += family.lora_expert_targets
    modules = dict(model.named_modules())
    experts = {n for n in modules if any(re.fullmatch(p, n) for p in family.lora_expert_targets)}
    names: set[str] = set()
    for pat in patterns:
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise ConfigError(f"{key}: {pat!r} is not a regular expression ({e})") from None
        hit = [n for n in modules if rx.fullmatch(n)]
        if not hit:
            raise ConfigError(f"{key}: {pat!r} matches no module of {type(model).__name__} "
                              f"(patterns match full names, e.g. {next(iter(_linear_names(modules)), '')!r})")
        for n in hit:
            if not isinstance(modules[n], nn.Linear):
                raise ConfigError(f"{key}: {pat!r} matches {n} ({type(modules[n]).__name__}), "
                                  f"not a linear layer")
            if n in experts and not cfg.experts:
                raise ConfigError(f"{key}: {pat!r} matches the routed expert {n}; set lora.experts true to "
                                  f"adapt experts")
        names.update(hit)
    return sorted(names)


def _linear_names(modules: dict[str, nn.Module]) -> list[str]:
    return [n for n, m in modules.items() if isinstance(m, nn.Linear)]


def apply_lora(model: nn.Module, family: Family, cfg: LoraConfig) -> nn.Module:
    """Freeze ``model`` and wrap it in a ``peft.PeftModel`` with adapters on :func:`target_modules`."""
    import peft

    config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                             target_modules=target_modules(model, family, cfg))
    for p in model.parameters():
        p.requires_grad_(False)
    return peft.get_peft_model(model, config, adapter_name=ADAPTER)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; full sizes under ZeRO-3 (``ds_numel``)."""
    numel = lambda p: int(getattr(p, "ds_numel", p.numel()))  # noqa: E731
    params = list(model.parameters())
    return sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params)


def _gathered(params: list[nn.Parameter]):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Collective: the trainable (adapter) parameters as fp32 CPU tensors on rank 0, None elsewhere."""
    out: dict[str, torch.Tensor] | None = {} if _rank() == 0 else None
    for name, p in model.named_parameters():
        if p.requires_grad:
            with _gathered([p]):
                if out is not None:
                    out[name] = p.detach().to("cpu", torch.float32).clone()
    return out


def export_adapter(model: nn.Module, tokenizer, out_dir: Path | str) -> Path | None:
    """Collective: write the PEFT adapter folder (and the tokenizer) from rank 0."""
    out = Path(out_dir)
    state = adapter_state_dict(model)
    if state is not None:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
    if dist.is_initialized():
        dist.barrier()
    return out if _rank() == 0 else None


def adapted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of a ``PeftModel``'s base model that carry an adapter, by name."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Collective: the base model's state dict with every adapter merged in (fp32 CPU, published names)
    on rank 0, None elsewhere; gathers one module's parameters at a time (see the module docstring)."""
    base = model.get_base_model()
    out: dict[str, torch.Tensor] | None = {} if _rank() == 0 else None
    adapted = adapted_modules(model)
    inside = tuple(f"{n}." for n in adapted)
    for name, module in base.named_modules():
        if inside and name.startswith(inside):
            continue  # base_layer / lora_A / lora_B of an adapted layer: merged below
        prefix = f"{name}." if name else ""
        if name in adapted:
            with _gathered(list(module.parameters())):
                if out is not None:
                    layer = module.base_layer
                    delta = module.get_delta_weight(ADAPTER)  # [out, in]: (alpha / r) B A
                    out[prefix + "weight"] = (layer.weight.detach().float() + delta.float()).cpu()
                    if layer.bias is not None:
                        out[prefix + "bias"] = layer.bias.detach().to("cpu", torch.float32).clone()
            continue
        own = list(module.parameters(recurse=False))
        if own:
            with _gathered(own):
                if out is not None:
                    for pname, p in module.named_parameters(recurse=False):
                        out[prefix + pname] = p.detach().to("cpu", torch.float32).clone()
    if out is not None:
        persistent = set(base.state_dict().keys())
        for name, b in base.named_buffers():
            if name in persistent:
                out[name] = b.detach().cpu().clone()
    return out


def export_merged(model: nn.Module, tokenizer, out_dir: Path | str, *, dtype: torch.dtype = torch.float32
                  ) -> Path | None:
    """Collective: the merged model as a ``save_pretrained`` folder in the family's published layout."""
    from trainer.checkpoint import export_hf

    return export_hf(model.get_base_model(), tokenizer, out_dir, dtype=dtype,
                     gather=lambda _: merged_state_dict(model))
