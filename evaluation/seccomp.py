"""A seccomp-BPF filter for sandboxed programs, built here as raw bytes for ``bwrap --seccomp FD``.

What it does (x86-64 and aarch64; other machines get no filter and the sandbox refuses to run):

- **No new processes**: ``fork``/``vfork`` and ``clone`` without ``CLONE_THREAD`` fail with EPERM
  (threads still work); ``clone3``, whose flags a filter cannot read, fails with ENOSYS so that libc
  falls back to ``clone``.  This is what stops fork bombs, ``setsid`` daemons and
  ``_posixsubprocess.fork_exec`` at the kernel, whatever uid the program has on the host (the
  ``RLIMIT_NPROC`` limit is not applied by the kernel to processes whose host uid is root).
- **No kernel attack surface a test program never needs**: ptrace and cross-process memory access,
  keyrings (not namespaced), bpf, perf events, userfaultfd, io_uring, namespaces and mounts,
  file handles (``open_by_handle_at``), modules, kexec, reboot.  They fail with EPERM.
- A process of another architecture (x32 or 32-bit calls on x86-64) is killed.
"""

from __future__ import annotations

import errno
import platform
import struct

# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6]
_NR, _ARCH, _ARG0 = 0, 4, 16
_LD, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _KILL = 0x7FFF0000, 0x80000000
_ERRNO = 0x00050000
CLONE_THREAD = 0x00010000
X32_BIT = 0x40000000

# (audit arch, clone, clone3, denied syscalls) per machine
_TABLES = {
    "x86_64": (0xC000003E, 56, 435, {
        "fork": 57, "vfork": 58, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
        "keyctl": 250, "add_key": 248, "request_key": 249, "bpf": 321, "perf_event_open": 298,
        "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
        "open_by_handle_at": 304, "name_to_handle_at": 303, "kexec_load": 246, "init_module": 175,
        "finit_module": 313, "reboot": 169}),
    "aarch64": (0xC00000B7, 220, 435, {
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "keyctl": 219, "add_key": 217,
        "request_key": 218, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "unshare": 97,
        "setns": 268, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51,
        "open_by_handle_at": 265, "name_to_handle_at": 264, "kexec_load": 104, "init_module": 105,
        "finit_module": 273, "reboot": 142}),
}


def _ins(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def seccomp_filter(machine: str | None = None) -> bytes | None:
    """The filter for this machine as ``struct sock_filter[]`` bytes; None where unsupported."""
    machine = machine or platform.machine()
    if machine not in _TABLES:
        return None
    arch, clone, clone3, denied = _TABLES[machine]
    eperm = _ERRNO | errno.EPERM
    prog = [_ins(_LD, _ARCH), _ins(_JEQ, arch, jt=1), _ins(_RET, _KILL), _ins(_LD, _NR)]
    if machine == "x86_64":
        prog += [_ins(_JGE, X32_BIT, jf=1), _ins(_RET, _KILL)]
    for nr in sorted(denied.values()):
        prog += [_ins(_JEQ, nr, jf=1), _ins(_RET, eperm)]
    prog += [_ins(_JEQ, clone3, jf=1), _ins(_RET, _ERRNO | errno.ENOSYS),
             _ins(_JEQ, clone, jt=1), _ins(_RET, _ALLOW),
             _ins(_LD, _ARG0), _ins(_JSET, CLONE_THREAD, jf=1), _ins(_RET, _ALLOW), _ins(_RET, eperm)]
    return b"".join(prog)
