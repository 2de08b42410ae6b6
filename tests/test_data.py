"""Sampler order/resume/rank sharding and padding, on shards written by the real ShardWriter."""

from __future__ import annotations

import json

import numpy as np
import pytest

from preprocess.shards import (
    FLAG_INFO_DENSE,
    FLAG_SUPERVISED,
    FORMAT_NAME,
    FORMAT_VERSION,
    ShardedDataset,
    ShardWriter,
)
from trainer.config import DataConfig
from trainer.data import BatchLoader, ResumableSampler, batch_rho, collate

EOS = 0


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards, 45 samples: sample i has length 5 + 7 i (some beyond 128), prompt of 4 tokens."""
    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    entries, k = [], 0
    for s, count in enumerate((20, 25)):
        w = ShardWriter(folder, s, vocab_size=4096)
        for _ in range(count):
            n = 5 + 7 * k
            tokens = rng.integers(2, 4096, n)
            flags = np.full(n, FLAG_SUPERVISED, np.uint8)
            flags[:4] = 0
            flags[4::3] |= FLAG_INFO_DENSE
            w.add(tokens, flags, domain=k % 3, key=f"s{k}")
            k += 1
        m = w.finish()
        entries.append({"name": m["name"], "num_samples": m["num_samples"]})
    (folder / "index.json").write_text(json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION,
                                                   "shards": entries, "vocab_size": 4096}))
    return ShardedDataset(folder)


def test_epoch_is_a_seeded_permutation_split_over_ranks():
    idx = np.arange(103)
    samplers = [ResumableSampler(idx, rank=r, world_size=4, micro_batch_size=5, seed=3) for r in range(4)]
    per_rank = [np.concatenate([s.next_indices() for _ in range(s.batches_per_epoch)]) for s in samplers]
    assert all(len(p) == 25 for p in per_rank)  # 103 // 4 = 25 each, 5 micro-batches of 5
    allx = np.concatenate(per_rank)
    assert len(set(allx.tolist())) == len(allx)  # disjoint across ranks
    again = ResumableSampler(idx, rank=2, world_size=4, micro_batch_size=5, seed=3)
    assert np.array_equal(np.concatenate([again.next_indices() for _ in range(5)]), per_rank[2])
    other_seed = ResumableSampler(idx, rank=2, world_size=4, micro_batch_size=5, seed=4)
    assert not np.array_equal(np.concatenate([other_seed.next_indices() for _ in range(5)]), per_rank[2])
    # the next epoch is a different permutation and the position says so
    nxt = samplers[0].next_indices()
    assert samplers[0].state.epoch == 1 and not np.array_equal(nxt, per_rank[0][:5])


def test_sampler_resume_continues_the_same_stream():
    idx = np.arange(50)
    a = ResumableSampler(idx, rank=1, world_size=2, micro_batch_size=3, seed=0)
    straight = [a.next_indices().tolist() for _ in range(20)]  # crosses an epoch boundary (8 per epoch)
    b = ResumableSampler(idx, rank=1, world_size=2, micro_batch_size=3, seed=0)
    first = [b.next_indices().tolist() for _ in range(11)]
    c = ResumableSampler(idx, rank=1, world_size=2, micro_batch_size=3, seed=0)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert first + [c.next_indices().tolist() for _ in range(9)] == straight


def test_sampler_resume_with_another_world_size_keeps_epoch_fraction():
    a = ResumableSampler(np.arange(100), rank=0, world_size=2, micro_batch_size=5, seed=0)
    for _ in range(5):  # half of the 50 samples of rank 0
        a.next_indices()
    b = ResumableSampler(np.arange(100), rank=0, world_size=4, micro_batch_size=5, seed=0)
    b.load_state_dict(a.state_dict())
    assert (b.state.epoch, b.state.offset) == (0, 10)  # half of 25, rounded down to a micro-batch
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(np.arange(100), rank=0, world_size=2, micro_batch_size=5, seed=1).load_state_dict(
            a.state_dict())


def test_too_few_samples_is_an_error():
    with pytest.raises(ValueError, match="cannot fill one micro-batch"):
        ResumableSampler(np.arange(3), rank=0, world_size=2, micro_batch_size=2, seed=0)


def test_collate_pads_with_supervised_eos_to_a_block_multiple():
    toks = [np.array([5, 6, 7]), np.arange(10, 80)]
    flags = [np.array([0, 1, 3], np.uint8), np.full(70, 1, np.uint8)]
    b = collate(toks, flags, max_length=64, block_size=32, eos_id=EOS)
    assert b["input_ids"].shape == (2, 64)  # 70 truncated to 64 (a block multiple)
    assert b["lengths"].tolist() == [3, 64]
    assert b["input_ids"][0, :3].tolist() == [5, 6, 7] and (b["input_ids"][0, 3:] == EOS).all()
    assert b["supervised"][0].tolist() == [False, True, True] + [True] * 61  # padding supervised
    assert b["dense"][0].tolist() == [False, False, True] + [False] * 61  # padding never dense
    assert b["input_ids"][1].tolist() == list(range(10, 74))
    short = collate(toks[:1], flags[:1], max_length=64, block_size=32, eos_id=EOS)
    assert short["input_ids"].shape == (1, 32)
    fixed = collate(toks[:1], flags[:1], max_length=64, block_size=32, eos_id=EOS, pad_to="max_length")
    assert fixed["input_ids"].shape == (1, 64)


def test_loader_reads_shards_and_applies_length_policy(shards):
    lengths = shards.lengths
    assert len(shards) == 45 and lengths[3] == 26
    trunc = BatchLoader(shards, DataConfig(path="x", max_length=128), block_size=32, eos_id=EOS, rank=0,
                        world_size=1, micro_batch_size=4, seed=0)
    n_long = int((lengths > 128).sum())
    assert trunc.n_too_long == n_long > 0 and trunc.n_dropped == 0
    seen = set()
    for _ in range(trunc.sampler.batches_per_epoch):
        b = next(trunc)
        assert b["input_ids"].shape[1] % 32 == 0 and b["input_ids"].shape[1] <= 128
        for row, i in enumerate(b["index"].tolist()):
            s = shards[i]
            n = min(len(s.tokens), 128)
            assert b["input_ids"][row, :n].tolist() == s.tokens[:n].tolist()
            assert b["supervised"][row, :n].numpy().tolist() == s.supervised[:n].tolist()
            assert b["dense"][row, :n].numpy().tolist() == s.info_dense[:n].tolist()
            assert b["domain"][row] == s.domain
            seen.add(i)
    assert len(seen) == 44  # 45 // 4 * 4
    drop = BatchLoader(shards, DataConfig(path="x", max_length=128, overflow="drop"), block_size=32,
                       eos_id=EOS, rank=0, world_size=1, micro_batch_size=4, seed=0)
    assert drop.n_dropped == n_long
    for _ in range(drop.sampler.batches_per_epoch):
        assert int(next(drop)["lengths"].max()) <= 128
    assert "dropped" in drop.summary()


def test_loader_state_roundtrip(shards):
    cfg = DataConfig(path="x", max_length=256)
    mk = lambda: BatchLoader(shards, cfg, block_size=32, eos_id=EOS, rank=1, world_size=2, micro_batch_size=2,
                             seed=5)
    a = mk()
    ref = [next(a)["index"].tolist() for _ in range(15)]
    b = mk()
    for _ in range(7):
        next(b)
    c = mk()
    c.load_state_dict(b.state_dict())
    assert [next(c)["index"].tolist() for _ in range(8)] == ref[7:]


def test_batch_rho_counts_real_supervised_tokens_only():
    b = collate([np.array([1, 2, 3, 4])], [np.array([0, 1, 3, 3], np.uint8)], max_length=32, block_size=32,
                eos_id=EOS)
    assert batch_rho(b) == pytest.approx(2 / 3)


def test_group_by_length_cuts_padding_keeps_the_epoch_and_resumes():
    rng = np.random.default_rng(3)
    lengths = rng.integers(20, 400, size=400)
    idx = np.arange(400)
    kw = dict(rank=0, world_size=1, micro_batch_size=4, seed=5, lengths=lengths)
    plain = ResumableSampler(idx, **kw)
    grouped = ResumableSampler(idx, **kw, group_by_length=8)
    a = np.concatenate([plain.next_indices() for _ in range(100)])
    batches = [grouped.next_indices() for _ in range(100)]
    b = np.concatenate(batches)
    assert sorted(a) == sorted(b) == list(range(400))  # the same epoch, every sample once
    width = lambda bs: sum(lengths[x].max() * len(x) for x in bs)  # noqa: E731
    assert width(batches) < 0.8 * width([a[i:i + 4] for i in range(0, 400, 4)])  # much less padding
    # each window of 8 micro-batches holds the same samples as the plain order, shuffled as batches
    for w in range(0, 400, 32):
        assert sorted(a[w:w + 32]) == sorted(b[w:w + 32])
    assert not all(lengths[x].max() <= lengths[y].min() for x, y in zip(batches, batches[1:8]))
    # resume at an offset continues the identical stream
    again = ResumableSampler(idx, **kw, group_by_length=8)
    again.load_state_dict({**grouped.state_dict(), "offset": 40})
    assert np.array_equal(again.next_indices(), b[40:44])
    with pytest.raises(ValueError, match="group_by_length needs"):
        ResumableSampler(idx, rank=0, world_size=1, micro_batch_size=4, seed=5, group_by_length=8)
    with pytest.raises(ValueError, match="data.group_by_length"):
        DataConfig(group_by_length=-1)
