"""DeepSpeed checkpoints with everything exact resume needs, pre-emption signals, and the HF export.

Layout of ``<output_dir>/checkpoints/``::

    latest                         # tag of the newest complete checkpoint (DeepSpeed writes it last)
    step_100/                      # one DeepSpeed tag: model/optimizer/scheduler states of every rank
      trainer_state_rank0.pt       # ours, one per rank: step, sampler position, RNG states
      trainer_state_rank1.pt
      zero_pp_rank_0_mp_rank_00_model_states.pt ...

Why our own per-rank file next to DeepSpeed's ``client_state``: DeepSpeed stores ``client_state``
only in the model-states file, which ZeRO-1/2 write from data-parallel rank 0 alone, but every rank
has its own mask-generator and RNG streams.  The files are written before
``engine.save_checkpoint``, which writes ``latest`` last, so ``latest`` never names a tag whose
trainer state is missing.

Exact resume: model, optimizer and LR-scheduler states (DeepSpeed), the sampler position
(epoch, offset), and the torch/numpy/python/accelerator RNGs and the mask generator state are all
restored, so on CPU a resumed run reproduces the uninterrupted run's losses bit for bit
(``tests/test_checkpoint.py``).

Pre-emption (SLURM): SIGTERM or SIGUSR1 only sets a flag.  The loop agrees on the flag across ranks
at the end of every step (one all-reduce of one integer: ranks may receive the signal at different
times), saves a checkpoint, and every rank exits with ``PREEMPT_EXIT_CODE`` (75).  The launcher then
exits 75 too when the signal went to the ranks only; a SIGTERM sent to the ``deepspeed`` launcher
itself makes the launcher forward SIGTERM, wait up to 30 s for the ranks and exit 1.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from trainer.config import PREEMPT_EXIT_CODE, CheckpointConfig, ConfigError

LATEST = "latest"
STATE_FILE = "trainer_state_rank{rank}.pt"


def tag_for(step: int) -> str:
    return f"step_{step}"


def checkpoints_dir(cfg: CheckpointConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


# -------------------------------------------------------------------------------------------- RNG state


def capture_rng(generator: torch.Generator | None = None) -> dict[str, Any]:
    """All RNG streams of this process as tensors/lists (loadable with ``weights_only=True``)."""
    from deepspeed.accelerator import get_accelerator

    np_state = np.random.get_state()
    py_state = random.getstate()
    acc = get_accelerator()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state()
    if generator is not None:
        state["mask_generator"] = generator.get_state()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    from deepspeed.accelerator import get_accelerator

    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "accelerator" in state and get_accelerator().device_name() != "cpu":
        get_accelerator().set_rng_state(state["accelerator"])
    if generator is not None and "mask_generator" in state:
        generator.set_state(state["mask_generator"])


# ---------------------------------------------------------------------------------------- save / load


def save_checkpoint(engine, cfg: CheckpointConfig, *, step: int, loader_state: dict[str, Any],
                    generator: torch.Generator | None, extra: dict[str, Any] | None = None,
                    trainable_only: bool = False) -> Path:
    """Collective: every rank must call it.  Returns the tag folder.

    ``trainable_only`` (LoRA): frozen parameters are left out of the module states, so the tag holds the
    adapters, their optimizer state and ours (sampler, RNG); the frozen base is read from model.name.
    """
    root = checkpoints_dir(cfg)
    tag = tag_for(step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    (root / tag).mkdir(parents=True, exist_ok=True)
    state = {"step": step, "loader": loader_state, "rng": capture_rng(generator),
             "world_size": dist.get_world_size() if dist.is_initialized() else 1, **(extra or {})}
    torch.save(state, root / tag / STATE_FILE.format(rank=rank))
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step},
                           exclude_frozen_parameters=trainable_only)
    if rank == 0:
        prune_checkpoints(root, cfg.keep_last)
    if dist.is_initialized():
        dist.barrier()
    return root / tag


def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` step_N tags (never the one ``latest`` names)."""
    if keep_last <= 0:
        return []
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    tags = sorted((p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()),
                  key=lambda p: int(p.name[5:]))
    removed = []
    for p in tags[:-keep_last]:
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def find_resume(cfg: CheckpointConfig) -> tuple[Path, list[str]] | None:
    """(checkpoint root, tags to try newest first) per ``checkpoint.resume``, or None to start fresh.

    'auto' (and a checkpoints/ root): the tag ``latest`` names, then the older kept tags, so a newest
    checkpoint found unreadable falls back to the previous one.  An explicit tag folder is tried alone.
    """
    root = checkpoints_dir(cfg)
    if cfg.resume == "never":
        if (root / LATEST).is_file():
            raise ConfigError(f"checkpoint.resume=never but {root} already holds a checkpoint "
                              f"({(root / LATEST).read_text().strip()}); use another "
                              f"checkpoint.output_dir or delete it")
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume)
        if (path / LATEST).is_file():  # a checkpoints/ root
            root = path
        elif path.is_dir():
            return path.parent, [path.name]
        else:
            raise ConfigError(f"checkpoint.resume: {path} is neither auto, never nor a checkpoint folder")
    elif not (root / LATEST).is_file():
        return None
    tag = (root / LATEST).read_text().strip()
    if not tag:
        raise ConfigError(f"{root / LATEST} is empty (interrupted while written?): write the tag to resume "
                          f"from into it (e.g. step_100), set checkpoint.resume to a step folder, or delete "
                          f"{root} to start fresh")
    older = sorted((int(p.name[5:]) for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()
                    and p.name != tag), reverse=True)
    newest = int(tag[5:]) if tag.startswith("step_") and tag[5:].isdigit() else None
    return root, [tag] + [tag_for(s) for s in older if newest is None or s < newest]


