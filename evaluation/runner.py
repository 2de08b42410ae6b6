"""One evaluation run: load a checkpoint, generate for each benchmark, score, write the results JSON.

Results JSON (``format: dm-eval-results/1``)::

    {"format", "name", "model", "created", "decode": {...}, "seed", "chat_template", "sandbox": {layers,
     limits}, "environment": {...},
     "benchmarks": {"gsm8k": {"title", "kind", "metric", "score" (percent), "n", "correct",
                              "generation_s", "scoring_s", "records": [
         {"task_id", "source" (file:line), "prompt", "generation", "extracted", "gold", "passed",
          "status", "generation_s" (batch time / batch size), "scoring_s", "stderr" (code only)}]}}}
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from evaluation import scoring
from evaluation.benchmarks import BENCHMARKS, ORDER, Problem, load_benchmark, reference_completion
from evaluation.sandbox import SandboxLimits, run_programs, sandbox_layers
from trainer.families import LAYOUTS
from trainer.generation import DecodeConfig, generate, supports_kv_cache

RESULTS_FORMAT = "dm-eval-results/1"


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    """Everything one ``dm-evaluate run`` needs."""

    model: str = "tiny"
    """``tiny`` (built-in random-init default) or an HF folder / hub id (e.g. a trainer export)."""
    name: str = ""
    """Row label in the table; defaults to the model folder's name."""
    benchmarks: tuple[str, ...] = ORDER
    paths: dict[str, Path] = field(default_factory=dict)
    """Benchmark file per name (the CLI fills this from --data-dir and per-benchmark options)."""
    limit: int | None = None
    """Evaluate only the first N problems of each benchmark (smoke tests)."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    batch_size: int = 8
    seed: int = 0
    use_chat_template: bool = True
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    workers: int = 2
    """Programs run in parallel in the sandbox."""
    device: str = "cpu"
    dtype: str = "float32"
    kv_cache_auto: bool = False
    """Use the KV cache when the loaded model and the layout support it (overrides ``decode.kv_cache``)."""
    layout_auto: bool = False
    """Decode with the layout the run was trained with (its config.yaml), else the family's default
    (overrides ``decode.layout``)."""

    def __post_init__(self) -> None:
        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        if unknown:
            raise ValueError(f"EvalConfig.benchmarks: unknown {unknown}; known: {', '.join(ORDER)}")
        if not self.benchmarks:
            raise ValueError("EvalConfig.benchmarks is empty")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"EvalConfig.limit must be >= 1, got {self.limit}")
        if self.batch_size < 1 or self.workers < 1:
            raise ValueError("EvalConfig.batch_size and EvalConfig.workers must be >= 1")
        if self.dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise ValueError(f"EvalConfig.dtype must be float32|bfloat16|float16|float64, got {self.dtype}")
        if not self.name:
            self.name = Path(str(self.model).rstrip("/")).name or str(self.model)


def training_settings(model: str | Path) -> dict:
    """Block size, layout and prompt format a trainer export was trained with, or {} when unknown.

    Why: a checkpoint decoded with another block size than it was trained with, or prompted
    with(out) the chat template when its data was built the other way, scores far below what it
    learned, silently.  The trainer writes ``<run>/config.yaml`` beside its ``<run>/hf`` export; its
    ``data.path`` names the shards, whose ``index.json`` says whether the chat template was used.
    Anything missing or unreadable just leaves that setting unknown (other models have no run dir).
    """
    path = Path(str(model))
    cfg_file = path.parent / "config.yaml"
    if not (path.is_dir() and cfg_file.is_file()):
        return {}
    import yaml

    try:
        cfg = yaml.safe_load(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    if not isinstance(cfg, dict):
        return {}
    out: dict = {"config": str(cfg_file)}
    block = (cfg.get("masking") or {}).get("block_size")
    if isinstance(block, int) and not isinstance(block, bool):
        out["block_size"] = block
    layout = (cfg.get("objective") or {}).get("layout")
    if layout in LAYOUTS:
        out["layout"] = layout
    data_path = (cfg.get("data") or {}).get("path")
    if isinstance(data_path, str) and data_path:
        for base in (Path(data_path), path.parent / data_path):
            try:
                index = json.loads((base / "index.json").read_text(encoding="utf-8"))
                used = index["tokenizer"]["chat_template_used"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(used, bool):
                out["chat_template"] = used
                break
    return out


def setting_mismatches(trained: dict, block_size: int, chat_template: bool) -> list[str]:
    """Human-readable differences between how a checkpoint was trained and how it is evaluated."""
    out = []
    if "block_size" in trained and trained["block_size"] != block_size:
        out.append(f"trained with block size {trained['block_size']} but decoding with block length "
                   f"{block_size} (pass --block-size {trained['block_size']})")
    if "chat_template" in trained and trained["chat_template"] != chat_template:
        how = "with" if trained["chat_template"] else "without"
        out.append(f"trained {how} the chat template but evaluated "
                   f"{'with' if chat_template else 'without'} it"
                   + ("" if trained["chat_template"] else " (pass --no-chat-template)"))
    return out


def score_problems(problems: list[Problem], completions: list[str], limits: SandboxLimits, workers: int
                   ) -> list[dict]:
    """Score completions against their problems -> per-sample records (no timing of generation)."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    records: list[dict] = []
    code_idx = [i for i, p in enumerate(problems) if BENCHMARKS[p.benchmark].kind == "code"]
    programs = [scoring.PROGRAM_BUILDERS[problems[i].benchmark](problems[i].record, completions[i])
                for i in code_idx]
    results = dict(zip(code_idx, run_programs(programs, limits, workers=workers)))
    for i, (p, c) in enumerate(zip(problems, completions)):
        rec = {"task_id": p.task_id, "source": p.source, "prompt": p.prompt, "generation": c}
        if i in results:
            r = results[i]
            rec.update(extracted=scoring.extract_code(c), gold=None, passed=r.passed, status=r.status,
                       scoring_s=r.duration_s, stderr=r.stderr[-500:])
        else:
            t = time.perf_counter()
            ok, extracted = scoring.score_math(p.gold or "", c)
            rec.update(extracted=extracted, gold=p.gold, passed=ok, status="passed" if ok else "failed",
                       scoring_s=round(time.perf_counter() - t, 4))
        records.append(rec)
    return records


