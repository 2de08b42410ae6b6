"""SLURM allocation -> torch.distributed / DeepSpeed wiring, with no dependency beyond the standard library.

Why a helper at all: an sbatch script must turn ``SLURM_JOB_NODELIST=gpu[01-04,07]`` into a master
address, give every task the same rendezvous port without talking to the others, map the srun task
layout onto RANK / LOCAL_RANK / WORLD_SIZE, and decide after a pre-emption signal whether to requeue.
Doing that in bash is where such scripts break; here it is plain functions with unit tests.
It imports nothing heavy (no torch) because it runs once per srun task before the trainer starts.

Command line (used by ``launch/slurm/train.sbatch``)::

    python launch/slurm_env.py hostnames 'node[01-04,07]'       # one host per line, like scontrol
    eval "$(python launch/slurm_env.py env)"                    # export MASTER_ADDR, MASTER_PORT, ...
    python launch/slurm_env.py hostfile runs/x/hostfile --slots 8   # DeepSpeed hostfile (ssh launcher)
    srun python launch/slurm_env.py exec -- python launch/train.py ...  # per-task RANK etc., then exec
    python launch/slurm_env.py should-requeue --exit-code 0 --signalled 1 --restart-count 0 --max-restarts 3
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

PORT_BASE = 20000
"""Lowest rendezvous port; ports below are often taken by system services."""
PORT_SPAN = 20000
"""Ports are drawn from [PORT_BASE, PORT_BASE + PORT_SPAN) -- below Linux's ephemeral range (32768+)
would be nicer, but clusters commonly reserve 20000-39999 for exactly this kind of use."""

PREEMPTED_EXIT_CODES = frozenset({75, 138, 143})
"""Exit codes after which a job that got the requeue signal (USR1) is requeued: 75 (launch/train.py:
checkpoint saved after SIGTERM/SIGUSR1), 138 / 143 (died of SIGUSR1 / SIGTERM: the next run resumes
from the latest *complete* checkpoint, which DeepSpeed only marks `latest` after writing). 0 means
the trainer finished (the signal came too late to matter): nothing to resume."""


class HostlistError(ValueError):
    """A malformed SLURM hostlist; the message names the expression and the offending part."""


# ----------------------------------------------------------------------------- hostlists
def _split_top_level(expr: str) -> list[str]:
    """Split on commas/whitespace that are outside brackets: 'a[1-2],b3' -> ['a[1-2]', 'b3']."""
    items, depth, cur = [], 0, []
    for pos, ch in enumerate(expr):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise HostlistError(f"hostlist {expr!r}: nested '[' at character {pos}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostlistError(f"hostlist {expr!r}: unmatched ']' at character {pos}")
        if depth == 0 and (ch == "," or ch.isspace()):
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise HostlistError(f"hostlist {expr!r}: unclosed '['")
    items.append("".join(cur))
    return [item for item in items if item]  # SLURM itself skips empty items ("a,,b" -> a b)


def _expand_ranges(body: str, expr: str) -> list[str]:
    """'01-04,07' -> ['01', '02', '03', '04', '07']; the width of the lower bound sets the zero padding,
    which is SLURM's rule ('n[8-11]' -> n8..n11, 'n[08-11]' -> n08..n11, 'n[1-010]' -> n1..n10)."""
    out: list[str] = []
    for part in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m:
            raise HostlistError(f"hostlist {expr!r}: invalid range {part!r} inside [{body}]")
        lo_s, hi_s = m.group(1), m.group(2)
        lo, hi = int(lo_s), int(hi_s if hi_s is not None else lo_s)
        if hi < lo:
            raise HostlistError(f"hostlist {expr!r}: range {part!r} runs backwards")
        if hi - lo > 1_000_000:
            raise HostlistError(f"hostlist {expr!r}: range {part!r} has more than a million hosts")
        out.extend(str(n).zfill(len(lo_s)) for n in range(lo, hi + 1))
    return out


def _expand_item(item: str, expr: str) -> list[str]:
    """One host expression with any number of bracket groups, expanded as their cartesian product in
    SLURM's order (leftmost group varies slowest): 'a[1-2]b[1-2]' -> a1b1 a1b2 a2b1 a2b2."""
    hosts = [""]
    for m in re.finditer(r"([^\[\]]*)(?:\[([^\]]*)\])?", item):
        literal, body = m.group(1), m.group(2)
        if body is None:  # plain text (the trailing part, or a name without brackets)
            hosts = [h + literal for h in hosts]
            continue
        if not literal and m.start() == 0:
            raise HostlistError(f"hostlist {expr!r}: {item!r} starts with '[' (no host name prefix)")
        suffixes = [literal + r for r in _expand_ranges(body, expr)]
        hosts = [h + s for h in hosts for s in suffixes]
    return hosts


