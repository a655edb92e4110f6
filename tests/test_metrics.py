"""Generation metrics (clopdit_dist.evaluate.metrics) on cases whose answers are known."""

from itertools import pairwise

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats
from scipy.spatial.distance import cdist

from clopdit_dist.evaluate import metrics as M


def _gauss(n, d, seed, scale=1.0, shift=0.0):
    return shift + scale * np.random.default_rng(seed).normal(size=(n, d))


MARKERS = np.arange(200, 230)


@pytest.fixture(scope="module")
def atlas():
    """Poisson counts of three cell types, 150 cells each, 500 genes with log-uniform mean
    expression; genes 200-229 are type markers (10 per type, 6x higher in their type)."""
    rng = np.random.default_rng(0)
    n_types, per, n_genes = 3, 150, 500
    base = np.exp(rng.uniform(np.log(0.05), np.log(20.0), size=n_genes))
    base[MARKERS] = rng.uniform(1.0, 5.0, size=30)
    labels = np.repeat(np.array(["B cell", "T cell", "monocyte"]), per)
    mu = np.tile(base, (n_types * per, 1))
    for t in range(n_types):
        mu[t * per:(t + 1) * per, MARKERS[t * 10:(t + 1) * 10]] *= 6.0
    lib = rng.uniform(0.5, 1.5, size=(len(mu), 1))
    counts = rng.poisson(mu * lib).astype(np.float32)
    return counts, labels


# ----------------------------------------------------------------------------- expression space


def test_log_cp10k_known_values_dense_and_sparse():
    c = np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0], [5.0, 0.0, 5.0]])
    want = np.log1p(np.array([[2500.0, 7500.0, 0.0], [0.0, 0.0, 0.0], [5000.0, 0.0, 5000.0]]))
    dense = M.log_cp10k(c)
    assert dense.dtype == np.float32
    np.testing.assert_allclose(dense, want, rtol=1e-6)
    sparse = M.log_cp10k(sp.csr_matrix(c))
    assert sp.issparse(sparse)
    np.testing.assert_allclose(sparse.toarray(), want, rtol=1e-6)
    # columns: the library size is still over all genes, and the numbers are the full result's, bit for bit
    cols = np.array([0, 2])
    np.testing.assert_array_equal(M.log_cp10k(c, cols), dense[:, cols])
    np.testing.assert_array_equal(M.log_cp10k(sp.csr_matrix(c), cols).toarray(), sparse.toarray()[:, cols])


def test_evalspace_shapes_hvgs_and_determinism(atlas):
    counts, _ = atlas
    space = M.EvalSpace(counts, n_hvg=100)
    assert space.hvg.shape == (100,) and np.all(np.diff(space.hvg) > 0)
    # the 30 marker genes are the variable ones: all of them are selected (chance: 20%)
    assert set(MARKERS.tolist()) <= set(space.hvg.tolist())
    e, z = space.expr(counts[:40]), space.embed(counts[:40])
    assert e.shape == (40, 100) and e.dtype == np.float32
    assert z.shape == (40, 50) and z.dtype == np.float32
    # expr normalises by the library size over ALL genes, then subsets
    np.testing.assert_allclose(e, M.log_cp10k(counts[:40])[:, space.hvg], rtol=1e-6)
    # refitting gives the same space, bit for bit
    np.testing.assert_array_equal(M.EvalSpace(counts, n_hvg=100).embed(counts[:40]), z)
    # so does the same counts as a sparse matrix, up to float32 rounding: compared on the
    # leading components (the trailing ones span nearly degenerate Poisson noise)
    again = M.EvalSpace(sp.csr_matrix(counts), n_hvg=100)
    np.testing.assert_array_equal(again.hvg, space.hvg)
    np.testing.assert_allclose(again.embed(sp.csr_matrix(counts[:40]))[:, :10], z[:, :10], atol=1e-3)
    # fewer genes than n_hvg: all genes; scaling keeps the shapes
    small = M.EvalSpace(counts[:, :40], n_hvg=2000, scale=True)
    np.testing.assert_array_equal(small.hvg, np.arange(40))
    assert small.embed(counts[:5, :40]).shape == (5, 40)
    with pytest.raises(ValueError):
        space.expr(counts[:, :10])


