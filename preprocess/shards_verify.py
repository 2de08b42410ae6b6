"""``verify``: re-check a preprocessed folder against its manifests and the format (``dm-preprocess verify``).

Split from ``preprocess.shards`` (the format itself: writer and reader) because checking every
invariant of a folder is as long as writing and reading it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from preprocess.shards import (
    FLAG_INFO_DENSE,
    FLAG_SELECTED,
    FLAG_SUPERVISED,
    INDEX_FILE,
    KNOWN_FLAGS,
    TMP_SUFFIX,
    ShardReader,
    _index_size,
    manifest_name,
    read_manifest,
    sha256_file,
    shard_files,
)


def _verify_shard(folder: Path, name: str, manifest: dict[str, Any], vocab_size: int | None,
                  deep: bool) -> list[str]:
    problems: list[str] = []
    for role, info in manifest.get("files", {}).items():
        p = folder / info["name"]
        if not p.is_file():
            problems.append(f"{name}: {role} file {info['name']} missing")
            continue
        if p.stat().st_size != info["bytes"]:
            problems.append(f"{name}: {info['name']} has {p.stat().st_size} bytes, "
                            f"manifest says {info['bytes']}")
        elif deep and sha256_file(p) != info["sha256"]:
            problems.append(f"{name}: {info['name']} sha256 mismatch (file changed or corrupted)")
    if problems:
        return problems
    try:
        r = ShardReader(folder, name)
    except (ValueError, OSError) as e:
        return [f"{name}: cannot open: {e}"]
    if r.num_samples != manifest.get("num_samples") or r.num_tokens != manifest.get("num_tokens"):
        problems.append(f"{name}: idx header says {r.num_samples} samples/{r.num_tokens} tokens, manifest "
                        f"{manifest.get('num_samples')}/{manifest.get('num_tokens')}")
    expected_idx = _index_size(r.num_samples)
    if (folder / shard_files(name)["idx"]).stat().st_size != expected_idx:
        return problems + [f"{name}: idx size does not match its header (expected {expected_idx} bytes)"]
    itemsize = r.dtype.numpy().itemsize
    if (folder / shard_files(name)["tokens"]).stat().st_size != r.num_tokens * itemsize:
        problems.append(f"{name}: tokens file size != {r.num_tokens} x {itemsize} bytes")
    if (folder / shard_files(name)["flags"]).stat().st_size != r.num_tokens:
        problems.append(f"{name}: flags file size != {r.num_tokens} bytes")
    if problems:
        return problems
    for field, offs, total in (("token_offsets", r.token_offsets, r.num_tokens),
                               ("key_offsets", r.key_offsets, r.num_key_bytes)):
        if len(offs) and (offs[0] != 0 or offs[-1] != total):
            problems.append(f"{name}: {field} must run from 0 to {total}, got {offs[0]}..{offs[-1]}")
        d = np.diff(offs)
        bad = np.flatnonzero(d <= 0) if field == "token_offsets" else np.flatnonzero(d < 0)
        if len(bad):
            problems.append(f"{name}: {field} not increasing at samples {bad[:10].tolist()}"
                            f"{' ...' if len(bad) > 10 else ''} ({len(bad)} in all)")
    bad_dom = np.flatnonzero(r.domains > 2)
    if len(bad_dom):
        problems.append(f"{name}: unknown domain codes at samples {bad_dom[:10].tolist()}")
    if not deep or problems:
        return problems
    # Token-level checks, in blocks so memory stays bounded on huge shards.
    block = 1 << 24
    for a in range(0, r.num_tokens, block):
        t = np.asarray(r.tokens[a:a + block])
        f = np.asarray(r.flags[a:a + block])
        if vocab_size is not None and len(t) and int(t.max()) >= vocab_size:
            pos = a + int(np.flatnonzero(t >= vocab_size)[0])
            problems.append(f"{name}: token id {int(r.tokens[pos])} >= vocab_size {vocab_size} "
                            f"at token {pos}")
        unknown = np.flatnonzero(f & ~np.uint8(KNOWN_FLAGS))
        if len(unknown):
            problems.append(f"{name}: unknown flag bits at token {a + int(unknown[0])} "
                            f"({len(unknown)} tokens)")
        dense_unsup = np.flatnonzero((f & FLAG_INFO_DENSE) & ~((f & FLAG_SUPERVISED) << 1))
        if len(dense_unsup):
            problems.append(f"{name}: INFO_DENSE without SUPERVISED at token {a + int(dense_unsup[0])} "
                            f"({len(dense_unsup)} tokens)")
    # Per-sample: the last token (EOS) is supervised; SELECTED is constant inside a sample.
    if r.num_samples:
        ends = np.asarray(r.token_offsets[1:]) - 1
        last = np.asarray(r.flags[ends])
        nosup = np.flatnonzero((last & FLAG_SUPERVISED) == 0)
        if len(nosup):
            problems.append(f"{name}: samples {nosup[:10].tolist()} do not end with a supervised token")
        # SELECTED may only change value where a sample starts (checked block-wise: bounded memory).
        starts = np.asarray(r.token_offsets[:-1])
        mixed: list[int] = []
        for a in range(0, r.num_tokens, block):
            lo = max(a - 1, 0)
            sel = (np.asarray(r.flags[lo:a + block]) & FLAG_SELECTED) != 0
            changes = np.flatnonzero(sel[1:] != sel[:-1]) + lo + 1
            bad = changes[~np.isin(changes, starts)]
            mixed += (np.searchsorted(starts, bad, side="right") - 1).tolist()
            if len(mixed) >= 10:
                break
        if mixed:
            problems.append(f"{name}: SELECTED bit not uniform inside samples {sorted(set(mixed))[:10]}")
        try:
            bytes(r.keys).decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(f"{name}: keys file is not valid UTF-8 ({e})")
    return problems


def verify(path: Path | str, deep: bool = True) -> list[str]:
    """Re-check a preprocessed folder; return every problem found (empty list = healthy).

    Checks: index.json present and consistent with the manifests, every shard's files present with
    the manifest's sizes and sha256 (``deep``), header magic/version, offsets monotone and
    covering the files exactly, token ids < vocab_size, only known flag bits, INFO_DENSE only on
    SUPERVISED tokens, every sample ending with a supervised token, leftover temporary files.
    """
    folder = Path(path)
    problems: list[str] = []
    if not folder.is_dir():
        return [f"{folder}: not a directory"]
    index: dict[str, Any] | None = None
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            problems.append(f"{INDEX_FILE}: not valid JSON ({e})")
    else:
        problems.append(f"{INDEX_FILE} missing (pipeline not finished or merge step not run)")
    for p in sorted(folder.glob(f"*{TMP_SUFFIX}*")):
        problems.append(f"{p.name}: leftover temporary file of an interrupted write")
    if index is not None:
        names = [s["name"] for s in index.get("shards", [])]
        vocab_size = index.get("vocab_size")
        on_disk = {p.name[: -len(".json")] for p in folder.glob("shard_*.json")}
        for extra in sorted(on_disk - set(names)):
            problems.append(f"{extra}: shard on disk but not listed in {INDEX_FILE}")
    else:
        names = sorted(p.name[: -len(".json")] for p in folder.glob("shard_*.json"))
        vocab_size = None
    total_samples = total_tokens = 0
    for k, name in enumerate(names):
        manifest_path = folder / manifest_name(name)
        try:
            manifest = read_manifest(folder, name)
        except json.JSONDecodeError as e:
            problems.append(f"{manifest_path.name}: not valid JSON ({e})")
            continue
        if manifest is None:
            problems.append(f"{name}: manifest {manifest_path.name} missing (shard not finished)")
            continue
        if index is not None:
            entry = index["shards"][k]
            if entry.get("manifest_sha256") and entry["manifest_sha256"] != sha256_file(manifest_path):
                problems.append(f"{name}: manifest changed since index.json was written")
            if entry.get("num_samples") != manifest.get("num_samples"):
                problems.append(f"{name}: index.json says {entry.get('num_samples')} samples, manifest "
                                f"{manifest.get('num_samples')}")
        total_samples += int(manifest.get("num_samples", 0))
        total_tokens += int(manifest.get("num_tokens", 0))
        problems += _verify_shard(folder, name, manifest, vocab_size, deep)
    if index is not None:
        if index.get("num_samples") != total_samples:
            problems.append(f"{INDEX_FILE}: num_samples {index.get('num_samples')} != "
                            f"sum over shards {total_samples}")
        if index.get("num_tokens") != total_tokens:
            problems.append(f"{INDEX_FILE}: num_tokens {index.get('num_tokens')} != "
                            f"sum over shards {total_tokens}")
    return problems
