"""Persistent answer cache (and Batch API state) for the LLM extractor: one SQLite file in WAL mode.

Why SQLite/WAL: every completed answer is one committed transaction, so a process killed at any
point leaves either the whole row or none; several worker processes (datatrove ranks, a Batch
collector next to an online run) can read while one writes, and writers wait on the lock
(``busy_timeout``) instead of failing.  Rows are keyed by a hash of the exact request body
(model, prompt version, messages, schema, temperature...), so a rerun, a resumed crash or another
worker never pays twice for the same sample, and any change of prompt or model misses the cache.

The raw model answer (content/refusal/finish reason/usage) is stored, not the located spans:
span location is cheap and deterministic, so improving it never needs a new request.
Only answers the API actually produced are stored (ok, refused, malformed); transport failures
are not, so a rerun retries exactly those.

The same file holds the Batch API state (``batches`` and ``batch_requests``): which request was
submitted in which batch, so a rerun polls instead of submitting again.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

CACHE_FILENAME = "llm_cache.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    created REAL NOT NULL,
    content TEXT,
    refusal TEXT,
    finish_reason TEXT,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    source TEXT NOT NULL DEFAULT 'online'
);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    input_file_id TEXT NOT NULL,
    created REAL NOT NULL,
    status TEXT NOT NULL,
    n_requests INTEGER NOT NULL,
    collected INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS batch_requests (
    custom_id TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    PRIMARY KEY (custom_id, batch_id)
);
CREATE INDEX IF NOT EXISTS batch_requests_batch ON batch_requests (batch_id);
"""
_CHUNK = 500  # well under SQLite's bound-parameter limit


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """What the API answered for one request (everything needed to re-derive spans and cost)."""

    content: str | None
    refusal: str | None
    finish_reason: str | None
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class BatchRecord:
    batch_id: str
    input_file_id: str
    status: str
    n_requests: int
    collected: bool


class AnswerCache:
    """Process- and crash-safe key → ``CachedAnswer`` store in ``<cache_dir>/llm_cache.sqlite``.

    The connection is opened lazily and re-opened after a ``fork`` (SQLite connections must not
    cross processes); a lock serialises threads of one process.
    """

    def __init__(self, cache_dir: str | os.PathLike[str]):
        self.path = Path(cache_dir) / CACHE_FILENAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._conn_or_open()  # fail early (unwritable folder, corrupt file) with the path in the error

    def _conn_or_open(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            try:
                conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None,
                                       check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: consistent after a kill
                conn.execute("PRAGMA busy_timeout=60000")
                conn.executescript(_SCHEMA)
            except sqlite3.Error as e:
                raise RuntimeError(f"cannot open LLM cache {self.path}: {e}") from e
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def get_many(self, keys: Iterable[str]) -> dict[str, CachedAnswer]:
        keys = list(dict.fromkeys(keys))
        out: dict[str, CachedAnswer] = {}
        with self._lock:
            conn = self._conn_or_open()
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i:i + _CHUNK]
                q = ("SELECT key, content, refusal, finish_reason, input_tokens, output_tokens "
                     f"FROM answers WHERE key IN ({','.join('?' * len(chunk))})")
                for k, content, refusal, finish, tin, tout in conn.execute(q, chunk):
                    out[k] = CachedAnswer(content, refusal, finish, int(tin), int(tout))
        return out

    def put_many(self, rows: Sequence[tuple[str, CachedAnswer]], *, model: str, prompt_version: str,
                 source: str = "online") -> None:
        """Store answers in one transaction (all or nothing if the process dies mid-way)."""
        if not rows:
            return
        now = time.time()
        params = [(k, model, prompt_version, now, a.content, a.refusal, a.finish_reason,
                   a.input_tokens, a.output_tokens, source) for k, a in rows]
        with self._lock:
            conn = self._conn_or_open()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT OR REPLACE INTO answers VALUES (?,?,?,?,?,?,?,?,?,?)", params)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def put(self, key: str, answer: CachedAnswer, *, model: str, prompt_version: str,
            source: str = "online") -> None:
        self.put_many([(key, answer)], model=model, prompt_version=prompt_version, source=source)

    def __bool__(self) -> bool:  # an empty cache is still a cache (and truthiness must not COUNT(*))
        return True

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn_or_open().execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    # ---- Batch API state -------------------------------------------------------------------
    def record_batch(self, batch_id: str, input_file_id: str, status: str, custom_ids: Sequence[str]) -> None:
        """Remember a submitted batch and its requests, in one transaction, right after creation."""
        with self._lock:
            conn = self._conn_or_open()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("INSERT OR REPLACE INTO batches VALUES (?,?,?,?,?,0)",
                             (batch_id, input_file_id, time.time(), status, len(custom_ids)))
                conn.executemany("INSERT OR IGNORE INTO batch_requests VALUES (?,?)",
                                 [(c, batch_id) for c in custom_ids])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def update_batch(self, batch_id: str, status: str, *, collected: bool | None = None) -> None:
        with self._lock:
            conn = self._conn_or_open()
            if collected is None:
                conn.execute("UPDATE batches SET status=? WHERE batch_id=?", (status, batch_id))
            else:
                conn.execute("UPDATE batches SET status=?, collected=? WHERE batch_id=?",
                             (status, int(collected), batch_id))

    def open_batches_for(self, custom_ids: Iterable[str]) -> dict[str, str]:
        """custom_id → batch id for requests already sitting in a batch that is not yet collected."""
        ids = list(dict.fromkeys(custom_ids))
        out: dict[str, str] = {}
        with self._lock:
            conn = self._conn_or_open()
            for i in range(0, len(ids), _CHUNK):
                chunk = ids[i:i + _CHUNK]
                q = ("SELECT r.custom_id, r.batch_id FROM batch_requests r JOIN batches b "
                     "ON r.batch_id = b.batch_id WHERE b.collected = 0 "
                     f"AND r.custom_id IN ({','.join('?' * len(chunk))})")
                out.update(dict(conn.execute(q, chunk).fetchall()))
        return out

    def batches(self) -> list[BatchRecord]:
        with self._lock:
            rows = self._conn_or_open().execute(
                "SELECT batch_id, input_file_id, status, n_requests, collected FROM batches "
                "ORDER BY created").fetchall()
        return [BatchRecord(b, f, s, int(n), bool(c)) for b, f, s, n, c in rows]
