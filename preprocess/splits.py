"""Work splitting by bytes: which ``records.Unit`` pieces of which sources each shard reads.

The inputs are laid end to end as one stream of input bytes and cut into ``num_shards`` equal
stretches; shard ``k`` reads stretch ``k``.  What can be cut is cut exactly where the stretch
ends -- plain JSONL at any byte (a line belongs to the range it starts in) -- and what cannot
goes whole to the shard whose stretch holds its middle byte: a Parquet row group, an Arrow file
of a saved HF dataset, a compressed stream (.gz/.bz2/.xz/.zst: decompression has to start at
the beginning).  Hence:

- every input byte is read by exactly one task (plus the tail of the one line that crosses each
  cut, which the next range skips);
- shards hold equal input bytes, the proxy for equal tokens, to within one indivisible piece;
  one huge compressed file is one piece, so ``split_input`` rewrites it into many first;
- concatenating the shards in order gives all records in input order, whatever ``num_shards``;
- the plan depends only on the source list, the file sizes and Parquet/Arrow metadata, never on
  workers or timing.

The only extra read is a newline count up to each cut inside a plain file (``bytes.count`` on
large blocks, once per file, in the driver), which makes reported line numbers the file's own.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from preprocess.records import (
    COMPRESSED,
    Source,
    Unit,
    arrow_rows,
    hf_arrow_files,
    is_splittable,
    row_group_bytes,
)


@dataclass(frozen=True, slots=True)
class _Piece:
    """An atom of the input stream: a plain file (cuttable) or an indivisible piece."""

    source: int
    start: int
    end: int
    nbytes: int
    cuttable: bool
    line_base: int = 0


def _pieces(sources: list[Source]) -> list[_Piece]:
    out: list[_Piece] = []
    for j, src in enumerate(sources):
        if src.kind == "parquet":
            import pyarrow.parquet as pq

            md = pq.ParquetFile(src.path).metadata
            rows = 0
            for g in range(md.num_row_groups):
                rg = md.row_group(g)
                out.append(_Piece(j, g, g + 1, row_group_bytes(md, g), False, rows))
                rows += rg.num_rows
        elif src.kind == "hf_disk":
            rows = 0
            for i, f in enumerate(hf_arrow_files(src)):
                out.append(_Piece(j, i, i + 1, f.stat().st_size, False, rows))
                rows += arrow_rows(f)
        else:
            size = src.path.stat().st_size
            out.append(_Piece(j, 0, size, size, is_splittable(src)))
    return out


def plan_shards(sources: list[Source], num_shards: int) -> list[list[Unit]]:
    """Units of every shard, in input order (see the module docstring for the rules)."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    pieces = _pieces(sources)
    total = sum(p.nbytes for p in pieces)
    cuts = [k * total // num_shards for k in range(num_shards + 1)]
    plan: list[list[Unit]] = [[] for _ in range(num_shards)]
    g = 0  # global offset of the piece in the input stream
    for p in pieces:
        if p.cuttable:
            k = bisect.bisect_right(cuts, g) - 1
            while k < num_shards and cuts[k] < g + p.nbytes:
                lo, hi = max(cuts[k], g), min(cuts[k + 1], g + p.nbytes)
                if hi > lo:
                    plan[k].append(Unit(p.source, lo - g, hi - g, hi - lo))
                k += 1
        else:
            k = min(max(bisect.bisect_right(cuts, g + p.nbytes // 2) - 1, 0), num_shards - 1)
            last = plan[k][-1] if plan[k] else None
            if last is not None and last.source == p.source and last.end == p.start:
                plan[k][-1] = replace(last, end=p.end, nbytes=last.nbytes + p.nbytes)
            else:
                plan[k].append(Unit(p.source, p.start, p.end, p.nbytes, p.line_base))
        g += p.nbytes
    return _with_line_bases(sources, plan)


def _with_line_bases(sources: list[Source], plan: list[list[Unit]]) -> list[list[Unit]]:
    """Fill ``line_base`` of byte ranges that start inside a plain file: one newline-counting pass
    per such file, up to its last cut."""
    cuts: dict[int, set[int]] = {}
    for units in plan:
        for u in units:
            if u.start > 0 and is_splittable(sources[u.source]):
                cuts.setdefault(u.source, set()).add(u.start)
    bases = {j: count_lines_before(sources[j].path, sorted(c)) for j, c in cuts.items()}
    return [[replace(u, line_base=bases[u.source][u.start]) if u.start in bases.get(u.source, {}) else u
             for u in units] for units in plan]


def count_lines_before(path: Path, starts: list[int], block: int = 1 << 24) -> dict[int, int]:
    """For each byte offset ``s`` (sorted, > 0): the number of lines that start before ``s``, i.e.
    1 + the newlines in ``[0, s - 1)``; the first line starting at or after ``s`` is that + 1."""
    out: dict[int, int] = {}
    newlines = pos = 0
    with open(path, "rb", buffering=0) as f:
        for s in starts:
            stop = s - 1
            while pos < stop:
                chunk = f.read(min(block, stop - pos))
                if not chunk:
                    break
                newlines += chunk.count(b"\n")
                pos += len(chunk)
            out[s] = 1 + newlines
    return out


def plan_balance(plan: list[list[Unit]]) -> float:
    """Largest shard's input bytes / mean shard's (1.0 = perfect balance)."""
    sizes = [sum(u.nbytes for u in units) for units in plan]
    mean = sum(sizes) / len(sizes)
    return max(sizes) / mean if mean else 1.0


def imbalance_note(sources: list[Source], plan: list[list[Unit]], tolerance: float = 0.10) -> str | None:
    """One line of advice when some shard gets more than ``1 + tolerance`` times the mean input
    bytes (only indivisible pieces cause that: big compressed files, few Parquet row groups)."""
    balance = plan_balance(plan)
    if balance <= 1 + tolerance:
        return None
    sizes = [sum(u.nbytes for u in units) for units in plan]
    heavy = plan[sizes.index(max(sizes))]
    biggest = max(heavy, key=lambda u: u.nbytes)
    src = sources[biggest.source]
    fix = (f"dm-preprocess split-input {src.path} --parts {len(plan)} --output <folder>"
           if src.kind == "jsonl" else "rewrite it with smaller row groups / more files")
    return (f"note: unbalanced shards (largest {balance:.1f}x the mean input bytes): {src.name} cannot be "
            f"split ({src.kind}, {biggest.nbytes / 1e6:,.0f} MB in one piece); for parallel work: {fix}")


# ------------------------------------------------------------------------------- split-input helper


def split_input(path: Path | str, out_dir: Path | str, parts: int) -> list[Path]:
    """Rewrite one (compressed) JSONL file into ``parts`` files of about equal compressed size,
    cut at line ends and compressed like the input (``<stem>.00000-of-00008.jsonl.zst`` ...).

    A compressed stream can only be read from its start, so one big ``.jsonl.zst`` is one task's
    work; split into at least as many files as shards, it spreads over all of them.  Cuts follow
    the position in the compressed input, so the parts balance by the same measure as the plan.
    Line numbers in reject reports then refer to the part files.
    """
    path, out = Path(path), Path(out_dir)
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    out.mkdir(parents=True, exist_ok=True)
    name = path.name
    suffix = next((c for c in COMPRESSED if name.lower().endswith(c)), "")
    stem = name[: len(name) - len(suffix)]
    base, dot, ext = stem.rpartition(".")
    base, ext = (base, "." + ext) if dot else (stem, "")
    names = [out / f"{base}.{i:05d}-of-{parts:05d}{ext}{suffix}" for i in range(parts)]
    if any(n.resolve() == path.resolve() for n in names):
        raise ValueError(f"{out}: would overwrite the input")
    size = path.stat().st_size
    with open(path, "rb") as raw:
        i = 0
        f = _codec_stream(names[0], suffix, "wb")
        for line in _codec_stream(raw, suffix, "rb"):
            f.write(line)
            if i < parts - 1 and raw.tell() * parts >= (i + 1) * size:
                f.close()
                i += 1
                f = _codec_stream(names[i], suffix, "wb")
        f.close()
    for k in range(i + 1, parts):  # fewer lines than parts: empty files keep the set complete
        _codec_stream(names[k], suffix, "wb").close()
    return names


def _codec_stream(target: Path | BinaryIO, suffix: str, mode: str) -> Any:
    """A binary stream (de)compressing with the codec of ``suffix`` ('' = plain) over a path or an
    open raw file (whose ``tell`` then counts compressed bytes)."""
    import bz2
    import gzip
    import io
    import lzma

    if suffix == ".gz":
        return gzip.open(target, mode) if isinstance(target, Path) \
            else gzip.GzipFile(fileobj=target, mode=mode)
    if suffix == ".bz2":
        return bz2.BZ2File(target, mode)
    if suffix == ".xz":
        return lzma.LZMAFile(target, mode)
    if suffix == ".zst":
        import zstandard

        if mode == "rb":
            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(target))
        return zstandard.ZstdCompressor(level=3).stream_writer(open(target, "wb"), closefd=True)  # type: ignore[arg-type]
    return open(target, mode) if isinstance(target, Path) else target
