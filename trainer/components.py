"""The parts a training run is assembled from, each built by one small function (``Trainer.__init__``
calls them in order): process group and device, DeepSpeed JSON, shards, model, engine and schedule.

Configuration problems found here raise :class:`trainer.config.ConfigError` naming the key or file, so
``launch/train.py`` exits 2 with one line instead of a traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.attention import BLOCK_SPARSE_SDPA
from trainer.config import Config, ConfigError
from trainer.config_io import find_deepspeed_config, resolve_deepspeed_config
from trainer.families import family_for
from trainer.modeling import (
    DEFAULT_MODEL,
    ModelBundle,
    family_in,
    load_model,
    mark_z3_leaf_modules,
)
from trainer.recompute import enable_activation_checkpointing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join the process group the launcher describes, or make a one-rank group for `python train.py`."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # plain python / in-process tests: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               auto_mpi_discovery=False, verbose=False)


def release_shm_buffer() -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce segment from /dev/shm.

    DeepSpeed's shared-memory all-reduce for CPU ranks (``deepspeed/ops/csrc/cpu/comm/shm.cpp``) creates
    one 66 MiB segment per rank, ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``,
    and never unlinks it: every CPU run used to leave its ranks' segments in RAM (/dev/shm is memory)
    until reboot.  Every rank mapped every peer's segment when the group formed, so removing the name
    at the end of the run is safe; the memory goes when the last rank exits.  No-op where there is no
    such segment (GPU ranks communicate through NCCL).
    """
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path("/dev/shm") / name)


