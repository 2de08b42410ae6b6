"""Input readers: formats, field mappings, every reject reason, and the shard plan."""

from __future__ import annotations

import bz2
import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from preprocess.records import (
    BAD_MESSAGES,
    EMPTY_RESPONSE,
    MALFORMED_JSON,
    MISSING_FIELD,
    NOT_AN_OBJECT,
    UNKNOWN_DOMAIN,
    WRONG_TYPE,
    FieldMap,
    ReadStats,
    Record,
    Reject,
    expand_inputs,
    iter_records,
    shard_plan,
)
from preprocess.shards import Domain

GOOD = [{"id": f"r{i}", "domain": ["math", "code"][i % 2], "prompt": f"q{i} é", "response": f"a{i} 東"}
        for i in range(10)]


def _write_jsonl(path: Path, rows: list, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def _read_all(path: Path, fields: FieldMap | None = None, **kw) -> list[Record | Reject]:
    (src,) = expand_inputs([path])
    return list(iter_records(src, fields or FieldMap(), **kw))


@pytest.mark.parametrize("suffix,opener",
                         [(".jsonl", open), (".jsonl.gz", gzip.open), (".jsonl.bz2", bz2.open)])
def test_jsonl_plain_and_compressed(tmp_path: Path, suffix, opener):
    out = _read_all(_write_jsonl(tmp_path / f"d{suffix}", GOOD, opener))
    assert [r.key for r in out] == [g["id"] for g in GOOD]
    assert out[3].domain is Domain.CODE and out[3].prompt == "q3 é" and out[3].response == "a3 東"
    assert out[3].line == 4


def test_zstd_jsonl(tmp_path: Path):
    import zstandard

    raw = "".join(json.dumps(g) + "\n" for g in GOOD).encode()
    p = tmp_path / "d.jsonl.zst"
    p.write_bytes(zstandard.ZstdCompressor().compress(raw))
    assert [r.key for r in _read_all(p)] == [g["id"] for g in GOOD]


def test_parquet_and_saved_hf_dataset(tmp_path: Path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(GOOD), tmp_path / "d.parquet", row_group_size=3)
    out = _read_all(tmp_path / "d.parquet")
    assert [r.key for r in out] == [g["id"] for g in GOOD]
    # Parts of a parquet file: rows k with k % 3 == 1, reported with their 1-based row numbers.
    part = _read_all(tmp_path / "d.parquet", part=1, nparts=3)
    assert [r.line for r in part] == [2, 5, 8]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(GOOD)}).save_to_disk(str(tmp_path / "hf"))
    out = _read_all(tmp_path / "hf")
    assert [r.key for r in out] == [g["id"] for g in GOOD]
    part = _read_all(tmp_path / "hf", part=2, nparts=4)
    assert [r.key for r in part] == ["r2", "r6"] and [r.line for r in part] == [3, 7]


def test_every_reject_reason_with_location(tmp_path: Path):
    rows = [
        GOOD[0],
        '{"id": "broken", "prompt": "x"',  # malformed
        "[1, 2]",  # not an object
        {"id": "nores", "domain": "math", "prompt": "p"},  # missing response
        {"id": "num", "domain": "math", "prompt": "p", "response": 42},  # wrong type
        {"id": "empty", "domain": "math", "prompt": "p", "response": "  \n"},  # empty response
        {"id": "dom", "domain": "poetry", "prompt": "p", "response": "r"},  # unknown domain
        {"id": "nodom", "prompt": "p", "response": "r"},  # missing domain
        "",  # blank line: not a record, counted separately
        GOOD[1],
    ]
    p = _write_jsonl(tmp_path / "bad.jsonl", rows)
    stats = ReadStats()
    (src,) = expand_inputs([p])
    out = list(iter_records(src, FieldMap(), stats=stats))
    rejects = [r for r in out if isinstance(r, Reject)]
    got = [(r.line, r.reason, r.field) for r in rejects]
    assert got == [(2, MALFORMED_JSON, None), (3, NOT_AN_OBJECT, None), (4, MISSING_FIELD, "response"),
                   (5, WRONG_TYPE, "response"), (6, EMPTY_RESPONSE, "response"),
                   (7, UNKNOWN_DOMAIN, "domain"), (8, MISSING_FIELD, "domain")]
    assert all(r.source == "bad.jsonl" for r in rejects)
    assert [r.key for r in out if isinstance(r, Record)] == ["r0", "r1"]
    assert stats.blank_lines == 1 and stats.seen == 9
    assert json.loads(json.dumps(rejects[2].to_json()))["field"] == "response"


