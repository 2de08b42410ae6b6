"""What all shard tasks of one run share: the expanded sources, the itemised fingerprint and the
plan of which input units each shard reads (``preprocess.splits``), resolved once by the driver and
shipped to the tasks, so that no task re-hashes the inputs or re-counts newlines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from preprocess.align import TokenizerSpec
from preprocess.extractors.registry import get_extractor
from preprocess.pipeline.config import PreprocessConfig, fingerprint_parts, output_fingerprint
from preprocess.records import Source, Unit, expand_inputs
from preprocess.splits import plan_shards


@dataclass
class RunInputs:
    """What every shard task of one run shares, resolved once by the driver: the sources, the
    itemised fingerprint and (``plan``, computed only when shards are to be built) the units of
    every shard (``preprocess.splits``)."""

    sources: list[Source]
    parts: dict[str, Any]
    fingerprint: str
    plan: list[list[Unit]] | None = None

    def with_plan(self, num_shards: int) -> RunInputs:
        if self.plan is None:
            self.plan = plan_shards(self.sources, num_shards)
        return self


def resolve_inputs(cfg: PreprocessConfig, spec: TokenizerSpec) -> RunInputs:
    """Expand the inputs and fingerprint them with the settings, tokenizer and extractor."""
    ex = get_extractor(cfg.extractor, **cfg.extractor_options)
    sources = expand_inputs(cfg.inputs, cfg.hf_split)
    parts = fingerprint_parts(cfg, sources, spec.fingerprint(), (ex.name, ex.version))
    return RunInputs(sources, parts, output_fingerprint(parts))
