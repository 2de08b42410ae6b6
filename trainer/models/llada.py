"""LLaDA v1 (GSAI-ML/LLaDA-8B-Instruct, hub ``model_type`` "llada") for transformers 5.

Reproduces the published ``LLaDAModelLM`` (an OLMo-style Llama body: pre-norm blocks with separate q/k/v
projections, RoPE, SiLU-gated MLP, untied output head ``ff_out``) under the published parameter names
(``model.transformer.wte``, ``model.transformer.blocks.N.q_proj`` ...) and the published config keys, so
``from_pretrained`` reads the hub checkpoint with no remote code.  With full attention and positions
0..L-1 it gives the published logits (logit i scores token i; no shift).

Where it differs from the published code, which ignores both (see the fixture's PROVENANCE.md):
``attention_mask`` (2-D padding or 4-D boolean, True = may attend, or a flex ``BlockMask``) and
``position_ids`` are honoured, and a transformers ``Cache`` keeps keys/values of earlier chunks.  Config
values selecting code paths we do not implement (ALiBi, the "sequential" block, QK-norm, block groups ...)
are refused in ``LLaDAConfig.__post_init__`` instead of silently computing something else.

Longer than 400 lines because the config (48 published keys) and the model share one module, as every
model family does here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half
from transformers.utils.deprecation import deprecate_kwarg

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "gelu": F.gelu, "relu": F.relu}
LAYER_NORMS = ("rms", "default")
INIT_FNS = ("mitchell", "normal")


@strict
class LLaDAConfig(PreTrainedConfig):
    """The published LLaDA config keys; defaults are LLaDA-8B-Instruct's values.

    Read: every architecture key below.  Accepted but without effect here: ``flash_attention`` (the kernel
    is ``attn_implementation``), ``precision``, ``init_device``, ``max_sequence_length`` and
    ``alibi_bias_max`` (RoPE is computed for any length; ALiBi is refused).
    """

    model_type = "llada"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers",
                     "num_attention_heads": "n_heads", "max_position_embeddings": "max_sequence_length"}

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int | None = 32
    multi_query_attention: bool | None = None
    n_layers: int = 32
    mlp_ratio: int = 4
    mlp_hidden_size: int | None = 12288
    activation_type: str = "silu"
    block_type: str = "llama"
    block_group_size: int = 1
    alibi: bool = False
    alibi_bias_max: float = 8.0
    rope: bool = True
    rope_full_precision: bool = True
    rope_theta: float = 500000.0
    flash_attention: bool = False
    attention_dropout: float = 0.0
    attention_layer_norm: bool = False
    attention_layer_norm_with_affine: bool = True
    residual_dropout: float = 0.0
    embedding_dropout: float = 0.0
    input_emb_norm: bool = False
    layer_norm_type: str = "rms"
    layer_norm_with_affine: bool = True
    bias_for_layer_norm: bool | None = False
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    include_bias: bool = False
    include_qkv_bias: bool | None = False
    scale_logits: bool = False
    vocab_size: int = 126464
    embedding_size: int | None = 126464
    weight_tying: bool = False
    eos_token_id: int | None = 126081
    pad_token_id: int | None = 126081
    mask_token_id: int | None = 126336
    init_device: str | None = "meta"
    init_fn: str = "mitchell"
    init_std: float = 0.02
    init_cutoff_factor: float | None = None
    precision: str | None = "amp_bf16"
    use_cache: bool = False

    def __post_init__(self, **kwargs) -> None:
        refused = {
            "alibi": self.alibi, "rope": not self.rope, "attention_layer_norm": self.attention_layer_norm,
            "block_type": self.block_type != "llama", "block_group_size": self.block_group_size != 1,
            "activation_type": self.activation_type not in ACTIVATIONS,
            "layer_norm_type": self.layer_norm_type not in LAYER_NORMS,
            "init_fn": self.init_fn not in INIT_FNS,
        }
        for key, bad in refused.items():
            if bad:
                raise ValueError(f"LLaDA config: {key}={getattr(self, key)!r} is not implemented here "
                                 f"(supported: block_type 'llama', rope=True, alibi=False, "
                                 f"block_group_size 1, "
                                 f"attention_layer_norm=False, activation_type {sorted(ACTIVATIONS)}, "
                                 f"layer_norm_type {list(LAYER_NORMS)}, init_fn {list(INIT_FNS)})")
        if self.d_model % self.n_heads:
            raise ValueError(f"LLaDA config: d_model={self.d_model} is not a multiple of "
                             f"n_heads={self.n_heads}")
        if self.embedding_size is not None and self.embedding_size < self.vocab_size:
            raise ValueError(f"LLaDA config: embedding_size={self.embedding_size} is smaller than "
                             f"vocab_size={self.vocab_size}")
        if self.multi_query_attention is not None and self.n_kv_heads is not None and self.n_kv_heads != (
                1 if self.multi_query_attention else self.n_heads):
            raise ValueError(f"LLaDA config: multi_query_attention={self.multi_query_attention} contradicts "
                             f"n_kv_heads={self.n_kv_heads}")
        if self.n_heads % self.num_key_value_heads:
            raise ValueError(f"LLaDA config: n_heads={self.n_heads} is not a multiple of "
                             f"n_kv_heads={self.num_key_value_heads}")
        super().__post_init__(**kwargs)

    @property
    def num_key_value_heads(self) -> int:
        """Published ``effective_n_kv_heads``: ``n_kv_heads``, else 1 for multi-query, else ``n_heads``."""
        if self.n_kv_heads is not None:
            return self.n_kv_heads
        return 1 if self.multi_query_attention else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def intermediate_size(self) -> int:
        """MLP width: ``mlp_hidden_size`` wins over ``mlp_ratio`` (they disagree in the published config)."""
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        """Rows of ``wte``/``ff_out`` and width of the logits: ``embedding_size`` (padded ``vocab_size``)."""
        return self.embedding_size or self.vocab_size


class LLaDANorm(nn.Module):
    """The published block norm: RMS (statistics in float32, ``rms_norm_eps``) or LayerNorm (eps 1e-5).

    Weight (``layer_norm_with_affine``) and bias (``bias_for_layer_norm``, else ``include_bias``) are
    optional.
    """

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.rms = config.layer_norm_type == "rms"
        self.eps = config.rms_norm_eps if self.rms else 1e-5
        n = config.d_model
        use_bias = config.include_bias if config.bias_for_layer_norm is None else config.bias_for_layer_norm
        affine = config.layer_norm_with_affine
        self.weight = nn.Parameter(torch.ones(n)) if affine else None
        self.bias = nn.Parameter(torch.zeros(n)) if affine and use_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D]
        if not self.rms:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        x32 = x.float()
        y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        if self.weight is not None:
            y = self.weight * y
        return y + self.bias if self.bias is not None else y


class LLaDALinear(nn.Linear):
    """``nn.Linear`` that records what the published init scales by (the init runs module by module).

    ``block_output_of``: layer index of a block's output projection (``attn_out``, ``ff_out``), whose
    "mitchell" std is further divided by sqrt(2 (layer + 1)); ``residual``: the block ``ff_out``, divided
    by sqrt(2 n_layers) under the "normal" init.
    """

    def __init__(self, d_in: int, d_out: int, bias: bool, *, block_output_of: int | None = None,
                 residual: bool = False) -> None:
        super().__init__(d_in, d_out, bias=bias)
        self.block_output_of = block_output_of
        self.residual = residual


class LLaDARotaryEmbedding(nn.Module):
    """RoPE cos/sin for given positions; ``inv_freq`` is derived per call, so no buffer can be left stale."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.dim = config.head_dim
        self.theta = config.rope_theta

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids [B, L] -> cos, sin [B, L, head_dim] in float32
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, device=position_ids.device,
                                                      dtype=torch.float) / self.dim))
        freqs = position_ids[..., None].float() * inv_freq  # [B, L, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


