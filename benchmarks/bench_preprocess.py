"""Preprocessing throughput, memory and scaling, measured side by side in one run.

    python benchmarks/bench_preprocess.py                  # ~30k records, all cores
    python benchmarks/bench_preprocess.py --records 6000 --reps 1 --skip-memory   # quick look
    python benchmarks/bench_preprocess.py --corpus-mb 1000 --only-corpus   # 1 GB synthetic corpus
    python benchmarks/bench_preprocess.py --skip-memory --skip-scaling --json out.json   # ratios only

``--json PATH`` also writes every figure printed (raw seconds and tokens too) to PATH, rewritten
whole (temp file + rename) after each section, so a run cut short keeps the sections it finished.

Prints:
1. throughput ratio = whole pipeline (read + rules extraction + tokenize + align + write, datatrove
   LocalPipelineExecutor on all cores) / raw ``tokenizers`` ``encode_batch`` with offsets of the
   same texts (rayon on all cores); also with the ``none`` extractor and the paper's fractions
   (code 10 %, math 50 %), so extraction cost is visible on its own; and the CPU ratio to raw
   ``encode_batch_fast`` (no offsets: what the pipeline calls for byte-level tokenizers), the
   stricter reference;
2. peak RSS of a single-process run at 1x and 10x the input (flat = streaming works);
3. wall time with 1 and 2 workers (same shard count) and the speed-up;
4. with ``--corpus-mb N``: an N MB synthetic corpus (the mixed code/math sample replicated), laid
   out as several files and as one big file: throughput, CPU ratio to raw encode_batch with
   offsets of the same texts, peak RSS per worker, bytes read / input bytes, shard token balance.

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
from itertools import islice
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from preprocess.assets import SAMPLE_PATH  # noqa: E402
from preprocess.pipeline import PreprocessConfig, run_pipeline  # noqa: E402
from preprocess.pipeline.shard import load_tokenizer  # noqa: E402
from preprocess.pipeline.steps import read_timings  # noqa: E402
from preprocess.records import expand_inputs  # noqa: E402
from preprocess.splits import plan_shards  # noqa: E402


def make_input(path: Path, n: int) -> None:
    rows = [json.loads(line) for line in SAMPLE_PATH.read_text(encoding="utf-8").split("\n") if line.strip()]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            r = dict(rows[i % len(rows)])
            r["id"] = f"{r['id']}-{i // len(rows)}"
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def baseline_encode(path: Path, batch: int = 512, fast: bool = False) -> tuple[float, float, int]:
    """encode_batch (with offsets materialised) of exactly the texts the pipeline encodes; with
    ``fast``, encode_batch_fast (no offsets).

    Returns wall seconds, CPU seconds of this process (all tokenizer threads) and tokens.
    """
    tok = load_tokenizer(str(PreprocessConfig(inputs=[path], output_dir=".").tokenizer), True)
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    texts = [t for r in rows for t in (tok.render_prompt(r["prompt"], None), r["response"])]
    t0, c0 = time.perf_counter(), time.process_time()
    n_tokens = 0
    for i in range(0, len(texts), batch):
        if fast:
            n_tokens += sum(len(enc.ids) for enc in tok.backend.encode_batch_fast(texts[i:i + batch],
                                                                                  add_special_tokens=False))
            continue
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


def make_corpus(folder: Path, total_mb: float, files: int) -> list[Path]:
    """``files`` JSONL files of about ``total_mb / files`` MB each (whole copies of the sample, so a
    little more): the sample's records with fresh ids."""
    rows = [json.loads(line) for line in SAMPLE_PATH.read_text(encoding="utf-8").split("\n") if line.strip()]
    templates = [json.dumps({**r, "id": "@ID@"}, ensure_ascii=False) + "\n" for r in rows]
    folder.mkdir(parents=True, exist_ok=True)
    target = total_mb * 1e6 / files
    paths, i = [], 0
    for k in range(files):
        path = folder / f"part-{k:03d}.jsonl"
        size = 0
        with open(path, "w", encoding="utf-8") as f:
            while size < target:
                block = "".join(t.replace("@ID@", f"c{i + j}", 1) for j, t in enumerate(templates))
                i += len(templates)
                f.write(block)
                size += len(block.encode("utf-8"))
        paths.append(path)
    return paths


