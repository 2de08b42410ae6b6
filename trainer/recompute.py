"""Activation recomputation (``model.activation_checkpointing``): none, selective or full, any ZeRO stage.

``full`` recomputes each decoder layer in the backward from its input (transformers'
``gradient_checkpointing_enable``: every family's decoder layer is a ``GradientCheckpointingLayer``,
non-reentrant, so frozen LoRA weights work).  ``selective`` checkpoints the same layers but keeps the
outputs of the expensive ops (matrix products, attention kernels) and recomputes only the rest
(norms, activation functions, rotary embeddings, the gate x up product): elementwise work, ~8 % of
a step at 27 M on CPU, for about a third of the activation memory (torchtitan's op-level selective AC).

Why not torch's ``create_selective_checkpoint_contexts``: its recompute matches every op of the
layer's forward one for one, by op and call index, including ops it does not keep.  Under ZeRO-3 the
layer's submodules gather their partitioned weights in forward hooks (all-gathers, copies), and the
recompute does so a different number of times, so torch's version fails (``c10d._allgather_base_
invocation index 7 ... not found``).  :class:`_KeepOutputs` and :class:`_ReuseOutputs` count only the
kept ops: the recompute runs everything else (ZeRO-3's gathers included) as it comes, and receives
the kept ops' outputs in the order the forward produced them.
"""

from __future__ import annotations

from collections import defaultdict, deque

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.checkpoint import _detach_helper

from trainer.attention import block_sparse_attention
from trainer.config import ACTIVATION_CHECKPOINTING

_aten = torch.ops.aten
KEPT_OPS = frozenset({
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten._scaled_mm.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    block_sparse_attention.default,
})
"""Ops whose outputs ``selective`` keeps for the backward (everything else in a layer is recomputed)."""


class _Kept:
    """A kept tensor with its version counter at the time, so an in-place change after it is caught."""

    __slots__ = ("tensor", "version")

    def __init__(self, x: torch.Tensor) -> None:
        # torch's own SAC detach: below autograd a plain detach would not share the version counter
        self.tensor, self.version = _detach_helper(x), x._version

    def get(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError("selective recomputation: a kept output was modified in place after the "
                               "forward")
        return self.tensor


def _keep(x):  # noqa: ANN001, ANN202 - any pytree leaf
    return _Kept(x) if isinstance(x, torch.Tensor) else x


def _reuse(x):  # noqa: ANN001, ANN202
    return x.get() if isinstance(x, _Kept) else x


class _KeepOutputs(TorchDispatchMode):
    """The checkpointed forward: runs every op; keeps the outputs of ``KEPT_OPS``, per op in call order."""

    def __init__(self, store: dict) -> None:
        super().__init__()
        self.store = store

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        if func in KEPT_OPS:
            self.store[func].append(tree_map(_keep, out))
        return out


class _ReuseOutputs(TorchDispatchMode):
    """The recompute in the backward: hands back the kept outputs in order, runs every other op."""

    def __init__(self, store: dict) -> None:
        super().__init__()
        self.store = store

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func not in KEPT_OPS:
            return func(*args, **(kwargs or {}))
        kept = self.store[func]
        if not kept:
            raise RuntimeError(f"selective recomputation: {func} ran more often in the recompute than in the "
                               "forward (the layer's forward must not depend on state that changed since)")
        return tree_map(_reuse, kept.popleft())


def _selective_contexts() -> tuple[TorchDispatchMode, TorchDispatchMode]:
    store: dict = defaultdict(deque)  # per checkpointed call: its forward fills it, its recompute drains it
    return _KeepOutputs(store), _ReuseOutputs(store)


def enable_activation_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """Recompute activations of every decoder layer in the backward (``mode`` in ACTIVATION_CHECKPOINTING).

    Works under every ZeRO stage: the recompute gathers ZeRO-3's partitioned weights again through the
    same module hooks, and ``selective`` matches only the ops it keeps (module docstring).
    """
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"activation checkpointing: {mode!r} is not one of {ACTIVATION_CHECKPOINTING}")
    if mode == "none":
        return
    kwargs: dict = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = _selective_contexts
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
