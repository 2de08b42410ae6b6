"""From memory-mapped shards to padded micro-batches: a rank-aware, seeded, resumable sampler.

Order: epoch ``e`` uses the permutation ``default_rng([seed, e]).permutation(kept)`` of the kept
sample indices; rank ``r`` of ``W`` takes ``perm[r::W]`` cut to ``len(kept) // W`` so every rank has
the same number of micro-batches, and micro-batch ``j`` is its slice ``[j B, (j + 1) B)``.  A trailing
partial micro-batch is skipped (every rank must run the same number of collectives).  The whole
position is two integers (``epoch``, ``offset``), saved in checkpoints: resuming rebuilds the same
permutation and continues at the same sample, and a run resumed with another world size keeps the
epoch and the fraction of it already consumed.

Length policy (``data.max_length``, a block multiple): samples longer are truncated to their first
max_length tokens (``overflow=truncate``; the EOS and the end of the response are lost, counted at
start) or removed from the epoch (``overflow=drop``; counted).  No packing: a bidirectional
diffusion model would attend across packed samples.  Each micro-batch is padded with EOS to its
longest sample rounded up to a block (or to max_length with ``pad_to=max_length``); padding is
flagged supervised and not info-dense, so it is maskable and trained, as LLaDA and dFactory do: the
model learns to end an answer by filling the rest of the block with EOS.

Cost: a micro-batch is a few memmap slices and one numpy copy, far below a training step (every
metrics record has ``data_s`` next to ``step_s``), so batches are built synchronously in the training
process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from preprocess.shards import FLAG_INFO_DENSE, FLAG_SUPERVISED, ShardedDataset
from trainer.config import DataConfig
from trainer.masking import num_blocks


@dataclass(slots=True)
class SamplerState:
    """Position of the sampler: where the next micro-batch starts."""

    epoch: int = 0
    offset: int = 0
    """Samples of this rank's share of the epoch already consumed."""


