"""Dream (Dream-org/Dream-v0-Instruct-7B, hub ``model_type`` "Dream") for transformers 5.

Reproduces the published ``DreamModel``: a Qwen2 body (q/k/v projections with bias, grouped-query
attention, RMSNorm, SwiGLU MLP, plain RoPE) with full bidirectional attention and an untied LM head,
under the published config keys and parameter names (``model.embed_tokens``,
``model.layers.N.self_attn.q_proj``, ``lm_head``, ...), so the hub checkpoint loads as is.

Differences from the published code (see docs/models/dream.md):

- RoPE ``inv_freq`` is re-derived in ``_init_weights``: transformers 5 builds models on the meta
  device, and the published ``_init_weights`` never refills it (its ``from_pretrained`` gives
  stale-memory frequencies).
- Masks follow the project's one convention for every family: none = full bidirectional; a 2-D
  ``[B, K]`` padding mask blocks padded *keys* only; a 4-D boolean mask (True = may attend) is
  honoured exactly under sdpa, eager and flex_attention; a flex ``BlockMask`` passes through.
- ``forward`` takes ``logits_to_keep`` and a transformers ``cache`` (``past_key_values``) and returns
  ``CausalLMOutputWithPast``; the published generation mixin is not reproduced.

Like the published forward, logit i predicts token i+1 (Dream starts from an autoregressive model);
the shift is applied by the trainer, not here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2MLP,
    Qwen2RMSNorm,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils.deprecation import deprecate_kwarg

# The Qwen2 MLP and RMSNorm are the published modules line for line (same math, same parameter names).
DreamMLP = Qwen2MLP
DreamRMSNorm = Qwen2RMSNorm


class DreamConfig(PreTrainedConfig):
    """The published ``DreamConfig``: its keys and defaults (hub config.json round-trips unchanged).

    ``use_mrope`` is in the hub config.json but read by no published code; it is kept so that it is
    written back.  ``keys_to_ignore_at_inference`` is as published.
    """

    model_type = "Dream"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = False
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    # A plain field (shadowing PreTrainedConfig's deprecated ``rope_scaling`` property), so the key is
    # written back as published instead of being folded into transformers 5's ``rope_parameters``.
    rope_scaling: dict | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    attention_dropout: float = 0.0
    mask_token_id: int | None = 151666
    pad_token_id: int | None = 151643
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    use_mrope: bool = False

    def __post_init__(self, **kwargs) -> None:
        # As published: the window only exists when sliding-window attention is switched on.
        self.sliding_window = self.sliding_window if self.use_sliding_window else None
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_scaling is not None:
            raise ValueError(f"DreamConfig.rope_scaling: only null (plain RoPE, as Dream publishes) is "
                             f"implemented, got {self.rope_scaling!r}")
        if self.use_sliding_window:
            # The published SDPA attention ignores the window (only its flash path honours it).
            raise ValueError("DreamConfig.use_sliding_window: sliding-window attention is not implemented "
                             "(Dream publishes false)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"DreamConfig.hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        super().__post_init__(**kwargs)


def rope_inv_freq(config: DreamConfig) -> torch.Tensor:
    """[head_dim / 2] float32 inverse frequencies of plain RoPE, computed on the CPU as published."""
    dim = config.hidden_size // config.num_attention_heads
    return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


class DreamRotaryEmbedding(nn.Module):
    """Plain RoPE: position ids [B, L] -> (cos, sin) [B, L, head_dim], computed in float32."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.inv_freq = nn.Buffer(rope_inv_freq(config), persistent=False)  # [head_dim / 2]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # [B, L, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, L, head_dim]
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class DreamAttention(nn.Module):
    """Grouped-query self-attention with q/k/v bias; never causal (the mask alone decides)."""

    def __init__(self, config: DreamConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = False  # read by transformers' sdpa/flash/flex functions
        kv_dim = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=True)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | BlockMask | None, cache: Cache | None = None,
                **kwargs) -> torch.Tensor:
        input_shape = hidden_states.shape[:-1]  # [B, L]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, H, L, D]
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, H_kv, L, D]
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, H_kv, L, D]
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, H_kv, K, D], K = cached + L

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                          eager_attention_forward)
        out, _ = attention(self, q, k, v, attention_mask, scaling=self.scaling,
                           dropout=self.attention_dropout if self.training else 0.0, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous())  # [B, L, hidden]


class DreamDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: DreamConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = DreamAttention(config, layer_idx)
        self.mlp = DreamMLP(config)
        self.input_layernorm = DreamRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DreamRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | BlockMask | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: Cache | None = None, **kwargs) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                       attention_mask, cache=cache, **kwargs)
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DreamPreTrainedModel(PreTrainedModel):
    config_class = DreamConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DreamDecoderLayer"]
    _skip_keys_device_placement = "past_key_values"
    _supports_sdpa = True
    _supports_flex_attn = True

    def _init_weights(self, module: nn.Module) -> None:
        """As published (normal(0, initializer_range) for Linear and Embedding, zero biases, padding row
        zeroed, norms at one), plus the RoPE frequencies, which transformers 5 leaves as garbage."""
        if isinstance(module, DreamRotaryEmbedding):
            init.copy_(module.inv_freq, rope_inv_freq(self.config))
        else:
            super()._init_weights(module)