def expand_hostlist(expr: str) -> list[str]:
    """Expand a SLURM hostlist ('node[01-04,07]', 'a[1-2],b3', 'r[1-2]n[01-02]') into host names.

    Same output as ``scontrol show hostnames`` for every list SLURM itself writes; duplicates are kept
    (as scontrol does). Unlike scontrol, text after the last bracket ('n[1-2]x') is accepted and
    malformed input raises HostlistError instead of printing a half-expanded list.
    """
    if not isinstance(expr, str):
        raise HostlistError(f"hostlist must be a string, got {type(expr).__name__}")
    return [host for item in _split_top_level(expr.strip()) for host in _expand_item(item, expr)]


def parse_tasks_per_node(value: str) -> list[int]:
    """SLURM_TASKS_PER_NODE / SLURM_JOB_CPUS_PER_NODE compressed form: '2(x3),1' -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"tasks-per-node value {value!r}: cannot parse {part!r} (expected N or N(xK))")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def hostfile_text(hosts: Sequence[str], slots: int) -> str:
    """A DeepSpeed/OpenMPI hostfile: one 'host slots=N' line per distinct host, allocation order kept."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    seen = dict.fromkeys(hosts)  # dedupe, keep order: srun may list a host once per task
    return "".join(f"{host} slots={slots}\n" for host in seen)


def master_port(job_id: int, restart_count: int = 0) -> int:
    """Rendezvous port every task can compute alone: a function of the job id (jobs sharing a node do
    not collide) and the restart count (a requeued run does not trip over the old run's TIME_WAIT)."""
    return PORT_BASE + (job_id * 31 + restart_count * 7919) % PORT_SPAN


# ----------------------------------------------------------------------------- the allocation
def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int:
    """First of `names` present in env, as int; errors name the variable and value."""
    for name in names:
        if name in env and env[name] != "":
            try:
                return int(env[name])
            except ValueError:
                raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None
    if default is None:
        raise KeyError(f"none of {', '.join(names)} is set: not inside a SLURM job/step?")
    return default


def gpus_on_node(env: Mapping[str, str]) -> int:
    """GPUs this node's tasks may use: SLURM_GPUS_ON_NODE (set with --gpus*), else the length of
    CUDA_VISIBLE_DEVICES, else 0 (a CPU job, which runs one process per launcher task)."""
    if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return int(env["SLURM_GPUS_ON_NODE"])
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible not in {"-1", "NoDevFiles"}:
        return len([d for d in visible.split(",") if d.strip()])
    return 0


