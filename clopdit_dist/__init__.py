"""clopdit-dist: text-guided single-cell generation (CLOP-DiT) trained at atlas scale."""

__version__ = "0.1.0"
