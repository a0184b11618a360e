"""Serving causal-LM blends as LLMs: their tokenizer, sampling, and the generation loop."""
