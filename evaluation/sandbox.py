"""Running untrusted generated programs: separate process, resource limits, no network, no escape.

Layers (each tested on its own; the active ones are reported by ``sandbox_layers()`` and written
into every results JSON):

1. **Separate interpreter** ``python -I -B`` (isolated: no user site, no PYTHON* variables, no
   .pyc writes) in a fresh temporary working directory (``HOME``/``TMPDIR`` point there), its own
   session/process group (``start_new_session``) so that on timeout the whole group is killed
   with ``os.killpg(SIGKILL)``.
2. **Resource limits** set by our bootstrap before the program runs: ``RLIMIT_CPU`` (CPU seconds),
   ``RLIMIT_AS`` (address space), ``RLIMIT_FSIZE`` (largest file it may write), ``RLIMIT_NOFILE``,
   ``RLIMIT_NPROC`` and no core dumps; plus a wall-clock timeout enforced by the parent.
3. **No network**: a fresh, empty network namespace (``unshare -n``) when that works (root, or a
   kernel allowing unprivileged namespaces), *and* in every case an audit hook (PEP 578) that
   refuses any ``socket.*`` event (creation, connect, DNS).
4. **Audit hook** also refuses creating processes (fork, exec, spawn, ``subprocess``, ``os.system``:
   fork bombs stop at the first fork), sending signals, ``ctypes`` (which could undo all of this),
   and any write, delete, rename, chmod... of a path outside the sandbox directory.  An audit hook
   cannot be removed once installed.
   (Best effort: ``os.open(..., dir_fd=...)`` does not expose its directory to the hook; the
   unprivileged user below is the hard boundary for files where it is available.)
5. **Unprivileged user** (``nobody``) when we are root *and* that user can still run the
   interpreter (probed once; a Python installed under ``/root`` cannot be, then this layer is off
   and reported so).

The program runs with ``__name__ == "solution"`` (as in the HumanEval harness, whose ``exec`` has
no ``__main__``): a demo ``if __name__ == "__main__":`` block in an answer is skipped.

Pass/fail: the program (solution + tests) must run to its end without an exception and exit 0;
the bootstrap then writes a random nonce (received on stdin, not handed to the program) to a private
duplicate of stdout.  So ``sys.exit(0)`` or ``os._exit(0)`` half way through the tests is a failure,
not a pass.  Limit: this guards against accidental early exits, not hostile code: the nonce lives
in the same interpreter, so a program written to dig it out of memory (``__main__``, frames, gc)
could fake a pass; it cannot escape the other layers by doing so.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

NOBODY = 65534
TAIL_CHARS = 2000

# Runs inside the child before the untrusted program; receives its settings on stdin.
BOOTSTRAP = r'''
import builtins, json, os, resource, sys
cfg = json.loads(sys.stdin.readline())
lim = cfg["limits"]
def setlim(kind, soft, hard=None):
    try:
        resource.setrlimit(kind, (soft, soft if hard is None else hard))
    except (ValueError, OSError):
        pass
setlim(resource.RLIMIT_CPU, lim["cpu_s"], lim["cpu_s"] + 1)
setlim(resource.RLIMIT_AS, lim["memory_mb"] << 20)
setlim(resource.RLIMIT_FSIZE, lim["file_size_mb"] << 20)
setlim(resource.RLIMIT_NOFILE, lim["max_open_files"])
setlim(resource.RLIMIT_NPROC, lim["max_processes"])
setlim(resource.RLIMIT_CORE, 0)
if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["gid"])
    os.setuid(cfg["uid"])
root = os.path.realpath(cfg["dir"])
nonce, source_path = cfg["nonce"], cfg["program"]
with open(source_path, encoding="utf-8") as f:
    source = f.read()
result_fd = os.dup(1)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
DENY_PREFIX = ("socket.", "ctypes.", "_ctypes.")
DENY = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system",
        "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "os.setuid", "os.setgid",
        "pty.spawn", "os.startfile", "_posixsubprocess.fork_exec"}
PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.replace": (0, 1),
               "os.mkdir": (0,), "os.chmod": (0,), "os.chown": (0,), "os.link": (0, 1),
               "os.symlink": (0, 1), "os.truncate": (0,), "os.utime": (0,), "shutil.rmtree": (0,),
               "shutil.move": (0, 1), "shutil.copyfile": (1,), "os.chflags": (0,), "os.lchown": (0,)}
DIR_FD = {"os.remove": (1,), "os.rmdir": (1,), "os.mkdir": (2,), "os.rename": (2, 3), "os.replace": (2, 3),
          "os.chmod": (2,), "os.chown": (3,), "os.link": (2, 3), "os.symlink": (2,), "os.utime": (3,)}
def inside(path):
    if isinstance(path, int):
        return True
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    full = os.path.realpath(os.fspath(path))  # relative paths resolve against the *current* cwd
    return full == root or full.startswith(root + os.sep) or full == "/dev/null"
def hook(event, args):
    if event in DENY or event.startswith(DENY_PREFIX):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = args
        writes = isinstance(mode, str) and any(c in mode for c in "wax+")
        writes = writes or bool((flags or 0) & WRITE_FLAGS)
        if writes and path is not None and not inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory")
    elif event in PATH_EVENTS:
        if any(i < len(args) and args[i] is not None for i in DIR_FD.get(event, ())):
            raise PermissionError(f"sandbox: {event} relative to a directory descriptor is not allowed")
        for i in PATH_EVENTS[event]:
            if i < len(args) and args[i] is not None and not inside(args[i]):
                raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the sandbox directory")
if cfg["audit"]:
    sys.addaudithook(hook)
del cfg, lim
code = compile(source, "program.py", "exec")
# Not "__main__": like the HumanEval harness, a demo `if __name__ == "__main__":` block in the
# model's answer (often calling input()) is not run.
namespace = {"__name__": "solution", "__builtins__": builtins, "__file__": "program.py"}
try:
    exec(code, namespace)
except SystemExit as e:
    if e.code not in (None, 0):
        raise
    sys.stderr.write("sandbox: the program exited before the end of its tests\n")
    sys.exit(3)
sys.stdout.flush()
os.write(result_fd, ("\n" + nonce + "\n").encode())
'''


@dataclass(kw_only=True, slots=True)
class SandboxLimits:
    """Per-program limits; defaults suit HumanEval/MBPP tests (milliseconds of work each)."""

    timeout_s: float = 10.0
    """Wall-clock limit; the process group is killed when it is exceeded."""
    cpu_s: int = 0
    """RLIMIT_CPU seconds; 0 = ceil(timeout_s) + 1."""
    memory_mb: int = 1024
    """RLIMIT_AS (virtual address space) in MiB."""
    file_size_mb: int = 16
    """RLIMIT_FSIZE: the largest file (including captured stdout/stderr) the program may write."""
    max_open_files: int = 128
    max_processes: int = 64
    """RLIMIT_NPROC (counts the user's processes; not enforced for root, the audit hook is)."""
    network_namespace: bool = True
    """Use ``unshare -n`` when it works here."""
    drop_privileges: bool = True
    """Run as ``nobody`` when root and the interpreter is accessible to it."""
    audit_hook: bool = True
    """Install the audit hook (network, processes, writes outside the sandbox, ctypes)."""
    python: str = ""
    """Interpreter for the programs ("" = this one).  A system Python that ``nobody`` can run
    (e.g. /usr/bin/python3 when this venv's Python lives under /root) enables the user layer."""

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


@dataclass(slots=True)
class ExecResult:
    """Outcome of one program: ``passed`` only when it ran to its end (see module docstring)."""

    passed: bool
    status: str          # passed | failed | timeout | killed
    returncode: int | None
    duration_s: float
    stdout: str
    stderr: str


@lru_cache(maxsize=8)
def _netns_works(python: str) -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    try:
        return subprocess.run([unshare, "-n", python, "-I", "-c", "pass"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@lru_cache(maxsize=8)
def _nobody_can_run_python(python: str) -> bool:
    if os.geteuid() != 0:
        return False
    try:
        probe = subprocess.run([python, "-I", "-c", "import json, math, collections, re"],
                               user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True,
                               timeout=30, cwd="/")
        return probe.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def sandbox_layers(limits: SandboxLimits | None = None) -> dict:
    """Which isolation layers are active on this machine with these limits (for reports and tests)."""
    limits = limits or SandboxLimits()
    return {
        "process_group_kill": True,
        "network_namespace": limits.network_namespace and _netns_works(limits.python),
        "audit_hook": limits.audit_hook,
        "unprivileged_user": limits.drop_privileges and _nobody_can_run_python(limits.python),
        "python": limits.python,
        "limits": asdict(limits),
    }


def _tail(path: Path, nonce: str | None = None) -> tuple[str, bool]:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 4 * TAIL_CHARS))
        text = f.read().decode("utf-8", "replace")
    found = nonce is not None and ("\n" + nonce + "\n") in text
    if found:
        text = text.replace("\n" + nonce + "\n", "")
    return text[-TAIL_CHARS:], found


def run_program(source: str, limits: SandboxLimits | None = None) -> ExecResult:
    """Run one Python program in the sandbox and report whether it ran to its end."""
    limits = limits or SandboxLimits()
    layers = sandbox_layers(limits)
    drop = layers["unprivileged_user"]
    workdir = Path(tempfile.mkdtemp(prefix="dm-sandbox-"))
    try:
        program = workdir / "program.py"
        program.write_text(source, encoding="utf-8")
        if drop:
            os.chown(workdir, NOBODY, NOBODY)
            os.chown(program, NOBODY, NOBODY)
        nonce = secrets.token_hex(16)
        cfg = {"limits": asdict(limits), "uid": NOBODY if drop else None, "gid": NOBODY if drop else None,
               "dir": str(workdir), "nonce": nonce, "program": str(program), "audit": limits.audit_hook}
        cmd = [limits.python, "-I", "-B", "-c", BOOTSTRAP]
        if layers["network_namespace"]:
            cmd = [shutil.which("unshare") or "unshare", "-n", *cmd]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0"}
        out_path, err_path = workdir / ".stdout", workdir / ".stderr"
        start = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir, env=env,
                                    start_new_session=True, close_fds=True)
            status = None
            try:
                proc.stdin.write((json.dumps(cfg) + "\n").encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                status = "timeout"
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group, also after a normal exit
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        duration = time.perf_counter() - start
        stdout, finished = _tail(out_path, nonce)
        stderr, _ = _tail(err_path)
        rc = proc.returncode
        passed = status is None and rc == 0 and finished
        if status is None:
            status = "passed" if passed else ("killed" if rc is not None and rc < 0 else "failed")
        return ExecResult(passed, status, rc, round(duration, 4), stdout, stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_programs(sources: list[str], limits: SandboxLimits | None = None, workers: int = 2
                 ) -> list[ExecResult]:
    """Run many programs with at most ``workers`` at a time; results in input order.

    Threads only wait on child processes, so a thread pool is enough for parallelism.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    limits = limits or SandboxLimits()
    sandbox_layers(limits)  # probe once before the threads start
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))