def baseline_encode_files(paths: list[Path], batch: int = 512) -> tuple[float, int]:
    """CPU seconds of encode_batch with offsets over the corpus' texts (streamed), and tokens."""
    tok = load_tokenizer(str(PreprocessConfig(inputs=paths, output_dir=".").tokenizer), True)
    cpu, n_tokens = 0.0, 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            while lines := list(islice(f, batch)):
                rows = [json.loads(line) for line in lines]
                texts = [tok.render_prompt(r["prompt"], None) for r in rows] + [r["response"] for r in rows]
                c0 = time.process_time()
                for enc in tok.backend.encode_batch(texts, add_special_tokens=False):
                    n_tokens += len(enc.ids)
                    enc.offsets  # noqa: B018
                cpu += time.process_time() - c0
                n_tokens += len(rows)  # EOS
    return cpu, n_tokens


def corpus_run(paths: list[Path], out: Path, workers: int, num_shards: int) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    cfg = PreprocessConfig(inputs=paths, output_dir=out, extractor="rules", workers=workers,
                           num_shards=num_shards)
    t0 = time.perf_counter()
    run_pipeline(cfg)
    wall = time.perf_counter() - t0
    index = json.loads((out / "index.json").read_text())
    timings = read_timings(cfg)
    input_bytes = sum(p.stat().st_size for p in paths)
    tokens = [s["num_tokens"] for s in index["shards"]]
    t_plan = time.perf_counter()
    plan_shards(expand_inputs(paths), num_shards)
    return {"wall": wall, "cpu": sum(t["cpu_s"] for t in timings), "tokens": index["num_tokens"],
            "samples": index["num_samples"], "mb": input_bytes / 1e6,
            "rss": max(t["peak_rss_mb"] for t in timings), "read_ratio": index["bytes_read"] / input_bytes,
            "balance": max(tokens) / (sum(tokens) / len(tokens)),
            "min_balance": min(tokens) / (sum(tokens) / len(tokens)),
            "plan_s": time.perf_counter() - t_plan}


