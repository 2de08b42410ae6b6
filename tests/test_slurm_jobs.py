"""The real sbatch scripts under a real (single-machine) SLURM: preprocessing array -> merge -> verify,
2-task training, pre-emption signal -> checkpoint -> requeue -> resume, scancel -> resubmit -> resume.

The cluster has two slurmd nodes on this machine (named after the host and 'localhost'), so training
gets a real 2-node allocation (SLURM_NODEID 0/1, nodelist 'localhost,<host>'); where the host name does
not resolve it falls back to one node running both tasks. The daemons come from `.ci/slurm_setup.sh`;
without root or the packages every test here is skipped with the reason (see tests/slurm_cluster.py).

Over 400 lines: each scenario drives real daemons through a multi-step job life cycle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import LocalSlurmCluster

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "preprocess" / "assets" / "sample" / "sample.jsonl"
TRAIN_SBATCH = "launch/slurm/train.sbatch"
PREPROCESS_SBATCH = "launch/slurm/preprocess.sbatch"
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    """Two slurmd nodes on this machine when its host name resolves (a real 2-node allocation:
    SLURM_NODEID 0/1, a two-host nodelist), else one node running two tasks."""
    c, reason = LocalSlurmCluster.start_or_skip_reason(nodes=2)
    if c is None and LocalSlurmCluster.skip_reason() is None:  # binaries and root are there: try 1 node
        c, reason = LocalSlurmCluster.start_or_skip_reason(nodes=1)
    if c is None:
        pytest.skip(reason)
    yield c
    c.stop()


def _layout(cluster: LocalSlurmCluster) -> list[str]:
    """Two training ranks: one per node on the 2-node cluster, both on the node otherwise."""
    n = len(cluster.nodes)
    return [f"--nodes={n}", f"--ntasks-per-node={2 // n}", "--cpus-per-task=1"]


def _env(cluster: LocalSlurmCluster, **extra: str) -> dict[str, str]:
    """Job environment: this interpreter's venv first on PATH (sbatch exports it to the job)."""
    bindir = str(Path(sys.executable).parent)
    return cluster.env(
        {
            "PATH": bindir + os.pathsep + os.environ.get("PATH", "") + ":/usr/sbin",
            "PYTHON": sys.executable,
            **extra,
        }
    )


def _wait(pred, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tail}")


def _release_requeued(cluster: LocalSlurmCluster, job_id: str, log: Path, timeout: float = 120) -> None:
    """SLURM holds a requeued job ~2 min (BeginTime) -- fine on a cluster, slow for a test. Once the old
    run has fully left the node (otherwise slurmd rejects the new start: 'credential revoked'), start it."""
    _wait(lambda: cluster.job_fields(job_id).get("Restarts", "0") != "0", timeout, "the requeue", log)
    _wait(cluster.all_idle, 60, "the nodes to finish the old run", log)
    # slurmd revokes the old run's credential with a one-second timestamp; a new start within the same
    # second counts as revoked ("Killing non-startable batch job"). SLURM's own ~2 min hold avoids that.
    time.sleep(3)
    if cluster.job_fields(job_id).get("JobState") == "PENDING":
        cluster.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])


def _attempts(run_dir: Path, job_id: str) -> list[dict[str, str]]:
    """Parse the per-job attempts.log ('restart=0 end=... rc=75 signal=USR1 requeue=1 (...)')."""
    path = run_dir / "slurm" / job_id / "attempts.log"
    lines = path.read_text().splitlines() if path.exists() else []
    records = [dict(kv.split("=", 1) for kv in line.split(" (")[0].split() if "=" in kv) for line in lines]
    return [r for r in records if "rc" in r]  # the 'end' line of each attempt