def test_knn_judge_identity(atlas):
    counts, labels = atlas
    space = M.EvalSpace(counts, n_hvg=100)
    emb = space.embed(counts)
    judge = M.KNNJudge(emb, labels, k=15)
    right = judge.identity(emb, labels)
    assert right == {"accuracy": 1.0, "macro_f1": 1.0}
    # one target for all cells of one type
    b = labels == "B cell"
    assert judge.identity(emb[b], "B cell")["accuracy"] == 1.0
    # every cell asked to be another type: nothing matches
    wrong = np.roll(labels, 150)
    assert not np.any(wrong == labels)
    out = judge.identity(emb, wrong)
    assert out["accuracy"] == 0.0 and out["macro_f1"] == 0.0
    # half right: macro-F1 over the targets present
    half = labels.copy()
    half[::2] = wrong[::2]
    assert judge.identity(emb, half)["accuracy"] == pytest.approx(0.5)
    # macro-F1 over the requested labels only: 100 B cells asked for "B cell" (F1 1) and
    # 10 T cells asked for "monocyte" (never predicted: F1 0) -> 0.5; "T cell" is predicted
    # but was not asked for, so it gets no term (micro-F1 would be 0.95, accuracy 0.91)
    t = labels == "T cell"
    sub = np.concatenate([emb[b][:100], emb[t][:10]])
    out = judge.identity(sub, np.array(["B cell"] * 100 + ["monocyte"] * 10))
    assert out["macro_f1"] == pytest.approx(0.5) and out["accuracy"] == pytest.approx(100 / 110)


# ----------------------------------------------------------------------------- fidelity / diversity


def _prdc_reference(real, fake, k):
    """Naeem et al. 2020 as written in the reference prdc package, with dense matrices."""
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]
    rr, rf = radii(real), radii(fake)
    d = np.linalg.norm(real[:, None] - fake[None], axis=-1)
    return {"precision": (d < rr[:, None]).any(0).mean(), "recall": (d < rf[None, :]).any(1).mean(),
            "density": (d < rr[:, None]).sum(0).mean() / k, "coverage": (d.min(1) < rr).mean()}


def test_prdc_matches_reference_definition():
    real, fake = _gauss(120, 4, 1), _gauss(90, 4, 2, scale=1.3, shift=0.4)
    got, want = M.prdc(real, fake, k=5), _prdc_reference(real, fake, 5)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert got["precision"] < 1.0 and got["coverage"] < 1.0  # the case is not trivial


def test_prdc_blocked_distances_match(monkeypatch):
    real, fake = _gauss(50, 3, 4), _gauss(40, 3, 5, shift=0.5)
    whole = M.prdc(real, fake, k=3)
    monkeypatch.setattr(M, "_BLOCK", 7)  # many row blocks, a ragged last one
    assert M.prdc(real, fake, k=3) == whole


def test_prdc_identical_and_collapsed():
    real = _gauss(200, 10, 3)
    same = M.prdc(real, real.copy(), k=5)
    for key in ("precision", "recall", "density", "coverage"):
        assert same[key] == pytest.approx(1.0, abs=1e-12), key
    collapsed = np.repeat(real[:1], 200, axis=0)  # every fake is real cell 0
    out = M.prdc(real, collapsed, k=5)
    assert out["precision"] == 1.0  # all fakes are realistic ...
    assert out["recall"] == 0.0  # ... but fake k-NN balls have radius 0
    assert out["coverage"] < 0.05  # and one point covers almost no real neighbourhood
    assert M.diversity_ratio(collapsed, real) == 0.0
    shifted = M.prdc(real, real + 3.0, k=5)
    assert shifted["precision"] < 0.5 and shifted["coverage"] < 0.5


