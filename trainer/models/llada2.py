"""LLaDA2 MoE (inclusionAI/LLaDA2.0-mini, LLaDA2.1-mini; hub ``model_type`` "llada2_moe") for transformers 5.

Our own implementation of the published ``LLaDA2MoeModelLM`` (Apache-2.0; read in ZHZisZZ/dllm
``dllm/pipelines/llada2/models/modeling_llada2_moe.py`` and inclusionAI/dFactory
``models/llada2_moe/``), written in the style of transformers' Llama/Qwen2 modules.  It reproduces:

* attention: one fused ``query_key_value`` projection split into [H | H_kv | H_kv] heads, RMSNorm
  over the head dim on queries and keys (``query_layernorm``/``key_layernorm``), RoPE on the first
  ``head_dim * partial_rotary_factor`` dims only, output projection ``dense``;
* a dense SwiGLU MLP in the first ``first_k_dense_replace`` layers, a sparse MoE block after;
* the router: sigmoid scores; ``expert_bias`` added for the *choice* only; group-limited top-k
  (group score = sum of the group's top-2 biased scores, keep ``topk_group`` groups, then top
  ``num_experts_per_tok`` experts inside them); weights = the chosen experts' *unbiased* scores,
  normalised to sum 1 when top_k > 1, times ``routed_scaling_factor``; plus the shared experts;
* the published parameter names, so the hub safetensors load as they are.

Differences from the published forward, all on purpose (docs/models/llada2.md): no mask means full
bidirectional attention for every attention backend (upstream eager turns it causal); a 2-D mask
with zeros blocks padded keys only (upstream makes it causal + padding); a 4-D mask is bool (True =
may attend) or additive float on every backend; ``cache`` follows transformers 5 (``past_key_values``
is still accepted); router logits are not returned.  Over 400 lines because config, router, experts
and the model belong to one published architecture and are read together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg

from trainer.attention import BLOCK_SPARSE_SDPA


class LLaDA2MoeConfig(PreTrainedConfig):
    """The published ``LLaDA2MoeConfig``: same keys, same defaults, values saved back as given.

    Keys of the published config.json that the published code never reads (``norm_topk_prob``,
    ``score_function``, ``moe_router_enable_expert_bias``, ``rotary_dim``, ``use_rmsnorm``,
    ``router_dtype``, ``norm_softmax``, ``using_split_qkv_in_self_attention``, ``sliding_window``)
    are accepted as extra attributes and written back; they change nothing, as upstream.
    """

    model_type = "llada2_moe"

    vocab_size: int = 30592
    hidden_size: int = 1024
    intermediate_size: int | None = None
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 0  # 0 = as many as query heads (LLaDA2.1's config class)
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_bias: bool = True  # bias of the attention output projection ``dense``
    rms_norm_eps: float = 1e-5
    norm_head: bool = False
    tie_word_embeddings: bool = False
    embedding_dropout: float = 0.1
    attention_dropout: float = 0.1
    output_dropout: float = 0.1
    initializer_range: float = 0.02
    max_position_embeddings: int = 16384
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 0.5
    use_cache: bool = True
    use_sliding_window: bool = False
    max_window_layers: int = 28
    pad_token_id: int | None = 126081
    num_experts: int | None = 16  # None = every layer dense
    num_shared_experts: int | None = 0
    num_experts_per_tok: int = 2
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    moe_intermediate_size: int | None = None
    first_k_dense_replace: int = 0
    output_router_logits: bool = False

    def __post_init__(self, **kwargs) -> None:
        # use_qk_norm: the dllm copy honours False, dFactory (the hub layout) always normalises; refuse
        # the ambiguous value rather than pick one.  Absent it is not written back (hub configs lack it).
        if kwargs.get("use_qk_norm", True) is not True:
            raise ValueError("llada2_moe config: use_qk_norm=false is not supported "
                             "(published copies disagree)")
        if self.rope_scaling is not None:
            raise ValueError(f"llada2_moe config: rope_scaling={self.rope_scaling!r} is not supported "
                             "(LLaDA2 uses plain RoPE; only null is implemented)")
        if self.num_experts is not None:
            if self.moe_intermediate_size is None:
                raise ValueError("llada2_moe config: moe_intermediate_size is required "
                                 "when num_experts is set")
            if self.num_experts % self.n_group or self.num_experts // self.n_group < 2:
                raise ValueError(f"llada2_moe config: num_experts ({self.num_experts}) must split into "
                                 f"n_group ({self.n_group}) groups of >= 2 experts (group score = top-2 sum)")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"llada2_moe config: topk_group ({self.topk_group}) must be in 1..n_group")
        if self.intermediate_size is None and (self.num_experts is None or self.first_k_dense_replace > 0):
            raise ValueError("llada2_moe config: intermediate_size is required for the dense layers")
        super().__post_init__(**kwargs)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def resolved_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads


class LLaDA2MoeRMSNorm(nn.Module):
    """RMSNorm computed in float32, weight applied in the input dtype (as the published class)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(input_dtype)


