"""The trainer's configuration: one tree of typed dataclasses, presets as functions, YAML/CLI onto it.

Precedence, lowest to highest: preset function (``--preset tiny_default``) < YAML file
(``--config x.yaml``, nested sections) < CLI overrides (``--masking.weight 0.5``,
``--train.max_steps=50``).  Every section validates itself in ``__post_init__`` and names the bad
field (``optim.lr: must be > 0``); overrides are applied with ``dataclasses.replace`` so the
validation runs again on the final values.  ``python launch/train.py --help`` lists every key with
its default and the docstring written under the field here.

The DeepSpeed JSON is not a second source of truth: its ``"auto"`` values are filled from this tree
and a non-auto value that disagrees is an error naming both (:func:`resolve_deepspeed_config`).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.masking import MaskingConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = "cache/sample-rules"
PREEMPT_EXIT_CODE = 75
"""Exit code after a SIGTERM/SIGUSR1-triggered checkpoint (EX_TEMPFAIL: "try again", i.e. requeue)."""


def _check(cond: bool, key: str, msg: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"{key}: {msg}, got {value!r}")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Which diffusion LM to fine-tune."""

    name: str = "tiny"
    """HF hub name or local folder of a diffusion LM (LLaDA, LLaDA2 MoE, Dream, an exported run),
    or "tiny" for the built-in random-initialised ~4M-parameter default."""
    tokenizer: str | None = None
    """Tokenizer name/path when it differs from the model's (default: the model's own)."""
    dtype: str = "auto"
    """Parameter dtype: auto (bf16 on a GPU with bf16, fp32 on CPU), float32, bfloat16."""
    trust_remote_code: bool = True
    """Allow the model's own modelling code (LLaDA, LLaDA2, Dream ship it)."""
    attn_implementation: str | None = None
    """Override the attention backend (sdpa, eager, flex_attention); None keeps the model's."""

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name", "must be a name, a path or 'tiny'", self.name)
        _check(self.dtype in ("auto", "float32", "bfloat16"), "model.dtype",
               "must be auto, float32 or bfloat16", self.dtype)


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the preprocessed shards are and how samples become padded batches."""

    path: str = DEFAULT_CACHE
    """Folder of preprocessed shards (``index.json`` + shards).  Relative paths are from the cwd."""
    preprocess_if_missing: bool = True
    """If ``path`` has no ``index.json``, preprocess the bundled sample with the rule-based extractor
    into it first (rank 0 only; the others wait at a barrier)."""
    max_length: int = 512
    """Longest sample in tokens, a multiple of masking.block_size.  Longer samples follow ``overflow``."""
    overflow: str = "truncate"
    """Samples longer than max_length: 'truncate' keeps the first max_length tokens (the prompt and the
    start of the response; the EOS is lost), 'drop' removes them from the epoch (counted, logged).
    There is no packing: bidirectional attention would let packed samples see each other."""
    pad_to: str = "batch"
    """Pad each micro-batch to its longest sample rounded up to a block ('batch'), or always to
    max_length ('max_length': fixed shapes, for compiled/GPU runs).  Padding is EOS and supervised."""
    shuffle: bool = True
    """A fresh seeded permutation per epoch (False: file order, for debugging)."""

    def __post_init__(self) -> None:
        _check(bool(self.path), "data.path", "must name a folder", self.path)
        _check(isinstance(self.max_length, int) and self.max_length > 0, "data.max_length",
               "must be a positive int", self.max_length)
        _check(self.overflow in ("truncate", "drop"), "data.overflow", "must be truncate or drop",
               self.overflow)
        _check(self.pad_to in ("batch", "max_length"), "data.pad_to", "must be batch or max_length",
               self.pad_to)


@dataclass(kw_only=True, slots=True)
class ObjectiveConfig:
    """The diffusion loss around the masks."""

    layout: str = "block"
    """'block': block diffusion over [x_t ; x_0] (LLaDA2/dFactory); 'full': bidirectional MDM (LLaDA)."""
    weighting: str = "masked_mean"
    """'masked_mean': CE summed over masked tokens / their count (dFactory); 'elbo': each token
    weighted by 1/t of its block (the ELBO weight of the LLaDA2 report)."""

    def __post_init__(self) -> None:
        _check(self.layout in ("block", "full"), "objective.layout", "must be block or full", self.layout)
        _check(self.weighting in ("masked_mean", "elbo"), "objective.weighting",
               "must be masked_mean or elbo", self.weighting)


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """AdamW, warmup then a decaying schedule, gradient clipping."""

    lr: float = 1e-3
    """Peak learning rate (1e-3 suits the tiny default; dFactory uses 1e-5 for LLaDA2-mini)."""
    warmup_ratio: float = 0.03
    """Fraction of train.max_steps spent warming up linearly from 0 (dFactory: 0.03)."""
    schedule: str = "cosine"
    """Decay after warmup: cosine, linear or constant."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine/linear)."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (not on norms/biases)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    clip: float = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""

    def __post_init__(self) -> None:
        _check(isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0, "optim.lr",
               "must be a finite number > 0", self.lr)
        _check(0.0 <= self.warmup_ratio < 1.0, "optim.warmup_ratio", "must be in [0, 1)", self.warmup_ratio)
        _check(self.schedule in ("cosine", "linear", "constant"), "optim.schedule",
               "must be cosine, linear or constant", self.schedule)
        _check(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", self.weight_decay)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               "must be two numbers in [0, 1)", self.betas)
        _check(self.eps > 0, "optim.eps", "must be > 0", self.eps)
        _check(self.clip >= 0, "optim.clip", "must be >= 0", self.clip)


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Length, batch shape, seeds, and what happens at the end."""

    max_steps: int = 300
    """Optimizer steps to train (each = grad_accum micro-batches per rank)."""
    micro_batch_size: int = 2
    """Samples per rank per micro-batch, before the complementary copy doubles it."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    seed: int = 0
    """Seeds the model init (tiny), the data order and (with the rank) the mask generator."""
    log_every: int = 10
    """Steps between metric records (JSONL/TensorBoard); the progress bar updates every step."""
    save_every: int = 100
    """Steps between checkpoints (0: only at the end and on a pre-emption signal)."""
    stop_at_step: int = 0
    """Checkpoint and exit (code 0, no export) once this step is reached, leaving the LR schedule spanning
    max_steps (0 = off).  For time-limited job chunks and the resume tests."""
    sample_prompts: list[str] = field(default_factory=lambda: [
        "Tom has 3 boxes with 12 apples each. He gives away 7 apples. How many apples are left?",
        "Write a python function to find the maximum of three numbers.",
    ])
    """Prompts decoded at the end of training (rank 0) to show what the model learnt."""
    sample_max_new_tokens: int = 96
    """Tokens generated per sample prompt (rounded up to a block)."""

    def __post_init__(self) -> None:
        for key in ("max_steps", "micro_batch_size", "grad_accum"):
            v = getattr(self, key)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"train.{key}",
                   "must be an int >= 1", v)
        for key in ("log_every", "save_every", "stop_at_step", "sample_max_new_tokens"):
            v = getattr(self, key)
            _check(isinstance(v, int) and v >= 0, f"train.{key}", "must be an int >= 0", v)
        _check(all(isinstance(p, str) for p in self.sample_prompts), "train.sample_prompts",
               "must be a list of strings", self.sample_prompts)


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """DeepSpeed checkpoints, automatic resume and the HF export."""

    output_dir: str = "outputs/tiny-default"
    """Run folder: checkpoints/ (DeepSpeed tags step_N + latest), hf/ (export), metrics.jsonl, tb/."""
    resume: str = "auto"
    """'auto': continue from output_dir/checkpoints/latest if present; 'never': start fresh (an
    existing checkpoint folder is an error rather than silently overwritten); or a checkpoint tag
    folder path (…/checkpoints/step_100) to resume from."""
    keep_last: int = 2
    """Checkpoint tags kept in output_dir/checkpoints (older ones are deleted; 0 keeps all)."""
    export_hf: bool = True
    """Write a save_pretrained folder (model + tokenizer) to output_dir/hf at the end."""

    def __post_init__(self) -> None:
        _check(bool(self.output_dir), "checkpoint.output_dir", "must name a folder", self.output_dir)
        _check(bool(self.resume), "checkpoint.resume", "must be auto, never or a path", self.resume)
        _check(isinstance(self.keep_last, int) and self.keep_last >= 0, "checkpoint.keep_last",
               "must be an int >= 0", self.keep_last)


