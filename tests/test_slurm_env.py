"""Unit tests for launch/slurm_env.py: hostlists, task layout, rendezvous port, requeue decision.

Where SLURM's own `scontrol show hostnames` is installed, the expansion is compared with it (it needs
a slurm.conf to start, not a running controller: the test writes a three-line one).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "slurm_env.py"


def _load():
    spec = importlib.util.spec_from_file_location("slurm_env", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["slurm_env"] = mod  # dataclasses resolve the module by name
    spec.loader.exec_module(mod)
    return mod


se = _load()

CASES = {
    "node[01-04,07]": ["node01", "node02", "node03", "node04", "node07"],
    "a[1-2],b3": ["a1", "a2", "b3"],
    "n[8-11]": ["n8", "n9", "n10", "n11"],  # no padding: lower bound has one digit
    "n[08-11]": ["n08", "n09", "n10", "n11"],  # zero padding from the lower bound's width
    "n[001-3]": ["n001", "n002", "n003"],
    "n[1-010]": [f"n{i}" for i in range(1, 11)],  # SLURM pads to the *lower* bound's width only
    "r[1-2]n[01-02]": ["r1n01", "r1n02", "r2n01", "r2n02"],  # leftmost group varies slowest
    "a[1-2]-[3-4]": ["a1-3", "a1-4", "a2-3", "a2-4"],
    "gpu-a100-[0-1],cpu[9-10]": ["gpu-a100-0", "gpu-a100-1", "cpu9", "cpu10"],
    "n[3,1]": ["n3", "n1"],  # order kept, not sorted
    "a1,a1": ["a1", "a1"],  # duplicates kept, like scontrol
    "a,,b": ["a", "b"],
    "host-1.cluster.org": ["host-1.cluster.org"],
    "a[1]b[2-3]": ["a1b2", "a1b3"],
    "n[0-1]": ["n0", "n1"],
}


@pytest.mark.parametrize("expr", sorted(CASES))
def test_expand_hostlist_known_cases(expr: str) -> None:
    assert se.expand_hostlist(expr) == CASES[expr]


@pytest.mark.parametrize(
    "expr, needle",
    [
        ("n[2-1]", "runs backwards"),
        ("a[]", "invalid range ''"),
        ("a[x-y]", "invalid range 'x-y'"),
        ("a[1--2]", "invalid range '1--2'"),
        ("n[1-2", "unclosed '['"),
        ("n]1", "unmatched ']'"),
        ("n[1[2]]", "nested '['"),
        ("[1-2]", "starts with '['"),
        ("n[0-2000000]", "more than a million"),
    ],
)
def test_expand_hostlist_rejects_malformed_input_naming_the_part(expr: str, needle: str) -> None:
    with pytest.raises(se.HostlistError) as err:
        se.expand_hostlist(expr)
    assert needle in str(err.value) and repr(expr) in str(err.value)


def test_tasks_per_node_compressed_form() -> None:
    assert se.parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert se.parse_tasks_per_node("8") == [8]
    assert se.parse_tasks_per_node("4(x2)") == [4, 4]
    with pytest.raises(ValueError, match="'2x3'"):
        se.parse_tasks_per_node("2x3")


def test_hostfile_one_line_per_distinct_host_in_order() -> None:
    text = se.hostfile_text(["n02", "n01", "n02"], slots=8)
    assert text == "n02 slots=8\nn01 slots=8\n"
    with pytest.raises(ValueError, match="slots"):
        se.hostfile_text(["n1"], slots=0)


def _job_env(**over: str) -> dict[str, str]:
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "dm",
        "SLURM_JOB_NODELIST": "gpu[01-02,07]",
        "SLURM_JOB_NUM_NODES": "3",
        "SLURM_RESTART_COUNT": "0",
    }
    env.update(over)
    return env


def test_slurm_job_from_multi_node_environment() -> None:
    job = se.SlurmJob.from_env(_job_env(SLURM_GPUS_ON_NODE="8"))
    assert job.hosts == ("gpu01", "gpu02", "gpu07")
    assert job.master_addr == "gpu01"
    assert job.gpus_per_node == 8
    exported = job.batch_env()
    assert exported["MASTER_ADDR"] == "gpu01" and exported["NNODES"] == "3"
    assert se.PORT_BASE <= int(exported["MASTER_PORT"]) < se.PORT_BASE + se.PORT_SPAN


def test_slurm_job_rejects_inconsistent_node_count() -> None:
    with pytest.raises(ValueError, match="expands to 3 hosts but SLURM_JOB_NUM_NODES=4"):
        se.SlurmJob.from_env(_job_env(SLURM_JOB_NUM_NODES="4"))
    with pytest.raises(KeyError, match="SLURM_JOB_NODELIST"):
        se.SlurmJob.from_env({"SLURM_JOB_ID": "1"})
    with pytest.raises(ValueError, match="SLURM_JOB_ID='12a'"):
        se.SlurmJob.from_env(_job_env(SLURM_JOB_ID="12a"))


def test_gpus_on_node_fallbacks() -> None:
    assert se.gpus_on_node({"SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1"}) == 4
    assert se.gpus_on_node({"CUDA_VISIBLE_DEVICES": "0,1,2"}) == 3
    assert se.gpus_on_node({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert se.gpus_on_node({}) == 0


def test_master_port_differs_between_jobs_and_restarts_but_not_between_tasks() -> None:
    ports = {se.master_port(j) for j in range(1000, 1100)}
    assert len(ports) == 100  # neighbouring job ids (jobs sharing a node) never collide
    assert se.master_port(77, 0) != se.master_port(77, 1)
    assert se.master_port(77, 1) == se.master_port(77, 1)


def test_task_env_maps_srun_task_to_torch_distributed() -> None:
    # task 5 of 8 on the second node of a 2-node x 4-task allocation
    env = _job_env(
        SLURM_JOB_NODELIST="n[1-2]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_PROCID="5",
        SLURM_NTASKS="8",
        SLURM_LOCALID="1",
        SLURM_NODEID="1",
        SLURM_TASKS_PER_NODE="4(x2)",
    )
    out = se.task_env(env)
    assert out == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "NODE_RANK": "1",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": str(se.master_port(4242)),
    }
    # the batch script's exported values win (every task must use the same ones)
    out = se.task_env({**env, "MASTER_ADDR": "x", "MASTER_PORT": "123"})
    assert "MASTER_ADDR" not in out and "MASTER_PORT" not in out
    with pytest.raises(ValueError, match="SLURM_PROCID=8 outside"):
        se.task_env({**env, "SLURM_PROCID": "8"})
    # the trainer picks cuda:LOCAL_RANK, so each task must see all of its node's GPUs
    assert se.task_env({**env, "CUDA_VISIBLE_DEVICES": "0,1,2,3"})["LOCAL_RANK"] == "1"
    with pytest.raises(ValueError, match="--gpus-per-node"):
        se.task_env({**env, "CUDA_VISIBLE_DEVICES": "3"})
    with pytest.raises(KeyError, match="SLURM_PROCID"):
        se.task_env({k: v for k, v in env.items() if k != "SLURM_PROCID"})


@pytest.mark.parametrize(
    "code, signalled, restarts, expected",
    [
        (75, True, 0, True),  # trainer: checkpointed after SIGTERM/SIGUSR1
        (0, True, 2, False),  # finished anyway: the signal came too late to matter
        (138, True, 0, True),  # died of SIGUSR1: resume from the last complete checkpoint
        (0, False, 0, False),  # finished
        (1, False, 0, False),  # crashed on its own: never loop
        (1, True, 0, False),  # crashed while stopping
        (75, True, 10, False),  # budget spent
    ],
)
def test_should_requeue(code: int, signalled: bool, restarts: int, expected: bool) -> None:
    decision, reason = se.should_requeue(code, signalled, restarts, max_restarts=10)
    assert decision is expected and str(code) in reason or "budget" in reason


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_cli_env_hostfile_exec_and_should_requeue(tmp_path: Path) -> None:
    env = _job_env(SLURM_GPUS_ON_NODE="2")
    out = _cli("env", env=env)
    assert out.returncode == 0, out.stderr
    assert "export MASTER_ADDR=gpu01\n" in out.stdout and "export NNODES=3\n" in out.stdout

    hf = tmp_path / "hostfile"
    assert _cli("hostfile", str(hf), env=env).returncode == 0
    assert hf.read_text() == "gpu01 slots=2\ngpu02 slots=2\ngpu07 slots=2\n"

    task = {
        **env,
        "SLURM_PROCID": "2",
        "SLURM_NTASKS": "3",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "2",
        "SLURM_TASKS_PER_NODE": "1(x3)",
    }
    probe = "import os; print(os.environ['RANK'], os.environ['WORLD_SIZE'], os.environ['MASTER_ADDR'])"
    out = _cli("exec", "--", sys.executable, "-c", probe, env=task)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "3", "gpu01"]

    assert (
        _cli("should-requeue", "--exit-code", "75", "--signalled", "1", "--restart-count", "0").returncode
        == 0
    )
    assert (
        _cli("should-requeue", "--exit-code", "0", "--signalled", "0", "--restart-count", "0").returncode == 1
    )

    bad = _cli("hostnames", "n[2-1]")
    assert bad.returncode == 2 and "runs backwards" in bad.stderr

    outside = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run([sys.executable, str(SCRIPT), "env"], capture_output=True, text=True, env=outside)
    assert out.returncode == 2 and "not inside a SLURM allocation" in out.stderr


# ------------------------------------------------------------------ against SLURM's own parser
def _scontrol(tmp_path_factory) -> tuple[str, dict[str, str]] | None:
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return None
    conf = tmp_path_factory.mktemp("slurmconf") / "slurm.conf"
    conf.write_text(
        "ClusterName=t\nSlurmctldHost=localhost\nNodeName=localhost\nPartitionName=p Nodes=localhost\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = str(conf)
    return scontrol, env


@pytest.fixture(scope="module")
def scontrol(tmp_path_factory):
    found = _scontrol(tmp_path_factory)
    if found is None:
        pytest.skip("scontrol not installed (.ci/slurm_setup.sh installs slurm-client)")
    return found


def _scontrol_hostnames(scontrol, expr: str) -> list[str]:
    exe, env = scontrol
    out = subprocess.run(
        [exe, "show", "hostnames", expr], capture_output=True, text=True, env=env, timeout=30
    )
    assert out.returncode == 0 and "Invalid" not in out.stdout + out.stderr, (expr, out.stdout, out.stderr)
    return out.stdout.split()


@pytest.mark.parametrize("expr", sorted(e for e in CASES if e != "a,,b"))
def test_matches_scontrol_on_known_cases(scontrol, expr: str) -> None:
    assert se.expand_hostlist(expr) == _scontrol_hostnames(scontrol, expr)


_prefix = st.text(alphabet="abcxyz-", min_size=1, max_size=4).filter(lambda s: s[0] != "-")
_bound = st.tuples(st.integers(0, 120), st.integers(0, 6), st.integers(0, 3))  # lo, span, pad


def _range_text(b: tuple[int, int, int]) -> str:
    lo, span, pad = b
    lo_s = str(lo).zfill(len(str(lo)) + pad)
    return lo_s if span == 0 else f"{lo_s}-{lo + span}"


_group = st.lists(_bound, min_size=1, max_size=3).map(lambda rs: "[" + ",".join(map(_range_text, rs)) + "]")
# SLURM accepts any number of bracket groups but no text after the last one.
_item = st.lists(st.tuples(_prefix, _group), min_size=1, max_size=2).map(
    lambda parts: "".join(p + g for p, g in parts)
) | _prefix.map(lambda p: p + "1")
_hostlist = st.lists(_item, min_size=1, max_size=3).map(",".join)


@settings(max_examples=60, deadline=None)
@given(expr=_hostlist)
def test_matches_scontrol_on_generated_hostlists(scontrol, expr: str) -> None:
    assert se.expand_hostlist(expr) == _scontrol_hostnames(scontrol, expr)