class LLaDA2MoeRotaryEmbedding(nn.Module):
    """Plain RoPE over ``head_dim * partial_rotary_factor`` dims; no buffer (see forward)."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.dim = int(config.resolved_head_dim * config.partial_rotary_factor)
        self.base = float(config.rope_theta)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # inv_freq is derived here rather than kept in a non-persistent buffer: transformers 5 builds
        # models on the meta device and refills such buffers with garbage (fixture PROVENANCE, quirk 2).
        # Same formula and dtype path as transformers-4 "default" RoPE, so the angles are bit-identical.
        exponent = torch.arange(0, self.dim, 2, dtype=torch.int64, device=x.device).float() / self.dim
        inv_freq = 1.0 / (self.base ** exponent)  # [dim/2]
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = position_ids[..., None].float() * inv_freq  # [B, L, dim/2]
            emb = torch.cat((freqs, freqs), dim=-1)  # [B, L, dim]
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_partial_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on the first ``cos.shape[-1]`` dims of q/k [B, H, L, D]; the rest passes through."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, L, rot]
    rot = cos.shape[-1]
    q_rot, q_pass = q[..., :rot], q[..., rot:]
    k_rot, k_pass = k[..., :rot], k[..., rot:]
    q_rot = q_rot * cos + rotate_half(q_rot) * sin
    k_rot = k_rot * cos + rotate_half(k_rot) * sin
    return torch.cat([q_rot, q_pass], dim=-1), torch.cat([k_rot, k_pass], dim=-1)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H_kv, L, D] -> [B, H_kv * n_rep, L, D]."""
    b, h_kv, n, d = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    return hidden_states[:, :, None].expand(b, h_kv, n_rep, n, d).reshape(b, h_kv * n_rep, n, d)


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                            **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention; ``attention_mask`` is additive float [B|1, 1, Q, K] (see ``_to_additive``)."""
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling  # [B, H, Q, K]
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()  # [B, Q, H, D]
    return attn_output, attn_weights


class LLaDA2MoeAttention(nn.Module):
    """Fused-QKV GQA attention with QK RMSNorm and partial RoPE; never causal."""

    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.resolved_kv_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.head_dim = config.resolved_head_dim
        self.scaling = self.head_dim ** -0.5
        self.is_causal = False
        qkv_heads = self.num_heads + 2 * self.num_kv_heads
        self.query_key_value = nn.Linear(config.hidden_size, qkv_heads * self.head_dim,
                                         bias=config.use_qkv_bias)
        self.query_layernorm = LLaDA2MoeRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.key_layernorm = LLaDA2MoeRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.use_bias)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask, cache: Cache | None = None, **kwargs) -> torch.Tensor:
        b, n, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states).view(b, n, -1, self.head_dim)  # [B, L, H + 2 H_kv, D]
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H|H_kv, L, D]
        q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k = apply_partial_rotary(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, H_kv, K, D], K = cached + L
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                          eager_attention_forward)
        dropout = self.config.attention_dropout if self.training else 0.0
        out, _ = interface(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling,
                           is_causal=False, **kwargs)  # [B, L, H, D]
        return self.dense(out.reshape(b, n, -1))


class LLaDA2MoeMLP(nn.Module):
    """SwiGLU MLP: the dense layers, each routed expert and the shared experts."""

    def __init__(self, config: LLaDA2MoeConfig, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LLaDA2MoeGate(nn.Module):
    """Sigmoid router with a selection-only ``expert_bias`` and group-limited top-k (all in float32)."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        # A persistent buffer, as published: it is in the checkpoint (aux-loss-free balancing updates it
        # outside autograd) and must not be trained by the optimizer.
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, H] -> (expert ids [T, k] long, weights [T, k] float32)."""
        logits = F.linear(hidden_states.float(), self.weight.float())  # [T, E]
        scores = torch.sigmoid(logits)
        biased = scores + self.expert_bias  # [T, E] float32: selection only
        t, e = biased.shape
        grouped = biased.view(t, self.n_group, e // self.n_group)  # [T, G, E/G]
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
        group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices  # [T, g]
        group_keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        expert_keep = group_keep[:, :, None].expand_as(grouped).reshape(t, e)  # [T, E]
        topk_idx = biased.masked_fill(~expert_keep, float("-inf")).topk(self.top_k, dim=-1).indices  # [T, k]
        weights = scores.gather(1, topk_idx)  # unbiased scores of the chosen experts
        if self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return topk_idx, weights * self.routed_scaling_factor


class LLaDA2MoeSparseMoeBlock(nn.Module):
    """Routed experts + shared experts.  Declared a ZeRO-3 leaf (``_z3_leaf_modules``): see ``forward``."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.experts = nn.ModuleList(LLaDA2MoeMLP(config, config.moe_intermediate_size)
                                     for _ in range(config.num_experts))
        self.gate = LLaDA2MoeGate(config)
        self.shared_experts = (LLaDA2MoeMLP(config, config.moe_intermediate_size * config.num_shared_experts)
                               if config.num_shared_experts is not None else None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Each expert runs once, on exactly the tokens routed to it: T*k token-expert pairs in all.

        Experts that got no token are skipped, so ranks of one ZeRO-3 job call different experts; their
        parameters are only gathered consistently because the whole block is a ZeRO-3 leaf module
        (``deepspeed.utils.set_z3_leaf_modules``), gathered once on entry.  The weighted sum runs in
        float32 and is cast once, as the published code does.
        """
        b, n, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)  # [T, H]
        topk_idx, weights = self.gate(x)  # [T, k], [T, k]
        k = topk_idx.shape[1]
        flat = topk_idx.reshape(-1)  # [T*k], pair p = token p // k
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # one host sync per layer
        token_of = order // k  # [T*k] token of each pair, grouped by expert
        weight_of = weights.reshape(-1)[order]  # [T*k]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
        start = 0
        for expert_id, count in enumerate(counts):
            if count == 0:
                continue
            tok = token_of[start:start + count]
            y = self.experts[expert_id](x[tok])  # [count, H]
            out.index_add_(0, tok, y.float() * weight_of[start:start + count, None])
            start += count
        out = out.to(hidden_states.dtype).view(b, n, h)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out


class LLaDA2MoeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = LLaDA2MoeAttention(config, layer_idx)
        moe = config.num_experts is not None and layer_idx >= config.first_k_dense_replace
        self.mlp = LLaDA2MoeSparseMoeBlock(config) if moe else LLaDA2MoeMLP(config, config.intermediate_size)
        self.input_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_embeddings=None,
                cache: Cache | None = None, **kwargs) -> torch.Tensor:
        attn = self.attention(self.input_layernorm(hidden_states), position_embeddings, attention_mask,
                              cache=cache, **kwargs)
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LLaDA2MoePreTrainedModel(PreTrainedModel):
    """Common settings.  ``_z3_leaf_modules`` names the classes the trainer must declare ZeRO-3 leaves
    (``deepspeed.utils.set_z3_leaf_modules(model, list(model._z3_leaf_modules))``) so that ranks routing
    tokens to different experts still gather the same parameters (otherwise ZeRO-3 hangs)."""

    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDA2MoeDecoderLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _z3_leaf_modules = ("LLaDA2MoeSparseMoeBlock",)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear/Embedding normal(0, initializer_range), norms to 1
        if isinstance(module, LLaDA2MoeGate):
            init.kaiming_uniform_(module.weight, a=5 ** 0.5)
            init.zeros_(module.expert_bias)


def _attention_mask(mask, batch: int, q_len: int, k_len: int, dtype: torch.dtype, backend: str):
    """Our mask semantics -> the form ``backend`` takes.

    None: full attention (None).  [B, K] 0/1: padded keys blocked.  [B|1, 1, Q, K] bool (True = may
    attend) or additive float: as given.  A flex ``BlockMask``: passed through.  sdpa takes bool; eager
    and a flex score mask add the mask to the scores, so they get the additive form.
    """
    if mask is None or not isinstance(mask, torch.Tensor):
        return mask
    if mask.dim() == 2:
        if mask.shape != (batch, k_len):
            raise ValueError(f"2-D attention_mask must be [batch, keys] = {(batch, k_len)}, "
                             f"got {tuple(mask.shape)}")
        mask = mask.bool()[:, None, None, :].expand(batch, 1, q_len, k_len)
    elif mask.dim() != 4:
        raise ValueError(f"attention_mask must be 2-D or 4-D, got {mask.dim()}-D")
    if backend in ("sdpa", BLOCK_SPARSE_SDPA) or mask.dtype != torch.bool:
        return mask if mask.dtype == torch.bool else mask.to(dtype)
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return additive.masked_fill_(~mask, torch.finfo(dtype).min)


class LLaDA2MoeModel(LLaDA2MoePreTrainedModel):
    """The backbone (no LM head)."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(LLaDA2MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LLaDA2MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LLaDA2MoeRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask=None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)  # [B, L, H]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        b, n, _ = inputs_embeds.shape
        if position_ids is None:
            position_ids = torch.arange(past, past + n, device=inputs_embeds.device)[None].expand(b, n)
        mask = _attention_mask(attention_mask, b, n, past + n, inputs_embeds.dtype,
                               self.config._attn_implementation)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=mask, position_embeddings=position_embeddings,
                                  cache=cache if use_cache else None, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states),
                                       cache=cache if use_cache else None)