def summarise(name: str, records: list[dict], generation_s: float) -> dict:
    bench = BENCHMARKS[name]
    correct = sum(r["passed"] for r in records)
    metric = "pass@1" if bench.kind == "code" else "accuracy"
    return {"title": bench.title, "kind": bench.kind, "metric": metric,
            "score": round(100.0 * correct / len(records), 2), "n": len(records), "correct": correct,
            "generation_s": round(generation_s, 3),
            "scoring_s": round(sum(r["scoring_s"] for r in records), 3), "records": records}


def self_check(cfg: EvalConfig) -> dict:
    """Score each benchmark's own reference answers through the same checkers (should be 100 %)."""
    out = {}
    for name in cfg.benchmarks:
        problems = load_benchmark(name, cfg.paths[name], cfg.limit)
        answers = [reference_completion(p) for p in problems]
        records = score_problems(problems, answers, cfg.sandbox, cfg.workers)
        out[name] = summarise(name, records, 0.0)
    return out


def read_completions(path: Path, problems: list[Problem]) -> tuple[list[str | None], list[str]]:
    """Completions made elsewhere (``{"task_id": ..., "completion": "..."}`` per line), in problem
    order (None where a problem has none), and one ``file:line: problem`` message per bad line."""
    wanted = {p.task_id: i for i, p in enumerate(problems)}
    out: list[str | None] = [None] * len(problems)
    errors: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("completion"), str) \
                    or not isinstance(rec.get("task_id"), (str, int)) or isinstance(rec.get("task_id"), bool):
                errors.append(f"{where}: expected an object with task_id (string or integer) and completion "
                              "(string)")
                continue
            i = wanted.get(str(rec["task_id"]))
            if i is None:
                errors.append(f"{where}: task_id: {rec['task_id']!r} is not a problem being scored "
                              "(not in the benchmark file, or beyond --limit)")
            elif out[i] is not None:
                errors.append(f"{where}: task_id: {rec['task_id']!r} appears twice")
            else:
                out[i] = rec["completion"]
    return out, errors


