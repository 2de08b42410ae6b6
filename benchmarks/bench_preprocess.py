"""Preprocessing throughput, memory and scaling, measured side by side in one run.

    python benchmarks/bench_preprocess.py                  # ~30k records, all cores
    python benchmarks/bench_preprocess.py --records 6000 --reps 1 --skip-memory   # quick look

Prints:
1. throughput ratio = whole pipeline (read + rules extraction + tokenize + align + write, datatrove
   LocalPipelineExecutor on all cores) / raw ``tokenizers`` ``encode_batch`` with offsets of the
   same texts (rayon on all cores); also with the ``none`` extractor and the paper's fractions
   (code 10 %, math 50 %), so extraction cost is visible on its own;
2. peak RSS of a single-process run at 1x and 10x the input (flat = streaming works);
3. wall time with 1 and 2 workers (same shard count) and the speed-up.

The sample is replicated with fresh ids to reach ``--records``.  Repetitions are interleaved
(baseline, pipeline, baseline, ...) and the best of each is reported, because this machine may be
shared; the figures are only comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from preprocess.assets import SAMPLE_PATH  # noqa: E402
from preprocess.pipeline import PreprocessConfig, run_pipeline  # noqa: E402
from preprocess.pipeline.shard import load_tokenizer  # noqa: E402
from preprocess.pipeline.steps import read_timings  # noqa: E402


def make_input(path: Path, n: int) -> None:
    rows = [json.loads(line) for line in SAMPLE_PATH.read_text(encoding="utf-8").split("\n") if line.strip()]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            r = dict(rows[i % len(rows)])
            r["id"] = f"{r['id']}-{i // len(rows)}"
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def baseline_encode(path: Path, batch: int = 512) -> tuple[float, float, int]:
    """encode_batch (with offsets materialised) of exactly the texts the pipeline encodes.

    Returns wall seconds, CPU seconds of this process (all tokenizer threads) and tokens.
    """
    tok = load_tokenizer(str(PreprocessConfig(inputs=[path], output_dir=".").tokenizer), True)
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    texts = [t for r in rows for t in (tok.render_prompt(r["prompt"], None), r["response"])]
    t0, c0 = time.perf_counter(), time.process_time()
    n_tokens = 0
    for i in range(0, len(texts), batch):
        for enc in tok.backend.encode_batch(texts[i:i + batch], add_special_tokens=False):
            n_tokens += len(enc.ids)
            enc.offsets  # noqa: B018  (materialise offsets like a consumer would)
    # + one EOS per sample, as in the shards
    return time.perf_counter() - t0, time.process_time() - c0, n_tokens + len(rows)


def pipeline_run(path: Path, out: Path, workers: int, num_shards: int, extractor: str = "rules",
                 fractions: dict[str, float] | None = None) -> tuple[float, float, int]:
    """Wall seconds of run_pipeline, CPU seconds of its shard tasks (from the timing logs), tokens."""
    shutil.rmtree(out, ignore_errors=True)
    cfg = PreprocessConfig(inputs=[path], output_dir=out, extractor=extractor, workers=workers,
                           num_shards=num_shards, fractions=fractions or {})
    t0 = time.perf_counter()
    run_pipeline(cfg)
    wall = time.perf_counter() - t0
    index = json.loads((out / "index.json").read_text())
    cpu = sum(t["cpu_s"] for t in read_timings(cfg))
    return wall, cpu, index["num_tokens"]


_RSS_SCRIPT = """
import sys
from preprocess.pipeline import PreprocessConfig, run_pipeline
if __name__ == "__main__":
    run_pipeline(PreprocessConfig(inputs=[sys.argv[1]], output_dir=sys.argv[2], extractor="rules",
                                  workers=1, num_shards=1))
"""


def peak_rss_mb(path: Path, out: Path) -> tuple[float, float]:
    """Peak RSS (MB) and wall time of a fresh single-process run (no worker pool: one process)."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _RSS_SCRIPT, str(path), str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    try:  # datatrove's Manager helper process, if anything of the group is left
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("memory run failed")
    return usage.ru_maxrss / 1024, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=30000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-memory", action="store_true")
    a = ap.parse_args()
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        data = tmp / "in.jsonl"
        make_input(data, a.records)
        shards = 2 * a.workers
        print(f"{a.records} records, {cores} cores, workers={a.workers}, num_shards={shards}")
        runs: dict[str, list[tuple[float, float, int]]] = {k: [] for k in ("base", "rules", "none", "frac")}
        for _ in range(a.reps):
            runs["base"].append(baseline_encode(data))
            runs["rules"].append(pipeline_run(data, tmp / "o", a.workers, shards))
            runs["none"].append(pipeline_run(data, tmp / "o", a.workers, shards, extractor="none"))
            runs["frac"].append(pipeline_run(data, tmp / "o", a.workers, shards,
                                             fractions={"code": 0.1, "math": 0.5}))
        n_tok = runs["base"][0][2]
        assert all(r[2] == n_tok for rs in runs.values() for r in rs), "token counts differ"
        b_wall = min(r[0] for r in runs["base"])
        b_cpu = min(r[1] for r in runs["base"])
        print(f"\n1. throughput (best of {a.reps}; tokens incl. EOS: {n_tok:,}); "
              "wall ratio = the goal metric,")
        print("   CPU ratio = encode CPU-s / pipeline CPU-s (shard tasks), robust to other load")
        print(f"   raw tokenizers encode_batch + offsets : {n_tok / b_wall:10,.0f} tokens/s  "
              f"wall {b_wall:6.2f} s  CPU {b_cpu:6.2f} s")
        for key, name in (("rules", "pipeline, rules extractor, 100 %"), ("none", "pipeline, none extractor"),
                          ("frac", "pipeline, rules, code 10 % math 50 %")):
            w = min(r[0] for r in runs[key])
            c = min(r[1] for r in runs[key])
            print(f"   {name:38s}: {n_tok / w:10,.0f} tokens/s  wall {w:6.2f} s  CPU {c:6.2f} s  "
                  f"ratio wall {b_wall / w:.2f}  CPU {b_cpu / c:.2f}")

        if not a.skip_memory:
            small = tmp / "small.jsonl"
            big = tmp / "big.jsonl"
            n_small = max(a.records // 10, 1000)
            make_input(small, n_small)
            make_input(big, 10 * n_small)
            r1, w1 = peak_rss_mb(small, tmp / "m1")
            r10, w10 = peak_rss_mb(big, tmp / "m10")
            print(f"\n2. peak RSS, one process: {n_small:,} records {r1:.0f} MB ({w1:.1f} s); "
                  f"{10 * n_small:,} records {r10:.0f} MB ({w10:.1f} s); ratio {r10 / r1:.2f}")

        w1 = min(pipeline_run(data, tmp / "o", 1, 4)[0] for _ in range(max(1, a.reps - 1)))
        w2 = min(pipeline_run(data, tmp / "o", 2, 4)[0] for _ in range(max(1, a.reps - 1)))
        print(f"\n3. scaling (num_shards=4): 1 worker {w1:.2f} s, 2 workers {w2:.2f} s, "
              f"speed-up {w1 / w2:.2f}x")


if __name__ == "__main__":
    main()
