"""The paper's LLM extractor: client, prompts, answer cache, Batch API and cost estimate."""
