"""A throwaway single-machine SLURM cluster (munged + slurmctld + slurmd) for integration tests.

Why a real cluster: launch scripts that were never run under a scheduler are where multi-node
training breaks (signal delivery, requeue, srun task layout, environment export). The daemons come
from the Debian packages (`slurm-wlm`, `munge`, installed by `.ci/slurm_setup.sh`); everything they
write -- key, sockets, state, spool, logs, slurm.conf -- lives in one temporary folder, and the
clients are pointed at it through ``SLURM_CONF``, so nothing under /etc is touched and a second
cluster (another test session) can run beside it on other ports. ``nodes=2`` starts two slurmd on this
machine (per-node ports and spool folders), named after the host and 'localhost': a real multi-node
allocation for launch scripts, on one machine.

Usage::

    cluster = LocalSlurmCluster.start_or_skip_reason()   # (cluster, None) or (None, "why")
    env = cluster.env()                                  # os.environ + SLURM_CONF
    subprocess.run(["sbatch", ...], env=env)
    cluster.stop()
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo")
"""Binaries that must be on PATH (or in /usr/sbin) for the cluster to start."""


def _which(name: str) -> str | None:
    """`shutil.which` that also looks in the sbin folders, which a non-login PATH may lack."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin:/usr/local/sbin"
    return shutil.which(name, path=path)


