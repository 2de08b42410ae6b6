"""The ``none`` extractor: no spans at all, so every indicator is zero (uniform-masking baseline)."""

from __future__ import annotations

from collections.abc import Sequence

from preprocess.extractors.base import ExtractInput, ExtractResult


class NoneExtractor:
    name = "none"
    version = "1"

    def __init__(self, **_: object) -> None:
        pass

    def extract_batch(self, items: Sequence[ExtractInput]) -> list[ExtractResult]:
        return [ExtractResult() for _ in items]