def save_json(results: dict[str, Any], path: str | None) -> None:
    """Write ``results`` to ``path`` (if given) atomically: never a half-written file."""
    if path is None:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def corpus_section(tmp: Path, total_mb: float, files: int, workers: int, num_shards: int,
                   results: dict[str, Any], json_path: str | None) -> None:
    print(f"\n4. synthetic corpus {total_mb:,.0f} MB, rules extractor on every sample, workers={workers}, "
          f"num_shards={num_shards}")
    t0 = time.perf_counter()
    many = make_corpus(tmp / "many", total_mb, files)
    (tmp / "one").mkdir(exist_ok=True)
    with open(tmp / "one" / "all.jsonl", "wb") as f:  # the same records, concatenated
        for p in many:
            with open(p, "rb") as g:
                shutil.copyfileobj(g, f, 1 << 24)
    layouts = {f"{files} files": many, "1 big file": [tmp / "one" / "all.jsonl"]}
    t_base = time.perf_counter()
    base_cpu, base_tok = baseline_encode_files(layouts["1 big file"])
    t_end = time.perf_counter()
    print(f"   corpus written in {t_base - t0:.1f} s; raw encode_batch + offsets of the same texts: "
          f"{base_cpu:.1f} CPU s, {base_tok:,} tokens (wall {t_end - t_base:.1f} s with reading)")
    corpus: dict[str, Any] = {"target_mb": total_mb, "files": files, "workers": workers,
                              "num_shards": num_shards, "write_s": t_base - t0,
                              "baseline_wall_s": t_end - t_base, "baseline_cpu_s": base_cpu,
                              "baseline_tokens": base_tok, "layouts": {}}
    results["corpus"] = corpus
    print("   layout       |  wall s |   MB/s | tokens/s   | CPU s  | CPU ratio | RSS/worker | read/input "
          "| shard tokens max/min of mean | plan s")
    for name, paths in layouts.items():
        r = corpus_run(paths, tmp / "corpus_out", workers, num_shards)
        assert r["tokens"] == base_tok, (r["tokens"], base_tok)
        wall = r["wall"]
        print(f"   {name:12s} | {wall:7.1f} | {r['mb'] / wall:6.2f} | {r['tokens'] / wall:10,.0f} "
              f"| {r['cpu']:6.1f} | {base_cpu / r['cpu']:9.2f} | {r['rss']:7.0f} MB "
              f"| {r['read_ratio']:10.4f} | {r['balance']:.3f} / {r['min_balance']:.3f}{'':15s} "
              f"| {r['plan_s']:.1f}")
        corpus["layouts"][name] = {**r, "mb_per_s": r["mb"] / wall, "tokens_per_s": r["tokens"] / wall,
                                   "cpu_ratio": base_cpu / r["cpu"]}
        save_json(results, json_path)
        shutil.rmtree(tmp / "corpus_out", ignore_errors=True)
    for d in ("many", "one"):
        shutil.rmtree(tmp / d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=30000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--corpus-mb", type=float, default=0, help="also run the synthetic corpus of this size")
    ap.add_argument("--corpus-files", type=int, default=8, help="files of the several-files layout")
    ap.add_argument("--only-corpus", action="store_true", help="run only the corpus section")
    ap.add_argument("--tmp", default=None, help="folder for the corpus (default: the system temp folder)")
    ap.add_argument("--skip-scaling", action="store_true", help="skip the 1 vs 2 workers section")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the figures to this JSON file")
    a = ap.parse_args()
    cores = os.cpu_count()
    results: dict[str, Any] = {"args": vars(a), "cores": cores}
    if a.only_corpus:
        with tempfile.TemporaryDirectory(dir=a.tmp) as tmp_s:
            corpus_section(Path(tmp_s), a.corpus_mb, a.corpus_files, a.workers, 2 * a.workers,
                           results, a.json)
        return
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        data = tmp / "in.jsonl"
        make_input(data, a.records)
        shards = 2 * a.workers
        print(f"{a.records} records, {cores} cores, workers={a.workers}, num_shards={shards}")
        runs: dict[str, list[tuple[float, float, int]]] = {k: [] for k in ("base", "fast", "rules", "none",
                                                                           "frac")}
        for _ in range(a.reps):
            runs["base"].append(baseline_encode(data))
            runs["fast"].append(baseline_encode(data, fast=True))
            runs["rules"].append(pipeline_run(data, tmp / "o", a.workers, shards))
            runs["none"].append(pipeline_run(data, tmp / "o", a.workers, shards, extractor="none"))
            runs["frac"].append(pipeline_run(data, tmp / "o", a.workers, shards,
                                             fractions={"code": 0.1, "math": 0.5}))
        n_tok = runs["base"][0][2]
        assert all(r[2] == n_tok for rs in runs.values() for r in rs), "token counts differ"
        b_wall = min(r[0] for r in runs["base"])
        b_cpu = min(r[1] for r in runs["base"])
        f_cpu = min(r[1] for r in runs["fast"])
        print(f"\n1. throughput (best of {a.reps}; tokens incl. EOS: {n_tok:,}); "
              "wall ratio = the goal metric,")
        print("   CPU ratio = encode CPU-s / pipeline CPU-s (shard tasks), robust to other load")
        print(f"   raw tokenizers encode_batch + offsets : {n_tok / b_wall:10,.0f} tokens/s  "
              f"wall {b_wall:6.2f} s  CPU {b_cpu:6.2f} s")
        print(f"   raw encode_batch_fast (no offsets)    :{'':26s}CPU {f_cpu:6.2f} s  "
              "(last column: CPU ratio to this)")
        throughput: dict[str, Any] = {"records": a.records, "workers": a.workers, "num_shards": shards,
                                      "reps": a.reps, "tokens": n_tok,
                                      "base": {"wall_s": b_wall, "cpu_s": b_cpu}, "fast": {"cpu_s": f_cpu}}
        for key, name in (("rules", "pipeline, rules extractor, 100 %"), ("none", "pipeline, none extractor"),
                          ("frac", "pipeline, rules, code 10 % math 50 %")):
            w = min(r[0] for r in runs[key])
            c = min(r[1] for r in runs[key])
            print(f"   {name:38s}: {n_tok / w:10,.0f} tokens/s  wall {w:6.2f} s  CPU {c:6.2f} s  "
                  f"ratio wall {b_wall / w:.2f}  CPU {b_cpu / c:.2f}  (fast {f_cpu / c:.2f})")
            throughput[key] = {"wall_s": w, "cpu_s": c, "ratio_wall": b_wall / w, "ratio_cpu": b_cpu / c,
                               "ratio_cpu_fast": f_cpu / c}
        results["throughput"] = throughput
        save_json(results, a.json)

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
            results["memory"] = {"records": [n_small, 10 * n_small], "peak_rss_mb": [r1, r10],
                                 "wall_s": [w1, w10]}
            save_json(results, a.json)

        if not a.skip_scaling:
            w1 = min(pipeline_run(data, tmp / "o", 1, 4)[0] for _ in range(max(1, a.reps - 1)))
            w2 = min(pipeline_run(data, tmp / "o", 2, 4)[0] for _ in range(max(1, a.reps - 1)))
            print(f"\n3. scaling (num_shards=4): 1 worker {w1:.2f} s, 2 workers {w2:.2f} s, "
                  f"speed-up {w1 / w2:.2f}x")
            results["scaling"] = {"num_shards": 4, "wall_s_1_worker": w1, "wall_s_2_workers": w2}
            save_json(results, a.json)
        if a.corpus_mb:
            corpus_section(tmp, a.corpus_mb, a.corpus_files, a.workers, shards, results, a.json)


if __name__ == "__main__":
    main()