@dataclass(frozen=True, slots=True)
class SlurmJob:
    """What a batch script or srun task needs to know about its allocation (from SLURM_* variables)."""

    job_id: int
    """SLURM_JOB_ID; unchanged by requeue, so it names the run's per-job folders."""
    job_name: str
    hosts: tuple[str, ...]
    """Expanded SLURM_JOB_NODELIST, allocation order; hosts[0] is where the batch script runs."""
    restart_count: int
    """SLURM_RESTART_COUNT: 0 on first start, +1 per requeue."""
    gpus_per_node: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SlurmJob:
        env = os.environ if env is None else env
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise KeyError("SLURM_JOB_NODELIST is not set: not inside a SLURM allocation")
        hosts = tuple(expand_hostlist(nodelist))
        n_nodes = _int(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES", default=len(hosts))
        if n_nodes != len(hosts):
            raise ValueError(
                f"SLURM_JOB_NODELIST={nodelist!r} expands to {len(hosts)} hosts "
                f"but SLURM_JOB_NUM_NODES={n_nodes}"
            )
        return cls(
            job_id=_int(env, "SLURM_JOB_ID", "SLURM_JOBID"),
            job_name=env.get("SLURM_JOB_NAME", "job"),
            hosts=hosts,
            restart_count=_int(env, "SLURM_RESTART_COUNT", default=0),
            gpus_per_node=gpus_on_node(env),
        )

    @property
    def master_addr(self) -> str:
        return self.hosts[0]

    @property
    def master_port(self) -> int:
        return master_port(self.job_id, self.restart_count)

    def batch_env(self) -> dict[str, str]:
        """Variables the batch script exports before srun (same on every task)."""
        return {
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "NNODES": str(len(self.hosts)),
            "GPUS_PER_NODE": str(self.gpus_per_node),
        }


def task_env(env: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed variables for one srun task, one task per training process.

    RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID; LOCAL_WORLD_SIZE is this
    node's task count. MASTER_ADDR/PORT come from the batch script (exported by `env`) or are computed
    here, so a bare `srun ... slurm_env.py exec` also works. Several tasks on one host is how the tests
    fake several nodes; nothing here assumes one host per task.
    """
    rank = _int(env, "SLURM_PROCID")
    world = _int(env, "SLURM_NTASKS", "SLURM_NPROCS")
    local_rank = _int(env, "SLURM_LOCALID")
    node_id = _int(env, "SLURM_NODEID", default=0)
    if not 0 <= rank < world:
        raise ValueError(f"SLURM_PROCID={rank} outside [0, SLURM_NTASKS={world})")
    local_world = parse_tasks_per_node(
        env.get("SLURM_TASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE") or str(world)
    )
    out = {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(local_world[min(node_id, len(local_world) - 1)]),
        "NODE_RANK": str(node_id),
    }
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if visible and visible[0] not in {"-1", "NoDevFiles"} and local_rank >= len(visible):
        # The trainer selects cuda:LOCAL_RANK; with --gpus-per-task SLURM shows each task only its own GPU.
        raise ValueError(
            f"LOCAL_RANK={local_rank} but CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r} lists "
            f"{len(visible)} device(s): request GPUs with --gpus-per-node (not --gpus-per-task) or add "
            "--gpu-bind=none, so every task on a node sees all of its GPUs"
        )
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        job = SlurmJob.from_env(env)
        out["MASTER_ADDR"], out["MASTER_PORT"] = job.master_addr, str(job.master_port)
    return out


def should_requeue(
    exit_code: int, signalled: bool, restart_count: int, max_restarts: int
) -> tuple[bool, str]:
    """Decide, after srun returns, whether the batch script requeues itself.

    Only a run stopped by a pre-emption/time-limit signal is requeued: a trainer that finished or
    crashed on its own is not (a crash loop would burn the allocation), and the restart budget bounds
    a job that is pre-empted forever. Returns (requeue?, reason for the log).
    """
    if not signalled:
        return False, f"no pre-emption signal; trainer exit code {exit_code} is final"
    if restart_count >= max_restarts:
        return False, f"signalled, but restart budget spent ({restart_count}/{max_restarts})"
    if exit_code not in PREEMPTED_EXIT_CODES:
        return False, f"signalled, but trainer exit code {exit_code} looks like a crash, not a clean stop"
    return True, f"signalled; trainer exited {exit_code}; requeue #{restart_count + 1} of {max_restarts}"


# ----------------------------------------------------------------------------- command line
def _shell_exports(values: Mapping[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slurm_env.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("hostnames", help="expand a hostlist, one host per line")
    p.add_argument("hostlist", nargs="?", help="default: $SLURM_JOB_NODELIST")
    sub.add_parser("env", help="print `export` lines for the batch script (MASTER_ADDR, MASTER_PORT, ...)")
    p = sub.add_parser("hostfile", help="write a DeepSpeed hostfile for the allocation")
    p.add_argument("path")
    p.add_argument(
        "--slots", type=int, default=None, help="processes per host (default: GPUs per node, at least 1)"
    )
    p = sub.add_parser("exec", help="set RANK/LOCAL_RANK/WORLD_SIZE from this srun task, then exec CMD")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p = sub.add_parser("should-requeue", help="exit 0 if the batch script should requeue itself, else 1")
    p.add_argument("--exit-code", type=int, required=True)
    p.add_argument("--signalled", type=int, choices=(0, 1), required=True)
    p.add_argument("--restart-count", type=int, default=None, help="default: $SLURM_RESTART_COUNT")
    p.add_argument("--max-restarts", type=int, default=10)
    args = parser.parse_args(argv)

    try:
        if args.cmd == "hostnames":
            expr = args.hostlist or os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
            if not expr:
                parser.error("no hostlist given and SLURM_JOB_NODELIST is not set")
            print("\n".join(expand_hostlist(expr)))
        elif args.cmd == "env":
            sys.stdout.write(_shell_exports(SlurmJob.from_env().batch_env()))
        elif args.cmd == "hostfile":
            job = SlurmJob.from_env()
            slots = args.slots if args.slots is not None else max(1, job.gpus_per_node)
            with open(args.path, "w", encoding="utf-8") as f:
                f.write(hostfile_text(job.hosts, slots))
        elif args.cmd == "exec":
            cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not cmd:
                parser.error("exec needs a command after --")
            os.environ.update(task_env(os.environ))
            sys.stdout.flush()
            os.execvp(cmd[0], cmd)  # replace this process: srun's signals then reach the trainer directly
        elif args.cmd == "should-requeue":
            restart = args.restart_count
            if restart is None:
                restart = _int(os.environ, "SLURM_RESTART_COUNT", default=0)
            yes, reason = should_requeue(args.exit_code, bool(args.signalled), restart, args.max_restarts)
            print(reason)
            return 0 if yes else 1
    except (HostlistError, KeyError, ValueError) as exc:
        print(f"slurm_env.py {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