# ----------------------------------------------------------------------------------- preprocessing
@pytest.fixture(scope="module")
def preprocessed(cluster, tmp_path_factory) -> dict:
    """Run launch/slurm/preprocess.sbatch on 240 sample records in 2 shards; return what happened."""
    root = tmp_path_factory.mktemp("pp")
    records = root / "in.jsonl"
    records.write_text("".join(SAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)[:240]))
    out = root / "out"
    args = [
        PREPROCESS_SBATCH,
        "--input",
        str(records),
        "--output",
        str(out),
        "--num-shards",
        "2",
        "--slurm-mem-per-cpu-gb",
        "1",
        "--slurm-time",
        "00:10:00",
    ]
    driver_log = root / "driver.out"
    driver = cluster.sbatch([f"--output={driver_log}", *args], env=_env(cluster), cwd=REPO)
    state = cluster.wait_job(driver, DONE, 180)["JobState"]
    assert state == "COMPLETED", driver_log.read_text()
    verify_id = (out / "logs" / "verify_job_id").read_text().strip()
    verify = cluster.wait_job(verify_id, DONE, 300)
    return {
        "out": out,
        "root": root,
        "args": args,
        "driver_log": driver_log,
        "verify": verify,
        "verify_id": verify_id,
    }


def test_preprocess_array_merge_verify(cluster, preprocessed) -> None:
    out: Path = preprocessed["out"]
    verify_log = out / "logs" / f"verify-{preprocessed['verify_id']}.out"
    assert preprocessed["verify"]["JobState"] == "COMPLETED", verify_log.read_text()
    assert f"OK: {out}" in verify_log.read_text()
    index = json.loads((out / "index.json").read_text())
    assert len(list(out.glob("shard_*.tokens.bin"))) == 2
    assert sum(d["samples"] for d in index["domains"].values()) == 240, index["domains"]
    # one datatrove array task per shard, each with a completion marker
    assert sorted(p.name for p in (out / "logs" / "shards" / "completions").iterdir()) == ["00000", "00001"]
    names = cluster.run(["squeue", "-h", "-t", "all", "-o", "%j %T"]).stdout.split("\n")
    array_tasks = [n for n in names if n.startswith("dm-pp-") and "-merge" not in n and "-verify" not in n]
    assert len(array_tasks) >= 2 and all(n.endswith("COMPLETED") for n in array_tasks), names


def test_preprocess_resubmit_reruns_only_the_missing_shard(cluster, preprocessed) -> None:
    out: Path = preprocessed["out"]
    before = {p.name: p.read_bytes() for p in out.glob("shard_0000[01].*")}
    for p in out.glob("shard_00001.*"):  # a lost shard (e.g. node died before its output was synced)
        p.unlink()
    log = preprocessed["root"] / "driver2.out"
    driver = cluster.sbatch([f"--output={log}", *preprocessed["args"]], env=_env(cluster), cwd=REPO)
    assert cluster.wait_job(driver, DONE, 180)["JobState"] == "COMPLETED", log.read_text()
    verify_id = (out / "logs" / "verify_job_id").read_text().strip()
    assert verify_id != preprocessed["verify_id"]
    verify = cluster.wait_job(verify_id, DONE, 300)
    assert verify["JobState"] == "COMPLETED", (out / "logs" / f"verify-{verify_id}.out").read_text()
    # the completion marker of shard 0 made datatrove skip it: only rank 1 ran, shard 0 is untouched
    assert json.loads((out / "logs" / "shards" / "ranks_to_run.json").read_text()) == [1]
    # shard 0 untouched, shard 1 rebuilt byte for byte (output independent of scheduling)
    assert {p.name: p.read_bytes() for p in out.glob("shard_0000[01].*")} == before