class DreamBaseModel(DreamPreTrainedModel):
    """Embeddings, decoder layers and final norm (the published ``DreamBaseModel``, under ``model.``)."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DreamRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DreamRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | BlockMask | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("DreamBaseModel.forward: give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # [B, L, hidden]
        if use_cache is None:
            # A training forward never reads a cache, and filling one copies every layer's keys/values.
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + inputs_embeds.shape[1],
                                        device=inputs_embeds.device)[None]  # [1, L]

        mask = self._attention_mask(attention_mask, inputs_embeds)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=mask, position_embeddings=position_embeddings,
                                  cache=cache, use_cache=use_cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states),
                                       cache=cache if use_cache else None)

    def _attention_mask(self, attention_mask: torch.Tensor | BlockMask | None,
                        inputs_embeds: torch.Tensor) -> torch.Tensor | BlockMask | None:
        """The caller's mask in the form the configured attention function takes (never causal).

        - None -> None: every attention function then attends fully (the layers are not causal);
        - a 2-D [B, K] padding mask (K = cached + L) -> the 4-D boolean mask blocking keys where it is 0;
        - a 4-D boolean [B|1, 1, L, K] mask (True = may attend) -> as is for sdpa, a BlockMask for
          flex, additive 0 / dtype-min for eager (which adds the mask to the scores);
        - a 4-D float mask is additive already (as the published code takes it) and passes as is;
        - a BlockMask (flex_attention only) passes as is.
        """
        impl = self.config._attn_implementation
        if attention_mask is None:
            return None
        if isinstance(attention_mask, BlockMask):
            if impl != "flex_attention":
                raise ValueError(f"a flex BlockMask needs attn_implementation='flex_attention', not {impl!r}")
            return attention_mask
        if attention_mask.dim() == 2:  # [B, K] -> [B, 1, L, K]: padded keys blocked for every query
            attention_mask = attention_mask.bool()[:, None, None, :].expand(-1, 1, inputs_embeds.shape[1], -1)
        if attention_mask.dim() != 4:
            raise ValueError(f"attention_mask must be [B, K] or [B, 1, L, K], "
                             f"got {tuple(attention_mask.shape)}")
        if attention_mask.dtype != torch.bool or impl == "sdpa":
            return attention_mask
        if impl == "flex_attention":
            return bool_to_block_mask(attention_mask)
        additive = torch.zeros(attention_mask.shape, dtype=inputs_embeds.dtype, device=attention_mask.device)
        return additive.masked_fill_(~attention_mask, torch.finfo(inputs_embeds.dtype).min)


def bool_to_block_mask(allowed: torch.Tensor) -> BlockMask:
    """4-D boolean [B|1, 1, L, K] (True = may attend) -> the equivalent flex BlockMask.

    A BlockMask rather than transformers' additive ``score_mod`` path, which aborts on the CPU here
    (``munmap_chunk(): invalid pointer`` with torch 2.13) and cannot skip fully masked blocks.
    """
    b, _, q_len, kv_len = allowed.shape
    if b == 1:
        return create_block_mask(lambda _b, _h, q, k: allowed[0, 0, q, k], B=None, H=None,
                                 Q_LEN=q_len, KV_LEN=kv_len, device=allowed.device)
    return create_block_mask(lambda bi, _h, q, k: allowed[bi, 0, q, k], B=b, H=None,
                             Q_LEN=q_len, KV_LEN=kv_len, device=allowed.device)


class DreamModel(DreamPreTrainedModel):
    """The published LM class (its hub name, registered for AutoModel as published): body + LM head.

    Logits are returned unshifted, as published: the logit at position i predicts token i+1.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # only if tie_word_embeddings

    def __init__(self, config: DreamConfig) -> None:
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | BlockMask | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | slice | torch.Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        """-> logits [B, kept, V] (all L positions for ``logits_to_keep=0``) and the cache if used.

        ``logits_to_keep``: an int keeps the last n positions (0 = all), a slice or a 1-D bool/long
        tensor selects positions; the LM head runs on those only.
        """
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = slice_logits_to_keep(out.last_hidden_state, logits_to_keep)  # [B, kept, hidden]
        return CausalLMOutputWithPast(logits=self.lm_head(hidden), cache=out.cache)


AutoConfig.register(DreamConfig.model_type, DreamConfig, exist_ok=True)
AutoModel.register(DreamConfig, DreamModel, exist_ok=True)
AutoModelForCausalLM.register(DreamConfig, DreamModel, exist_ok=True)
