"""The sandbox: correct programs pass, wrong ones fail, and hostile ones (tests/hostile_programs.py)
score 0 and leave no process, file or connection behind, with and without the audit hook."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from evaluation import verdict
from evaluation.sandbox import Program, SandboxLimits, bwrap_path, run_program, run_programs, sandbox_layers
from tests.hostile_programs import HOSTILE, TESTS

REPO = Path(__file__).resolve().parents[1]
FAST = SandboxLimits(timeout_s=4.0, memory_mb=512)
SECRET = "sk-dm-hostile-canary-7f3a"


def _leftovers() -> list[str]:
    """Processes a sandboxed program could have left: marked ones, or candidates of this harness."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if any("31337" in c or "The verdict protocol" in c for c in cmd):
            out.append(f"{p.info['pid']}: {' '.join(cmd)[:80]}")
    return out


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Run every hostile program twice (kernel layers alone; with the audit hook) against live host
    listeners, a canary folder and a secret in the environment; collect what was left behind."""
    base = tmp_path_factory.mktemp("hostile")
    canary, host_tmp = base / "canary", base / "host_tmp"
    canary.mkdir()
    host_tmp.mkdir()
    (canary / "keep.txt").write_text("precious")
    fds_before = len(os.listdir("/proc/self/fd"))
    children_before = set(psutil.Process().children(recursive=True))  # e.g. earlier tests' forkservers
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", tcp.getsockname()[1]))
    try:
        tcp6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        tcp6 = None
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(base / "host.sock"))
    unix.listen()
    abstract = f"dm-hostile-{os.getpid()}"
    abstract_sock = socket.socket(socket.AF_UNIX)
    abstract_sock.bind("\0" + abstract)
    abstract_sock.listen()
    listeners = [s for s in (tcp, udp, tcp6, unix, abstract_sock) if s is not None]
    for s in listeners:
        s.setblocking(False)
    fill = {"canary": canary, "host_pid": os.getpid(), "repo": REPO, "port": tcp.getsockname()[1],
            "port6": tcp6.getsockname()[1] if tcp6 else 1, "unix": base / "host.sock", "abstract": abstract,
            "secret": SECRET}
    programs = [Program(src.format(**fill), TESTS) for src in HOSTILE.values()]
    old_env, old_tmp = os.environ.get("OPENAI_API_KEY"), tempfile.tempdir
    os.environ["OPENAI_API_KEY"] = SECRET
    tempfile.tempdir = str(host_tmp)
    try:
        start = time.perf_counter()
        kernel_only = SandboxLimits(timeout_s=4.0, memory_mb=512, audit_hook=False)
        kernel = run_programs(programs, kernel_only, workers=4)
        both = run_programs(programs, FAST, workers=4)
        elapsed = time.perf_counter() - start
    finally:
        tempfile.tempdir = old_tmp
        if old_env is None:
            del os.environ["OPENAI_API_KEY"]
        else:
            os.environ["OPENAI_API_KEY"] = old_env
    time.sleep(0.3)
    contacted = []
    for s in listeners:
        try:
            s.recv(1) if s.type == socket.SOCK_DGRAM else s.accept()
            contacted.append(s.getsockname())
        except BlockingIOError:
            pass
        s.close()
    return {"kernel": dict(zip(HOSTILE, kernel)), "both": dict(zip(HOSTILE, both)), "elapsed": elapsed,
            "children": sorted(set(psutil.Process().children(recursive=True)) - children_before,
                               key=lambda p: p.pid),
            "leftovers": _leftovers(),
            "canary": sorted(p.name for p in canary.iterdir()), "keep": (canary / "keep.txt").read_text(),
            "host_tmp": list(host_tmp.iterdir()), "contacted": contacted,
            "fds": len(os.listdir("/proc/self/fd")) - fds_before}


@pytest.mark.parametrize("layers", ["kernel", "both"])
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_scores_zero(hostile, name, layers):
    r = hostile[layers][name]
    assert not r.passed and r.status != "passed", (name, r)
    assert len(r.stdout) <= 2000 and len(r.stderr) <= 2000


def test_hostile_programs_leave_nothing_behind(hostile):
    assert len(HOSTILE) >= 25
    assert hostile["children"] == [] and hostile["leftovers"] == []   # no process, daemon or sleeper
    assert hostile["canary"] == ["keep.txt"] and hostile["keep"] == "precious"   # no file written outside
    assert hostile["host_tmp"] == []   # the harness's own temporary folders are gone
    assert hostile["contacted"] == []   # no connection reached the host
    assert hostile["fds"] <= 0   # no descriptor leaked in the harness (earlier tests may close some)
    assert hostile["elapsed"] < 90, "the hostile suite must stay fast"


def test_kernel_layers_refuse_what_the_audit_hook_would(hostile):
    k = hostile["kernel"]
    assert "Operation not permitted" in k["setsid-fork-exec"].stdout   # seccomp: no new process
    assert k["ignore-sigterm-and-sleep"].status == "timeout"
    assert "Too many open files" in k["fd-exhaustion"].stderr
    assert "MemoryError" in k["huge-allocation"].stderr
    # _posixsubprocess.fork_exec raises no audit event: only the kernel stops it, hook or not
    assert "Operation not permitted" in hostile["both"]["setsid-fork-exec"].stdout
    assert "sandbox: os.fork is not allowed" in hostile["both"]["double-fork-daemon"].stderr


def test_correct_program_passes_and_wrong_fails():
    ok = run_program(Program("def f(x):\n    return x + 1\nprint('fine')\n", "assert f(1) == 2\n"), FAST)
    assert ok.passed and ok.status == "passed" and "fine" in ok.stdout
    bad = run_program(Program("def f(x):\n    return x\n", "assert f(1) == 2\n"), FAST)
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.stderr


def test_values_cross_as_plain_data_and_handles():
    src = ("import collections, math\n"
           "class Node:\n    def __init__(self, v):\n        self.v, self.left = v, None\n"
           "def depth(n):\n    return 0 if n is None else 1 + depth(n.left)\n"
           "def stats(xs):\n"
           "    return collections.Counter(xs), tuple(xs), set(xs), math.pi, 2**100, b'\\x00', 1j\n"
           "def evens(n):\n    return filter(lambda x: x % 2 == 0, range(n))\n"
           "def picky(x):\n    raise ValueError('no')\n")
    tests = ("root = Node(1)\nroot.left = Node(2)\nassert depth(root) == 2 and root.v == 1\n"
             "c, t, s, pi, big, by, z = stats([1, 1, 2])\n"
             "assert c == {1: 2, 2: 1} and t == (1, 1, 2) and s == {1, 2} and big == 2**100 and z == 1j\n"
             "assert math.isclose(pi, 3.14159, rel_tol=1e-5) and by == b'\\x00'\n"
             "assert list(evens(5)) == [0, 2, 4]\n"
             "try:\n    picky(1)\n    raise AssertionError('no error')\nexcept ValueError:\n    pass\n"
             "assert root != Node(1) and root == root\n")
    r = run_program(Program(src, tests), FAST)
    assert r.passed, r.stderr


def test_decoder_is_strict():
    for bad in (["x", 1], ["i", 3], ["b", 1], ["l", [["n"], ["q"]]], ["m", "os"], ["d", [[["l", []], ["n"]]]],
                "n", [], ["s"]):
        with pytest.raises((ValueError, TypeError)):
            verdict.decode(bad, lambda i: i)
    deep = ["n"]
    for _ in range(verdict.MAX_DEPTH + 5):
        deep = ["l", [deep]]
    with pytest.raises(ValueError, match="deep"):
        verdict.decode(deep, lambda i: i)


def test_common_stdlib_imports_work():
    src = ("import math, heapq, re, collections, itertools, bisect, functools, string, json, random, sys\n"
           "import datetime, fractions, decimal, statistics, operator, copy, typing, cmath, array, queue\n"
           "import threading, sqlite3\nsqlite3.connect(':memory:').execute('select 1')\n"
           "t = threading.Thread(target=lambda: None)\nt.start()\nt.join()\n"
           "assert math.gcd(12, 18) == 6 and heapq.nsmallest(1, [3, 1]) == [1]\n")
    r = run_program(Program(src), SandboxLimits(timeout_s=4.0, audit_hook=False))
    assert r.passed, r.stderr


@pytest.mark.parametrize("src", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"],
                         ids=["busy-loop", "sleep"])
def test_hanging_programs_time_out(src):
    t = time.perf_counter()
    r = run_program(Program(src), SandboxLimits(timeout_s=2.0))
    assert not r.passed and r.status == "timeout"
    assert time.perf_counter() - t < 2.0 + 6


def test_cpu_limit_kills_busy_loop_even_with_long_wall_timeout():
    r = run_program(Program("while True:\n    pass\n"), SandboxLimits(timeout_s=30, cpu_s=1))
    assert not r.passed and r.status == "killed" and r.duration_s < 15   # SIGXCPU from RLIMIT_CPU


def test_file_size_limit_and_flood():
    small = SandboxLimits(timeout_s=5, file_size_mb=4)
    r = run_program(Program("open('big.bin', 'wb').write(b'x' * (64 << 20))\n"), small)
    assert not r.passed and "File too large" in r.stderr
    flood = run_program(Program("print('x' * 10**8)\n"), small)
    assert not flood.passed and len(flood.stdout) <= 2000


def test_network_namespace_has_only_a_down_loopback():
    src = "import socket\nnames = [n for _, n in socket.if_nameindex()]\n"
    r = run_program(Program(src, "assert names == ['lo']\n"), SandboxLimits(timeout_s=4.0, audit_hook=False))
    assert r.passed, r.stderr


def test_early_exit_is_not_a_pass():
    for src in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n", "raise SystemExit\n"):
        r = run_program(Program(src + "def f():\n    return 1\n", "assert f() == 1\n"), FAST)
        assert not r.passed, src


def test_main_guard_demo_block_is_not_run():
    src = ("def f():\n    return 1\n"
           "if __name__ == '__main__':\n    input('number? ')\n    raise SystemExit(1)\n")
    assert run_program(Program(src, "assert f() == 1\n"), FAST).passed


def test_builtins_stay_the_checkers_unless_the_interface_says_otherwise():
    src = "def sum(a, b):\n    return 7\ndef set(*a):\n    return 0\n"
    assert not run_program(Program(src, "assert set([1]) == set([2])\n"), FAST).passed
    assert run_program(Program(src, "assert sum(1, 2) == 7\n", interface=("sum",)), FAST).passed


def test_pool_runs_in_parallel_and_keeps_order():
    progs = [Program("import time\ntime.sleep(1)\n"), Program("x = 1\n", "assert x == 2\n"),
             Program("import time\ntime.sleep(1)\n"), Program("x = 2\n", "assert x == 2\n")]
    t = time.perf_counter()
    res = run_programs(progs, SandboxLimits(timeout_s=10), workers=2)
    assert [r.passed for r in res] == [True, False, True, True]
    assert time.perf_counter() - t < res[0].duration_s + res[2].duration_s, "the sleeps should overlap"


def test_limits_validation():
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    assert SandboxLimits(timeout_s=2.5).cpu_s == 4


def test_layers_report():
    layers = sandbox_layers(FAST)
    assert layers["isolation"] == "bubblewrap" and layers["seccomp"] is True
    assert layers["sandbox_uid"] == 65534
    assert set(layers["namespaces"]) >= {"user", "pid", "mount", "network", "ipc"}
    who = run_program(Program("import os\nuid = os.getuid()\nhome = os.environ['HOME']\n",
                              "assert uid == 65534 and home == '/tmp'\n"), FAST)
    assert who.passed, who.stderr


def test_unsafe_no_isolation_runs_and_says_so():
    limits = SandboxLimits(timeout_s=4.0, isolation=False)
    assert sandbox_layers(limits)["isolation"] == "none (--unsafe-no-isolation)"
    assert run_program(Program("def f():\n    return 1\n", "assert f() == 1\n"), limits).passed
    assert not run_program(Program("def f():\n    return 0\n", "assert f() == 1\n"), limits).passed


FAIL_CLOSED_SCRIPT = """
import json, sys
from evaluation.sandbox import SandboxLimits, SandboxUnavailable, sandbox_layers
try:
    print(json.dumps(sandbox_layers(SandboxLimits(isolation=sys.argv[1] == "isolated"))))