def test_preprocess_from_login_node_on_complete_output(cluster, preprocessed) -> None:
    """`bash preprocess.sbatch` outside any job (a login node): partition from $PARTITION; with every
    shard and index.json in place nothing but the verify job is submitted."""
    out: Path = preprocessed["out"]
    before = cluster.run(["squeue", "-h", "-t", "all", "-o", "%A"]).stdout.split()
    args = preprocessed["args"][1:]  # without the script name
    proc = subprocess.run(
        ["bash", PREPROCESS_SBATCH, *args],
        cwd=REPO,
        env=_env(cluster, PARTITION=cluster.partition),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    new = sorted(set(cluster.run(["squeue", "-h", "-t", "all", "-o", "%A"]).stdout.split()) - set(before))
    verify_id = (out / "logs" / "verify_job_id").read_text().strip()
    assert new == [verify_id], (new, proc.stdout)
    assert "(after nothing)" in proc.stdout
    assert cluster.wait_job(verify_id, DONE, 120)["JobState"] == "COMPLETED"


# ----------------------------------------------------------------------------------- training
FAKE_TRAINER = r'''
"""Stand-in trainer (gloo): checks the rank wiring, checkpoints on SIGTERM/SIGUSR1 (exit 75), resumes."""
import argparse, json, os, signal, socket, sys, time
from pathlib import Path
import torch
import torch.distributed as dist

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--max_steps", type=int, default=12)
p.add_argument("--step_seconds", type=float, default=0.4)
p.add_argument("--crash_at", type=int, default=-1)
p.add_argument("--steps_after_resume", type=int, default=-1)
a = p.parse_args()
out = Path(a.out)
stop = []
for s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, lambda signum, frame: stop.append(signum))
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
ckpt = out / "checkpoint.json"
step = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
if step and a.steps_after_resume >= 0:
    a.max_steps = step + a.steps_after_resume
with open(out / f"rank{rank}.jsonl", "a") as f:
    f.write(json.dumps({"rank": rank, "world": world, "local_rank": int(os.environ["LOCAL_RANK"]),
                        "node_rank": int(os.environ["NODE_RANK"]), "host": os.environ["SLURMD_NODENAME"],
                        "master": os.environ["MASTER_ADDR"] + ":" + os.environ["MASTER_PORT"],
                        "start_step": step}) + "\n")
code = 0
while step < a.max_steps:
    t = torch.tensor([rank + 1.0]); dist.all_reduce(t)  # every rank really joined the group
    assert t.item() == world * (world + 1) / 2
    step += 1
    if step == a.crash_at:
        sys.exit(3)
    time.sleep(a.step_seconds)
    flag = torch.tensor([float(bool(stop))]); dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if rank == 0:
        (out / "progress.json").write_text(json.dumps({"step": step}))
    if flag.item() > 0:
        code = 75
        break
if rank == 0:
    ckpt.write_text(json.dumps({"step": step}))
    if code == 0:
        (out / "done.json").write_text(json.dumps({"step": step}))
dist.barrier(); dist.destroy_process_group()
sys.exit(code)
'''


def _progress(run: Path) -> int:
    try:
        return json.loads((run / "progress.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _submit_fake(
    cluster, tmp_path: Path, *trainer_args: str, run_name: str = "fake", sbatch_args: tuple[str, ...] = ()
) -> tuple[str, Path, Path]:
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    run = tmp_path / "runs" / run_name
    log = tmp_path / f"{run_name}.out"
    env = _env(cluster, TRAIN_SCRIPT=str(script), RUN_DIR=str(run), OUTPUT_FLAG="--out")
    job = cluster.sbatch(
        [
            *_layout(cluster),
            f"--output={log}",
            *sbatch_args,
            TRAIN_SBATCH,
            *trainer_args,
        ],
        env=env,
        cwd=REPO,
    )
    return job, run, log


def test_train_rank_wiring_crash_not_requeued(cluster, tmp_path) -> None:
    job, run, log = _submit_fake(cluster, tmp_path, "--crash_at", "3", run_name="crash")
    fields = cluster.wait_job(job, DONE, 180)
    assert fields["JobState"] == "FAILED" and fields["Restarts"] == "0", log.read_text()
    ranks = [json.loads((run / f"rank{r}.jsonl").read_text().splitlines()[0]) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world"] for r in ranks} == {2}
    hosts = (run / "slurm" / job / "hostfile").read_text().splitlines()
    assert sorted(hosts) == sorted(f"{n} slots=1" for n in cluster.nodes)
    master_host = hosts[0].split()[0]  # the first host of the allocation
    assert ranks[0]["master"] == ranks[1]["master"] and ranks[0]["master"].startswith(master_host + ":")
    if len(cluster.nodes) == 2:  # one rank per node: node ranks and hosts differ, local ranks are 0
        assert [r["node_rank"] for r in ranks] == [0, 1] and {r["local_rank"] for r in ranks} == {0}
        assert sorted(r["host"] for r in ranks) == sorted(cluster.nodes) and ranks[0]["host"] == master_host
    else:  # two tasks on one node
        assert {r["local_rank"] for r in ranks} == {0, 1} and {r["node_rank"] for r in ranks} == {0}
    (attempt,) = _attempts(run, job)
    assert attempt["signal"] == "none" and attempt["requeue"] == "0" and attempt["rc"] != "0"


def test_train_scancel_then_resubmit_resumes(cluster, tmp_path) -> None:
    job, run, log = _submit_fake(cluster, tmp_path, "--max_steps", "10", run_name="cancel")
    _wait(lambda: _progress(run) >= 3, 180, "3 training steps", log)
    cluster.run(["scancel", job])
    fields = cluster.wait_job(job, DONE, 120)
    # a cancelled job stays cancelled (the script's requeue attempt must not override the user)...
    assert fields["JobState"] == "CANCELLED" and fields["Restarts"] == "0", log.read_text()
    _wait(lambda: len(_attempts(run, job)) == 1, 60, "the batch script's last log line", log)
    (attempt,) = _attempts(run, job)
    assert attempt["signal"] == "TERM" and attempt["requeue"] == "0", attempt
    saved = json.loads((run / "checkpoint.json").read_text())["step"]
    assert 3 <= saved < 10, log.read_text()
    # ...and a resubmission with the same run folder continues from its checkpoint
    job2, run2, log2 = _submit_fake(cluster, tmp_path, "--max_steps", "10", run_name="cancel")
    assert run2 == run and job2 != job
    assert cluster.wait_job(job2, DONE, 180)["JobState"] == "COMPLETED", log2.read_text()
    assert json.loads((run / "done.json").read_text())["step"] == 10
    starts = [json.loads(line)["start_step"] for line in (run / "rank1.jsonl").read_text().splitlines()]
    assert starts == [0, saved]


def test_train_scontrol_requeue_resumes(cluster, tmp_path) -> None:
    """`scontrol requeue` (and PreemptMode=REQUEUE preemption) TERMs the job and requeues it itself: the
    trainer checkpoints, the script must not requeue a second time, the restart resumes."""
    job, run, log = _submit_fake(cluster, tmp_path, "--max_steps", "8", run_name="requeue")
    _wait(lambda: _progress(run) >= 2, 180, "2 training steps", log)
    cluster.run(["scontrol", "requeue", job])
    _release_requeued(cluster, job, log)
    fields = cluster.wait_job(job, DONE, 180)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", log.read_text() + cluster.logs()
    attempts = _attempts(run, job)
    assert [(a["restart"], a["signal"], a["requeue"]) for a in attempts] == [
        ("0", "TERM", "0"),
        ("1", "none", "0"),
    ]
    starts = [json.loads(line)["start_step"] for line in (run / "rank0.jsonl").read_text().splitlines()]
    assert starts[0] == 0 and 2 <= starts[1] < 8, starts
    assert json.loads((run / "done.json").read_text())["step"] == 8


def test_train_time_limit_signal_requeues_and_resumes(cluster, tmp_path) -> None:
    """The real `--signal=B:USR1@N` path: SLURM itself signals the batch script before the time limit."""
    job, run, log = _submit_fake(
        cluster,
        tmp_path,
        "--max_steps",
        "100000",
        "--steps_after_resume",
        "3",
        run_name="timelimit",
        # USR1 45 s after the start; the restart (same limit) then has ~45 s for start-up + 3 steps
        # before the same signal would fire again: enough on a loaded 2-core machine (15 s was not).
        sbatch_args=("--time=2", "--signal=B:USR1@75"),
    )
    _release_requeued(cluster, job, log, timeout=200)
    fields = cluster.wait_job(job, DONE, 120)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", log.read_text() + cluster.logs()
    attempts = _attempts(run, job)
    assert [(a["restart"], a["signal"], a["requeue"]) for a in attempts] == [
        ("0", "USR1", "1"),
        ("1", "none", "0"),
    ]
    # 75 from every rank, or 143 when --kill-on-bad-exit TERMs a rank still exiting after the first 75
    assert attempts[0]["rc"] in {"75", "143"} and attempts[1]["rc"] == "0"
    starts = [json.loads(line)["start_step"] for line in (run / "rank1.jsonl").read_text().splitlines()]
    assert starts[0] == 0 and starts[1] >= 1
    assert json.loads((run / "done.json").read_text())["step"] == starts[1] + 3


@pytest.fixture()
def real_trainer_ready() -> None:
    if not (REPO / "launch" / "train.py").exists():
        pytest.skip("launch/train.py not present")


def test_train_real_trainer_preempt_requeue_resume(
    cluster, preprocessed, tmp_path, real_trainer_ready
) -> None:
    """launch/train.py (DeepSpeed ZeRO-3, 2 ranks, CPU) on the shards made by the SLURM preprocessing:
    USR1 to the batch script (what --signal=B:USR1@300 does before the time limit) -> checkpoint ->
    exit 75 -> scontrol requeue -> the restart resumes from the checkpoint and finishes."""
    assert preprocessed["verify"]["JobState"] == "COMPLETED"
    run = tmp_path / "runs" / "real"
    log = tmp_path / "real.out"
    max_steps = 4
    env = _env(cluster, RUN_DIR=str(run))
    job = cluster.sbatch(
        [
            *_layout(cluster),
            f"--output={log}",
            TRAIN_SBATCH,
            "--deepspeed",
            "ds_configs/zero3.json",
            "--preset",
            "tiny_smoke",
            "--data.path",
            str(preprocessed["out"]),
            "--data.preprocess_if_missing",
            "false",
            "--train.max_steps",
            str(max_steps),
            "--checkpoint.export_hf",
            "false",
            "--metrics.progress",
            "false",
            "--metrics.tensorboard",
            "false",
        ],
        env=env,
        cwd=REPO,
    )
    metrics = run / "metrics.jsonl"
    _wait(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 1, 420, "the first step", log)
    cluster.run(["scancel", "--batch", "--signal=USR1", job])
    _release_requeued(cluster, job, log, timeout=300)
    fields = cluster.wait_job(job, DONE, 420)
    text = log.read_text(errors="replace")
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", text + cluster.logs(25)
    attempts = _attempts(run, job)
    assert [(a["restart"], a["signal"], a["requeue"]) for a in attempts] == [
        ("0", "USR1", "1"),
        ("1", "none", "0"),
    ]
    assert attempts[0]["rc"] in {"75", "143"} and attempts[1]["rc"] == "0", text
    assert "checkpoint saved at step" in text and "exiting with code 75" in text
    saved = int(text.split("checkpoint saved at step ")[1].split(";")[0])
    assert 1 <= saved < max_steps
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    # the restart logs steps after the checkpoint only: it resumed, it did not start over
    assert steps[-1] == max_steps and steps.count(1) == 1 and steps == sorted(steps), steps
    assert (run / "checkpoints" / f"step_{max_steps}").is_dir()