class LLaDALlamaBlock(GradientCheckpointingLayer):
    """One published "llama" block: ``x + attn(norm(x))`` then ``x + ff_out(act(ff_proj(h)) * up_proj(h))``.

    The projections live on the block itself (not in attention/MLP submodules) to keep the published names.
    """

    def __init__(self, config: LLaDAConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.n_heads // config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.is_causal = False  # read by transformers' sdpa/flex attention functions
        self.act = ACTIVATIONS[config.activation_type]
        d, kv, ff = config.d_model, config.num_key_value_heads * config.head_dim, config.intermediate_size
        qkv_bias = bool(config.include_bias or config.include_qkv_bias)
        self.attn_norm = LLaDANorm(config)
        self.q_proj = LLaDALinear(d, d, qkv_bias)
        self.k_proj = LLaDALinear(d, kv, qkv_bias)
        self.v_proj = LLaDALinear(d, kv, qkv_bias)
        self.attn_out = LLaDALinear(d, d, config.include_bias, block_output_of=layer_idx)
        self.ff_norm = LLaDANorm(config)
        self.ff_proj = LLaDALinear(d, ff, config.include_bias)
        self.up_proj = LLaDALinear(d, ff, config.include_bias)
        self.ff_out = LLaDALinear(ff, d, config.include_bias, block_output_of=layer_idx, residual=True)
        self.dropout = nn.Dropout(config.residual_dropout)

    def _rope(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        # q [B, H, L, hd], k [B, Hkv, L, hd], cos/sin [B, L, hd] float32;
        # rope_full_precision: rotate in float32 whatever the activations' dtype (as published)
        dtype = torch.float32 if self.config.rope_full_precision else q.dtype
        cos, sin = cos[:, None].to(dtype), sin[:, None].to(dtype)
        q_, k_ = q.to(dtype), k.to(dtype)
        return ((q_ * cos + rotate_half(q_) * sin).to(q.dtype),
                (k_ * cos + rotate_half(k_) * sin).to(k.dtype))

    def forward(self, hidden_states: torch.Tensor, attention_mask=None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: Cache | None = None, **kwargs) -> torch.Tensor:
        b, n, _ = hidden_states.shape  # [B, L, D]
        h = self.attn_norm(hidden_states)
        q = self.q_proj(h).view(b, n, -1, self.head_dim).transpose(1, 2)  # [B, H, L, hd]
        k = self.k_proj(h).view(b, n, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, L, hd]
        v = self.v_proj(h).view(b, n, -1, self.head_dim).transpose(1, 2)
        q, k = self._rope(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, Hkv, past + L, hd]
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward)
        att, _ = attention(self, q, k, v, attention_mask, scaling=self.scaling,
                           dropout=self.config.attention_dropout if self.training else 0.0, **kwargs)
        hidden_states = hidden_states + self.dropout(self.attn_out(att.reshape(b, n, -1)))
        h = self.ff_norm(hidden_states)
        h = self.ff_out(self.act(self.ff_proj(h)) * self.up_proj(h))
        return hidden_states + self.dropout(h)


class LLaDAPreTrainedModel(PreTrainedModel):
    config: LLaDAConfig
    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDALlamaBlock"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The published init: "mitchell" (truncated normal, std 1/sqrt(fan_in), block outputs further
        / sqrt(2 (layer + 1))) or "normal" (``init_std``, optional cutoff, block ``ff_out`` further
        / sqrt(2 n_layers)).
        """
        cfg = self.config

        def fill(weight: torch.Tensor, fan_in: int, layer: int | None = None, factor: float = 1.0,
                 residual: bool = False) -> None:
            if cfg.init_fn == "mitchell":
                std = factor / math.sqrt(fan_in) / (math.sqrt(2 * (layer + 1)) if layer is not None else 1.0)
                init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
                return
            std = cfg.init_std * factor / (math.sqrt(2 * cfg.n_layers) if residual else 1.0)
            if cfg.init_cutoff_factor is None:
                init.normal_(weight, mean=0.0, std=std)
            else:
                cut = cfg.init_cutoff_factor * std
                init.trunc_normal_(weight, mean=0.0, std=std, a=-cut, b=cut)

        if isinstance(module, LLaDALinear):
            fill(module.weight, module.in_features, module.block_output_of, residual=module.residual)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            fill(module.weight, cfg.d_model, factor=0.5 * math.sqrt(cfg.d_model) if cfg.scale_logits else 1.0)
        elif isinstance(module, LLaDANorm):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)


class LLaDAModel(LLaDAPreTrainedModel):
    """The published ``model`` submodule: ``transformer`` = {wte, blocks, ln_f, ff_out (unless weight_tying)}.

    ``forward`` returns the final-norm hidden states; the LM head (``ff_out`` or ``wte``) is applied by
    :class:`LLaDAModelLM`, which can then run it on the kept positions only.
    """

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.d_model),
            emb_drop=nn.Dropout(config.embedding_dropout),
            blocks=nn.ModuleList(LLaDALlamaBlock(config, i) for i in range(config.n_layers)),
            ln_f=LLaDANorm(config),
        ))
        if not config.weight_tying:
            self.transformer["ff_out"] = LLaDALinear(config.d_model, config.padded_vocab_size,
                                                     config.include_bias)
        self.rotary_emb = LLaDARotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask=None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                **kwargs) -> BaseModelOutputWithPast:
        """Bidirectional encoder pass -> ``last_hidden_state`` [B, L, D] after ``ln_f``.

        ``attention_mask``: None (full attention), [B, past + L] 0/1 padding, [B|1, 1, L, past + L] boolean
        (True = may attend) or a flex ``BlockMask``.  ``position_ids`` [B|1, L] default to past + 0..L-1.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("LLaDA forward: pass exactly one of input_ids and inputs_embeds")
        if "attention_bias" in kwargs:  # the published argument, which that code silently ignores
            raise TypeError("LLaDA forward: attention_bias is not taken; pass the mask as a 4-D boolean "
                            "attention_mask (True = may attend)")
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds  # [B, L, D]
        if self.config.input_emb_norm:
            x = x * self.config.d_model ** 0.5
        x = self.transformer.emb_drop(x)
        if (self.config.use_cache if use_cache is None else use_cache) and cache is None:
            cache = DynamicCache()
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + x.shape[1], device=x.device)[None]
        mask = self._attention_mask(x, attention_mask, cache)
        position_embeddings = self.rotary_emb(position_ids)
        for block in self.transformer.blocks:
            x = block(x, attention_mask=mask, position_embeddings=position_embeddings, cache=cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.transformer.ln_f(x), cache=cache)

    def _attention_mask(self, x: torch.Tensor, attention_mask, cache: Cache | None):
        """The caller's mask in the form the attention implementation takes (never causal).

        A 2-D padding mask goes through transformers' bidirectional mask builder; a 4-D boolean tensor is
        kept for sdpa and made additive (0 / dtype min) for eager and flex, which add it to the scores.
        """
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
            if attention_mask.dtype != torch.bool:
                raise ValueError(f"LLaDA forward: a 4-D attention_mask must be boolean (True = may attend), "
                                 f"got {attention_mask.dtype}")
            if self.config._attn_implementation == "sdpa":
                return attention_mask
            additive = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
            return additive.masked_fill_(~attention_mask.to(x.device), torch.finfo(x.dtype).min)
        return create_bidirectional_mask(config=self.config, inputs_embeds=x, attention_mask=attention_mask,
                                         cache=cache)