except SandboxUnavailable as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


def test_refused_namespaces_fail_closed_with_one_line():
    """Inside a sandbox that forbids new user namespaces, the harness refuses to run code (one line
    naming the switch) unless isolation is switched off explicitly."""
    cmd = [bwrap_path(), "--unshare-user", "--disable-userns", "--ro-bind", "/", "/", "--dev", "/dev",
           "--proc", "/proc", "--tmpfs", "/tmp",
           # re-expose the checkout and the interpreter if they live under /tmp (a CI clone may)
           "--ro-bind", str(REPO), str(REPO), "--ro-bind", sys.prefix, sys.prefix, "--chdir", str(REPO),
           sys.executable, "-c", FAIL_CLOSED_SCRIPT]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)}
    refused = subprocess.run(cmd + ["isolated"], capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "kernel isolation is not available" in refused.stderr and "--unsafe-no-isolation" in refused.stderr
    unsafe = subprocess.run(cmd + ["unsafe"], capture_output=True, text=True, env=env, timeout=120)
    assert unsafe.returncode == 0 and json.loads(unsafe.stdout)["isolation"].startswith("none")


NON_ROOT_SCRIPT = """
import json, os, sys
from evaluation.sandbox import Program, SandboxLimits, run_programs, sandbox_layers
from tests.hostile_programs import HOSTILE, TESTS
fill = dict(canary=sys.argv[1], host_pid=os.getpid(), repo=sys.argv[2], port=1, port6=1, unix="/x",
            abstract="x", secret=os.environ["OPENAI_API_KEY"])
names = ["fork-bomb", "read-api-key", "write-system-and-harness", "forge-marker-and-exit", "signal-every-pid"]
progs = [Program("def answer():\\n    return 42\\n", TESTS)]
progs += [Program(HOSTILE[n].format(**fill), TESTS) for n in names]
limits = SandboxLimits(timeout_s=8.0, audit_hook=False)
print(json.dumps({"uid": os.geteuid(), "host_uid": sandbox_layers(limits)["host_uid"],
                  "passed": [r.passed for r in run_programs(progs, limits, workers=2)]}))
"""


def test_same_behaviour_as_an_ordinary_user(tmp_path):
    """The harness itself run as uid 65534 (system Python, this checkout): same verdicts."""
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if os.geteuid() != 0 or system_python is None or shutil.which("setpriv") is None:
        pytest.skip("needs root (to become another user), setpriv and a system python3")
    bwrap_dir = str(Path(bwrap_path()).parent)
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "test", "-r",
                            str(REPO / "evaluation" / "sandbox.py"), "-a", "-x", bwrap_path()])
    if probe.returncode != 0:
        pytest.skip("this checkout or the bwrap binary is not readable by uid 65534")
    (tmp_path / "keep.txt").write_text("precious")
    env = {"PATH": f"{bwrap_dir}:/usr/bin:/bin", "PYTHONPATH": str(REPO), "OPENAI_API_KEY": SECRET,
           "HOME": "/tmp"}
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", system_python, "-c",
                        NON_ROOT_SCRIPT, str(tmp_path), str(REPO)], capture_output=True, text=True, env=env,
                       cwd="/", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["uid"] == 65534 and out["host_uid"] == 65534
    assert out["passed"] == [True, False, False, False, False, False]
    assert (tmp_path / "keep.txt").read_text() == "precious" and _leftovers() == []