def load_checkpoint(engine, root: Path, tag: str, *, generator: torch.Generator | None,
                    trainable_only: bool = False) -> dict[str, Any]:
    """Collective.  Restores DeepSpeed states and this rank's RNGs; returns our state (step, loader).

    ``trainable_only``: the tag was saved without the frozen parameters (LoRA), so the module states
    are loaded non-strictly (the optimizer states, which hold every trainable parameter's fp32 value, are
    loaded as always)."""
    if not (root / tag).is_dir():
        raise FileNotFoundError(f"{root / tag} does not exist")
    path, client = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True,
                                          load_module_strict=not trainable_only)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    file = root / tag / STATE_FILE.format(rank=rank)
    if not file.is_file():
        # Another world size: ranks beyond the saved ones reuse rank 0's position (sampler rescales it)
        # but keep fresh RNG streams; the run continues, exactness is lost and said so.
        file0 = root / tag / STATE_FILE.format(rank=0)
        if not file0.is_file():
            raise FileNotFoundError(f"{file0} missing: {root / tag} is not a checkpoint written by this "
                                    f"trainer")
        state = torch.load(file0, weights_only=True)
        state.pop("rng", None)
        state["inexact"] = (f"no trainer state for rank {rank} (saved with world size "
                            f"{state.get('world_size')})")
        return state
    state = torch.load(file, weights_only=True)
    restore_rng(state["rng"], generator)
    if state.get("step") != client.get("step"):
        raise RuntimeError(f"{file}: step {state.get('step')} != DeepSpeed client_state step "
                           f"{client.get('step')}")
    return state


def _culprit(folder: Path, error: Exception) -> str:
    """The file of ``folder`` that is unreadable (a torch.save archive failing its zip check), else the
    error itself: DeepSpeed's own loading errors do not name the file."""
    for f in sorted(folder.glob("*.pt")):
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError) as e:
            return f"{f} is unreadable ({e})"
        if bad is not None:
            return f"{f} is corrupt (member {bad})"
    return f"{type(error).__name__}: {error}"