def test_mmd_known_values_and_growth():
    # one kernel, single points at distance 1: MMD^2 = k(0,0) + k(1,1) - 2 k(0,1) = 2 - 2 exp(-1/h)
    assert M.mmd_rbf([[0.0]], [[1.0]], bandwidths=[2.0]) == pytest.approx(2 - 2 * np.exp(-0.5))
    # several kernels are summed, not averaged
    want = sum(2 - 2 * np.exp(-1 / h) for h in (1.0, 4.0))
    assert M.mmd_rbf([[0.0]], [[1.0]], bandwidths=[1.0, 4.0]) == pytest.approx(want)
    # bandwidths: mean squared distance between distinct points (here 1) times 2^(-2..2)
    np.testing.assert_allclose(M.mmd_bandwidths(np.array([[0.0], [1.0]])), [0.25, 0.5, 1, 2, 4])
    real = _gauss(200, 20, 4)
    bw = M.mmd_bandwidths(real)
    assert M.mmd_rbf(real, real.copy(), bw) == pytest.approx(0.0, abs=1e-12)
    values = [M.mmd_rbf(real, _gauss(200, 20, 5, shift=s), bw) for s in (0.0, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in pairwise(values)), values
    assert values[0] < 0.1 * values[-1]
    # unequal sizes are fine
    assert M.mmd_rbf(real, real[:50], bw) >= 0.0


def test_unbiased_mmd_leaves_out_the_self_pairs_and_is_centred():
    x, y, h = _gauss(12, 3, 21), _gauss(9, 3, 22, shift=0.5), [0.5, 2.0]

    def k(a, b):
        d2 = cdist(a, b, "sqeuclidean")
        return sum(np.exp(-d2 / hi) for hi in h)

    def off_diagonal_mean(m):
        return (m.sum() - np.trace(m)) / (len(m) * (len(m) - 1))

    want = off_diagonal_mean(k(x, x)) + off_diagonal_mean(k(y, y)) - 2 * k(x, y).mean()
    assert M.mmd_rbf(x, y, h, unbiased=True) == pytest.approx(want, rel=1e-12)
    assert np.isnan(M.mmd_rbf(x[:1], y, h, unbiased=True))
    rng = np.random.default_rng(1)
    draws = [(M.mmd_rbf(a, b, [50.0], unbiased=True), M.mmd_rbf(a, b, [50.0]))
             for a, b in (rng.normal(size=(2, 15, 50)) for _ in range(200))]
    u, v = np.mean(draws, axis=0)
    assert abs(u) < 0.1 * v


def test_energy_distance_known_values_and_growth():
    x = _gauss(300, 1, 6)
    y = _gauss(250, 1, 7, scale=1.5, shift=0.3)
    assert M.energy_distance(x, y) == pytest.approx(stats.energy_distance(x[:, 0], y[:, 0]) ** 2, rel=1e-9)
    # two point masses: 2|a - b|
    assert M.energy_distance([[0.0, 0.0]], [[3.0, 4.0]]) == pytest.approx(10.0)
    real = _gauss(200, 20, 8)
    assert M.energy_distance(real, real.copy()) == pytest.approx(0.0, abs=1e-9)
    values = [M.energy_distance(real, _gauss(200, 20, 9, shift=s)) for s in (0.0, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in pairwise(values)), values


def test_unbiased_energy_is_centred_where_the_v_form_favours_less_spread():
    x = _gauss(40, 3, 12)
    y = _gauss(30, 3, 13, shift=0.4)
    n, m = len(x), len(y)
    # by hand: the within-set means over distinct pairs only
    u = 2 * cdist(x, y).mean() - cdist(x, x).sum() / (n * (n - 1)) - cdist(y, y).sum() / (m * (m - 1))
    assert M.energy_distance(x, y, unbiased=True) == pytest.approx(u, rel=1e-12)
    assert M.energy_distance(x, y, unbiased=True) < M.energy_distance(x, y)
    assert np.isnan(M.energy_distance(x[:1], y, unbiased=True))
    # 15-point sets in 50-D (the size of a small fidelity half): against a reference drawn from N(0, I), V scores
    # a sample of N(0, 0.8^2 I) better than a second sample of N(0, I); U puts the second sample at 0 on average
    rng = np.random.default_rng(0)
    same_u, same_v, narrow_u, narrow_v = [], [], [], []
    for _ in range(200):
        ref, twin, narrow = rng.normal(size=(15, 50)), rng.normal(size=(15, 50)), 0.8 * rng.normal(size=(15, 50))
        same_u.append(M.energy_distance(ref, twin, unbiased=True))
        same_v.append(M.energy_distance(ref, twin))
        narrow_u.append(M.energy_distance(ref, narrow, unbiased=True))
        narrow_v.append(M.energy_distance(ref, narrow))
    assert abs(np.mean(same_u)) < 0.03 and np.mean(same_v) > 1.0
    assert np.mean(narrow_v) < np.mean(same_v)
    assert np.mean(narrow_u) > np.mean(same_u) + 0.05


def test_wasserstein2_shift_is_exact_and_gaussians_near_analytic():
    x = _gauss(300, 5, 10)
    assert M.wasserstein2(x, x.copy()) == pytest.approx(0.0, abs=1e-6)
    d = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert M.wasserstein2(x, x + d) == pytest.approx(np.linalg.norm(d), rel=1e-6)
    values = [M.wasserstein2(x, _gauss(300, 5, 11, shift=s)) for s in (0.0, 1.0, 3.0)]
    assert all(a < b for a, b in pairwise(values)), values
    # N(0, I) vs N(0, 4I) in 2-D: W2 = sqrt(d) * |1 - 2| = sqrt(2)
    a, b = _gauss(1000, 2, 12), _gauss(1000, 2, 13, scale=2.0)
    assert M.wasserstein2(a, b) == pytest.approx(np.sqrt(2.0), rel=0.1)
    # subsampling is seeded
    big = _gauss(1500, 2, 14)
    assert M.wasserstein2(big, b, max_points=400, seed=1) == M.wasserstein2(big, b, max_points=400, seed=1)


def test_diversity():
    x = _gauss(800, 10, 15)
    assert M.diversity_ratio(x, x.copy()) == pytest.approx(1.0)
    assert M.diversity_ratio(2.0 * x, x) == pytest.approx(2.0)  # same subsample, scaled
    assert M.diversity_ratio(_gauss(800, 10, 16, scale=2.0), x) == pytest.approx(2.0, rel=0.05)
    assert M.diversity(np.ones((30, 4))) == 0.0
    # mean over distinct pairs: points 0, 1, 3 on a line -> (1 + 3 + 2) / 3
    assert M.diversity([[0.0], [1.0], [3.0]]) == pytest.approx(2.0)


def test_classifier_auc():
    real = _gauss(200, 10, 17)
    big, fresh = _gauss(500, 10, 21), _gauss(600, 10, 18)  # sizes balanced by subsampling
    assert abs(M.classifier_auc(big, fresh) - 0.5) < 0.06
    assert abs(M.classifier_auc(big, fresh, model="logistic") - 0.5) < 0.06
    assert M.classifier_auc(real, _gauss(300, 10, 19, shift=5.0)) > 0.99
    # twice the spread, same mean: the kNN sees it, a linear model does not
    wide = _gauss(200, 10, 20, scale=2.0)
    assert M.classifier_auc(real, wide) > 0.85
    assert M.classifier_auc(real, wide, model="logistic") < 0.65
    # exact copies: the documented kNN artefact, below 0.5
    assert M.classifier_auc(real, real.copy()) < 0.45
    with pytest.raises(ValueError):
        M.classifier_auc(real, real, model="forest")


# ----------------------------------------------------------------------------- gene level


def test_gene_moments():
    real = np.random.default_rng(21).gamma(2.0, 1.0, size=(300, 50))
    same = M.gene_moments(real, real.copy())
    assert same == pytest.approx({"mean_pearson": 1.0, "mean_r2": 1.0, "var_pearson": 1.0, "var_r2": 1.0})
    # means doubled: still perfectly correlated, but R^2 (real as truth) falls below 0
    out = M.gene_moments(real, 2.0 * real)
    assert out["mean_pearson"] == pytest.approx(1.0) and out["var_pearson"] == pytest.approx(1.0)
    assert out["mean_r2"] < 0 and out["var_r2"] < 0


def test_correlation_distance():
    rng = np.random.default_rng(22)
    real = rng.normal(size=(500, 30))
    assert M.correlation_distance(real, real.copy(), n_genes=10) == pytest.approx(0.0, abs=1e-12)
    # two genes: perfectly correlated in real, anticorrelated in generated -> off-diagonals
    # differ by 2: sqrt((0 + 4 + 4 + 0) / 4)
    g = rng.normal(size=(200, 1))
    assert M.correlation_distance(np.hstack([g, g]), np.hstack([g, -g])) == pytest.approx(np.sqrt(2.0))
    # a gene constant in the generated set correlates 0 with the other (diagonal stays 1):
    # off-diagonals differ by 1 -> sqrt(2 / 4)
    assert M.correlation_distance(np.hstack([g, g]), np.hstack([g, np.ones_like(g)])) == pytest.approx(np.sqrt(0.5))
    gen = real.copy()
    gen[:, np.argmax(real.var(0))] = 1.0
    out = M.correlation_distance(real, gen, n_genes=10)
    assert np.isfinite(out) and out > 0


def test_de_concordance():
    rng = np.random.default_rng(23)
    labels = np.repeat(np.array(["a", "b", "c"]), 100)
    x = rng.normal(size=(300, 200))
    x[labels == "a", :20] += 3.0
    x[labels == "b", 20:40] += 3.0
    same = M.de_concordance(x, labels, x.copy(), labels, "a", top=20)
    assert same == pytest.approx({"logfc_pearson": 1.0, "top_jaccard": 1.0})
    # generated set of condition "a" only: compared against the real rest
    only_a = M.de_concordance(x, labels, x[labels == "a"], None, "a", top=20)
    assert only_a == pytest.approx({"logfc_pearson": 1.0, "top_jaccard": 1.0})
    # generated "a" cells that really look like "b": markers disjoint
    wrong = M.de_concordance(x, labels, x[labels == "b"], None, "a", top=20)
    assert wrong["top_jaccard"] == 0.0 and wrong["logfc_pearson"] < 0.2
    # an explicit reference rest wins
    a, b, rest = x[labels == "a"], x[labels == "b"], x[labels != "a"]
    ref = M.de_concordance(x, labels, a, None, "a", top=20, gen_rest=b)
    want = np.corrcoef(a.mean(0) - rest.mean(0), a.mean(0) - b.mean(0))[0, 1]
    assert ref["logfc_pearson"] == pytest.approx(want) and want < 0.999


# ----------------------------------------------------------------------------- memorisation


def test_memorisation():
    train, heldout = _gauss(1000, 10, 24), _gauss(300, 10, 25)
    copies = train[np.random.default_rng(26).choice(1000, 300, replace=False)]
    out = M.memorisation(copies, heldout, train)
    assert out["gen_nn_median"] == 0.0 and out["ratio"] == 0.0
    assert out["frac_gen_closer_than_real_5th_percentile"] == 1.0
    assert out["p_gen_closer"] == pytest.approx(1.0)
    fresh = M.memorisation(_gauss(300, 10, 27), heldout, train)
    assert fresh["ratio"] == pytest.approx(1.0, abs=0.1)
    assert fresh["frac_gen_closer_than_real_5th_percentile"] < 0.12
    assert fresh["p_gen_closer"] == pytest.approx(0.5, abs=0.07)
    # a prebuilt index gives the same numbers
    from sklearn.neighbors import NearestNeighbors
    assert M.memorisation(copies, heldout, NearestNeighbors(n_neighbors=1).fit(train)) == out


# ----------------------------------------------------------------------------- categorical, summaries


def test_total_variation():
    p = {"B cell": 0.5, "T cell": 0.3, "NK": 0.2}
    assert M.total_variation(p, dict(p)) == 0.0
    assert M.total_variation({"a": 1.0}, {"b": 1.0}) == 1.0
    assert M.total_variation({"a": 0.5, "b": 0.5}, {"a": 1.0}) == pytest.approx(0.5)
    assert M.total_variation({"a": 30, "b": 10}, {"a": 0.75, "b": 0.25}) == pytest.approx(0.0)  # counts


def test_mean_ci():
    out = M.mean_ci([1.0, 2.0, 3.0])
    half = stats.t.ppf(0.975, 2) * 1.0 / np.sqrt(3)  # sample sd of (1, 2, 3) is 1
    assert out["mean"] == 2.0 and out["n"] == 3
    assert out["lo"] == pytest.approx(2.0 - half) and out["hi"] == pytest.approx(2.0 + half)
    assert M.mean_ci([1.0, 2.0, 3.0], level=0.5)["hi"] < out["hi"]
    one = M.mean_ci([0.7, float("nan")])
    assert one["mean"] == 0.7 and one["n"] == 1 and np.isnan(one["lo"]) and np.isnan(one["hi"])