class LLaDAModelLM(LLaDAPreTrainedModel):
    """The published ``LLaDAModelLM``: :class:`LLaDAModel` plus the head; logits [B, L, embedding_size]."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear | None:
        """``ff_out``; None with ``weight_tying``, where the head is ``wte`` itself (no module to tie)."""
        return None if self.config.weight_tying else self.model.transformer.ff_out

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.transformer.ff_out = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask=None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | slice | torch.Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        """Logits [B, L_kept, embedding_size], unshifted (logit i scores token i), as published.

        ``logits_to_keep``: int (last n; 0 = all), a slice, or a 1-D bool/long index over positions; the head
        runs on those positions only.
        """
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        h = slice_logits_to_keep(out.last_hidden_state, logits_to_keep)  # [B, L_kept, D]
        transformer = self.model.transformer
        logits = (F.linear(h, transformer.wte.weight) if self.config.weight_tying
                  else transformer.ff_out(h))
        if self.config.scale_logits:
            logits = logits * (1 / math.sqrt(self.config.d_model))
        return CausalLMOutputWithPast(logits=logits, cache=out.cache)


AutoConfig.register(LLaDAConfig.model_type, LLaDAConfig, exist_ok=True)
AutoModel.register(LLaDAConfig, LLaDAModel, exist_ok=True)
AutoModelForCausalLM.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
