"""The verdict protocol: untrusted code answers, trusted tests decide, in different processes.

Why: a verdict computed in the process that runs the untrusted code can always be forged by that
code (it can print any marker, read any secret from memory, hand ``assert`` objects whose ``__eq__``
is always true, or exit 0 early).  So the untrusted solution runs alone in the sandboxed
*candidate* process (this file run as a script: ``python -I -S -B -c <this source> candidate``,
standard library only), and the trusted test code runs in the *checker*, a thread of the harness
process that the candidate cannot reach.  Every use of a solution's name in the tests
(``candidate(...)``, ``remove_Occ(...)``, ``Node(1)``) becomes a request over a pipe; the candidate
runs it and answers with a value in the wire format below.  The checker decodes answers strictly
into plain built-in values (None, bool, int, float, complex, str, bytes, tuple, list, dict, set,
frozenset), a standard-library module it imports itself, or an opaque ``Remote`` handle for
anything else; a handle equals only itself, and every operation on it is again a request.  So the
tests' comparisons run in trusted code on plain data: to pass, the candidate has to return the
right values.  A pass is the checker running the tests to their end without an exception.  Not
guaranteed: that the tests are strong enough (hard-coded answers to the tested inputs pass), and
sharing of objects between tests and solution (arguments are copies: a test that inspects an
argument the solution mutated in place sees the original).

Wire format: one JSON object per line.  Values are ``[tag, payload]``: ``n`` None, ``b`` bool,
``i`` int (decimal string), ``f`` float (``repr``), ``c`` complex, ``s`` str, ``y`` bytes (hex),
``t``/``l``/``S``/``F`` tuple/list/set/frozenset (list of values), ``d`` dict (list of pairs),
``m`` a standard-library module, ``h`` a handle (integer id).  Subclasses of the plain types travel
as their base type (a ``namedtuple`` as a tuple, ``Counter`` as a dict), which is how they compare
anyway.  Exceptions come back as ``[type name, message]`` and are raised in the checker as the
built-in exception of that name (never ``StopIteration`` and kin, which could end a test's loop
early) or as ``RemoteError``.
"""

import builtins
import json
import os
import resource
import sys

MAX_LINE = 4 << 20           # longest message either side accepts (bytes)
MAX_DEPTH = 200              # deepest value the checker decodes
PLAIN_SEQ = {"t": tuple, "l": list, "S": set, "F": frozenset}
# modules the tests may use through a solution's import (``math.isclose`` after ``import math``); the
# checker imports its own copy, so a solution cannot substitute one
SAFE_MODULES = {"math", "cmath", "re", "collections", "itertools", "functools", "heapq", "bisect", "string",
                "operator", "statistics", "fractions", "decimal", "random", "datetime", "json", "copy",
                "typing", "array", "sys", "time", "numbers", "enum", "dataclasses", "textwrap",
                "unicodedata", "hashlib", "struct", "calendar"}
NO_RERAISE = (StopIteration, StopAsyncIteration, GeneratorExit)  # would end a test's loop early


class RemoteError(Exception):
    """An exception raised in the candidate that has no safe built-in counterpart here."""


# ----------------------------------------------------------------------------- wire values
def encode(x, handle):
    """Plain value -> wire; anything else -> ``handle(x)`` (the caller's id for it)."""
    if x is None:
        return ["n"]
    if isinstance(x, bool):
        return ["b", bool(x)]
    if isinstance(x, int):
        return ["i", str(int(x))]
    if isinstance(x, float):
        return ["f", repr(float(x))]
    if isinstance(x, complex):
        return ["c", repr(x.real), repr(x.imag)]
    if isinstance(x, str):
        return ["s", str.__str__(x)]
    if isinstance(x, (bytes, bytearray)):
        return ["y", bytes(x).hex()]
    for tag, typ in (("t", tuple), ("l", list), ("F", frozenset), ("S", set)):
        if isinstance(x, typ):
            return [tag, [encode(v, handle) for v in x]]
    if isinstance(x, dict):
        return ["d", [[encode(k, handle), encode(v, handle)] for k, v in dict.items(x)]]
    if type(x).__name__ == "module" and getattr(x, "__name__", None) in SAFE_MODULES:
        return ["m", x.__name__]
    return ["h", handle(x)]


