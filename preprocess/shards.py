"""The on-disk shard format: writer beside reader, field by field in the same order.

Over 400 lines on purpose: the format is one definition (domain codes, flag bits, file layout,
shard writer, ``index.json`` writer, reader), kept in one file so that a change to how a field is
written sits next to how it is read.  Checking a folder lives in ``preprocess.shards_verify``.

A preprocessed folder holds ``num_shards`` shards plus one ``index.json``::

    out/
      index.json                  # totals, tokenizer, extractor, rho per domain, shard list
      shard_00000.tokens.bin      # token ids, little-endian, dtype by vocab size (uint16/uint32)
      shard_00000.flags.bin       # one uint8 per token: bit0 SUPERVISED, bit1 INFO_DENSE, bit2 SELECTED
      shard_00000.idx             # header + per-sample arrays (see ``_index_layout``)
      shard_00000.keys.bin        # UTF-8 sample ids, concatenated (offsets in the .idx)
      shard_00000.rejects.jsonl   # rejected records of this shard, one JSON object per line
      shard_00000.json            # manifest: counts, sha256 of every file, fingerprints, stats

The ``.idx`` file (all little-endian)::

    magic     8 bytes  b"DMSHARD\\0"
    version   uint32   FORMAT_VERSION
    dtype     uint8    DType code of the tokens file
    pad       3 bytes
    n_samples uint64
    n_tokens  uint64
    n_keybyte uint64
    token_offsets int64[n_samples + 1]   sample i = tokens[token_offsets[i]:token_offsets[i+1]]
    key_offsets   int64[n_samples + 1]   key i = keys[key_offsets[i]:key_offsets[i+1]].decode()
    domains       uint8[n_samples]       ``Domain`` values (below)

Why separate files instead of one blob: each array is memory-mapped with its own dtype and no
alignment arithmetic, and each has its own sha256 in the manifest so ``verify`` names the damaged
file (``preprocess.shards_verify``).  Why a manifest per shard: it is renamed into place last, so
its existence *is* the
completion marker that makes reruns skip finished shards, independent of any executor's logs.

Readers never load a whole shard: ``ShardedDataset`` memory-maps the arrays lazily (also after
pickling into DataLoader workers).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

FORMAT_NAME = "dm-shards"
FORMAT_VERSION = 1
MAGIC = b"DMSHARD\x00"
INDEX_FILE = "index.json"

# Flag bits, one uint8 per token.  Values are part of the on-disk format.
FLAG_SUPERVISED = 1  # response token or its EOS: maskable, contributes to the loss
FLAG_INFO_DENSE = 2  # overlaps an information-dense span of the response
FLAG_SELECTED = 4  # the sample was in the extracted fraction (set on every token of such a sample)
KNOWN_FLAGS = FLAG_SUPERVISED | FLAG_INFO_DENSE | FLAG_SELECTED


class Domain(IntEnum):
    """Stored as one uint8 per sample in the shards; values are part of the on-disk format."""

    OTHER = 0
    CODE = 1
    MATH = 2

    @classmethod
    def parse(cls, value: str | int | Domain) -> Domain:
        if isinstance(value, Domain):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[str(value).strip().upper()]
        except KeyError:
            raise ValueError(f"unknown domain {value!r}; expected one of "
                             f"{[d.name.lower() for d in cls]}") from None

_HEADER = struct.Struct("<8sIB3xQQQ")
TMP_SUFFIX = ".tmp"


class ConfigMismatchError(RuntimeError):
    """The output folder already holds shards made with a different configuration."""


class DType(IntEnum):
    """Dtype codes of the tokens file (our own numbering; not Megatron's nor DeepSpeed's)."""

    UINT8 = 1
    UINT16 = 2
    UINT32 = 3
    INT64 = 4

    def numpy(self) -> np.dtype:
        return np.dtype({1: "<u1", 2: "<u2", 3: "<u4", 4: "<i8"}[int(self)])

    @classmethod
    def from_name(cls, name: str) -> DType:
        return cls[name.upper()]


def smallest_token_dtype(vocab_size: int) -> DType:
    """The one place deciding the token dtype: uint16 halves disk and page-cache use when it fits."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 2**16:
        return DType.UINT16
    if vocab_size <= 2**32:
        return DType.UINT32
    raise ValueError(f"vocab_size {vocab_size} does not fit uint32")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def shard_files(name: str) -> dict[str, str]:
    """Role -> file name of one shard; the manifest lists sha256 for each role."""
    return {
        "tokens": f"{name}.tokens.bin",
        "flags": f"{name}.flags.bin",
        "idx": f"{name}.idx",
        "keys": f"{name}.keys.bin",
        "rejects": f"{name}.rejects.jsonl",
    }


