"""Hostile programs score 0 without harming the host; each isolation layer is tested on its own."""

from __future__ import annotations

import os
import time

import psutil
import pytest

from evaluation.sandbox import SandboxLimits, run_program, run_programs, sandbox_layers

FAST = SandboxLimits(timeout_s=2.0, memory_mb=512)


def test_correct_program_passes_and_wrong_fails():
    ok = run_program("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('fine')\n", FAST)
    assert ok.passed and ok.status == "passed" and ok.returncode == 0
    assert "fine" in ok.stdout
    bad = run_program("def f(x):\n    return x\nassert f(1) == 2\n", FAST)
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.stderr


def test_common_stdlib_imports_work():
    src = ("import math, heapq, re, collections, itertools, bisect, functools, string, json, random, sys\n"
           "import datetime, fractions, decimal, statistics, operator, copy, typing, cmath, array, queue\n"
           "assert math.gcd(12, 18) == 6 and heapq.nsmallest(1, [3, 1]) == [1]\n")
    assert run_program(src, FAST).passed


@pytest.mark.parametrize("src", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"],
                         ids=["busy-loop", "sleep"])
def test_hanging_programs_time_out(src):
    t = time.perf_counter()
    r = run_program(src, FAST)
    assert not r.passed and r.status == "timeout"
    assert time.perf_counter() - t < FAST.timeout_s + 3


def test_cpu_limit_kills_busy_loop_even_with_long_wall_timeout():
    r = run_program("while True:\n    pass\n", SandboxLimits(timeout_s=30, cpu_s=1))
    assert not r.passed and r.status == "killed" and r.duration_s < 10  # SIGXCPU/SIGKILL from RLIMIT_CPU


def test_memory_hungry_program_fails_fast():
    r = run_program("x = bytearray(3 * 2**30)\n", FAST)
    assert not r.passed and "MemoryError" in r.stderr and r.duration_s < 5


def test_fork_bomb_is_stopped():
    before = len(psutil.Process().children(recursive=True))
    r = run_program("import os\nwhile True:\n    os.fork()\n", FAST)
    assert not r.passed and r.status == "failed"
    assert len(psutil.Process().children(recursive=True)) == before


def test_subprocess_and_ctypes_refused():
    for src in ("import subprocess\nsubprocess.run(['true'])\n", "import os\nos.system('true')\n",
                "import ctypes\n"):
        r = run_program(src, FAST)
        assert not r.passed and "sandbox:" in r.stderr, src


def test_writes_outside_the_sandbox_dir_are_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    for src in (f"open({str(target)!r}, 'w').write('x')\n",
                f"import os\nos.remove({str(victim)!r})\n",
                f"import pathlib\npathlib.Path({str(tmp_path / 'newdir')!r}).mkdir()\n",
                f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
                f"import os\nos.chdir({str(tmp_path)!r})\nopen('escaped.txt', 'w').write('x')\n",
                f"import os\nos.symlink({str(tmp_path)!r}, 'link')\nopen('link/escaped.txt', 'w')\n"):
        r = run_program(src, FAST)
        assert not r.passed, src
    assert not target.exists() and victim.read_text() == "precious" and not (tmp_path / "newdir").exists()
    # inside its own temporary directory a program may write freely
    ok = run_program("open('scratch.txt', 'w').write('x')\nimport os\nassert os.path.exists('scratch.txt')\n",
                     FAST)
    assert ok.passed


def test_file_size_limit():
    small = SandboxLimits(timeout_s=5, file_size_mb=4)
    r = run_program("open('big.bin', 'wb').write(b'x' * (64 << 20))\n", small)
    assert not r.passed and "File too large" in r.stderr
    flood = run_program("print('x' * 10**8)\n", small)
    assert not flood.passed and len(flood.stdout) <= 2000


NET = ("import socket\n"
       "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
       "s.settimeout(1)\n"
       "s.connect(('1.1.1.1', 53))\n")


