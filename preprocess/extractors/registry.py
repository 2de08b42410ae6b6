"""The extractors the preprocessor knows by name (``PreprocessConfig.extractor``, ``--extractor``).

A plain dict from name to factory; add an entry to plug in another extractor.  Importing this
module imports every built-in extractor (the LLM one pulls in ``openai``); the interface alone is
``preprocess.extractors.base``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from preprocess.extractors.base import Extractor
from preprocess.extractors.confidence import ConfidenceExtractor
from preprocess.extractors.llm.client import LLMExtractor
from preprocess.extractors.none import NoneExtractor
from preprocess.extractors.rules.extractor import RuleCodeExtractor, RuleExtractor, RuleMathExtractor

EXTRACTORS: dict[str, Callable[..., Extractor]] = {
    "rules": RuleExtractor,
    "rules-code": RuleCodeExtractor,
    "rules-math": RuleMathExtractor,
    "llm": LLMExtractor,
    "none": NoneExtractor,
    "confidence": ConfidenceExtractor,
}


def get_extractor(name: str, **options: object) -> Extractor:
    """Build the extractor registered under ``name``, or named ``package.module:Class`` (a plug-in
    outside this package, imported here, so it also reaches worker processes), with ``options``."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise KeyError(f"extractor {name!r}: cannot import {attr} from {module}: {e}") from None
        return factory(**options)
    if name not in EXTRACTORS:
        raise KeyError(f"unknown extractor {name!r}; available: {sorted(EXTRACTORS)}")
    return EXTRACTORS[name](**options)
