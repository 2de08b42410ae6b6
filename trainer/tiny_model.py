"""The built-in tiny masked-diffusion LM: a Llama body with bidirectional attention.

Why a registered transformers class rather than a bare ``nn.Module``: the trainer, the exporter
and the evaluator load every model through ``AutoConfig``/``AutoModelForCausalLM`` and call it
with ``(input_ids, attention_mask[B, 1, Q, K], position_ids)``, exactly as they call LLaDA2 or
Dream loaded with ``trust_remote_code``.  The tiny default therefore exercises the same code path.

Attention is bidirectional by default: a 2-D padding mask (or none) becomes a full 4-D mask
instead of Llama's causal one.  Block-diffusion callers pass their own 4-D boolean mask, which
transformers forwards to SDPA/flex untouched.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM


class TinyDLLMConfig(LlamaConfig):
    """Llama config plus the mask token id the diffusion objective replaces tokens with."""

    model_type = "tiny_dllm"

    def __init__(self, mask_token_id: int = 1, **kwargs) -> None:
        self.mask_token_id = mask_token_id
        super().__init__(**kwargs)


class TinyDLLMForMaskedDiffusion(LlamaForCausalLM):
    """Llama with every attention layer non-causal; logits are predicted at the same position."""

    config_class = TinyDLLMConfig

    def __init__(self, config: TinyDLLMConfig) -> None:
        super().__init__(config)
        for layer in self.model.layers:
            layer.self_attn.is_causal = False

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):  # noqa: D102
        # logits_to_keep is named (not left in **kwargs) so trainer.modeling.call_model can see that the
        # LM head may run on the noisy half only.
        # A 4-D tensor or a flex BlockMask is the caller's layout and passes through untouched.
        if attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
            attention_mask = bidirectional_mask(input_ids if input_ids is not None
                                                else kwargs["inputs_embeds"][..., 0],
                                                attention_mask)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                               logits_to_keep=logits_to_keep, **kwargs)


def bidirectional_mask(ids: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """[B, L] (+ optional [B, L] keep-mask) -> [B, 1, L, L] boolean, True = may attend."""
    b, n = ids.shape[:2]
    keep = torch.ones(b, n, dtype=torch.bool, device=ids.device) if padding is None else padding.bool()
    return keep[:, None, None, :].expand(b, 1, n, n)


def tiny_config(vocab_size: int, mask_token_id: int, eos_token_id: int, *, hidden_size: int = 256,
                num_layers: int = 4, num_heads: int = 4, max_positions: int = 4096,
                attn_implementation: str = "sdpa") -> TinyDLLMConfig:
    """The default preset: ~4M parameters with a 4k vocabulary (tied embeddings).

    ``attn_implementation="flex_attention"`` when the trainer passes flex BlockMasks
    (objective.attn_backend = flex).
    """
    return TinyDLLMConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 8 // 3 // 16 * 16,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_positions, rope_theta=10000.0, tie_word_embeddings=True,
        mask_token_id=mask_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
        bos_token_id=None, attn_implementation=attn_implementation,
    )


AutoConfig.register(TinyDLLMConfig.model_type, TinyDLLMConfig, exist_ok=True)
AutoModelForCausalLM.register(TinyDLLMConfig, TinyDLLMForMaskedDiffusion, exist_ok=True)
