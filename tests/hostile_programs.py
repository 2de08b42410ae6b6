"""Hostile completions for tests/test_sandbox.py: each defines ``answer()``, tested by ``answer() == 42``
(see ``TESTS``).

Where an attack's success can be seen from inside, ``answer()`` returns 42 exactly when it
succeeded, so an escape shows up as a pass.  Other effects (processes, files, connections, the
host's life) are checked from outside by the test.  Placeholders in braces are filled by the test:
``{canary}`` a host folder with ``keep.txt``, ``{host_pid}``, ``{repo}``, ``{port}``/``{port6}`` host
TCP listeners, ``{unix}`` a host unix socket path, ``{abstract}`` a host abstract unix socket name,
``{secret}`` an API key set in the harness's environment.  ``31337`` marks any process they start.
"""

from __future__ import annotations

# through map(): a StopIteration from the candidate, if it were re-raised as such, would end the map early
TESTS = "assert all(map(lambda _: answer() == 42, range(2)))\n"

_LIBC = ("import ctypes, ctypes.util\n"
         "libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6', use_errno=True)\n")

HOSTILE: dict[str, str] = {
    # --- the four escapes of the issue
    "setsid-fork-exec": """
import _posixsubprocess, os
def answer():
    r, w = os.pipe()
    for extra in ([], [False], [False, False]):  # the signature grows across Python versions
        try:
            _posixsubprocess.fork_exec([b"/bin/sleep", b"31337"], [b"/bin/sleep"], True, (), None, None,
                                       -1, -1, -1, -1, -1, -1, r, w, False, True, -1, None, None, None, -1,
                                       None, *extra)
        except TypeError:
            continue
        except Exception as e:
            print("refused:", e)
            return 0
        return 42
    return 0
""",
    "pidfd-kill-host": """
import os, signal
def answer():
    hits = 0
    for pid in [{host_pid}, *range(1, 400)]:
        if pid == os.getpid():
            continue
        try:
            fd = os.pidfd_open(pid)
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            hits += 1
        except OSError:
            pass
    return 0
""",
    "sqlite-outside": """
import sqlite3
def answer():
    sqlite3.connect("{canary}/escaped.db").execute("create table t(x)")
    return 42
""",
    "forge-marker-and-exit": """
import __main__, os, sys
for name in dir(__main__):
    print(name, getattr(__main__, name, None))
print("PASS\\n" * 3, flush=True)
sys.stderr.write("passed\\n")
os._exit(0)
""",
    # --- processes
    "fork-bomb": """
import os
while True:
    os.fork()
""",
    "double-fork-daemon": """
import os, time
def answer():
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv("/bin/sleep", ["sleep", "31337"])
        os._exit(0)
    return 0
""",
    "subprocess-daemon": """
import subprocess
def answer():
    subprocess.Popen(["/bin/sleep", "31337"], start_new_session=True)
    return 42
""",
    "multiprocessing": """
import multiprocessing, time
def answer():
    p = multiprocessing.Process(target=time.sleep, args=(31337,))
    p.start()
    return 42
""",
    "ptrace-pid1": _LIBC + """
def answer():
    return 42 if libc.ptrace(16, 1, 0, 0) == 0 else 0   # PTRACE_ATTACH to the namespace's init
""",
    "unshare-userns": _LIBC + """
def answer():
    return 42 if libc.unshare(0x10000000) == 0 else 0   # CLONE_NEWUSER
""",
    # --- files
    "write-proc-self-fd": """
import os
def answer():
    done = 0
    for p in ["/proc/self/fd/1", "/proc/1/fd/1", "/proc/self/root/{canary}/keep.txt",
              "/proc/1/root/{canary}/keep.txt", "/proc/1/cwd/../{canary}/keep.txt"]:
        try:
            with open(p, "w") as f:
                f.write("overwritten")
            done += "{canary}" in p
        except OSError:
            pass
    return 42 if done else 0
""",
    "symlink-out": """
import os
def answer():
    os.symlink("{canary}", "link")
    with open("link/escaped.txt", "w") as f:
        f.write("x")
    return 42
""",
    "write-system-and-harness": """
import sys
def answer():
    for p in ["{repo}/evaluation/sandbox.py", sys.executable, "/usr/lib/escaped", "/etc/escaped",
              "/root/escaped", "{canary}/keep.txt"]:
        try:
            open(p, "a").write("x")
            return 42
        except OSError:
            pass
    return 0
""",
    "fill-tmpfs": """
def answer():
    for i in range(1000):
        with open(f"/tmp/fill{{i}}", "wb") as f:
            f.write(b"x" * (8 << 20))
    return 42
""",
    # --- reading the harness
    "read-harness-files": """
import os
def answer():
    for p in ["{repo}/evaluation/sandbox.py", "{canary}/keep.txt", "/etc/passwd", "/etc/shadow",
              "/root/.bashrc", "/proc/{host_pid}/environ", "/proc/{host_pid}/cmdline"]:
        try:
            open(p).read()
            return 42
        except OSError:
            pass
    return 0
""",
    "read-api-key": """
import os
def answer():
    seen = str(dict(os.environ))
    for pid in os.listdir("/proc"):
        try:
            seen += open(f"/proc/{{pid}}/environ", errors="replace").read()
        except OSError:
            pass
    return 42 if "{secret}" in seen or "OPENAI" in seen else 0
""",
    "list-host-processes": """
import os
def answer():
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
    return 42 if str({host_pid}) in pids or len(pids) > 3 else 0
""",
    # --- network
    "tcp-to-host": """
import socket
def answer():
    for fam, addr in [(socket.AF_INET, ("127.0.0.1", {port})), (socket.AF_INET6, ("::1", {port6})),
                      (socket.AF_INET, ("1.1.1.1", 53))]:
        try:
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.settimeout(1)
            s.connect(addr)
            return 42
        except OSError:
            pass
    return 0
""",
    "udp-and-dns": """
import socket
def answer():
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", {port}))
        socket.getaddrinfo("example.com", 80)
        return 42
    except OSError:
        return 0
""",
    "unix-sockets-to-host": """
import socket
def answer():
    for addr in ["{unix}", "\\0{abstract}"]:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(addr)
            return 42
        except OSError:
            pass
    return 0
""",
    "raw-packet-netlink": """
import socket
def answer():
    for args in [(socket.AF_PACKET, socket.SOCK_RAW), (socket.AF_INET, socket.SOCK_RAW, 1)]:
        try:
            socket.socket(*args)
            return 42
        except OSError:
            pass
    return 0
""",
    # --- resources
    "huge-allocation": """
def answer():
    blocks = [bytearray(1 << 30) for _ in range(64)]
    return 42
""",
    "stdout-flood": """
import sys
def answer():
    while True:
        sys.stdout.write("x" * (1 << 20))
""",
    "stderr-flood": """
import os
while True:
    os.write(2, b"y" * (1 << 20))
""",
    "ignore-sigterm-and-sleep": """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
time.sleep(3600)
""",
    "raise-rlimits": """
import resource
def answer():
    try:
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        return 42
    except (ValueError, OSError):
        return 0
""",
    "signal-every-pid": """
import os, signal
def answer():
    for pid in [{host_pid}, -1, *range(1, 400)]:
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    return 0
""",
    "fd-exhaustion": """
def answer():
    files = [open("/dev/null") for _ in range(100000)]
    return 42
""",
    # --- faking the verdict
    "always-equal": """
class Liar:
    def __eq__(self, other):
        return True
    __hash__ = object.__hash__
def answer():
    return Liar()
""",
    "int-subclass-liar": """
class Liar(int):
    def __eq__(self, other):
        return True
def answer():
    return Liar(0)
""",
    "stopiteration-ends-test": """
def answer():
    raise StopIteration
""",
    "forge-channel": """
import os
for fd in range(3, 64):
    try:
        os.write(fd, b'{{"ready":true}}\\n{{"ok":["b",true]}}\\n{{"ok":["h",1]}}\\nPASS\\n')
    except OSError:
        pass
def answer():
    return 0
""",
    "patch-builtins-and-exit": """
import builtins, sys
builtins.AssertionError = type("Nothing", (Exception,), {{}})
builtins.__dict__["__import__"] = None
def answer():
    sys.exit(0)
""",
}