def manifest_name(name: str) -> str:
    return f"{name}.json"


def _index_layout(n_samples: int) -> list[tuple[str, np.dtype, int, int]]:
    """(field, dtype, count, byte offset) of the arrays after the header, in file order."""
    fields = [("token_offsets", np.dtype("<i8"), n_samples + 1),
              ("key_offsets", np.dtype("<i8"), n_samples + 1),
              ("domains", np.dtype("<u1"), n_samples)]
    out, pos = [], _HEADER.size
    for name, dt, count in fields:
        out.append((name, dt, count, pos))
        pos += dt.itemsize * count
    return out


def _index_size(n_samples: int) -> int:
    name, dt, count, pos = _index_layout(n_samples)[-1]
    return pos + dt.itemsize * count


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON deterministically (sorted keys) to a temporary name, fsync, then rename."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _HashedFile:
    """A buffered binary file that hashes what it writes, so finishing a shard needs no re-read."""

    def __init__(self, path: Path, buffer_bytes: int = 1 << 20) -> None:
        self.path = path
        self.f: BinaryIO = open(path, "wb")
        self.h = hashlib.sha256()
        self.size = 0
        self._buf: list[bytes] = []
        self._buffered = 0
        self._limit = buffer_bytes

    def write(self, data: bytes) -> None:
        self._buf.append(data)
        self._buffered += len(data)
        self.size += len(data)
        if self._buffered >= self._limit:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            blob = b"".join(self._buf)
            self.h.update(blob)
            self.f.write(blob)
            self._buf, self._buffered = [], 0

    def close(self) -> dict[str, Any]:
        self.flush()
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {"bytes": self.size, "sha256": self.h.hexdigest()}


