"""The shard format: round trip, dtype choice, memory-mapped random access, crash safety, verify."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from preprocess.shards import (
    FLAG_INFO_DENSE,
    FLAG_SELECTED,
    FLAG_SUPERVISED,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    MAGIC,
    DType,
    ShardedDataset,
    ShardWriter,
    clean_partial,
    manifest_name,
    sha256_file,
    shard_files,
    shard_is_complete,
    smallest_token_dtype,
)
from preprocess.shards_verify import verify


def _random_samples(rng: np.random.Generator, n: int, vocab: int) -> list[tuple]:
    out = []
    for i in range(n):
        length = int(rng.integers(2, 40))
        tokens = rng.integers(0, vocab, size=length)
        n_prompt = int(rng.integers(0, length - 1))
        flags = np.zeros(length, dtype=np.uint8)
        flags[n_prompt:] = FLAG_SUPERVISED
        dense = rng.random(length) < 0.3
        flags[n_prompt:][dense[n_prompt:]] |= FLAG_INFO_DENSE
        if i % 3 == 0:
            flags |= FLAG_SELECTED
        out.append((tokens, flags, i % 3, f"sample-{i}-ü€"))
    return out


def _write_folder(folder: Path, shards: list[list[tuple]], vocab: int) -> None:
    entries = []
    for k, samples in enumerate(shards):
        w = ShardWriter(folder, k, vocab)
        for s in samples:
            w.add(*s)
        m = w.finish({"config_fingerprint": "test"})
        entries.append({"name": m["name"], "num_samples": m["num_samples"], "num_tokens": m["num_tokens"],
                        "manifest_sha256": sha256_file(folder / manifest_name(m["name"]))})
    index = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "vocab_size": vocab, "shards": entries,
             "num_samples": sum(e["num_samples"] for e in entries),
             "num_tokens": sum(e["num_tokens"] for e in entries), "rho": {"math": 0.3}}
    (folder / INDEX_FILE).write_text(json.dumps(index))


def test_smallest_dtype_boundaries():
    assert smallest_token_dtype(4096) is DType.UINT16
    assert smallest_token_dtype(65536) is DType.UINT16  # ids 0..65535 fit
    assert smallest_token_dtype(65537) is DType.UINT32
    assert smallest_token_dtype(151_936) is DType.UINT32  # Qwen-size vocab
    with pytest.raises(ValueError):
        smallest_token_dtype(0)


@pytest.mark.parametrize("vocab", [4096, 70_000])
def test_round_trip(tmp_path: Path, vocab: int):
    rng = np.random.default_rng(0)
    shards = [_random_samples(rng, 50, vocab), [], _random_samples(rng, 7, vocab)]  # includes an empty shard
    _write_folder(tmp_path, shards, vocab)
    ds = ShardedDataset(tmp_path)
    flat = [s for shard in shards for s in shard]
    assert len(ds) == len(flat) == 57
    assert ds.index["vocab_size"] == vocab and ds.rho == {"math": 0.3}
    expected_dtype = np.uint16 if vocab <= 65536 else np.uint32
    for i, (tokens, flags, domain, key) in enumerate(flat):
        s = ds[i]
        assert s.tokens.dtype == expected_dtype
        np.testing.assert_array_equal(s.tokens, tokens)
        np.testing.assert_array_equal(s.flags, flags)
        assert s.domain == domain and s.sample_id == key
        assert s.selected == bool(flags[0] & FLAG_SELECTED)
    np.testing.assert_array_equal(ds.lengths, [len(s[0]) for s in flat])
    np.testing.assert_array_equal(ds.domains, [s[2] for s in flat])
    assert ds[-1].sample_id == flat[-1][3]
    assert ds.find("sample-5-ü€") == 5 and ds.find(flat[20][3]) == 20 and ds.find("sample-49-ü€") == 49
    assert ds.find("sample-5") is None and ds.find("nope") is None  # prefixes are not matches
    with pytest.raises(IndexError):
        ds[57]
    # Picklable for DataLoader workers: the copy re-maps lazily and reads the same data.
    ds2 = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(ds2[30].tokens, flat[30][0])
    assert verify(tmp_path) == []


def test_files_are_memory_mapped_and_header_is_documented(tmp_path: Path):
    rng = np.random.default_rng(1)
    _write_folder(tmp_path, [_random_samples(rng, 5, 4096)], 4096)
    ds = ShardedDataset(tmp_path)
    s = ds[0]
    assert isinstance(s.tokens.base, np.memmap) or isinstance(s.tokens, np.memmap)
    raw = (tmp_path / shard_files("shard_00000")["idx"]).read_bytes()
    assert raw[:8] == MAGIC
    assert int.from_bytes(raw[8:12], "little") == FORMAT_VERSION
    assert raw[12] == DType.UINT16
    n = int.from_bytes(raw[16:24], "little")
    assert n == 5
    # Tokens file is exactly n_tokens little-endian uint16 values.
    tok_bytes = (tmp_path / shard_files("shard_00000")["tokens"]).read_bytes()
    assert len(tok_bytes) == 2 * int(ds.lengths.sum())


def test_unfinished_writer_publishes_nothing(tmp_path: Path):
    w = ShardWriter(tmp_path, 3, 4096)
    w.add(np.array([5, 6, 0]), np.array([0, 1, 1], dtype=np.uint8), 2, "k")
    w._tokens.flush()  # simulate data reaching the disk before a kill -9
    names = shard_files("shard_00003")
    assert not any((tmp_path / n).exists() for n in names.values())
    assert not shard_is_complete(tmp_path, "shard_00003")
    removed = clean_partial(tmp_path, "shard_00003")
    assert removed and not list(tmp_path.glob("*.tmp*"))


def test_writer_rejects_inconsistent_sample(tmp_path: Path):
    w = ShardWriter(tmp_path, 0, 4096)
    with pytest.raises(ValueError):
        w.add(np.array([1, 2]), np.array([1], dtype=np.uint8), 0, "x")
    with pytest.raises(ValueError):
        w.add(np.array([], dtype=np.int64), np.array([], dtype=np.uint8), 0, "x")
    w.abort()
    assert not list(tmp_path.iterdir())


@pytest.fixture
def healthy(tmp_path: Path) -> Path:
    rng = np.random.default_rng(2)
    _write_folder(tmp_path, [_random_samples(rng, 20, 4096), _random_samples(rng, 20, 4096)], 4096)
    assert verify(tmp_path) == []
    return tmp_path


def _problems(folder: Path) -> str:
    return "\n".join(verify(folder))


def test_verify_detects_flipped_token_byte(healthy: Path):
    p = healthy / shard_files("shard_00001")["tokens"]
    data = bytearray(p.read_bytes())
    data[10] ^= 0xFF
    p.write_bytes(bytes(data))
    out = _problems(healthy)
    assert "shard_00001" in out and "sha256 mismatch" in out and "tokens.bin" in out
    assert verify(healthy, deep=False) == []  # sizes and offsets alone cannot see it


def test_verify_detects_truncation_and_missing_files(healthy: Path):
    p = healthy / shard_files("shard_00000")["flags"]
    p.write_bytes(p.read_bytes()[:-3])
    (healthy / shard_files("shard_00001")["keys"]).unlink()
    out = _problems(healthy)
    assert "shard_00000: shard_00000.flags.bin has" in out
    assert "shard_00001: keys file shard_00001.keys.bin missing" in out


def test_verify_detects_semantic_errors_behind_valid_checksums(tmp_path: Path):
    bad = [(np.array([1, 2, 3]), np.array([0, FLAG_INFO_DENSE, 1], dtype=np.uint8), 0, "dense-unsupervised"),
           (np.array([1, 2, 3]), np.array([0, 1, 0], dtype=np.uint8), 0, "no-final-supervised"),
           (np.array([1, 4000, 3]), np.array([0, 1, 1 | 64], dtype=np.uint8), 7, "unknown-bits-domain")]
    _write_folder(tmp_path, [bad], 4096)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["vocab_size"] = 1000  # token 4000 is now out of range
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    out = _problems(tmp_path)
    assert "unknown domain codes at samples [2]" in out
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    # Domain problems stop the token scan; fix the domain to see the token-level problems.
    tmp2 = tmp_path / "b"
    bad[2] = (bad[2][0], bad[2][1], 1, bad[2][3])
    _write_folder(tmp2, [bad], 4096)
    index2 = json.loads((tmp2 / INDEX_FILE).read_text())
    index2["vocab_size"] = 1000
    (tmp2 / INDEX_FILE).write_text(json.dumps(index2))
    out = _problems(tmp2)
    assert "token id 4000 >= vocab_size 1000" in out
    assert "unknown flag bits" in out
    assert "INFO_DENSE without SUPERVISED" in out
    assert "samples [1] do not end with a supervised token" in out


def test_verify_reports_leftovers_missing_manifest_and_index(healthy: Path):
    (healthy / "shard_00005.tokens.bin.tmp").write_bytes(b"x")
    (healthy / manifest_name("shard_00001")).unlink()
    out = _problems(healthy)
    assert "leftover temporary file" in out
    assert "shard_00001: manifest shard_00001.json missing" in out
    assert "num_samples" in out  # totals in index.json no longer add up
    (healthy / "shard_00009.json").write_text("{}")
    assert "shard_00009: shard on disk but not listed in index.json" in _problems(healthy)
    (healthy / INDEX_FILE).unlink()
    assert "index.json missing" in _problems(healthy)


def test_verify_detects_bad_magic_even_with_matching_checksum(healthy: Path):
    p = healthy / shard_files("shard_00000")["idx"]
    data = bytearray(p.read_bytes())
    data[0:8] = b"NOTMAGIC"
    p.write_bytes(bytes(data))
    m = json.loads((healthy / manifest_name("shard_00000")).read_text())
    m["files"]["idx"]["sha256"] = sha256_file(p)
    (healthy / manifest_name("shard_00000")).write_text(json.dumps(m))
    assert "bad magic" in _problems(healthy)


def test_dataset_refuses_missing_or_foreign_index(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        ShardedDataset(tmp_path)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"format": "other", "version": 1, "shards": []}))
    with pytest.raises(ValueError, match="format"):
        ShardedDataset(tmp_path)


def test_verify_detects_mixed_selected_bit(tmp_path: Path):
    samples = [(np.array([1, 2, 3]), np.array([4, 5, 5], dtype=np.uint8), 2, "uniform"),
               (np.array([1, 2, 3]), np.array([0, 5, 1], dtype=np.uint8), 2, "mixed"),
               (np.array([7, 8]), np.array([0, 1], dtype=np.uint8), 1, "unselected")]
    _write_folder(tmp_path, [samples], 4096)
    assert "SELECTED bit not uniform inside samples [1]" in _problems(tmp_path)