def test_sandbox_dies_with_the_harness(tmp_path):
    """SIGKILL of the harness mid-run: bubblewrap (--die-with-parent) takes the program with it."""
    script = ("from evaluation.sandbox import Program, SandboxLimits, run_program, sandbox_layers\n"
              "limits = SandboxLimits(timeout_s=120)\nsandbox_layers(limits)\nprint('probed', flush=True)\n"
              "run_program(Program('import time\\ntime.sleep(120)\\n'), limits)\n")
    harness = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.PIPE, text=True)
    try:
        assert harness.stdout.readline() == "probed\n"
        deadline = time.monotonic() + 60
        while not any(c.name() != "bwrap" and "The verdict protocol" in " ".join(c.cmdline())
                      for c in psutil.Process(harness.pid).children(recursive=True)):  # the program itself
            assert time.monotonic() < deadline and harness.poll() is None, "the program never started"
            time.sleep(0.1)
    finally:
        harness.kill()
        harness.wait()
    deadline = time.monotonic() + 10
    while _leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _leftovers() == []


def test_modules_come_from_the_checker_under_their_own_name():
    ok = run_program(Program("import math\n", "assert math.isclose(math.pi, 3.14159, rel_tol=1e-5)\n"), FAST)
    assert ok.passed, ok.stderr
    swapped = run_program(Program("import operator as math\n", "assert math.truth(1)\n"), FAST)
    assert not swapped.passed and "is module 'operator'" in swapped.stderr
