"""Evaluation: metrics (one definition each) and reports."""
