"""Fine-tune a masked diffusion LM with complementary priority masking under DeepSpeed.

Run commands (from the repository root)::

    # the main command: preprocess the bundled sample if needed, train the tiny default (ZeRO-3),
    # checkpoint, export a HF folder, print generated samples
    deepspeed launch/train.py --deepspeed ds_configs/zero3.json
    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero3.json   # 2 ranks (CPU: gloo)

    # a YAML file and dotted overrides on top of a preset
    deepspeed launch/train.py --config my.yaml --masking.weight 0.5 --train.max_steps 50
    python launch/train.py --help                                  # every key, default and meaning

This script wires the run around ``trainer.loop.Trainer``: the default data folder is built from the
bundled sample when missing (rank 0; any other missing ``data.path`` is an error), and after the
export rank 0 decodes ``train.sample_prompts`` with the exported model.

Exit codes: 0 done; 75 checkpointed after SIGTERM/SIGUSR1 (pre-emption: run the same command again
to resume); 2 bad configuration (one line on stderr); anything else is a crash.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from trainer.config import TASK_DATA, Config, ConfigError  # noqa: E402
from trainer.config_io import help_text, load_config  # noqa: E402


def prepare_default_data(cfg: Config, rank: int) -> None:
    """Build ``task.name``'s data into its default ``data.path`` (``TASK_DATA``) when that folder has no
    index (rank 0; the other ranks wait at a barrier).  Other paths are left alone: the trainer
    reports them missing, so a misspelt path is never filled."""
    import torch.distributed as dist

    path = Path(cfg.data.path)
    if (path / "index.json").is_file() or not cfg.data.preprocess_if_missing \
            or path.resolve() != Path(TASK_DATA[cfg.task.name]).resolve():
        return
    if rank == 0:
        from tasks.builtin import build_data

        build_data(cfg.task, path)
    dist.barrier()


def evaluate_task(trainer) -> dict:
    """Held-out exact match of the built-in task: the untrained model (same seed) vs the export."""
    import torch

    from tasks.builtin import evaluate, report
    from trainer.modeling import load_model

    cfg = trainer.cfg
    templated = bool(trainer.dataset.index["tokenizer"].get("chat_template_used", True))
    sources = (cfg.model.name, trainer.export_dir) if cfg.task.eval_before else (trainer.export_dir,)
    scores = []
    for source in sources:
        bundle = load_model(source, dtype=torch.bfloat16 if trainer.bf16 else torch.float32,
                            seed=cfg.train.seed)
        scores.append(evaluate(bundle.model.to(trainer.device), bundle.tokenizer,
                               mask_token_id=bundle.mask_token_id, eos_token_id=bundle.eos_token_id,
                               task=cfg.task, block_size=cfg.masking.block_size,
                               use_chat_template=templated, seed=cfg.train.seed))
    before = scores[0] if cfg.task.eval_before else None
    return report(before, scores[-1], cfg.task, trainer.out_dir, echo=trainer.metrics.print)


def write_samples(trainer) -> None:
    """Decode the sample prompts with the exported model (LoRA: the base + the exported adapter) on rank 0
    -> samples.json and the log."""
    import torch

    from trainer.generation import generate, supports_kv_cache
    from trainer.modeling import load_model

    cfg = trainer.cfg
    dtype = torch.bfloat16 if trainer.bf16 else torch.float32
    bundle = (load_model(cfg.model.name, tokenizer=cfg.model.tokenizer, dtype=dtype, seed=cfg.train.seed,
                         adapter=trainer.adapter_dir)
              if cfg.lora.enabled else load_model(trainer.export_dir, dtype=dtype))
    model = bundle.model.to(trainer.device)
    templated = bool(trainer.dataset.index["tokenizer"].get("chat_template_used", True))
    layout = cfg.objective.layout
    texts = generate(model, bundle.tokenizer, list(cfg.train.sample_prompts),
                     mask_token_id=bundle.mask_token_id, eos_token_id=bundle.eos_token_id,
                     gen_length=cfg.train.sample_max_new_tokens, block_size=cfg.masking.block_size,
                     steps_per_block=cfg.masking.block_size,
                     use_chat_template=templated,  # prompt the way the training data was built
                     layout=layout, kv_cache=supports_kv_cache(model) and layout == "block",
                     seed=cfg.train.seed)
    samples = [{"prompt": p, "completion": t} for p, t in zip(cfg.train.sample_prompts, texts)]
    (trainer.out_dir / "samples.json").write_text(json.dumps(samples, indent=1, ensure_ascii=False) + "\n")
    for s in samples:
        trainer.metrics.print(f"[sample] {s['prompt']}\n{s['completion']}\n")


def main(argv: list[str]) -> int:
    try:
        cfg = load_config(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "-h" in argv or "--help" in argv:
        print(help_text(cfg))
        return 0
    from trainer.components import init_distributed
    from trainer.loop import Trainer

    init_distributed()
    trainer = None
    try:
        import torch.distributed as dist

        prepare_default_data(cfg, dist.get_rank())
        trainer = Trainer(cfg)
        code = trainer.train()
        finished = code == 0 and cfg.checkpoint.export_hf and trainer.rank == 0 \
            and trainer.step == cfg.train.max_steps
        if finished and cfg.train.sample_prompts:
            write_samples(trainer)
        if finished and cfg.task.name == "chain" and cfg.task.eval_size:
            evaluate_task(trainer)
        return code
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BaseException:
        # Leave without the closing barrier: the other ranks may be waiting in a collective
        # this rank will never join; the launcher stops them when this process exits non-zero.
        if trainer is not None:
            trainer.close(barrier=False)
            trainer = None
        raise
    finally:
        if trainer is not None:
            trainer.close()
        else:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