class ShardWriter:
    """Streams samples of one shard to temporary files; ``finish`` publishes them atomically.

    Memory stays flat in the shard size: token/flag bytes go straight to buffered files and the
    per-sample arrays (offsets, domains) are spilled to temporary files too, then copied into the
    ``.idx`` behind its header at the end.  Nothing is visible under a final name until every file
    is complete; the manifest is renamed last and is the completion marker.
    """

    def __init__(self, folder: Path | str, index: int, vocab_size: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name = shard_name(index)
        self.index = index
        self.vocab_size = vocab_size
        self.dtype = smallest_token_dtype(vocab_size)
        self._np_dtype = self.dtype.numpy()
        self.files = shard_files(self.name)
        self._tmp = {role: self.folder / (fname + TMP_SUFFIX) for role, fname in self.files.items()}
        self._tokens = _HashedFile(self._tmp["tokens"])
        self._flags = _HashedFile(self._tmp["flags"])
        self._keys = _HashedFile(self._tmp["keys"])
        self._rejects = _HashedFile(self._tmp["rejects"])
        spill = self.folder / f"{self.name}.spill{TMP_SUFFIX}"
        self._spill_paths = (spill.with_name(spill.name + ".tok"), spill.with_name(spill.name + ".key"),
                             spill.with_name(spill.name + ".dom"))
        self._spill = [open(p, "wb") for p in self._spill_paths]
        self._spill_bufs: tuple[list[int], list[int], list[int]] = ([], [], [])
        self.num_samples = 0
        self.num_tokens = 0
        self._key_bytes = 0
        self.num_rejects = 0
        self._closed = False

    def add(self, tokens: np.ndarray, flags: np.ndarray, domain: int, key: str) -> None:
        """Append one sample.  ``tokens`` and ``flags`` must have equal length > 0."""
        n = len(tokens)
        if n == 0 or len(flags) != n:
            raise ValueError(f"sample {key!r}: {n} tokens but {len(flags)} flags")
        self._tokens.write(np.asarray(tokens, dtype=self._np_dtype).tobytes())
        self._flags.write(np.asarray(flags, dtype=np.uint8).tobytes())
        kb = key.encode("utf-8")
        self._keys.write(kb)
        self.num_samples += 1
        self.num_tokens += n
        self._key_bytes += len(kb)
        tok, keyo, dom = self._spill_bufs
        tok.append(self.num_tokens)
        keyo.append(self._key_bytes)
        dom.append(int(domain))
        if len(tok) >= 65536:
            self._flush_spill()

    def add_batch(self, tokens: np.ndarray, flags: np.ndarray, lengths: np.ndarray, domains: list[int],
                  keys: list[str]) -> None:
        """Append several samples laid end to end (``lengths`` tokens each); same bytes as ``add``."""
        lengths = np.asarray(lengths, dtype=np.int64)
        total = int(lengths.sum())
        if len(tokens) != total or len(flags) != total or len(domains) != len(lengths) != len(keys):
            raise ValueError(f"batch of {len(lengths)} samples: {len(tokens)} tokens, {len(flags)} flags, "
                             f"{total} by lengths, {len(domains)} domains, {len(keys)} keys")
        if len(lengths) and int(lengths.min()) <= 0:
            raise ValueError("every sample needs at least one token")
        self._tokens.write(np.asarray(tokens).astype(self._np_dtype, copy=False).tobytes())
        self._flags.write(np.asarray(flags, dtype=np.uint8).tobytes())
        kbs = [k.encode("utf-8") for k in keys]
        self._keys.write(b"".join(kbs))
        tok, keyo, dom = self._spill_bufs
        tok.extend((self.num_tokens + np.cumsum(lengths)).tolist())
        keyo.extend((self._key_bytes + np.cumsum([len(k) for k in kbs], dtype=np.int64)).tolist())
        dom.extend(int(d) for d in domains)
        self.num_samples += len(lengths)
        self.num_tokens += total
        self._key_bytes += sum(len(k) for k in kbs)
        if len(tok) >= 65536:
            self._flush_spill()

    def add_reject(self, reject: dict[str, Any]) -> None:
        """Record a rejected input record (one JSON line; sorted keys for byte-identical reruns)."""
        line = json.dumps(reject, sort_keys=True, ensure_ascii=False) + "\n"
        self._rejects.write(line.encode("utf-8"))
        self.num_rejects += 1

    def _flush_spill(self) -> None:
        tok, keyo, dom = self._spill_bufs
        self._spill[0].write(np.asarray(tok, dtype="<i8").tobytes())
        self._spill[1].write(np.asarray(keyo, dtype="<i8").tobytes())
        self._spill[2].write(np.asarray(dom, dtype="<u1").tobytes())
        self._spill_bufs = ([], [], [])

    def _write_idx(self) -> dict[str, Any]:
        self._flush_spill()
        for f in self._spill:
            f.close()
        idx = _HashedFile(self._tmp["idx"])
        idx.write(_HEADER.pack(MAGIC, FORMAT_VERSION, int(self.dtype), self.num_samples, self.num_tokens,
                               self._key_bytes))
        # Field order must match _index_layout: token_offsets, key_offsets, domains (each offsets
        # array starts with its leading 0, which the spill files omit).
        for field, spill in zip(("token_offsets", "key_offsets", "domains"), self._spill_paths):
            if field != "domains":
                idx.write(np.zeros(1, dtype="<i8").tobytes())
            with open(spill, "rb") as f:
                while block := f.read(1 << 20):
                    idx.write(block)
        info = idx.close()
        if info["bytes"] != _index_size(self.num_samples):
            expected = _index_size(self.num_samples)
            raise AssertionError(f"{self.name}: idx size {info['bytes']} != layout {expected}")
        for p in self._spill_paths:
            p.unlink()
        return info

    def finish(self, manifest_extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Close, hash and publish all files; return the manifest that was written."""
        if self._closed:
            raise RuntimeError(f"{self.name} already finished")
        self._closed = True
        infos = {"tokens": self._tokens.close(), "flags": self._flags.close(), "keys": self._keys.close(),
                 "rejects": self._rejects.close(), "idx": self._write_idx()}
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "shard": self.index,
            "name": self.name,
            "num_samples": self.num_samples,
            "num_tokens": self.num_tokens,
            "num_rejects": self.num_rejects,
            "token_dtype": self.dtype.name.lower(),
            "vocab_size": self.vocab_size,
            "files": {role: {"name": self.files[role], **infos[role]} for role in self.files},
            **(manifest_extra or {}),
        }
        for role, fname in self.files.items():
            os.replace(self._tmp[role], self.folder / fname)
        write_json_atomic(self.folder / manifest_name(self.name), manifest)
        return manifest

    def abort(self) -> None:
        """Remove temporary files (a crashed writer's leftovers are also removed by ``clean_partial``)."""
        self._closed = True
        for f in (self._tokens, self._flags, self._keys, self._rejects):
            if not f.f.closed:
                f.f.close()
        for f in self._spill:
            if not f.closed:
                f.close()
        for p in [*self._tmp.values(), *self._spill_paths]:
            p.unlink(missing_ok=True)


def clean_partial(folder: Path | str, name: str) -> list[Path]:
    """Delete leftovers of an interrupted write of shard ``name``; return what was removed."""
    removed = []
    for p in Path(folder).glob(f"{name}.*{TMP_SUFFIX}*"):
        p.unlink()
        removed.append(p)
    return removed


def read_manifest(folder: Path | str, name: str) -> dict[str, Any] | None:
    path = Path(folder) / manifest_name(name)
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def shard_is_complete(folder: Path | str, name: str) -> bool:
    """A shard is complete when its manifest exists and every listed file has the listed size."""
    manifest = read_manifest(folder, name)
    if manifest is None:
        return False
    for info in manifest["files"].values():
        p = Path(folder) / info["name"]
        if not p.is_file() or p.stat().st_size != info["bytes"]:
            return False
    return True


# ----------------------------------------------------------------------------------------------- reader


@dataclass
class DomainCounts:
    """Deterministic per-domain counters of one shard (summed by the merge step)."""

    samples: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    dense_tokens: int = 0
    selected_samples: int = 0
    selected_supervised_tokens: int = 0
    selected_dense_tokens: int = 0
    selected_ratio_sum: float = 0.0  # sum over selected samples of dense/supervised (paper's rho)
    budget_samples: int = 0  # samples over their rho budget (``preprocess.budget``), trimmed to it
    budget_dropped_spans: int = 0
    budget_dropped_tokens: int = 0  # marked by the extractor, unmarked by the budget

    def add(self, other: dict[str, Any]) -> None:
        for k, v in other.items():
            setattr(self, k, getattr(self, k) + v)


def missing_shards(folder: Path | str, num_shards: int) -> list[str]:
    """Names of the shards of ``folder`` whose manifest is not (yet) in place."""
    names = [shard_name(k) for k in range(num_shards)]
    return [n for n in names if not shard_is_complete(folder, n)]


def write_index(folder: Path | str, num_shards: int, config: dict[str, Any]) -> dict[str, Any]:
    """Aggregate the shard manifests into ``index.json`` (deterministic; sorted keys).

    ``config`` is recorded as the settings that decided the output (``PreprocessConfig.output_settings``).
    """
    folder = Path(folder)
    missing = missing_shards(folder, num_shards)
    if missing:
        raise RuntimeError(f"cannot write {INDEX_FILE}: {len(missing)} shard(s) incomplete: {missing[:8]}")
    manifests = [read_manifest(folder, shard_name(k)) for k in range(num_shards)]
    fps = {m["config_fingerprint"] for m in manifests}  # type: ignore[index]
    if len(fps) != 1:
        raise ConfigMismatchError(f"shards in {folder} come from {len(fps)} different configurations")
    domains: dict[str, DomainCounts] = {}
    rejects: Counter[str] = Counter()
    status: Counter[str] = Counter()
    alignment: Counter[str] = Counter()
    unmatched = 0
    read: Counter[str] = Counter()
    for m in manifests:
        st = m["stats"]  # type: ignore[index]
        read.update({k: st.get(k, 0) for k in ("records_read", "blank_lines", "bytes_read")})
        for name, counts in st["domains"].items():
            domains.setdefault(name, DomainCounts()).add(counts)
        rejects.update(st["rejects"])
        status.update(st["extract_status"])
        alignment.update(st["alignment"])
        unmatched += st["unmatched_spans"]
    dom_out = {}
    for name, c in sorted(domains.items()):
        dom_out[name] = {
            **asdict(c),
            "rho": c.selected_ratio_sum / c.selected_samples if c.selected_samples else 0.0,
            "rho_tokens": (c.selected_dense_tokens / c.selected_supervised_tokens
                           if c.selected_supervised_tokens else 0.0),
        }
    first = manifests[0]
    index = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config_fingerprint": first["config_fingerprint"],  # type: ignore[index]
        "config": config,
        "num_shards": num_shards,
        "num_samples": sum(m["num_samples"] for m in manifests),  # type: ignore[index]
        "num_tokens": sum(m["num_tokens"] for m in manifests),  # type: ignore[index]
        "num_rejects": sum(m["num_rejects"] for m in manifests),  # type: ignore[index]
        "token_dtype": first["token_dtype"],  # type: ignore[index]
        "vocab_size": first["vocab_size"],  # type: ignore[index]
        "tokenizer": first["tokenizer"],  # type: ignore[index]
        "extractor": first["extractor"],  # type: ignore[index]
        "flags": {"SUPERVISED": FLAG_SUPERVISED, "INFO_DENSE": FLAG_INFO_DENSE, "SELECTED": FLAG_SELECTED},
        "domains": dom_out,
        "rho": {name: d["rho"] for name, d in dom_out.items()},
        "rejects": dict(sorted(rejects.items())),
        "extract_status": dict(sorted(status.items())),
        "alignment": dict(sorted(alignment.items())),
        "unmatched_spans": unmatched,
        "records_read": read["records_read"],  # non-blank input records (samples + rejects)
        "blank_lines": read["blank_lines"],
        "bytes_read": read["bytes_read"],
        "shards": [{"name": shard_name(k), "num_samples": m["num_samples"], "num_tokens": m["num_tokens"],  # type: ignore[index]
                    "manifest_sha256": sha256_file(folder / manifest_name(shard_name(k)))}
                   for k, m in enumerate(manifests)],
    }
    assert smallest_token_dtype(index["vocab_size"]).name.lower() == index["token_dtype"]
    write_json_atomic(folder / INDEX_FILE, index)
    return index


@dataclass(frozen=True, slots=True)
class Sample:
    """One training sample: ``tokens`` and ``flags`` are read-only views into the memory maps."""

    tokens: np.ndarray
    flags: np.ndarray
    domain: int
    sample_id: str
    shard: int

    @property
    def supervised(self) -> np.ndarray:
        return (self.flags & FLAG_SUPERVISED) != 0

    @property
    def info_dense(self) -> np.ndarray:
        return (self.flags & FLAG_INFO_DENSE) != 0

    @property
    def selected(self) -> bool:
        return bool(len(self.flags) and self.flags[0] & FLAG_SELECTED)


class ShardReader:
    """Memory-mapped view of one shard (opened on first use)."""

    def __init__(self, folder: Path | str, name: str) -> None:
        self.folder = Path(folder)
        self.name = name
        files = shard_files(name)
        with open(self.folder / files["idx"], "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise ValueError(f"{files['idx']}: truncated header ({len(head)} bytes)")
        magic, version, dtype_code, n, n_tokens, n_keybytes = _HEADER.unpack(head)
        if magic != MAGIC:
            raise ValueError(f"{files['idx']}: bad magic {magic!r}, not a {FORMAT_NAME} index")
        if version != FORMAT_VERSION:
            raise ValueError(f"{files['idx']}: format version {version}, this reader knows {FORMAT_VERSION}")
        self.dtype = DType(dtype_code)
        self.num_samples, self.num_tokens, self.num_key_bytes = n, n_tokens, n_keybytes
        idx_path = self.folder / files["idx"]
        arrays = {}
        for field, dt, count, offset in _index_layout(n):
            arrays[field] = np.memmap(idx_path, dtype=dt, mode="r", offset=offset, shape=(count,))
        self.token_offsets: np.ndarray = arrays["token_offsets"]
        self.key_offsets: np.ndarray = arrays["key_offsets"]
        self.domains: np.ndarray = arrays["domains"]
        self.tokens = self._map(files["tokens"], self.dtype.numpy(), n_tokens)
        self.flags = self._map(files["flags"], np.dtype("u1"), n_tokens)
        self.keys = self._map(files["keys"], np.dtype("u1"), n_keybytes)

    def _map(self, fname: str, dt: np.dtype, count: int) -> np.ndarray:
        # np.memmap refuses zero-length files; an empty shard gets an empty array instead.
        if count == 0:
            return np.zeros(0, dtype=dt)
        return np.memmap(self.folder / fname, dtype=dt, mode="r", shape=(count,))

    def __len__(self) -> int:
        return self.num_samples

    def key(self, i: int) -> str:
        a, b = int(self.key_offsets[i]), int(self.key_offsets[i + 1])
        return bytes(self.keys[a:b]).decode("utf-8")

    def sample(self, i: int, shard_index: int) -> Sample:
        a, b = int(self.token_offsets[i]), int(self.token_offsets[i + 1])
        return Sample(tokens=self.tokens[a:b], flags=self.flags[a:b], domain=int(self.domains[i]),
                      sample_id=self.key(i), shard=shard_index)


def check_shard_sizes(folder: Path, name: str) -> None:
    """Cheap completeness check of one shard (no data read): every file's size against the manifest,
    and the tokens/flags/keys/idx sizes against the ``.idx`` header.  Raises ``ValueError`` naming
    the file."""
    manifest = read_manifest(folder, name)
    if manifest is None:
        raise ValueError(f"{folder / manifest_name(name)}: missing (shard not finished)")
    for info in manifest["files"].values():
        p = folder / info["name"]
        size = p.stat().st_size if p.is_file() else None
        if size != info["bytes"]:
            raise ValueError(f"{p}: {'missing' if size is None else f'{size} bytes'}, its manifest "
                             f"{manifest_name(name)} says {info['bytes']}")
    files = shard_files(name)
    with open(folder / files["idx"], "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise ValueError(f"{folder / files['idx']}: truncated header ({len(head)} bytes)")
    magic, version, dtype_code, n, n_tokens, n_keybytes = _HEADER.unpack(head)
    if magic != MAGIC or version != FORMAT_VERSION or dtype_code not in DType._value2member_map_:
        raise ValueError(f"{folder / files['idx']}: not a {FORMAT_NAME} v{FORMAT_VERSION} index")
    expected = {"idx": _index_size(n), "tokens": n_tokens * DType(dtype_code).numpy().itemsize,
                "flags": n_tokens, "keys": n_keybytes}
    for role, want in expected.items():
        size = (folder / files[role]).stat().st_size
        if size != want:
            raise ValueError(f"{folder / files[role]}: {size} bytes, the header of {files['idx']} "
                             f"implies {want}")


class ShardedDataset:
    """Random access by global sample index over all shards listed in ``index.json``.

    Opening reads index.json and checks every shard's file sizes against its manifest and header
    (``check_shard_sizes``: a truncated or missing file fails here, naming it, not mid-epoch);
    shard files are memory-mapped on first access (also after pickling, so DataLoader workers
    each map their own view instead of copying arrays).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found: run `dm-preprocess run` (or it is running)")
        with open(index_path, encoding="utf-8") as f:
            self.index: dict[str, Any] = json.load(f)
        if self.index.get("format") != FORMAT_NAME or self.index.get("version") != FORMAT_VERSION:
            got = f"{self.index.get('format')!r} v{self.index.get('version')}"
            raise ValueError(f"{index_path}: format {got}, expected {FORMAT_NAME!r} v{FORMAT_VERSION}")
        self.shard_names: list[str] = [s["name"] for s in self.index["shards"]]
        for name in self.shard_names:
            check_shard_sizes(self.path, name)
        counts = np.array([s["num_samples"] for s in self.index["shards"]], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._readers: dict[int, ShardReader] = {}
        self._lengths: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_readers"] = {}
        return state

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    @property
    def rho(self) -> dict[str, float]:
        return dict(self.index.get("rho", {}))

    def __len__(self) -> int:
        return int(self._starts[-1])

    def shard(self, k: int) -> ShardReader:
        r = self._readers.get(k)
        if r is None:
            r = self._readers[k] = ShardReader(self.path, self.shard_names[k])
        return r

    def locate(self, i: int) -> tuple[int, int]:
        """Global index -> (shard number, index inside the shard)."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return k, i - int(self._starts[k])

    def __getitem__(self, i: int) -> Sample:
        k, j = self.locate(int(i))
        return self.shard(k).sample(j, k)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def find(self, key: str) -> int | None:
        """Global index of the sample with id ``key`` (substring search in each keys file), or None."""
        kb = key.encode("utf-8")
        for k in range(len(self.shard_names)):
            r = self.shard(k)
            blob = bytes(r.keys)
            offs = np.asarray(r.key_offsets)
            at = blob.find(kb)
            while at != -1:
                j = int(np.searchsorted(offs, at))
                if j < len(offs) - 1 and offs[j] == at and offs[j + 1] == at + len(kb):
                    return int(self._starts[k]) + j
                at = blob.find(kb, at + 1)
        return None

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every sample (int32), computed once from the offsets (no token reads)."""
        if self._lengths is None:
            parts = [np.diff(self.shard(k).token_offsets).astype(np.int32)
                     for k in range(len(self.shard_names))]
            self._lengths = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        return self._lengths

    @property
    def domains(self) -> np.ndarray:
        """Domain of every sample (uint8), for domain-aware sampling."""
        parts = [np.asarray(self.shard(k).domains) for k in range(len(self.shard_names))]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
