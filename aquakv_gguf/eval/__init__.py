"""Evaluation: perplexity, KL divergence vs the f16 cache, long-context retrieval, memory."""