@dataclass(kw_only=True, slots=True)
class MetricsConfig:
    """What rank 0 reports."""

    jsonl: bool = True
    """Append one JSON object per logged step to output_dir/metrics.jsonl."""
    tensorboard: bool = True
    """Write TensorBoard scalars to output_dir/tb."""
    progress: bool = True
    """Rich progress bar (step, loss, tokens/s, ETA) on rank 0; plain log lines when False."""
    peak_flops: float = 0.0
    """Peak FLOP/s of one device for the MFU estimate; 0 = look the device up (H100/A100/… bf16 dense,
    CPU: 32 fp32 FLOP/cycle x 2.5 GHz x threads); MFU = 6 N tokens / (time x peak x world size)."""

    def __post_init__(self) -> None:
        _check(self.peak_flops >= 0, "metrics.peak_flops", "must be >= 0", self.peak_flops)


@dataclass(kw_only=True, slots=True)
class Config:
    """The whole run."""

    deepspeed: str = "ds_configs/zero3.json"
    """DeepSpeed JSON (ZeRO stage, offload); "auto" values are filled from this config."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        # Cross-section rules live here, where both fields are visible.
        if self.data.max_length % self.masking.block_size:
            raise ValueError(f"data.max_length: {self.data.max_length} is not a multiple of "
                             f"masking.block_size {self.masking.block_size}")


# --------------------------------------------------------------------------------------------- presets


def tiny_default() -> Config:
    """The main command: tiny model, bundled sample, soft complementary masking, a few minutes on CPU."""
    return Config()


def tiny_smoke() -> Config:
    """A few short steps for CI and tests (same code path, seconds instead of minutes)."""
    cfg = Config()
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, max_length=256),
        train=dataclasses.replace(cfg.train, max_steps=6, log_every=1, save_every=0, sample_prompts=[]),
        checkpoint=dataclasses.replace(cfg.checkpoint, output_dir="outputs/tiny-smoke"))


PRESETS = {"tiny_default": tiny_default, "tiny_smoke": tiny_smoke}


# ------------------------------------------------------------------------------------ dict/YAML/CLI map


def to_dict(obj: Any) -> Any:
    """Config -> plain nested dict (tuples as lists), the inverse of :func:`from_dict` for YAML."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated field type, or raise naming the key."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{key}: cannot convert {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{key}: must be one of {typing.get_args(tp)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        return origin(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected an int, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected an int, got {value!r}") from None
        if not f.is_integer():
            raise ValueError(f"{key}: expected an int, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def apply_overrides(obj: Any, overrides: dict[str, Any], *, prefix: str = "", source: str = "") -> Any:
    """Return a copy of dataclass ``obj`` with nested ``overrides`` applied and re-validated.

    Unknown keys are errors naming the key and its ``source`` (file or "command line").
    """
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    changes: dict[str, Any] = {}
    where = f" ({source})" if source else ""
    for k, v in overrides.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ValueError(f"{key}: unknown config key{where}; known: {sorted(names)}")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ValueError(f"{key}: is a section, expected a mapping{where}, got {v!r}")
            changes[k] = apply_overrides(current, v, prefix=f"{key}.", source=source)
        else:
            try:
                changes[k] = _coerce(v, hints[k], key)
            except ValueError as e:
                raise ValueError(f"{e}{where}") from None
    try:
        return dataclasses.replace(obj, **changes)
    except ValueError as e:
        raise ValueError(f"{e}{where}") from None


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in dotted.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"{key}: {p} is given both as a value and as a section")
        node[parts[-1]] = v
    return out


def parse_cli(argv: list[str]) -> tuple[dict[str, str], dict[str, Any]]:
    """Split argv into launcher/meta options (config, preset, help) and dotted overrides.

    Accepts ``--a.b value``, ``--a.b=value`` and a bare ``--a.b`` (true).  ``--local_rank`` from
    the DeepSpeed launcher is accepted and ignored (ranks come from the environment).
    """
    meta: dict[str, str] = {}
    dotted: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            meta["help"] = "1"
            i += 1
            continue
        if not arg.startswith("--"):
            raise ValueError(f"command line: unexpected argument {arg!r} (options look like "
                             f"--section.key value)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
            else:
                value = "true"
        i += 1
        key = key.replace("-", "_") if "." not in key else key
        if key in ("local_rank",):
            continue
        if key in ("config", "preset"):
            meta[key] = value
        else:
            dotted[key] = value
    return meta, dotted


def load_config(argv: list[str]) -> Config:
    """Preset -> YAML -> CLI, validated.  Raises ValueError naming the bad key and where it came from."""
    meta, dotted = parse_cli(argv)
    preset = meta.get("preset", "tiny_default")
    if preset not in PRESETS:
        raise ValueError(f"--preset: unknown preset {preset!r}; known: {sorted(PRESETS)}")
    cfg = PRESETS[preset]()
    if "config" in meta:
        path = Path(meta["config"])
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config sections at the top level")
        cfg = apply_overrides(cfg, data, source=str(path))
    if dotted:
        cfg = apply_overrides(cfg, _nest(dotted), source="command line")
    return cfg


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields (Python drops them; read them from the source)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for a, b in zip(body, body[1:]):
        if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def help_text(cfg: Config | None = None) -> str:
    """Every key with its current value and docstring, for ``--help``."""
    cfg = cfg or tiny_default()
    lines = ["usage: deepspeed launch/train.py [--config x.yaml] [--preset NAME] [--section.key value ...]",
             f"presets: {', '.join(PRESETS)}", ""]

    def walk(obj: Any, prefix: str) -> None:
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                lines.append(f"[{prefix}{f.name}]")
                walk(v, f"{prefix}{f.name}.")
            else:
                lines.append(f"  --{prefix}{f.name} {json.dumps(to_dict(v))}")
                if f.name in docs:
                    lines.append(f"      {docs[f.name]}")

    walk(cfg, "")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- DeepSpeed JSON


def find_deepspeed_config(path: str) -> Path:
    """A relative path is tried from the cwd, then from the repo root (so the default works anywhere)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_absolute() and (REPO_ROOT / p).is_file():
        return REPO_ROOT / p
    raise FileNotFoundError(f"deepspeed: config file {path!r} not found (cwd or {REPO_ROOT})")


def resolve_deepspeed_config(cfg: Config, ds: dict[str, Any], *, world_size: int, bf16: bool,
                             source: str = "deepspeed config") -> dict[str, Any]:
    """Fill "auto" values of a DeepSpeed config dict from ``cfg``; a disagreeing value is an error.

    Why: DeepSpeed and our loop both need the batch shape, clipping and optimizer settings; keeping
    one source of truth (this config tree) and checking the JSON against it prevents a run whose
    logged hyper-parameters are not the ones DeepSpeed used.
    """
    ds = json.loads(json.dumps(ds))  # deep copy
    t, o = cfg.train, cfg.optim
    expected: list[tuple[list[str], Any, str]] = [
        (["train_micro_batch_size_per_gpu"], t.micro_batch_size, "train.micro_batch_size"),
        (["gradient_accumulation_steps"], t.grad_accum, "train.grad_accum"),
        (["train_batch_size"], t.micro_batch_size * t.grad_accum * world_size,
         f"train.micro_batch_size x train.grad_accum x world size {world_size}"),
        (["gradient_clipping"], o.clip, "optim.clip"),
        (["bf16", "enabled"], bf16, "model.dtype (bf16 on GPU, fp32 on CPU)"),
    ]
    if "optimizer" in ds:
        expected += [(["optimizer", "params", "lr"], o.lr, "optim.lr"),
                     (["optimizer", "params", "weight_decay"], o.weight_decay, "optim.weight_decay"),
                     (["optimizer", "params", "betas"], list(o.betas), "optim.betas"),
                     (["optimizer", "params", "eps"], o.eps, "optim.eps")]
    for path, want, ours in expected:
        node = ds
        for p in path[:-1]:
            node = node.setdefault(p, {})
        name = ".".join(path)
        have = node.get(path[-1], "auto")
        if have == "auto":
            node[path[-1]] = want
        elif not _same(have, want):
            raise ValueError(f"{source}: {name} = {have!r} contradicts {ours} = {want!r}; "
                             f"set it to \"auto\" in the JSON or change the config to match")
    if ds.get("fp16", {}).get("enabled") is True:
        raise ValueError(f"{source}: fp16.enabled = true is not supported (use bf16, filled from "
                         f"model.dtype)")
    if "scheduler" in ds:
        raise ValueError(f"{source}: a DeepSpeed 'scheduler' section would fight the trainer's own "
                         f"optim.schedule; remove it and set optim.schedule/warmup_ratio instead")
    return ds


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, bool) or isinstance(a, bool):
        return a is b or a == b
    if isinstance(b, (int, float)) and isinstance(a, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(b, list) and isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b