def _free_port() -> int:
    """A TCP port nobody listens on now (tiny race accepted: the daemons bind it within a second)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node_name() -> str:
    """The node's name in slurm.conf, which becomes SLURM_JOB_NODELIST and so the trainers' MASTER_ADDR:
    the short host name if it resolves (as on a cluster), else 'localhost' (a container without its
    name in /etc/hosts); slurmd is told its name with -N either way."""
    host = socket.gethostname().split(".")[0]
    try:
        socket.getaddrinfo(host, None)
        return host
    except OSError:
        return "localhost"


def _node_names(count: int) -> list[str]:
    """Names for `count` nodes on this one machine; every name must resolve to it, because the first
    becomes MASTER_ADDR: the host name and 'localhost' (so at most 2, and only if the host name resolves)."""
    first = _node_name()
    names = [first, "localhost"] if first != "localhost" else ["localhost"]
    if count > len(names):
        raise RuntimeError(f"{count} nodes asked, but only {len(names)} local name(s) resolve: {names}")
    return names[:count]


def _node_hardware(slurmd: str) -> dict[str, str]:
    """The node line fields that `slurmd -C` detects; slurmd refuses to register if the config differs."""
    out = subprocess.run([slurmd, "-C"], capture_output=True, text=True, timeout=30, check=True).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0]))
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    missing = [k for k in keep if k not in fields]
    if missing:
        raise RuntimeError(f"`slurmd -C` output lacks {missing}: {out!r}")
    return {k: fields[k] for k in keep}


@dataclass
class LocalSlurmCluster:
    """Handles to the daemons of one temporary cluster; `stop()` ends exactly the processes it started."""

    root: Path
    conf: Path
    partition: str
    node: str
    cpus: int
    nodes: list[str] = field(default_factory=list)
    """All node names; one slurmd per name, all on this machine (several simulate a multi-node cluster)."""
    procs: list[subprocess.Popen] = field(default_factory=list)

    # ------------------------------------------------------------------ start / stop
    @staticmethod
    def skip_reason() -> str | None:
        """Why this machine cannot host the cluster (None when it can)."""
        if os.name != "posix":
            return "SLURM needs a POSIX machine"
        if os.geteuid() != 0:
            return (
                "starting slurmd/slurmctld/munged needs root (the test cluster runs them as SlurmUser=root)"
            )
        missing = [d for d in DAEMONS if _which(d) is None]
        if missing:
            return f"SLURM/munge binaries not installed ({', '.join(missing)}); run .ci/slurm_setup.sh"
        return None

    @classmethod
    def start_or_skip_reason(
        cls, partition: str = "debug", nodes: int = 1
    ) -> tuple[LocalSlurmCluster | None, str | None]:
        """Start a cluster, or return the reason it could not (binaries, root, daemon start-up)."""
        reason = cls.skip_reason()
        if reason:
            return None, reason
        try:
            return cls._start(partition, nodes), None
        except Exception as exc:  # any start-up failure becomes a stated skip reason
            root = getattr(exc, "cluster_root", None)
            logs = _tail_logs(Path(root)) if root else ""
            if root:
                shutil.rmtree(root, ignore_errors=True)
            return None, f"SLURM daemons did not start: {exc}{logs}"

    @classmethod
    def _start(cls, partition: str, nodes: int) -> LocalSlurmCluster:
        root = Path(tempfile.mkdtemp(prefix="slurm-test-"))
        try:
            return cls._start_in(root, partition, nodes)
        except Exception as exc:
            exc.cluster_root = str(root)  # type: ignore[attr-defined]
            raise

    @classmethod
    def _start_in(cls, root: Path, partition: str, nodes: int) -> LocalSlurmCluster:
        os.chmod(root, 0o755)  # munged refuses group/world-writable parents; job steps must read conf
        hw = _node_hardware(_which("slurmd") or "slurmd")
        for sub in ("state", "spool", "log", "munge"):
            (root / sub).mkdir()
        os.chmod(root / "munge", 0o700)
        key = root / "munge" / "munge.key"
        subprocess.run(
            [_which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True, timeout=30
        )
        os.chmod(key, 0o400)
        munge_sock = root / "munge" / "munge.socket"
        ctld_port, slurmd_port = _free_port(), _free_port()
        names = _node_names(nodes)
        ports = [slurmd_port] + [_free_port() for _ in names[1:]]
        real_mem = max(256, int(hw["RealMemory"]) - 512)  # leave slack: detection varies by a few MB
        hw_text = " ".join(f"{k}={v if k != 'RealMemory' else real_mem}" for k, v in hw.items())
        conf = root / "slurm.conf"
        conf.write_text(
            "\n".join(
                [
                    "# Written by tests/slurm_cluster.py: nodes on one machine, no accounting, no cgroups.",
                    "ClusterName=dmtest",
                    f"SlurmctldHost={names[0]}(127.0.0.1)",
                    f"SlurmctldPort={ctld_port}",
                    f"SlurmdPort={slurmd_port}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={munge_sock}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"StateSaveLocation={root / 'state'}",
                    f"SlurmdSpoolDir={root / 'spool' / '%n'}",
                    f"SlurmctldPidFile={root / 'slurmctld.pid'}",
                    f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
                    f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
                    f"PlugStackConfig={root / 'plugstack.conf'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "SchedulerType=sched/backfill",
                    # Re-evaluate pending jobs often: the tests wait on requeues and dependencies.
                    "SchedulerParameters=sched_interval=2,bf_interval=2",
                    "AccountingStorageType=accounting_storage/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "JobCompType=jobcomp/none",
                    "MpiDefault=none",
                    "SwitchType=switch/none",
                    "ReturnToService=2",
                    "MinJobAge=600",  # keep finished jobs visible to `scontrol show job`
                    # A failed shard task must cancel the dependent merge/verify, not leave them pending.
                    "DependencyParameters=kill_invalid_depend",
                    "KillWait=30",
                    "InactiveLimit=0",
                    "SlurmctldTimeout=30",
                    "SlurmdTimeout=30",
                    "SlurmctldDebug=info",
                    "SlurmdDebug=info",
                    *(
                        f"NodeName={name} NodeAddr=127.0.0.1 Port={port} {hw_text} State=UNKNOWN"
                        for name, port in zip(names, ports)
                    ),
                    f"PartitionName={partition} Nodes={','.join(names)} Default=YES MaxTime=INFINITE",
                    "",
                ]
            )
        )
        (root / "plugstack.conf").write_text("")
        cluster = cls(
            root=root, conf=conf, partition=partition, node=names[0], cpus=int(hw["CPUs"]), nodes=names
        )
        try:
            log = open(root / "log" / "daemons.out", "ab")  # noqa: SIM115 - closed with the processes
            common = {
                "stdout": log,
                "stderr": subprocess.STDOUT,
                "env": cluster.env(),
                "start_new_session": True,
            }
            cluster.procs.append(
                subprocess.Popen(
                    [
                        _which("munged"),
                        "--foreground",
                        "--force",
                        f"--socket={munge_sock}",
                        f"--key-file={key}",
                        f"--pid-file={root / 'munge' / 'munged.pid'}",
                        f"--log-file={root / 'log' / 'munged.log'}",
                        f"--seed-file={root / 'munge' / 'seed'}",
                    ],
                    **common,
                )
            )
            _wait_for(lambda: munge_sock.exists(), 15, "munged socket", cluster)
            cluster.procs.append(
                subprocess.Popen([_which("slurmctld"), "-D", "-i", "-f", str(conf)], **common)
            )
            _wait_for(
                lambda: cluster._ok(["scontrol", "ping"], "UP"), 30, "slurmctld to answer ping", cluster
            )
            for name in names:
                cluster.procs.append(
                    subprocess.Popen([_which("slurmd"), "-D", "-N", name, "-f", str(conf)], **common)
                )
            _wait_for(lambda: cluster.all_idle(), 60, "every node idle", cluster)
        except Exception:
            cluster.stop(remove=False)  # keep the logs for the skip reason
            raise
        return cluster

    def stop(self, remove: bool = True) -> None:
        """Cancel this cluster's jobs, SIGTERM the daemons it started (newest first), end any job process
        that outlived slurmd (slurmstepd keeps running without it), drop the folder."""
        if self.procs and all(p.poll() is None for p in self.procs):
            try:
                ids = self.run(["squeue", "-h", "-o", "%A"], check=False, timeout=10).stdout.split()
                if ids:
                    self.run(["scancel", *ids], check=False, timeout=10)
                    deadline = time.monotonic() + 20
                    while (
                        time.monotonic() < deadline
                        and self.run(
                            ["squeue", "-h", "-t", "R,CG,S", "-o", "%A"], check=False, timeout=10
                        ).stdout.strip()
                    ):
                        time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs.clear()
        self._end_orphans()
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def _end_orphans(self) -> None:
        """SIGTERM, then SIGKILL, processes started for this cluster that are still alive: every one of
        them (slurmstepd, batch scripts, tasks) carries this cluster's SLURM_CONF in its environment."""
        marker = f"SLURM_CONF={self.conf}".encode()
        me = os.getpid()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                continue
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in found:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if sig == signal.SIGTERM and found:
                time.sleep(1)

    # ------------------------------------------------------------------ client helpers
    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """os.environ pointing SLURM clients at this cluster, with sbin on PATH."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
            del env[key]  # a test run from inside a real allocation must not leak its job into ours
        env.update(extra or {})
        return env

    def run(
        self, args: list[str], check: bool = True, timeout: float = 30, **kw
    ) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster and capture its text output."""
        return subprocess.run(
            args,
            env=kw.pop("env", self.env()),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            **kw,
        )

    def _ok(self, args: list[str], needle: str) -> bool:
        try:
            return needle in self.run(args, check=False, timeout=10).stdout
        except subprocess.TimeoutExpired:
            return False

    def all_idle(self) -> bool:
        """Every node registered and idle (no job running or completing)."""
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=10).stdout.split("\n")
        states = dict(line.split() for line in out if line.strip())
        return sorted(states) == sorted(self.nodes) and set(states.values()) == {"idle"}

    def node_state(self) -> str:
        """The node's state as sinfo prints it (idle, mixed, down*, ...)."""
        out = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False, timeout=10).stdout.strip()
        return out.splitlines()[0] if out else ""

    def job_fields(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, RestartCnt, ExitCode, ...); empty once purged."""
        out = self.run(["scontrol", "-o", "show", "job", job_id], check=False, timeout=10).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        """Poll until the job's JobState is one of `states`; raise with the controller log tail if not."""
        deadline = time.monotonic() + timeout
        fields: dict[str, str] = {}
        while time.monotonic() < deadline:
            fields = self.job_fields(job_id)
            if fields.get("JobState") in states:
                return fields
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {fields}{_tail_logs(self.root)}")

    def logs(self, lines: int = 15) -> str:
        """Tail of every daemon log, for assertion messages."""
        return _tail_logs(self.root, lines)

    def sbatch(
        self, args: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None
    ) -> str:
        """Submit with `sbatch --parsable` and return the job id."""
        out = self.run(["sbatch", "--parsable", *args], env=env or self.env(), cwd=cwd).stdout
        return out.strip().split(";")[0]


def _wait_for(pred, timeout: float, what: str, cluster: LocalSlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        dead = [p.args[0] for p in cluster.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{dead} exited while waiting for {what}{_tail_logs(cluster.root)}")
        time.sleep(0.3)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}{_tail_logs(cluster.root)}")


def _tail_logs(root: Path, lines: int = 15) -> str:
    """The last lines of every daemon log, for failure messages."""
    parts = []
    for log in sorted((root / "log").glob("*")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"\n--- {log.name} ---\n" + "\n".join(text))
    return "".join(parts)