def resume(engine, root: Path, tags: list[str], *, generator: torch.Generator | None, log,
           device: torch.device | str = "cpu", trainable_only: bool = False) -> tuple[str, dict[str, Any]]:
    """Collective.  Load the first usable tag of ``tags`` on every rank -> (tag, our state).

    A tag any rank cannot read is skipped on all ranks (agreed with one all-reduce), with a line naming
    the file; no usable tag left is a ConfigError listing each failure.
    """
    failures = []
    for i, tag in enumerate(tags):
        try:
            state, problem = load_checkpoint(engine, root, tag, generator=generator,
                                             trainable_only=trainable_only), None
        except Exception as e:  # noqa: BLE001 - any unreadable file means: try the previous checkpoint
            state, problem = None, _culprit(root / tag, e)
        flag = torch.tensor([0 if problem is None else 1], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            return tag, state
        problem = problem or "unreadable on another rank"
        failures.append(f"{tag}: {problem}")
        after = f"falling back to {root / tags[i + 1]}" if i + 1 < len(tags) else "no older checkpoint left"
        log(f"[train] WARNING: checkpoint {root / tag} unusable: {problem}; {after}")
    raise ConfigError(f"checkpoint.resume: no usable checkpoint in {root} ({'; '.join(failures)}); "
                      f"use another checkpoint.output_dir or delete it to start fresh")


# --------------------------------------------------------------------------------------------- signals


class PreemptionFlag:
    """SIGTERM/SIGUSR1 -> flag; ``agreed()`` tells every rank whether any rank was signalled."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
    exit_code = PREEMPT_EXIT_CODE

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {}

    def install(self) -> PreemptionFlag:
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handler(self, signum, frame) -> None:  # noqa: ANN001
        self.signum = signum

    def agreed(self, device: torch.device | str = "cpu") -> bool:
        """Collective: True on every rank if any rank has been signalled."""
        flag = torch.tensor([1 if self.signum is not None else 0], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# ------------------------------------------------------------------------------------------ HF export


def gather_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Full fp32 CPU state dict on rank 0 (None elsewhere), gathering ZeRO-3 partitions one at a time
    (the module's own, bf16 under bf16 training: DeepSpeed's fp32 masters stay in the optimizer).

    One parameter at a time keeps the peak at one full tensor per rank (plus the CPU copy on rank 0)
    instead of the whole model.  A no-op gather under ZeRO-1/2 or without DeepSpeed.
    """
    import deepspeed

    rank = dist.get_rank() if dist.is_initialized() else 0
    out: dict[str, torch.Tensor] | None = {} if rank == 0 else None
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if out is not None:
                out[name] = p.detach().to("cpu", torch.float32).clone()
    if out is not None:
        persistent = set(module.state_dict().keys())
        for name, b in module.named_buffers():
            if name in persistent:
                out[name] = b.detach().cpu().clone()
    return out


def export_hf(module: torch.nn.Module, tokenizer, out_dir: Path | str, *, dtype: torch.dtype = torch.float32,
              gather: Callable[[torch.nn.Module], dict[str, torch.Tensor] | None] = gather_state_dict
              ) -> Path | None:
    """Collective: write ``save_pretrained`` model + tokenizer to ``out_dir`` from rank 0.

    ``gather`` (collective) gives the fp32 state dict to write on rank 0: the module's own, or the LoRA
    merge (``trainer.lora.export_merged``).

    The built-in ``tiny_dllm`` also gets its modelling file and an ``auto_map`` so the folder loads
    with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` even without this
    package installed; remote-code models (LLaDA, Dream) carry their own code files already.
    """
    out = Path(out_dir)
    state = gather(module)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        assert state is not None
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        module.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
        if getattr(module.config, "model_type", "") == "tiny_dllm":
            _add_tiny_remote_code(out)
    if dist.is_initialized():
        dist.barrier()
    return out if rank == 0 else None


def _add_tiny_remote_code(out: Path) -> None:
    from trainer import tiny_model

    shutil.copy(tiny_model.__file__, out / "tiny_model.py")
    cfg_path = out / "config.json"
    config = json.loads(cfg_path.read_text())
    config["auto_map"] = {"AutoConfig": "tiny_model.TinyDLLMConfig",
                          "AutoModelForCausalLM": "tiny_model.TinyDLLMForMaskedDiffusion"}
    cfg_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
