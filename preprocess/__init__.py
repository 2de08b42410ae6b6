"""Offline preprocessing: records -> info-dense spans -> token-aligned flags -> memory-mapped shards."""
