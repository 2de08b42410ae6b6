"""The trainer's side of the built-in task: build its data when missing, score it at the end.

``build_data`` writes the generated training problems as JSONL next to the shard folder and runs the
normal preprocessor on them (any registered extractor: ``chain-truth`` for the exact spans, ``rules``
to see what the rule-based extractor makes of them).  ``evaluate`` decodes held-out problems with the
project's block-diffusion generation (``trainer.generation.generate``, called as ``launch/train.py`` calls
it for its samples) and scores the final answer by exact match.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tasks.chain import DOMAIN, parse_answer, problems, record
from trainer.config import TaskConfig

EXTRACTORS = {"chain-truth": "tasks.chain:ChainTruthExtractor"}
"""Task-specific extractors, by the ``module:Class`` plug-in name the preprocessor's registry imports."""

GEN_LENGTH = 24
"""New tokens per held-out answer: the longest chain (3 steps + answer) is 20 tokens + EOS, and with the
longest prompt (8 tokens) prompt + answer stay one 32-token block, so decoding runs one block per
problem (32 would spill into a second block: twice the decoding steps for a model that has not learnt
to stop, i.e. the untrained one)."""


def source_path(data_dir: Path) -> Path:
    """Where the generated JSONL lives: beside the shard folder, not inside it (the preprocessor owns it)."""
    return data_dir.parent / f"{data_dir.name}.records.jsonl"


def write_records(task: TaskConfig, path: Path) -> Path:
    """Write ``task.train_size`` training problems as preprocessor JSONL (atomically: tmp + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i, p in enumerate(problems("train", task.train_size, seed=task.seed)):
            f.write(json.dumps(record(p, f"chain-train-{i}")) + "\n")
    tmp.replace(path)
    return path


def build_data(task: TaskConfig, data_dir: Path) -> Path:
    """Preprocess ``task``'s data into ``data_dir`` (idempotent: a complete folder returns at once)."""
    from preprocess.pipeline import PreprocessConfig, run_pipeline

    workers = min(4, os.cpu_count() or 1)
    if task.name == "sample":
        from preprocess.assets import SAMPLE_PATH

        print(f"[train] {data_dir} missing: preprocessing the bundled sample with the {task.extractor} "
              f"extractor", flush=True)
        return run_pipeline(PreprocessConfig(inputs=[SAMPLE_PATH], output_dir=data_dir,
                                             extractor=task.extractor, workers=workers,
                                             fractions={"code": task.fraction, "math": task.fraction}))
    print(f"[train] {data_dir} missing: generating {task.train_size} arithmetic-chain problems "
          f"(seed {task.seed}) and preprocessing them with the {task.extractor} extractor", flush=True)
    src = write_records(task, source_path(data_dir))
    extractor = EXTRACTORS.get(task.extractor, task.extractor)
    return run_pipeline(PreprocessConfig(inputs=[src], output_dir=data_dir, extractor=extractor,
                                         fractions={DOMAIN: task.fraction}, seed=task.seed,
                                         use_chat_template=False, num_shards=2, workers=workers))


@dataclass(slots=True)
class Scored:
    """Held-out results of one model."""

    accuracy: float
    """Share of problems whose ``#### N`` equals the answer."""
    trace_accuracy: float
    """Share whose whole response equals the reference (every intermediate result right)."""
    rows: list[dict]
    """{"prompt", "reference", "completion", "correct"} per problem."""


def evaluate(model: torch.nn.Module, tokenizer, *, mask_token_id: int, eos_token_id: int, task: TaskConfig,
             block_size: int, use_chat_template: bool, seed: int, batch_size: int = 50) -> Scored:
    """Decode ``task.eval_size`` held-out problems greedily and score them by exact match."""
    from trainer.generation import generate, supports_kv_cache

    held = list(problems("heldout", task.eval_size, seed=task.seed))
    texts = generate(model, tokenizer, [p.prompt for p in held], mask_token_id=mask_token_id,
                     eos_token_id=eos_token_id, gen_length=GEN_LENGTH, block_size=block_size,
                     steps_per_block=block_size, use_chat_template=use_chat_template,
                     kv_cache=supports_kv_cache(model), seed=seed, batch_size=batch_size)
    rows = [{"prompt": p.prompt, "reference": p.response, "completion": t.strip(),
             "correct": parse_answer(t) == p.answer} for p, t in zip(held, texts)]
    n = max(len(rows), 1)
    return Scored(accuracy=sum(r["correct"] for r in rows) / n,
                  trace_accuracy=sum(r["completion"] == r["reference"] for r in rows) / n, rows=rows)


def report(before: Scored | None, after: Scored, task: TaskConfig, out_dir: Path,
           echo: Callable[[str], None] = print) -> dict:
    """Print accuracy before (None: not measured) and after, and ``task.show`` samples; write
    ``out_dir/eval.json``."""
    result = {"task": task.name, "heldout": len(after.rows),
              "accuracy_before": before.accuracy if before else None, "accuracy_after": after.accuracy,
              "trace_accuracy_before": before.trace_accuracy if before else None,
              "trace_accuracy_after": after.trace_accuracy, "samples": after.rows}
    tmp = out_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out_dir / "eval.json")
    n = len(after.rows)
    if before is None:
        echo(f"[eval] held-out exact match ({n} problems never trained on): {after.accuracy:.1%} "
             f"(whole chain right: {after.trace_accuracy:.1%})")
    else:
        echo(f"[eval] held-out exact match ({n} problems never trained on): "
             f"before training {before.accuracy:.1%} -> after {after.accuracy:.1%} "
             f"(whole chain right: {before.trace_accuracy:.1%} -> {after.trace_accuracy:.1%})")
    for r in after.rows[:task.show]:
        mark = "right" if r["correct"] else "wrong"
        echo(f"[eval] {r['prompt']}  ({mark})\n  reference: {r['reference']!r}\n"
             f"  generated: {r['completion']!r}")
    return result
