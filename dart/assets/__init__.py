"""Packaged assets: models (`models`: SmolLM2-135M, Qwen2.5-Coder-1.5B, local folders) and data
(`data`: corpora, MMLU, prompts), all shipped in PyPI packages, never fetched from a hub."""
