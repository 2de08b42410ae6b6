"""Input readers: formats, field mappings, every reject reason, and the shard plan."""

from __future__ import annotations

import bz2
import gzip
import json
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
)
from preprocess.shards import Domain
from preprocess.splits import plan_shards

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
    # Split by row groups (3+3+3+1 rows): each shard reads whole groups, rows keep their numbers.
    (src,) = expand_inputs([tmp_path / "d.parquet"])
    plan = plan_shards([src], 2)
    parts = [[r.line for u in units for r in iter_records(src, FieldMap(), unit=u)] for units in plan]
    assert parts[0] + parts[1] == list(range(1, 11)) and len(parts[0]) % 3 == 0 and parts[1]
    ds = datasets.Dataset.from_list(GOOD)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"), max_shard_size=300)
    out = _read_all(tmp_path / "hf")
    assert [r.key for r in out] == [g["id"] for g in GOOD]
    # Split by Arrow files: every shard reads its own files, rows keep their numbers.
    (src,) = expand_inputs([tmp_path / "hf"])
    plan = plan_shards([src], 3)
    assert sum(u.end - u.start for units in plan for u in units) > 1  # several Arrow files
    got = [r for units in plan for u in units for r in iter_records(src, FieldMap(), unit=u)]
    assert [r.key for r in got] == [g["id"] for g in GOOD] and [r.line for r in got] == list(range(1, 11))


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


def _units_read(sources, num_shards: int) -> tuple[list[list], ReadStats]:
    stats = ReadStats()
    out = [[(r.source, r.line, r.key) for u in units
            for r in iter_records(sources[u.source], FieldMap(), stats, u)]
           for units in plan_shards(sources, num_shards)]
    return out, stats


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7, 40])
def test_byte_ranges_cover_every_line_once(tmp_path: Path, num_shards: int):
    """CRLF endings, a last line without newline, multi-byte UTF-8 on every border, a blank line,
    a malformed one: the byte ranges give back every line once, in order, with its true number."""
    rows = [json.dumps({"id": f"r{i}", "domain": "math", "prompt": "p", "response": "東é" * (i % 13 + 1)},
                       ensure_ascii=False) for i in range(120)]
    rows[7], rows[30] = "{broken", ""
    p = tmp_path / "crlf.jsonl"
    p.write_bytes("\r\n".join(rows).encode("utf-8"))  # no newline after the last line
    sources = expand_inputs([p])
    whole = [(r.source, r.line, r.key) for r in iter_records(sources[0], FieldMap())]
    assert len(whole) == 119 and whole[-1][1] == 120 and whole[7][1] == 8
    parts, stats = _units_read(sources, num_shards)
    assert [x for part in parts for x in part] == whole
    assert stats.blank_lines == 1 and stats.seen == 119
    size = p.stat().st_size
    # Each border re-reads at most the rest of one line (the next range skips it).
    assert size <= stats.bytes_read <= size + (num_shards - 1) * max(len(r) + 2 for r in rows)


def test_every_border_position(tmp_path: Path):
    """Cut a small file at every byte: no line lost, none doubled, numbers right."""
    p = tmp_path / "x.jsonl"
    text = '{"id": "a", "domain": "math", "prompt": "", "response": "ü1"}\n\n' \
           '{"id": "b", "domain": "code", "prompt": "", "response": "東2"}\r\n' \
           '{"id": "c", "domain": "math", "prompt": "", "response": "3"}'
    p.write_bytes(text.encode())
    (src,) = expand_inputs([p])
    from preprocess.records import Unit
    from preprocess.splits import count_lines_before

    size = p.stat().st_size
    for cut in range(1, size):
        base = count_lines_before(p, [cut])[cut]
        got = [(r.key, r.line) for u in (Unit(0, 0, cut, cut), Unit(0, cut, size, size - cut, base))
               for r in iter_records(src, FieldMap(), unit=u)]
        assert got == [("a", 1), ("b", 3), ("c", 4)], cut


def test_plan_balances_bytes_and_keeps_input_order(tmp_path: Path):
    """Three unequal plain files into 4 shards: equal bytes per shard; compressed files go whole."""
    for name, n in (("a.jsonl", 50), ("b.jsonl", 300), ("c.jsonl", 90)):
        _write_jsonl(tmp_path / name, [dict(g, id=f"{name}-{i}") for i in range(n) for g in GOOD[:1]])
    sources = expand_inputs([tmp_path])
    plan = plan_shards(sources, 4)
    sizes = [sum(u.nbytes for u in units) for units in plan]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == sum(s.path.stat().st_size for s in sources)
    parts, _ = _units_read(sources, 4)
    counts = [len(x) for x in parts]
    assert max(counts) / (sum(counts) / 4) < 1.05
    assert [x for part in parts for x in part] == _units_read(sources, 1)[0][0]  # input order kept
    (tmp_path / "z").mkdir()
    for i in range(4):
        _write_jsonl(tmp_path / "z" / f"{i}.jsonl.gz", GOOD, gzip.open)
    plan = plan_shards(expand_inputs([tmp_path / "z"]), 2)
    assert [[(u.source, u.start) for u in units] for units in plan] == [[(0, 0), (1, 0)], [(2, 0), (3, 0)]]


def test_split_input_rewrites_one_compressed_file(tmp_path: Path):
    import zstandard

    from preprocess.splits import split_input

    raw = "".join(json.dumps(dict(g, id=f"{i}-{g['id']}")) + "\n" for i in range(200) for g in GOOD).encode()
    big = tmp_path / "big.jsonl.zst"
    big.write_bytes(zstandard.ZstdCompressor().compress(raw))
    parts = split_input(big, tmp_path / "parts", 4)
    assert [q.name for q in parts] == [f"big.{i:05d}-of-00004.jsonl.zst" for i in range(4)]
    keys = [r.key for s in expand_inputs([tmp_path / "parts"]) for r in iter_records(s, FieldMap())]
    assert keys == [r.key for r in _read_all(big)]
    sizes = [len(zstandard.ZstdDecompressor().decompressobj().decompress(q.read_bytes())) for q in parts]
    assert min(sizes) > 0


def test_imbalance_note_recommends_split_input(tmp_path: Path):
    from preprocess.splits import imbalance_note

    _write_jsonl(tmp_path / "big.jsonl.gz", [dict(GOOD[0], id=f"b{i}") for i in range(500)], gzip.open)
    _write_jsonl(tmp_path / "small.jsonl", GOOD)
    sources = expand_inputs([tmp_path])
    note = imbalance_note(sources, plan_shards(sources, 4))
    assert note is not None and "big.jsonl.gz cannot be split" in note
    assert "dm-preprocess split-input" in note and "--parts 4" in note
    assert imbalance_note(sources[1:], plan_shards(sources[1:], 4)) is None  # plain files split evenly
