"""Getting values onto the config tree, and checking the DeepSpeed JSON against it.

Precedence, lowest to highest: preset function (``--preset tiny_default``) < YAML file
(``--config x.yaml``, nested sections) < CLI overrides (``--masking.weight 0.5``,
``--train.max_steps=50``).  Overrides are applied with ``dataclasses.replace`` so each section's
validation runs again on the final values; an unknown key or a bad value is an error naming the key
and where it came from (the YAML file or "command line").  ``python launch/train.py --help`` lists
every key with its default and the docstring written under the field in :mod:`trainer.config`.

The DeepSpeed JSON is not a second source of truth: its ``"auto"`` values are filled from the tree
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
from pathlib import Path
from typing import Any

import yaml

from trainer.config import PRESETS, REPO_ROOT, Config, tiny_default

__all__ = [
    'to_dict',
    'apply_overrides',
    'parse_cli',
    'load_config',
    'field_docs',
    'help_text',
    'find_deepspeed_config',
    'resolve_deepspeed_config',
]


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