def test_network_refused_with_all_layers():
    layers = sandbox_layers(FAST)
    assert layers["audit_hook"] or layers["network_namespace"], "at least one network layer must be active"
    r = run_program(NET, FAST)
    assert not r.passed
    r = run_program("import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)\n", FAST)
    assert not r.passed


def test_network_refused_by_audit_hook_alone():
    limits = SandboxLimits(timeout_s=3, network_namespace=False)
    r = run_program(NET, limits)
    assert not r.passed and "sandbox: socket" in r.stderr


def test_network_refused_by_namespace_alone():
    limits = SandboxLimits(timeout_s=5, audit_hook=False)
    if not sandbox_layers(limits)["network_namespace"]:
        pytest.skip("unshare -n is not available here (needs root or unprivileged user namespaces)")
    r = run_program(NET, limits)
    assert not r.passed and "unreachable" in r.stderr.lower()
    # the namespace has only a loopback device, which is down: no interface to reach anything
    ifaces = run_program("import socket\nassert [n for _, n in socket.if_nameindex()] == ['lo']\n", limits)
    assert ifaces.passed, ifaces.stderr


def test_timeout_kills_the_whole_process_group():
    # without the audit hook the program may spawn a child; the group kill must take it down too
    src = ("import subprocess, sys, time\n"
           "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
           "print(p.pid, flush=True)\n"
           "time.sleep(120)\n")
    r = run_program(src, SandboxLimits(timeout_s=3, audit_hook=False))
    assert r.status == "timeout"
    pid = int(r.stdout.split()[0])
    time.sleep(0.2)
    alive = psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    assert not alive


def test_early_exit_is_not_a_pass():
    for src in ("import sys\nsys.exit(0)\nassert False\n", "import os\nos._exit(0)\nassert False\n",
                "raise SystemExit\nassert False\n"):
        r = run_program(src, FAST)
        assert not r.passed, src


def test_pool_runs_in_parallel_and_keeps_order():
    srcs = ["import time\ntime.sleep(1)\nassert True\n", "assert False\n", "import time\ntime.sleep(1)\n",
            "assert 1 + 1 == 2\n"]
    t = time.perf_counter()
    res = run_programs(srcs, SandboxLimits(timeout_s=5), workers=2)
    assert [r.passed for r in res] == [True, False, True, True]
    assert time.perf_counter() - t < 3.5, "two 1-second programs should overlap with 2 workers"


def test_limits_validation():
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    assert SandboxLimits(timeout_s=2.5).cpu_s == 4


def test_host_unaffected_cwd_and_environment():
    cwd = os.getcwd()
    r = run_program("import os\nos.chdir('/')\nos.environ['X'] = '1'\n", FAST)
    assert r.passed and os.getcwd() == cwd and "X" not in os.environ


def test_main_guard_demo_block_is_not_run():
    src = ("def f():\n    return 1\n"
           "if __name__ == '__main__':\n    input('number? ')\n    raise SystemExit(1)\n"
           "assert f() == 1\n")
    assert run_program(src, FAST).passed


SYSTEM_PYTHON = "/usr/bin/python3"


def test_unprivileged_user_layer(tmp_path):
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} not present")
    limits = SandboxLimits(timeout_s=5, python=SYSTEM_PYTHON, audit_hook=False)
    if not sandbox_layers(limits)["unprivileged_user"]:
        pytest.skip("not root, or nobody cannot run the system Python")
    who = run_program("import os\nassert os.getuid() == 65534 and os.geteuid() == 65534\n", limits)
    assert who.passed, who.stderr
    # with the audit hook off, file permissions alone stop writes into root's directories
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    os.chmod(tmp_path, 0o755)
    r = run_program(f"open({str(victim)!r}, 'w').write('x')\n", limits)
    assert not r.passed and "Permission denied" in r.stderr and victim.read_text() == "precious"
