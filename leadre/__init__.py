"""LEADRE on Ray: a causal LLM fine-tuned into an ad retrieval engine."""

__version__ = "0.1.0"
