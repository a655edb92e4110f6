"""Reconstruction metrics of the count autoencoder on held-out cells."""

from __future__ import annotations

import numpy as np


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def reconstruction_metrics(counts: np.ndarray, decoded_mean: np.ndarray, nll_per_cell: np.ndarray) -> dict:
    """``counts`` and ``decoded_mean`` are (cells, genes).

    - nll: mean negative log-likelihood per cell (nats, summed over genes)
    - gene_mean_pearson: Pearson over genes of the mean count per gene, real vs decoded
    - gene_mean_pearson_log: the same on log1p of the means
    - cell_pearson: mean over cells of the Pearson between log1p(real) and log1p(decoded mean)
    """
    real_mean, dec_mean = counts.mean(0), decoded_mean.mean(0)
    lx, lm = np.log1p(counts), np.log1p(decoded_mean)
    lx = lx - lx.mean(1, keepdims=True)
    lm = lm - lm.mean(1, keepdims=True)
    per_cell = (lx * lm).sum(1) / np.sqrt((lx * lx).sum(1) * (lm * lm).sum(1) + 1e-12)
    return {"nll": float(np.mean(nll_per_cell)), "gene_mean_pearson": pearson(real_mean, dec_mean),
            "gene_mean_pearson_log": pearson(np.log1p(real_mean), np.log1p(dec_mean)),
            "cell_pearson": float(np.mean(per_cell)), "cells": int(counts.shape[0])}