def select_device(world: int) -> torch.device:
    """This rank's device; on CPU, share the cores between the ranks of the node."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if acc.device_name() != "cpu":
        acc.set_device(local_rank)
        return torch.device(acc.device_name(local_rank))
    if "OMP_NUM_THREADS" not in os.environ:
        # Oversubscription would slow every rank down.  LOCAL_WORLD_SIZE: torchrun / slurm_env.py;
        # LOCAL_SIZE: the deepspeed launcher.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return torch.device("cpu")


def use_bf16(cfg: Config, device: torch.device) -> bool:
    from deepspeed.accelerator import get_accelerator

    return cfg.model.dtype == "bfloat16" or (cfg.model.dtype == "auto" and device.type != "cpu"
                                             and get_accelerator().is_bf16_supported())


def deepspeed_config(cfg: Config, *, world: int, bf16: bool) -> dict:
    """The DeepSpeed JSON named by ``cfg.deepspeed`` with its "auto" values filled; a missing file, bad
    JSON or a contradiction with the config is a ConfigError naming the file (and line for JSON)."""
    try:
        path = find_deepspeed_config(cfg.deepspeed)
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: line {e.lineno} column {e.colno}: invalid JSON ({e.msg})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    try:
        return resolve_deepspeed_config(cfg, raw, world_size=world, bf16=bf16, source=str(path))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def open_dataset(cfg: Config):
    """The preprocessed shards at ``data.path`` (``launch/train.py`` builds the default one if missing)."""
    from preprocess.shards import ShardedDataset

    path = Path(cfg.data.path)
    if not (path / "index.json").is_file():
        raise ConfigError(f"data.path: {path}/index.json not found; preprocess your data into it first "
                          f"(dm-preprocess), or check the path for a typo")
    return ShardedDataset(path)


def resolve_attn_backend(choice: str, device: torch.device, requested: str | None = None) -> str:
    """objective.attn_backend -> 'sdpa', 'sparse' or 'flex'.

    'auto' picks flex on CUDA when torch ships ``flex_attention``: its BlockMask skips the masked-out
    tiles of the block-diffusion scores (about 3/4 of them at L = 512), compiled once per shape.  On a
    CPU flex has no backward (torch 2.13 raises "FlexAttention does not support backward on CPU"), so
    'auto' is the block-sparse SDPA there ('sparse': the same skipping through the fused CPU kernel,
    ~10 % faster steps at L = 512, see docs/training.md "Step cost"), or plain sdpa when
    ``requested`` (model.attn_implementation) names another kernel.  An explicit 'flex' where it cannot
    train is an error naming the key, not a silent fallback.
    """
    if choice not in ("auto", "sdpa", "sparse", "flex"):
        raise ConfigError(f"objective.attn_backend: must be auto, sdpa, sparse or flex, got {choice!r}")
    try:
        import torch.nn.attention.flex_attention  # noqa: F401

        has_flex = True
    except ImportError:
        has_flex = False
    if choice == "flex" and not has_flex:
        raise ConfigError(f"objective.attn_backend: flex requested but torch {torch.__version__} has no "
                          f"torch.nn.attention.flex_attention; use sdpa")
    if choice == "sparse" and device.type != "cpu":
        raise ConfigError("objective.attn_backend: sparse is the CPU block-sparse SDPA; on a GPU use flex")
    if choice == "flex" and device.type == "cpu":
        raise ConfigError("objective.attn_backend: flex cannot train on CPU (flex attention has no CPU "
                          "backward); use sdpa or auto")
    if choice == "auto":
        if device.type == "cuda":
            return "flex" if has_flex and requested in (None, "flex_attention") else "sdpa"
        return "sparse" if device.type == "cpu" and requested in (None, BLOCK_SPARSE_SDPA) else "sdpa"
    return choice


def resolve_activation_checkpointing(choice: str, attn_backend: str, *, builtin: bool) -> str:
    """model.activation_checkpointing -> 'none', 'selective' or 'full' for the resolved attention backend.

    'auto' is selective (on the 27 M benchmark model it brings a step's memory from 1.8x to 1.2x AR SFT
    for ~8 % more CPU time, docs/training.md "Step cost"), except:
    * with flex: its recompute would run flex's higher-order op under a Python dispatch mode, which is
      not verified on a GPU yet, so 'auto' is none there and an explicit selective is an error;
    * for the ``builtin`` ~4 M model (model.name tiny): its activations are tens of MiB, and the
      recompute's per-op overhead would cost ~20 % of its step (command 1's run time) for nothing.
    """
    if choice == "auto":
        return "none" if attn_backend == "flex" or builtin else "selective"
    if choice == "selective" and attn_backend == "flex":
        raise ConfigError("model.activation_checkpointing: selective is not supported with objective."
                          "attn_backend flex yet; use full, none, or attn_backend sdpa")
    return choice


def attn_implementation_for(backend: str, requested: str | None) -> str | None:
    """The attn_implementation to load the model with for ``backend`` (None: the model's own).

    A flex BlockMask is only understood by transformers' flex_attention path, so flex forces it; an
    explicit model.attn_implementation that contradicts the backend is an error naming both keys.
    """
    if backend == "flex":
        if requested not in (None, "flex_attention"):
            raise ConfigError(f"model.attn_implementation: {requested!r} contradicts objective.attn_backend "
                              f"= flex (which needs 'flex_attention'); drop one of them")
        return "flex_attention"
    if backend == "sparse":
        if requested not in (None, BLOCK_SPARSE_SDPA):
            raise ConfigError(f"model.attn_implementation: {requested!r} contradicts objective.attn_backend "
                              f"= sparse (which needs {BLOCK_SPARSE_SDPA!r}); drop one of them")
        return BLOCK_SPARSE_SDPA
    if requested == "flex_attention":
        raise ConfigError("model.attn_implementation: 'flex_attention' needs objective.attn_backend = flex "
                          "(the sdpa backend passes a dense bool mask)")
    return requested


def load_for_training(cfg: Config, *, bf16: bool, attn_backend: str, recompute: str, ds_config: dict,
                      vocab_size: int) -> ModelBundle:
    """The model to train, checked against the layout and the data; under ZeRO-3 it is partitioned while
    it loads, and its family's MoE blocks are marked ZeRO-3 leaves.  ``recompute``: the activation
    checkpointing mode (:func:`resolve_activation_checkpointing`).  With ``lora.rank`` > 0 it comes back
    frozen inside a ``peft.PeftModel`` whose adapters alone train (``trainer.lora``)."""
    zero3 = int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3
    tiny = cfg.model.name == DEFAULT_MODEL
    try:  # the family and its layouts first, from config.json alone, before any weight is read
        family = family_for("tiny_dllm") if tiny else family_in(cfg.model.name)
    except (ValueError, OSError) as e:  # unknown family, missing folder or config.json
        raise ConfigError(f"model.name: {e}") from None
    try:
        family.check_layout(cfg.objective.layout, "objective.layout")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        bundle = load_model(cfg.model.name, tokenizer=cfg.model.tokenizer,
                            dtype=torch.bfloat16 if bf16 else torch.float32,
                            attn_implementation=attn_implementation_for(attn_backend,
                                                                        cfg.model.attn_implementation),
                            seed=cfg.train.seed, zero3_config=ds_config if zero3 and not tiny else None)
    except OSError as e:  # no tokenizer in the folder, unreadable weights
        raise ConfigError(f"model.name: {cfg.model.name}: {e}") from None
    if vocab_size > bundle.model.config.vocab_size:
        raise ConfigError(f"data.path: shards use a vocabulary of {vocab_size} tokens but model "
                          f"{cfg.model.name} has {bundle.model.config.vocab_size}: the data was tokenized "
                          f"with another tokenizer")
    if zero3:
        mark_z3_leaf_modules(bundle.model)
    enable_activation_checkpointing(bundle.model, recompute)
    if cfg.lora.enabled:  # the base is frozen (and stays partitioned); only the adapters train
        from trainer.lora import apply_lora

        bundle.model = apply_lora(bundle.model, family, cfg.lora)
    return bundle


def lr_factor(step: int, *, max_steps: int, warmup_ratio: float, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of optim.lr for optimizer step ``step`` (0-based): linear warmup, then decay."""
    warmup = math.ceil(warmup_ratio * max_steps)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_lr_ratio + (1 - min_lr_ratio) * shape


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices only; biases, norms and embeddings get none.

    Why: decaying norm gains pulls them towards 0 (not their neutral 1), and decaying embedding rows
    shrinks rare tokens that receive few gradients (the standard GPT/Llama recipe excludes both).
    With tied embeddings the LM head is the embedding matrix and is excluded with it.  Parameters are
    listed once (tied weights are one Parameter).
    """
    embeds = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeds else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass(slots=True)
class Engine:
    """What ``deepspeed.initialize`` returns that the loop uses."""

    engine: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def build_engine(cfg: Config, model: torch.nn.Module, ds_config: dict) -> Engine:
    """DeepSpeed engine with AdamW (unless the JSON names an optimizer) and the warmup/decay schedule."""
    import deepspeed

    groups = param_groups(model, cfg.optim.weight_decay)
    o = cfg.optim
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)

    def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
            s, max_steps=cfg.train.max_steps, warmup_ratio=o.warmup_ratio, schedule=o.schedule,
            min_lr_ratio=o.min_lr_ratio))

    engine, opt, _, sched = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer,
                                                 lr_scheduler=schedule, config=ds_config)
    return Engine(engine, opt, sched)


def mask_generator(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """One mask stream per rank, on the device where the masks are drawn."""
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + 7919 * (rank + 1))
    return g


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
