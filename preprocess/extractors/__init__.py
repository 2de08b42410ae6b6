"""Extractors: the interface (``base``), the registry, and the rule, LLM and ``none`` extractors."""