def score_completions(name: str, problems: list[Problem], completions_path: Path, limits: SandboxLimits,
                      workers: int, label: str = "") -> tuple[dict, list[str]]:
    """Score completions produced elsewhere -> (results dict as ``run_evaluation`` writes, bad lines).

    A problem without a completion scores 0 (status ``missing``); bad lines are returned, not dropped.
    """
    layers = sandbox_layers(limits)
    completions, errors = read_completions(completions_path, problems)
    have = [i for i, c in enumerate(completions) if c is not None]
    scored = dict(zip(have, score_problems([problems[i] for i in have], [completions[i] for i in have],
                                           limits, workers)))
    records = []
    for i, p in enumerate(problems):
        missing = {"task_id": p.task_id, "source": p.source, "prompt": p.prompt, "generation": None,
                   "extracted": None, "gold": p.gold, "passed": False, "status": "missing", "scoring_s": 0.0}
        records.append(scored.get(i) or missing)
    summary = summarise(name, records, 0.0)
    summary.update(completions=str(completions_path), missing=len(problems) - len(have),
                   bad_lines=len(errors))
    results = {"format": RESULTS_FORMAT, "name": label or Path(completions_path).stem,
               "model": f"external:{completions_path}",
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "decode": {},
               "sandbox": layers, "environment": {"python": platform.python_version()},
               "benchmarks": {name: summary}}
    return results, errors


def run_evaluation(cfg: EvalConfig, *, log=print, on_benchmark=None) -> dict:
    """Generate and score every requested benchmark; returns the results dict (see module doc).

    ``on_benchmark(results)`` is called after each benchmark (the CLI saves the JSON then, so a
    crash or interruption in a later benchmark loses nothing already scored).
    """
    from trainer.modeling import load_model  # heavy import only when a model is needed

    problems = {name: load_benchmark(name, cfg.paths[name], cfg.limit) for name in cfg.benchmarks}
    bundle = load_model(cfg.model, dtype=getattr(torch, cfg.dtype), seed=cfg.seed)
    model = bundle.model.to(cfg.device)
    trained = training_settings(cfg.model)
    if cfg.layout_auto:
        cfg.decode.layout = trained.get("layout", bundle.family.layouts[0])
    if cfg.kv_cache_auto:
        cfg.decode.kv_cache = supports_kv_cache(model) and cfg.decode.layout == "block"
    layers = sandbox_layers(cfg.sandbox)
    chat = cfg.use_chat_template and bool(getattr(bundle.tokenizer, "chat_template", None))
    mismatches = setting_mismatches(trained, cfg.decode.block_size, chat)
    for m in mismatches:
        log(f"WARNING: {cfg.model}: {m}")
    results = {"format": RESULTS_FORMAT, "name": cfg.name, "model": str(cfg.model),
               "family": bundle.family.model_type,
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "decode": asdict(cfg.decode), "batch_size": cfg.batch_size, "seed": cfg.seed,
               "chat_template": chat, "trained": trained, "setting_mismatches": mismatches,
               "sandbox": layers,
               "environment": {"python": platform.python_version(), "torch": torch.__version__,
                               "device": cfg.device, "dtype": cfg.dtype},
               "benchmarks": {}}
    d = cfg.decode
    for name in cfg.benchmarks:
        probs = problems[name]
        # Similar prompt lengths share a batch (less padding); answers go back to file order.
        order = sorted(range(len(probs)), key=lambda i: len(probs[i].prompt))
        completions: list[str] = [""] * len(probs)
        per_sample_s: list[float] = [0.0] * len(probs)
        t_gen = time.perf_counter()
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            t = time.perf_counter()
            texts = generate(model, bundle.tokenizer, [probs[i].prompt for i in idx],
                             mask_token_id=bundle.mask_token_id, eos_token_id=bundle.eos_token_id,
                             gen_length=d.gen_length, block_size=d.block_size,
                             steps_per_block=d.steps_per_block, temperature=d.temperature,
                             threshold=d.threshold, remasking=d.remasking,
                             use_chat_template=cfg.use_chat_template, batch_size=cfg.batch_size,
                             seed=cfg.seed + s, layout=d.layout, kv_cache=d.kv_cache,
                             editing_threshold=d.editing_threshold, max_post_steps=d.max_post_steps,
                             min_transfer=d.min_transfer)
            dt = (time.perf_counter() - t) / len(idx)
            for i, text in zip(idx, texts):
                completions[i], per_sample_s[i] = text, round(dt, 4)
            log(f"[{name}] generated {min(s + cfg.batch_size, len(order))}/{len(order)} "
                f"({dt:.2f} s/sample)")
        generation_s = time.perf_counter() - t_gen
        records = score_problems(probs, completions, cfg.sandbox, cfg.workers)
        for rec, gs in zip(records, per_sample_s):
            rec["generation_s"] = gs
        summary = summarise(name, records, generation_s)
        results["benchmarks"][name] = summary
        if on_benchmark is not None:
            on_benchmark(results)
        log(f"[{name}] {summary['metric']} = {summary['score']:.2f} % ({summary['correct']}/{summary['n']}), "
            f"{generation_s / len(probs):.2f} s/sample generation")
    return results


def write_results(results: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    return path