def test_messages_mapping_and_bad_messages(tmp_path: Path):
    ok = {"id": "m", "messages": [{"role": "system", "content": "be brief"},
                                  {"role": "user", "content": "2+2?"},
                                  {"role": "assistant", "content": "4"}]}
    bad = [{"id": "b1", "messages": "hi"},
           {"id": "b2", "messages": [{"role": "user", "content": "x"}]},
           {"id": "b3", "messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]},
           {"id": "b4", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
           {"id": "b5"}]
    p = _write_jsonl(tmp_path / "chat.jsonl", [ok, *bad])
    out = _read_all(p, FieldMap(messages="messages", domain="math"))
    assert isinstance(out[0], Record)
    assert out[0].response == "4" and out[0].messages == ok["messages"][:2] and out[0].domain is Domain.MATH
    assert [(r.key, r.reason) for r in out[1:]] == [("b1", BAD_MESSAGES), ("b2", BAD_MESSAGES),
                                                    ("b3", BAD_MESSAGES), ("b4", EMPTY_RESPONSE),
                                                    ("b5", MISSING_FIELD)]


def test_custom_fields_default_domain_and_location_keys(tmp_path: Path):
    rows = [{"question": "q", "answer": "a"}, {"question": "q2", "answer": "a2"}]
    p = _write_jsonl(tmp_path / "gsm.jsonl", rows)
    out = _read_all(p, FieldMap(prompt="question", response="answer", domain="math"))
    assert [(r.key, r.domain) for r in out] == [("gsm.jsonl:1", Domain.MATH), ("gsm.jsonl:2", Domain.MATH)]


def test_expand_inputs_directory_order_and_errors(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    _write_jsonl(tmp_path / "sub" / "b.jsonl", GOOD[:1])
    _write_jsonl(tmp_path / "a.jsonl.gz", GOOD[:1], gzip.open)
    (tmp_path / "notes.txt").write_text("ignored")
    names = [s.name for s in expand_inputs([tmp_path])]
    assert names == ["a.jsonl.gz", "b.jsonl"]
    assert [s.name for s in expand_inputs([str(tmp_path / "**" / "*.jsonl*")])] == ["a.jsonl.gz", "b.jsonl"]
    with pytest.raises(FileNotFoundError):
        expand_inputs([tmp_path / "nope.jsonl"])
    with pytest.raises(ValueError, match="unsupported"):
        expand_inputs([tmp_path / "notes.txt"])


@pytest.mark.parametrize("num_sources,num_shards", [(1, 1), (1, 8), (3, 8), (8, 8), (20, 8), (5, 3)])
def test_shard_plan_is_a_partition(num_sources, num_shards):
    """Every record (source j, record k) lands in exactly one shard; each shard reads few sources."""
    records_per_source = 37
    owner: Counter[tuple[int, int]] = Counter()
    for s in range(num_shards):
        plan = shard_plan(num_sources, num_shards, s)
        if num_sources < num_shards:
            assert len(plan) == 1  # one file per task even when files are fewer than shards
        for j, part, nparts in plan:
            for k in range(records_per_source):
                if k % nparts == part:
                    owner[(j, k)] += 1
    assert set(owner.values()) == {1}
    assert len(owner) == num_sources * records_per_source