def decode(w, handle, depth=0):
    """Wire -> value, strictly: any unknown tag or mistyped payload raises ValueError."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if not isinstance(w, list) or not w or not isinstance(w[0], str):
        raise ValueError(f"malformed value {str(w)[:80]!r}")
    tag, rest = w[0], w[1:]

    def one(kind):
        if len(rest) != 1 or not isinstance(rest[0], kind) or isinstance(rest[0], bool) != (kind is bool):
            raise ValueError(f"malformed {tag!r} value")
        return rest[0]

    if tag == "n" and not rest:
        return None
    if tag == "b":
        return one(bool)
    if tag == "i":
        return int(one(str))
    if tag == "f":
        return float(one(str))
    if tag == "c":
        if len(rest) != 2 or not all(isinstance(r, str) for r in rest):
            raise ValueError("malformed complex")
        return complex(float(rest[0]), float(rest[1]))
    if tag == "s":
        return one(str)
    if tag == "y":
        return bytes.fromhex(one(str))
    if tag in PLAIN_SEQ:
        return PLAIN_SEQ[tag](decode(v, handle, depth + 1) for v in one(list))
    if tag == "d":
        pairs = one(list)
        if not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise ValueError("malformed dict")
        return {decode(k, handle, depth + 1): decode(v, handle, depth + 1) for k, v in pairs}
    if tag == "m":
        name = one(str)
        if name.partition(".")[0] not in SAFE_MODULES:
            raise ValueError(f"module {name!r} is not a standard-library module")
        import importlib
        return importlib.import_module(name)
    if tag == "h":
        return handle(one(int))
    raise ValueError(f"unknown value tag {tag!r}")


class Channel:
    """Line-delimited JSON over two pipe descriptors."""

    def __init__(self, read_fd, write_fd):
        self.r = os.fdopen(read_fd, "rb", buffering=1 << 16)
        self.w = os.fdopen(write_fd, "wb", buffering=0)

    def send(self, obj):
        self.w.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")

    def recv(self):
        line = self.r.readline(MAX_LINE + 1)
        if not line:
            raise EOFError("the other side closed the channel")
        if len(line) > MAX_LINE or not line.endswith(b"\n"):
            raise ValueError("message too long")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise ValueError("message is not an object")
        return msg


def set_limits(lim):
    """Resource limits with hard = soft, so the program cannot raise them again."""
    mb = 1 << 20
    for kind, value in ((resource.RLIMIT_CPU, lim["cpu_s"]), (resource.RLIMIT_AS, lim["memory_mb"] * mb),
                        (resource.RLIMIT_FSIZE, lim["file_size_mb"] * mb),
                        (resource.RLIMIT_NOFILE, lim["max_open_files"]),
                        (resource.RLIMIT_NPROC, lim["max_processes"]), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(kind, (value, value))


# ----------------------------------------------------------------------------- candidate side
def audit_hook(root):
    """Second layer only (the kernel sandbox is the wall): refuse processes, signals, sockets,
    ctypes and writes outside ``root`` as early, readable errors."""
    deny = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "os.kill",
            "os.killpg", "signal.pthread_kill", "subprocess.Popen", "pty.spawn", "_posixsubprocess.fork_exec",
            "sqlite3.enable_load_extension", "sqlite3.load_extension"}
    deny_prefix = ("socket.", "ctypes.", "_ctypes.")
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path):
        if isinstance(path, int):
            return True
        full = os.path.realpath(os.fsdecode(path))
        return full == root or full.startswith(root + os.sep) or full == "/dev/null"

    def hook(event, args):
        if event in deny or event.startswith(deny_prefix):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "sqlite3.connect" and args[0] not in (":memory:", b":memory:", "") \
                and not inside(args[0]):
            raise PermissionError(f"sandbox: sqlite database {args[0]!r} outside {root}")
        if event == "open" and args[0] is not None:
            mode, flags = args[1], args[2] or 0
            if ((isinstance(mode, str) and any(c in mode for c in "wax+")) or flags & write_flags) \
                    and not inside(args[0]):
                raise PermissionError(f"sandbox: writing {args[0]!r} outside {root}")

    sys.addaudithook(hook)


def run_candidate(cfg):
    chan = Channel(cfg["read_fd"], cfg["write_fd"])
    source = cfg["source"]
    if cfg["audit"]:
        audit_hook(os.getcwd())
    del cfg
    ns = {"__name__": "solution", "__builtins__": builtins, "__file__": "program.py"}
    exec(compile(source, "program.py", "exec"), ns)  # an exception here ends the run: a failure
    objects = {}

    def handle(x):
        objects[id(x)] = x
        return id(x)

    def obj(i):
        if i not in objects:
            raise ValueError(f"unknown handle {i}")
        return objects[i]

    ops = {"global": lambda m: ns[m["name"]] if m["name"] in ns else getattr(builtins, m["name"]),
           "getattr": lambda m: getattr(obj(m["h"]), m["name"]),
           "setattr": lambda m: setattr(obj(m["h"]), m["name"], decode(m["v"], obj)),
           "call": lambda m: obj(m["h"])(*[decode(a, obj) for a in m["args"]],
                                         **{k: decode(v, obj) for k, v in m["kwargs"]}),
           "getitem": lambda m: obj(m["h"])[decode(m["k"], obj)],
           "list": lambda m: list(obj(m["h"])), "len": lambda m: len(obj(m["h"])),
           "bool": lambda m: bool(obj(m["h"])), "str": lambda m: str(obj(m["h"])),
           "repr": lambda m: repr(obj(m["h"]))}
    sys.stdout.flush()
    chan.send({"ready": True})
    while True:
        msg = chan.recv()  # EOFError when the checker is done
        try:
            answer = {"ok": encode(ops[msg["op"]](msg), handle)}
        except BaseException as e:  # noqa: BLE001 - whatever the candidate raises goes back as data
            answer = {"err": [type(e).__name__, str(e)[:500]]}
        sys.stdout.flush()  # its prints reach the record even if it is killed next
        chan.send(answer)


# ----------------------------------------------------------------------------- checker side
class Remote:
    """An object living in the candidate process; equal only to itself."""

    __slots__ = ("_id", "_conn")

    def __init__(self, conn, i):
        object.__setattr__(self, "_id", i)
        object.__setattr__(self, "_conn", conn)

    def _ask(self, op, **kw):
        return self._conn.ask(op, h=self._id, **kw)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._ask("getattr", name=name)

    def __setattr__(self, name, value):
        self._ask("setattr", name=name, v=self._conn.wire(value))

    def __call__(self, *args, **kwargs):
        return self._ask("call", args=[self._conn.wire(a) for a in args],
                         kwargs=[[k, self._conn.wire(v)] for k, v in kwargs.items()])

    def __getitem__(self, key):
        return self._ask("getitem", k=self._conn.wire(key))

    def __iter__(self):
        return iter(self._ask("list"))

    def __len__(self):
        return self._ask("len")

    def __bool__(self):
        return self._ask("bool")

    def __str__(self):
        return self._ask("str")

    def __repr__(self):
        return self._ask("repr")


class Conn:
    """The checker's end of the channel: requests, strict decoding, exceptions re-raised safely."""

    def __init__(self, chan):
        self.chan = chan

    def wire(self, value):
        def handle(x):
            if isinstance(x, Remote):
                return object.__getattribute__(x, "_id")
            raise TypeError(f"cannot pass a {type(x).__name__} to the candidate")
        return encode(value, handle)

    def ask(self, op, **kw):
        self.chan.send({"op": op, **kw})
        msg = self.chan.recv()
        if "ok" in msg:
            return decode(msg["ok"], lambda i: Remote(self, i))
        err = msg.get("err")
        if not (isinstance(err, list) and len(err) == 2 and all(isinstance(e, str) for e in err)):
            raise ValueError("malformed answer from the candidate")
        typ = getattr(builtins, err[0], None)
        if isinstance(typ, type) and issubclass(typ, Exception) and not issubclass(typ, NO_RERAISE):
            raise typ(err[1])
        raise RemoteError(f"{err[0]}: {err[1]}")


