"""CLOP evaluation metrics on embeddings whose answers are known."""

import numpy as np
import pytest
import torch

from clopdit_dist.evaluate.clop_metrics import knn_study_entropy, text_to_cell_recall, zero_shot_classification


def _clusters(n_per, centres, noise, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(centres)), n_per)
    return centres[labels] + noise * rng.normal(size=(len(labels), centres.shape[1])), labels


def test_zero_shot_classification():
    centres = np.eye(4) * 5.0
    x, y = _clusters(20, centres, 0.3)
    names = np.array(["a", "b", "c", "d"])
    out = zero_shot_classification(x, centres, names[y], names)
    assert out["accuracy"] == 1.0 and out["macro_f1"] == 1.0
    assert set(out["per_class"]) == set(names) and out["per_class"]["a"]["n"] == 20
    # captions for b and c swapped: half of the cells are wrong, and those two classes score 0
    swapped = zero_shot_classification(x, centres[[0, 2, 1, 3]], names[y], names)
    assert swapped["accuracy"] == pytest.approx(0.5)
    assert swapped["per_class"]["b"]["f1"] == 0.0 and swapped["per_class"]["a"]["f1"] == 1.0
    assert swapped["macro_f1"] == pytest.approx(0.5)
    # classes absent from the labels are left out of macro-F1; torch inputs are fine
    only_ab = y < 2
    sub = zero_shot_classification(torch.tensor(x[only_ab]), torch.tensor(centres), names[y][only_ab], names)
    assert set(sub["per_class"]) == {"a", "b"} and sub["macro_f1"] == 1.0


def test_text_to_cell_recall():
    cells = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    conds = np.array(["x", "y", "z", "z"])
    texts = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # "x", "y" (points at the z cells), "w"
    out = text_to_cell_recall(texts, ["x", "y", "w"], cells, conds, ks=(1, 2, 3))
    assert out["n_conditions"] == 2  # "w" has no cells
    assert out["recall@1"] == 0.5  # x found, y not
    assert out["recall@2"] == 0.5
    assert out["recall@3"] == 1.0  # y's cell is third nearest to its caption


def test_knn_study_entropy_mixed_vs_separated():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(300, 8))
    mixed_studies = rng.integers(0, 3, 300)
    mixed = knn_study_entropy(base, mixed_studies, k=30)
    assert mixed > 0.9
    # each study far from the others: neighbours come from one's own study only
    separated = base + 20.0 * np.eye(8)[mixed_studies]
    assert knn_study_entropy(separated, mixed_studies, k=30) < 0.05
    # the cell itself is not its own neighbour: far-apart triplets of identical cells from
    # studies (0, 1, 1), k=2: the study-0 cell sees (1, 1), entropy 0; the others see (0, 1),
    # entropy log 2, normalised 1; mean 2/3
    triplets = np.repeat(100.0 * np.eye(6), 3, axis=0)
    assert knn_study_entropy(triplets, np.tile([0, 1, 1], 6), k=2) == pytest.approx(2 / 3)
    # subsampling is seeded
    big = rng.normal(size=(600, 4))
    s = rng.integers(0, 2, 600)
    assert knn_study_entropy(big, s, max_cells=200, seed=1) == knn_study_entropy(big, s, max_cells=200, seed=1)
    assert np.isnan(knn_study_entropy(big, np.zeros(600)))