class LLaDA2MoeModelLM(LLaDA2MoePreTrainedModel):
    """Backbone + untied LM head; logit i is for token i (no shift), returned in float32 as published.

    No ``GenerationMixin``: transformers' autoregressive ``generate`` is meaningless for this diffusion LM;
    decoding lives in ``evaluation/generate.py``.
    """

    _tied_weights_keys = {"lm_head.weight": "model.word_embeddings.weight"}  # only if tie_word_embeddings

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__(config)
        self.model = LLaDA2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.word_embeddings = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask=None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | slice | torch.Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        """``logits_to_keep``: int n = last n positions (0 = all), a slice, a 1-D bool/long index, or a
        [B, L] bool mask (-> logits [N, V] for its True entries, the masked-only LM head of training)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = slice_logits_to_keep(out.last_hidden_state, logits_to_keep)  # [B, kept, H] or [N, H]
        logits = self.lm_head(hidden).float()
        return CausalLMOutputWithPast(logits=logits, cache=out.cache)


AutoConfig.register(LLaDA2MoeConfig.model_type, LLaDA2MoeConfig, exist_ok=True)
AutoModel.register(LLaDA2MoeConfig, LLaDA2MoeModel, exist_ok=True)
AutoModelForCausalLM.register(LLaDA2MoeConfig, LLaDA2MoeModelLM, exist_ok=True)
