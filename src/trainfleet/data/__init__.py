"""Corpora the built-in trainer reads: deterministic byte strings split into train and held-out."""