class Namespace(dict):
    """Test globals: a name the tests do not define is the candidate's, unless it is a built-in that
    is not part of the ``interface`` (so a solution cannot replace ``set`` or ``sorted`` for the tests,
    but MBPP's task whose function is called ``sum`` still tests that function)."""

    def __init__(self, conn, interface):
        super().__init__(__name__="checker", __builtins__=builtins)
        self.conn = conn
        self.interface = set(interface)

    def __missing__(self, name):
        if hasattr(builtins, name) and name not in self.interface:
            raise KeyError(name)  # the interpreter then falls back to the (real) built-ins
        value = self.conn.ask("global", name=name)
        if type(value).__name__ == "module" and value.__name__ != name:
            raise NameError(f"the solution's {name!r} is module {value.__name__!r}")  # no swapped modules
        if isinstance(value, Remote) or type(value).__name__ == "module":
            self[name] = value
        return value


def run_checker(conn, prelude, tests, entry_point, interface=()):
    """Run the trusted tests against the candidate behind ``conn``; returns only if they all pass."""
    if conn.chan.recv() != {"ready": True}:
        raise ValueError("the candidate did not start properly")
    ns = Namespace(conn, interface)
    exec(compile(prelude, "prompt.py", "exec"), ns)
    exec(compile(tests, "tests.py", "exec"), ns)
    if entry_point:
        ns["check"](conn.ask("global", name=entry_point))


def main():
    cfg = json.loads(sys.stdin.readline())
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    set_limits(cfg.pop("limits"))
    try:
        run_candidate(cfg)
    except EOFError:
        sys.stdout.flush()
        os._exit(0)  # the checker is done; nothing of the program's runs after this
    except SystemExit as e:
        sys.stderr.write(f"sandbox: the program exited ({e.code!r}) before the tests ran\n")
        sys.exit(1)
    except BaseException:  # noqa: BLE001
        import traceback  # only now: its imports would slow every start

        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__" and sys.argv[1:] == ["candidate"]:
    main()
