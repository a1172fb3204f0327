"""Stage 6: trie-constrained generation, metrics, baselines, evaluation and ablations."""
