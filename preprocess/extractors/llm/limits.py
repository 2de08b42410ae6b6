"""Request limits that hold for every process of a run on one machine: requests in flight, requests
and tokens per minute, and the pause after a 429.

Why lock files and not a ``multiprocessing`` semaphore: the pipeline's worker processes are started
by datatrove (a forkserver pool locally, separate array tasks on a SLURM node), not by the
extractor, so there is no common parent to hand them a semaphore; what they share is a folder.
The locks are ``flock`` locks, which the kernel drops when their process dies, so a worker killed
with -9 never keeps a slot, and no state needs cleaning up.

- In flight: ``max_concurrency`` lock files ``slot_0000``, ``slot_0001``, ...; a request holds one
  (a non-blocking ``flock``) while it is on the wire.  Inside one process an ``asyncio.Semaphore``
  admits at most ``max_concurrency`` tasks, and one of them at a time polls the files (the client's
  ``SLOT_POLL_SECONDS`` apart while all slots are taken).
- Rates: the generic cell rate algorithm (one "theoretical arrival time" per limit) in a 24-byte
  state file, read and rewritten under an exclusive ``flock``.  A request reserves its place in
  time and sleeps until then; a burst of one second's worth is allowed.  Requests per minute count
  1 per request; tokens per minute count the request's input tokens before it is sent and its
  output tokens when the answer arrives (what the API bills against the limit).
- Pause: a 429's ``Retry-After`` moves ``pause_until`` in the same file; every process waits it out.

The folder (``limits_dir``, default the system's temporary folder) is per machine: on SLURM each
node has its own limits, so divide an account's limits by the number of nodes that run at once.
Processes of different runs against the same endpoint and model share the same files (they share
the account's limits too).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct
import tempfile
import time
from pathlib import Path

_STATE = struct.Struct("<ddd")  # rpm_tat, tpm_tat, pause_until (wall-clock seconds)
BURST_SECONDS = 1.0
"""How far ahead of the steady rate requests may run (a burst of one second's worth)."""
STALE_SECONDS = 3600.0
"""A state further ahead than this comes from a clock that was set back: it is reset."""


def default_limits_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"dm-preprocess-llm-limits-{os.getuid()}"


class SharedLimits:
    """Slots, rates and the 429 pause of one endpoint+model, shared through ``folder``.

    Used as a context manager around one batch of requests: the files are opened on entry and
    closed on exit, which releases every slot still held.  So no descriptor outlives a batch (a
    long-lived worker builds an extractor per shard), none crosses a fork, and a batch needs
    ``max_concurrency`` + 1 descriptors besides its connections (``ulimit -n`` must allow about
    twice ``max_concurrency``).
    """

    def __init__(self, folder: str | os.PathLike[str] | None, endpoint: str, model: str, *,
                 max_concurrency: int, rpm: float | None = None, tpm: float | None = None):
        key = hashlib.sha256(f"{endpoint}\n{model}".encode()).hexdigest()[:16]
        self.path = (Path(folder) if folder else default_limits_dir()) / key
        self.max_concurrency = max_concurrency
        self.rpm, self.tpm = rpm, tpm
        self._slots: list[int] = []
        self._held: set[int] = set()
        self._state = -1

    def __enter__(self) -> SharedLimits:
        if self._state >= 0:
            raise RuntimeError(f"{self.path}: limits already in use by this object")
        self.path.mkdir(parents=True, exist_ok=True)
        self._state = os.open(self.path / "state", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in [*self._slots, self._state]:
            if fd >= 0:
                os.close(fd)  # also releases the slots still held
        self._slots, self._held, self._state = [], set(), -1

    # -- requests in flight --
    def try_slot(self) -> int | None:
        """A free slot (now held by this object), or None when ``max_concurrency`` are in use."""
        if not self._slots:  # opened at the first request: a batch of cache hits opens none
            self._slots = [os.open(self.path / f"slot_{i:04d}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                           for i in range(self.max_concurrency)]
        start = os.getpid() % self.max_concurrency  # processes start their search at different slots
        for j in range(self.max_concurrency):
            i = (start + j) % self.max_concurrency
            if i in self._held:
                continue
            try:
                fcntl.flock(self._slots[i], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            self._held.add(i)
            return i
        return None

    def release_slot(self, i: int) -> None:
        if i in self._held:
            fcntl.flock(self._slots[i], fcntl.LOCK_UN)
            self._held.discard(i)

    # -- rates and pause (one locked read-modify-write of the state file each) --
    def _update(self, requests: int, tokens: int, pause: float) -> float:
        fd = self._state
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            raw = os.pread(fd, _STATE.size, 0)
            rpm_tat, tpm_tat, pause_until = _STATE.unpack(raw) if len(raw) == _STATE.size else (0.0,) * 3
            now = time.time()
            if max(rpm_tat, tpm_tat, pause_until) > now + STALE_SECONDS:  # the clock was set back
                rpm_tat = tpm_tat = pause_until = now
            start = now
            if requests and self.rpm:
                rpm_tat, start = _reserve(rpm_tat, now, requests * 60.0 / self.rpm, start)
            if tokens and self.tpm:
                tpm_tat, start = _reserve(tpm_tat, now, tokens * 60.0 / self.tpm, start)
            if pause > 0:
                pause_until = max(pause_until, now + pause)
            os.pwrite(fd, _STATE.pack(rpm_tat, tpm_tat, pause_until), 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return max(start, pause_until) - now

    def reserve(self, tokens: int) -> float:
        """Reserve one request of ``tokens`` input tokens; seconds to wait before sending it
        (also covers a pause set by a 429 anywhere on the machine)."""
        return self._update(1, tokens, 0.0)

    def charge_tokens(self, tokens: int) -> None:
        """Count tokens known only afterwards (the answer's) against the tokens-per-minute limit."""
        if self.tpm and tokens:
            self._update(0, tokens, 0.0)

    def pause(self, seconds: float) -> None:
        """Hold every sender of this endpoint on this machine for ``seconds`` (a 429's Retry-After)."""
        self._update(0, 0, seconds)

    def pause_left(self) -> float:
        """Seconds until a pause set by a 429 (in any process) ends; <= 0 when none."""
        raw = os.pread(self._state, _STATE.size, 0)
        if len(raw) != _STATE.size:
            return 0.0
        return _STATE.unpack(raw)[2] - time.time()


def _reserve(tat: float, now: float, cost: float, start: float) -> tuple[float, float]:
    """GCRA: (new theoretical arrival time, earliest start) for a request costing ``cost`` seconds."""
    tat = max(tat, now)
    return tat + cost, max(start, tat - BURST_SECONDS)