class ResumableSampler:
    """Deterministic per-epoch permutation, sharded over ranks, with a saveable position."""

    def __init__(self, indices: np.ndarray, *, rank: int, world_size: int, micro_batch_size: int,
                 seed: int, shuffle: bool = True, lengths: np.ndarray | None = None,
                 group_by_length: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.indices = np.asarray(indices, dtype=np.int64)
        self.rank, self.world_size, self.batch = rank, world_size, micro_batch_size
        self.seed, self.shuffle = seed, shuffle
        if group_by_length and lengths is None:
            raise ValueError("group_by_length needs the sample lengths")
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.group = int(group_by_length)
        self.per_rank = len(self.indices) // world_size
        self.batches_per_epoch = self.per_rank // micro_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"data: {len(self.indices)} usable samples cannot fill one micro-batch of "
                             f"{micro_batch_size} on each of {world_size} ranks")
        self.state = SamplerState()
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    def _rank_order(self, epoch: int) -> np.ndarray:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.indices) if self.shuffle
                     else self.indices)
            mine = order[self.rank::self.world_size][:self.per_rank]
            if self.group:
                mine = self._group_by_length(mine, epoch)
            self._epoch_cache = (epoch, mine)
        return self._epoch_cache[1]

    def _group_by_length(self, order: np.ndarray, epoch: int) -> np.ndarray:
        """Sort each window of ``group`` micro-batches by length, then shuffle whole micro-batches in it.

        Why: a micro-batch is padded to its longest sample, so random batches of 4 waste about a third
        of the model's tokens on EOS padding; neighbours in length waste little.  Windows keep the
        epoch's randomness (which samples meet) and the batch shuffle keeps long and short batches
        mixed in time.  Deterministic in (seed, epoch), so (epoch, offset) still resumes exactly.
        """
        out = order.copy()
        b, span = self.batch, self.group * self.batch
        rng = np.random.default_rng([self.seed, epoch, 1])
        usable = len(order) // b * b
        for start in range(0, usable, span):
            end = min(start + span, usable)
            win = order[start:end]
            win = win[np.argsort(self.lengths[win], kind="stable")]
            perm = rng.permutation((end - start) // b)
            out[start:end] = win.reshape(-1, b)[perm].reshape(-1)
        return out

    def next_indices(self) -> np.ndarray:
        """Global sample indices of the next micro-batch; advances the position."""
        if self.state.offset + self.batch > self.per_rank:
            self.state = SamplerState(self.state.epoch + 1, 0)
        order = self._rank_order(self.state.epoch)
        out = order[self.state.offset:self.state.offset + self.batch]
        self.state.offset += self.batch
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.state.epoch, "offset": self.state.offset, "world_size": self.world_size,
                "per_rank": self.per_rank, "seed": self.seed, "num_indices": len(self.indices)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed or state.get("num_indices", len(self.indices)) != len(
                self.indices):
            raise ValueError(f"sampler state is for seed {state.get('seed')} over {state.get('num_indices')} "
                             f"samples, this run has seed {self.seed} over {len(self.indices)}: the data or "
                             f"train.seed changed since the checkpoint")
        offset = int(state["offset"])
        if state.get("world_size", self.world_size) != self.world_size:
            # Keep the fraction of the epoch already seen, rounded down to a micro-batch.
            frac = offset / max(1, int(state["per_rank"]))
            offset = int(frac * self.per_rank) // self.batch * self.batch
        self.state = SamplerState(int(state["epoch"]), offset)


def collate(tokens: list[np.ndarray], flags: list[np.ndarray], *, max_length: int, block_size: int,
            eos_id: int, pad_to: str = "batch") -> dict[str, torch.Tensor]:
    """Truncate, pad with supervised EOS to a block multiple and stack -> tensors [B, L].

    Returns input_ids (int64), supervised / dense (bool), lengths (real tokens per row, int64).
    """
    lengths = np.array([min(len(t), max_length) for t in tokens], dtype=np.int64)
    if pad_to == "max_length":
        width = max_length
    else:
        width = num_blocks(int(lengths.max()), block_size) * block_size
    b = len(tokens)
    ids = np.full((b, width), eos_id, dtype=np.int64)
    fl = np.full((b, width), FLAG_SUPERVISED, dtype=np.uint8)  # padding: supervised EOS, not dense
    for i, (t, f) in enumerate(zip(tokens, flags)):
        n = lengths[i]
        ids[i, :n] = t[:n]
        fl[i, :n] = f[:n]
    return {"input_ids": torch.from_numpy(ids),
            "supervised": torch.from_numpy((fl & FLAG_SUPERVISED) != 0),
            "dense": torch.from_numpy((fl & FLAG_INFO_DENSE) != 0),
            "lengths": torch.from_numpy(lengths)}


class BatchLoader:
    """Endless stream of micro-batches for one rank, resumable through ``state_dict``."""

    def __init__(self, dataset: ShardedDataset, cfg: DataConfig, *, block_size: int, eos_id: int, rank: int,
                 world_size: int, micro_batch_size: int, seed: int) -> None:
        if cfg.max_length % block_size:
            raise ValueError(f"data.max_length {cfg.max_length} is not a multiple of block size {block_size}")
        self.dataset, self.cfg, self.block_size, self.eos_id = dataset, cfg, block_size, eos_id
        lengths = dataset.lengths
        too_long = lengths > cfg.max_length
        self.n_too_long = int(too_long.sum())
        if cfg.overflow == "drop":
            kept = np.flatnonzero(~too_long)
        else:
            kept = np.arange(len(dataset))
        self.n_dropped = len(dataset) - len(kept)
        self.sampler = ResumableSampler(kept, rank=rank, world_size=world_size,
                                        micro_batch_size=micro_batch_size, seed=seed, shuffle=cfg.shuffle,
                                        lengths=np.minimum(lengths, cfg.max_length),
                                        group_by_length=cfg.group_by_length)

    def summary(self) -> str:
        """One line for the run log: what the length policy did to this dataset."""
        verb = "dropped" if self.cfg.overflow == "drop" else "truncated"
        return (f"{len(self.dataset)} samples, {self.n_too_long} longer than {self.cfg.max_length} tokens "
                f"({verb}), {self.sampler.batches_per_epoch} micro-batches/rank/epoch")

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        idx = self.sampler.next_indices()
        samples = [self.dataset[int(i)] for i in idx]
        batch = collate([s.tokens for s in samples], [s.flags for s in samples],
                        max_length=self.cfg.max_length, block_size=self.block_size, eos_id=self.eos_id,
                        pad_to=self.cfg.pad_to)
        batch["domain"] = torch.tensor([s.domain for s in samples], dtype=torch.uint8)
        batch["index"] = torch.from_numpy(idx.copy())
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def batch_rho(batch: dict[str, torch.Tensor]) -> float:
    """Info-dense share of the real (non-padding) supervised tokens of a batch."""
    real = torch.arange(batch["input_ids"].shape[1])[None] < batch["lengths"][:, None]
    sup = batch["supervised"] & real
    return float((batch["dense"] & sup).sum()) / max(1, int(sup.sum()))
