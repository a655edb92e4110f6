"""Metrics that compare generated single-cell profiles with real ones: one definition each.

Every function takes plain arrays (cells in rows) and returns floats or a dict of floats, so
one evaluation (dozens of conditions x ~200 cells x ~10 generators) runs in minutes on two
CPU cores. Nothing here loops over cells in Python: distances come from scipy ``cdist`` /
``pdist`` or scikit-learn, optimal transport from POT, HVGs from scanpy.

Where the metrics live
----------------------
- :class:`EvalSpace` is fitted ONCE on real held-out counts and then maps real and generated
  counts alike into (a) log1p CP10k expression on the real set's HVGs (``expr``) and (b) a
  50-component PCA embedding of that expression (``embed``). Gene-level metrics
  (:func:`gene_moments`, :func:`correlation_distance`, :func:`de_concordance`) take ``expr``
  output; the distribution metrics (:func:`prdc`, :func:`mmd_rbf`, :func:`energy_distance`,
  :func:`wasserstein2`, :func:`classifier_auc`, :func:`memorisation`, :func:`diversity`) and
  :class:`KNNJudge` take ``embed`` output.
- Parameters that set a scale (MMD bandwidths, the PCA) are computed once from real data and
  passed to every generator, so that numbers of different generators are comparable.

Randomness (subsampling, PCA's randomized solver, CV folds) is seeded; the same inputs give
the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import scipy.sparse as sp
from scipy import stats
from scipy.spatial.distance import cdist, pdist
from sklearn.decomposition import PCA
from sklearn.metrics import f1_score, r2_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

__all__ = [
    "log_cp10k", "EvalSpace", "KNNJudge", "prdc", "mmd_bandwidths", "mmd_rbf", "energy_distance",
    "wasserstein2", "gene_moments", "correlation_distance", "classifier_auc", "de_concordance",
    "memorisation", "diversity", "diversity_ratio", "total_variation", "mean_ci",
]


# ----------------------------------------------------------------------------- helpers


def _f64(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(len(x), -1) if x.ndim != 2 else x


def _subsample(x: np.ndarray, max_points: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_points is None or len(x) <= max_points:
        return x
    return x[np.sort(rng.choice(len(x), max_points, replace=False))]


_BLOCK = 2048  # rows per block of a blocked distance matrix


def _kth_nn_distance(x: np.ndarray, k: int) -> np.ndarray:
    """Euclidean distance from each row of ``x`` to its k-th nearest other row."""
    out = np.empty(len(x))
    for lo in range(0, len(x), _BLOCK):
        d = cdist(x[lo:lo + _BLOCK], x)
        out[lo:lo + _BLOCK] = np.partition(d, k, axis=1)[:, k]  # column 0 is the point itself
    return out


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


# ----------------------------------------------------------------------------- expression space


def log_cp10k(counts, columns: np.ndarray | None = None) -> np.ndarray | sp.csr_matrix:
    """log1p of counts per 10,000: ``log(1 + 1e4 * x_ig / sum_g x_ig)``.

    The library size is the sum over all columns given; ``columns`` (indices) keeps only those
    in the result, computing the log on them alone. Cells with no counts stay zero. Dense
    input gives a dense float32 array, scipy sparse input a CSR float32 matrix (same as
    ``scanpy.pp.normalize_total(target_sum=1e4)`` followed by ``scanpy.pp.log1p``).
    """
    if sp.issparse(counts):
        x = sp.csr_matrix(counts, dtype=np.float64)
        lib = np.asarray(x.sum(1)).ravel()
        scale = np.divide(1e4, lib, out=np.zeros_like(lib), where=lib > 0)
        x = sp.csr_matrix(sp.diags(scale) @ (x if columns is None else x[:, columns]))
        x.data = np.log1p(x.data)
        return x.astype(np.float32)
    x = np.asarray(counts, dtype=np.float64)
    lib = x.sum(1, keepdims=True)
    scale = np.divide(1e4, lib, out=np.zeros_like(lib), where=lib > 0)
    return np.log1p((x if columns is None else x[:, columns]) * scale).astype(np.float32)


def _dense(x) -> np.ndarray:
    """A dense float32 array of ``x`` (dense or scipy sparse)."""
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float32)


def _seurat_dispersion_rank(logx) -> np.ndarray:
    """Gene order (best first) by scanpy's ``highly_variable_genes(flavor='seurat')``
    normalised dispersion (Satija et al. 2015: dispersion var/mean of expm1(log data),
    z-scored within 20 mean-expression bins). Genes with undefined dispersion (e.g. never
    expressed) go last; ties keep gene order."""
    import anndata as ad
    import scanpy as sc

    df = sc.pp.highly_variable_genes(ad.AnnData(logx), flavor="seurat", n_top_genes=None, inplace=False)
    score = np.nan_to_num(df["dispersions_norm"].to_numpy(np.float64), nan=-np.inf, posinf=-np.inf)
    return np.argsort(-score, kind="stable")


class EvalSpace:
    """Expression and embedding space fitted on REAL held-out counts.

    Steps (all parameters come from the real counts passed here, then stay fixed):

    1. ``log_cp10k`` on all genes (library size over all genes).
    2. HVGs: the top ``n_hvg`` genes by scanpy's Seurat-flavour normalised dispersion
       (``sc.pp.highly_variable_genes(flavor='seurat')``, Satija et al. 2015, Nat. Biotechnol.
       33:495) on that log1p CP10k matrix; all genes when there are no more than ``n_hvg``.
       Kept in their original column order (``self.hvg``).
    3. Optional z-scoring per HVG with the real mean and standard deviation, clipped at
       +-10 (``scanpy.pp.scale(max_value=10)``). Default OFF: the embedding stays a linear
       map of log expression, so each gene weighs by its real variance and a few noisy,
       barely expressed genes in a small held-out set cannot dominate distances; this is
       also what the cell-type judge of the earlier held-out table did.
    4. PCA (scikit-learn, ``random_state=seed``) with ``n_pcs`` components (fewer only when
       there are fewer genes or cells), centred on the real mean.

    Parameters
    ----------
    counts : (cells, genes) array or scipy sparse matrix of real held-out counts.
    n_hvg : int, default 2000.
    n_pcs : int, default 50.
    scale : bool, default False.
    seed : int, default 0.
    """

    def __init__(self, counts, n_hvg: int = 2000, n_pcs: int = 50, scale: bool = False, seed: int = 0):
        logx = log_cp10k(counts)
        n_cells, n_genes = logx.shape
        self.n_genes = n_genes
        if n_genes <= n_hvg:
            self.hvg = np.arange(n_genes)
        else:
            self.hvg = np.sort(_seurat_dispersion_rank(logx)[:n_hvg])
        x = self._subset(logx)
        self.scale = scale
        if scale:
            self.mean_ = x.mean(0, dtype=np.float64).astype(np.float32)
            sd = x.std(0, dtype=np.float64)
            self.std_ = np.where(sd > 0, sd, 1.0).astype(np.float32)
            x = self._scale(x)
        n_comp = min(n_pcs, x.shape[1], n_cells)
        self.pca = PCA(n_components=n_comp, random_state=seed).fit(x)

    def _subset(self, logx) -> np.ndarray:
        return _dense(logx[:, self.hvg])

    def _scale(self, x: np.ndarray) -> np.ndarray:
        return np.clip((x - self.mean_) / self.std_, -10.0, 10.0)

    def expr(self, counts) -> np.ndarray:
        """log1p CP10k (library size over ALL genes of ``counts``) on the HVGs: dense float32
        (cells, n_hvg). ``counts`` must have the same genes, in the same order, as the real
        counts the space was fitted on."""
        if counts.shape[1] != self.n_genes:
            raise ValueError(f"expected {self.n_genes} genes, got {counts.shape[1]}")
        return _dense(log_cp10k(counts, self.hvg))

    def embed(self, counts) -> np.ndarray:
        """PCA coordinates (cells, n_pcs) of ``expr(counts)`` (z-scored first if ``scale``)."""
        return self.embed_expr(self.expr(counts))

    def embed_expr(self, x: np.ndarray) -> np.ndarray:
        """PCA coordinates of expression ``expr`` already computed (saves computing it twice)."""
        if self.scale:
            x = self._scale(x)
        return self.pca.transform(x).astype(np.float32)


# ----------------------------------------------------------------------------- identity


class KNNJudge:
    """k-nearest-neighbour classifier (scikit-learn, uniform weights, Euclidean) fitted on
    real held-out cells of one annotation field (cell type, tissue or disease) in the
    :class:`EvalSpace` embedding; it judges whether a generated cell is the thing its
    prompt asked for. This is the kNN label-transfer check used by CFGen (Palma et al.
    2024, ``train_knn_real_data``), with k=15.

    Parameters
    ----------
    space_embeddings : (n, d) real embeddings.
    labels : (n,) labels of the field.
    k : int, default 15 (fewer if there are fewer real cells).
    """

    def __init__(self, space_embeddings, labels, k: int = 15):
        x = _f64(space_embeddings)
        self.labels = np.asarray(labels)
        self.knn = KNeighborsClassifier(n_neighbors=min(k, len(x))).fit(x, self.labels)

    def predict(self, embeddings) -> np.ndarray:
        return self.knn.predict(_f64(embeddings))

    def identity(self, embeddings_gen, target_labels) -> dict:
        """How often a generated cell is predicted as the label it was asked for.

        Parameters
        ----------
        embeddings_gen : (m, d) generated embeddings.
        target_labels : (m,) requested label per cell, or one label for all.

        Returns
        -------
        dict
            ``accuracy``: fraction of cells whose predicted label equals the target.
            ``macro_f1``: ``sklearn.metrics.f1_score(targets, predictions, average='macro',
            labels=<distinct targets>, zero_division=0)``, i.e. F1 averaged over the
            requested labels only (predictions of labels nobody asked for count as misses
            of the asked-for label but get no F1 term of their own).
        """
        pred = self.predict(embeddings_gen)
        tgt = np.asarray(target_labels)
        if tgt.ndim == 0:
            tgt = np.full(len(pred), tgt.item())
        present = np.unique(tgt)
        return {"accuracy": float(np.mean(pred == tgt)),
                "macro_f1": float(f1_score(tgt, pred, labels=present, average="macro", zero_division=0))}


# ----------------------------------------------------------------------------- fidelity / diversity


def prdc(real, fake, k: int = 5) -> dict:
    """Precision, recall, density and coverage (Naeem, Oh, Uh, Choi & Yoo 2020, "Reliable
    Fidelity and Diversity Metrics for Generative Models", ICML; identical to the reference
    ``prdc`` package 0.2 ``compute_prdc``).

    With ``B(x, r)`` the open Euclidean ball and ``NND_k(x)`` the distance from ``x`` to its
    k-th nearest neighbour within its own set (the point itself excluded):

    - precision = (1/M) sum_j 1[ exists i: fake_j in B(real_i, NND_k(real_i)) ]
    - recall    = (1/N) sum_i 1[ exists j: real_i in B(fake_j, NND_k(fake_j)) ]
    - density   = 1/(k M) sum_j sum_i 1[ fake_j in B(real_i, NND_k(real_i)) ]
    - coverage  = (1/N) sum_i 1[ min_j |real_i - fake_j| < NND_k(real_i) ]

    Identical sets give 1 for all four; density can exceed 1 (fakes crowding dense real
    regions). Distances are scipy ``cdist`` Euclidean, computed in blocks of rows so memory
    stays bounded: one formula per pair, so a distance is the same number in the radius and
    in the real-fake comparison (the dot-product expansion of sklearn's brute-force
    ``NearestNeighbors`` rounds differently in different matrices, which moves boundary
    points in or out of the k-NN balls and puts density off 1 for identical sets).

    Parameters
    ----------
    real : (N, d), fake : (M, d) embeddings.
    k : int, default 5 (the paper's choice).
    """
    real, fake = _f64(real), _f64(fake)
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"prdc needs more than k={k} points per set")
    r_real, r_fake = _kth_nn_distance(real, k), _kth_nn_distance(fake, k)
    fake_hits = np.zeros(len(fake))  # number of real balls containing each fake
    recall_hit = np.zeros(len(real), bool)
    coverage_hit = np.zeros(len(real), bool)
    for lo in range(0, len(real), _BLOCK):
        d = cdist(real[lo:lo + _BLOCK], fake)
        rr = r_real[lo:lo + _BLOCK, None]
        fake_hits += (d < rr).sum(0)
        recall_hit[lo:lo + _BLOCK] = (d < r_fake[None, :]).any(1)
        coverage_hit[lo:lo + _BLOCK] = d.min(1) < rr[:, 0]
    return {"precision": float((fake_hits > 0).mean()), "recall": float(recall_hit.mean()),
            "density": float(fake_hits.mean() / k), "coverage": float(coverage_hit.mean())}


def mmd_bandwidths(real, kernel_mul: float = 2.0, kernel_num: int = 5, max_points: int = 1000,
                   seed: int = 0) -> np.ndarray:
    """Kernel widths ``h_i`` for :func:`mmd_rbf`, computed ONCE from real data.

    Follows scDiffusion (Luo et al. 2024, Bioinformatics 40:btae518; ``mmd_rbf`` in
    ``exp_script/script_static_eval.ipynb``): with ``s`` the mean squared Euclidean distance
    between distinct real points, ``h_i = s * kernel_mul**(i - kernel_num // 2)`` for
    ``i = 0..kernel_num-1``; the default gives ``s * (1/4, 1/2, 1, 2, 4)``. scDiffusion takes
    ``s`` from the pooled real+generated set of each comparison; here it comes from the real
    set alone so that every generator is scored with the same kernel.

    Parameters
    ----------
    real : (n, d) real embeddings (at most ``max_points`` used, seeded subsample).
    """
    x = _subsample(_f64(real), max_points, np.random.default_rng(seed))
    s = float(pdist(x, "sqeuclidean").mean())
    return s * kernel_mul ** (np.arange(kernel_num) - kernel_num // 2)


def mmd_rbf(x, y, bandwidths: Sequence[float], max_points: int | None = 2000, seed: int = 0,
            unbiased: bool = False) -> float:
    """Squared maximum mean discrepancy (Gretton et al. 2012, JMLR 13:723) with a sum of
    Gaussian kernels, BIASED (V-statistic) estimate:

        k(a, b) = sum_i exp(-|a - b|^2 / h_i)
        MMD^2 = mean_{i,i'} k(x_i, x_i') + mean_{j,j'} k(y_j, y_j') - 2 mean_{i,j} k(x_i, y_j)

    (diagonals included). This is the estimator of scDiffusion's ``mmd_rbf`` (kernel
    ``exp(-d^2 / h_i)``, kernels summed, V-statistic) and of CFGen's ``mix_rbf_mmd2``
    (theislab/CFGen ``cfgen/eval/distribution_distances.py``, ``biased=True``, with
    ``h_i = 2 sigma_i^2``); unlike both it accepts sets of different sizes. It is >= 0, and
    exactly 0 for identical sets; for two finite samples of one distribution it is O(1/n)
    above 0, and less so for a set with less spread (its k(y, y') are larger).

    ``unbiased=True``: Gretton et al.'s MMD^2_u (their eq. 3), the within-set means over
    distinct pairs only: 0 on average for two samples of one distribution (a draw may be
    negative; nan for a set of one).

    Parameters
    ----------
    x, y : (n, d), (m, d) embeddings.
    bandwidths : the ``h_i`` (squared-distance units), e.g. ``mmd_bandwidths(real)``; pass
        the SAME values for every generator of one evaluation.
    max_points : each set is subsampled (seeded) to at most this many points.
    """
    rng = np.random.default_rng(seed)
    x, y = _subsample(_f64(x), max_points, rng), _subsample(_f64(y), max_points, rng)
    h = np.asarray(bandwidths, np.float64).ravel()
    if h.size == 0 or np.any(h <= 0):
        raise ValueError("bandwidths must be positive")

    def kmean(a, b):
        d2 = cdist(a, b, "sqeuclidean")
        return float(sum(np.exp(-d2 / hi).mean() for hi in h))  # one (n, m) matrix at a time

    if not unbiased:
        return max(kmean(x, x) + kmean(y, y) - 2.0 * kmean(x, y), 0.0)
    if len(x) < 2 or len(y) < 2:
        return float("nan")

    def kmean_distinct(a):  # the n diagonal terms are k(a, a) = len(h)
        n = len(a)
        return (kmean(a, a) * n * n - n * len(h)) / (n * (n - 1))

    return kmean_distinct(x) + kmean_distinct(y) - 2.0 * kmean(x, y)


def energy_distance(x, y, max_points: int | None = 2000, seed: int = 0, unbiased: bool = False) -> float:
    """Energy distance (Székely & Rizzo 2013, "Energy statistics: a class of statistics based
    on distances", J. Stat. Plan. Inference 143:1249), multivariate, Euclidean norm:

        E(X, Y) = 2 E|X - Y| - E|X - X'| - E|Y - Y'|

    By default estimated with V-statistics (means over all pairs, self-pairs included), so it
    is >= 0 and exactly 0 for identical sets. No square root: in one dimension this equals
    ``scipy.stats.energy_distance(x, y) ** 2``. Sets larger than ``max_points`` are subsampled
    (seeded).

    ``unbiased=True``: U-statistics, the within-set means over distinct pairs only (their
    section 3), so two samples of one distribution score 0 on average (a single draw may be
    negative; nan for a set of one). The V form adds about ``E|X - X'| / n + E|Y - Y'| / m``:
    in small sets (the fidelity halves hold 15-100 cells) a generator with less spread than
    real cells pays less of it. Both are reported; the floors were set on the V form.
    """
    rng = np.random.default_rng(seed)
    x, y = _subsample(_f64(x), max_points, rng), _subsample(_f64(y), max_points, rng)
    if not unbiased:
        return float(max(2.0 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean(), 0.0))
    if len(x) < 2 or len(y) < 2:
        return float("nan")
    within = [2.0 * pdist(a).sum() / (len(a) * (len(a) - 1)) for a in (x, y)]
    return float(2.0 * cdist(x, y).mean() - within[0] - within[1])


def wasserstein2(x, y, max_points: int = 1000, seed: int = 0) -> float:
    """2-Wasserstein distance between the empirical distributions (uniform weights) of
    ``x`` and ``y``:

        W2 = sqrt( min_{P in U(a, b)} sum_ij P_ij |x_i - y_j|^2 )

    solved exactly by POT's network simplex (``ot.emd2``, cost ``ot.dist`` = squared
    Euclidean), as in CFGen's ``wasserstein(power=2)`` (from Tong et al.'s
    conditional-flow-matching). Each set is first subsampled (seeded) to at most
    ``max_points`` points, which bounds the cost at about a second for 1000 x 1000.
    """
    import ot

    rng = np.random.default_rng(seed)
    x, y = _subsample(_f64(x), max_points, rng), _subsample(_f64(y), max_points, rng)
    cost = ot.dist(x, y, metric="sqeuclidean")
    w2sq = ot.emd2(ot.unif(len(x)), ot.unif(len(y)), cost, numItermax=10_000_000)
    return float(np.sqrt(max(float(w2sq), 0.0)))


def diversity(x, max_n: int = 500, seed: int = 0) -> float:
    """Mean Euclidean distance over distinct pairs of points (``scipy.spatial.distance.pdist``
    mean), on a seeded subsample of at most ``max_n`` points; 0 when all points are equal.
    The CLOP-DiT paper's diversity ratio is this, generated over real."""
    x = _subsample(_f64(x), max_n, np.random.default_rng(seed))
    return float(pdist(x).mean()) if len(x) > 1 else 0.0


def diversity_ratio(gen, real, max_n: int = 500, seed: int = 0) -> float:
    """``diversity(gen) / diversity(real)``: 1 when generated cells are as spread as real
    ones, < 1 when too alike (mode collapse), 0 when all identical; nan if real has no
    spread."""
    d_real = diversity(real, max_n, seed)
    return diversity(gen, max_n, seed) / d_real if d_real > 0 else float("nan")


def classifier_auc(real, fake, folds: int = 5, seed: int = 0, model: str = "knn", k: int = 15) -> float:
    """Classifier two-sample test (Lopez-Paz & Oquab 2017, "Revisiting Classifier Two-Sample
    Tests", ICLR): cross-validated ROC AUC of a classifier telling real from generated cells.
    0.5 is best (indistinguishable), 1 means perfectly separable.

    The larger set is subsampled (seeded) to the size of the smaller; the score is the mean
    ROC AUC over ``folds`` stratified, shuffled folds (``cross_val_score(scoring='roc_auc')``).

    ``model='knn'`` (default): k-nearest-neighbour classifier (scikit-learn, k=15, uniform
    weights; score = share of generated neighbours). Chosen over a linear model because a
    linear classifier cannot see differences in spread or shape: a collapsed or
    over-dispersed generator with the right mean scores 0.5 with it.
    ``model='logistic'``: L2 logistic regression (C=1) on standardised features, the common
    linear baseline; it sees only differences of location.

    Note: with the kNN, exact duplicates of real cells among the generated ones (a point and
    its copy in different folds vote for each other's class) push the AUC BELOW 0.5, down to
    ~0.3 for two identical sets; a value clearly under 0.5 flags copying of the reference.
    Independent samples of one distribution score ~0.5 (slightly above, by chance).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    real, fake = _f64(real), _f64(fake)
    rng = np.random.default_rng(seed)
    n = min(len(real), len(fake))
    if n < folds:
        raise ValueError(f"classifier_auc needs at least folds={folds} points per set")
    real, fake = _subsample(real, n, rng), _subsample(fake, n, rng)
    x = np.concatenate([real, fake])
    y = np.r_[np.zeros(n, int), np.ones(n, int)]
    if model == "knn":
        clf = KNeighborsClassifier(n_neighbors=min(k, 2 * n - 2 * n // folds - 1))
    elif model == "logistic":
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    else:
        raise ValueError(f"model must be 'knn' or 'logistic', not {model!r}")
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, x, y, cv=cv, scoring="roc_auc").mean())


# ----------------------------------------------------------------------------- gene level


def gene_moments(real_expr, gen_expr) -> dict:
    """Agreement of per-gene means and variances (over cells, ddof=0) of expression
    (``EvalSpace.expr`` output, log1p CP10k), real vs generated, as reported by scDiffusion
    and CFGen:

    - mean_pearson / var_pearson: Pearson correlation over genes (nan if either is constant)
    - mean_r2 / var_r2: ``sklearn.metrics.r2_score(real, generated)`` (real as the truth;
      1 is perfect, can be negative)
    """
    r, g = _f64(real_expr), _f64(gen_expr)
    mr, mg, vr, vg = r.mean(0), g.mean(0), r.var(0), g.var(0)
    return {"mean_pearson": _pearson(mr, mg), "mean_r2": float(r2_score(mr, mg)),
            "var_pearson": _pearson(vr, vg), "var_r2": float(r2_score(vr, vg))}


def _gene_corr(x: np.ndarray) -> np.ndarray:
    """Pearson correlation between columns; a constant column correlates 0 with the others;
    the diagonal is 1."""
    xc = x - x.mean(0)
    sd = np.sqrt((xc * xc).mean(0))
    z = np.divide(xc, sd, out=np.zeros_like(xc), where=sd > 0)
    c = z.T @ z / len(x)
    np.fill_diagonal(c, 1.0)
    return np.clip(c, -1.0, 1.0)


def correlation_distance(real_expr, gen_expr, n_genes: int = 100) -> float:
    """Distance between gene-gene Pearson correlation matrices (as in the gene-correlation
    comparisons of scDesign2, Sun et al. 2021, and scDiffusion):

        sqrt( mean_{g,g'} (C_real[g,g'] - C_gen[g,g'])^2 ) = ||C_real - C_gen||_F / n_genes

    over the ``n_genes`` genes of highest variance in the REAL set (all if fewer). A gene
    constant within one set gets correlation 0 with every other gene there (nan -> 0);
    diagonals are 1. Ranges from 0 (same correlation structure) to 2.
    """
    r, g = _f64(real_expr), _f64(gen_expr)
    top = np.sort(np.argsort(-r.var(0), kind="stable")[:n_genes])
    diff = _gene_corr(r[:, top]) - _gene_corr(g[:, top])
    return float(np.sqrt(np.mean(diff * diff)))


def de_concordance(real_expr, real_labels, gen_expr, gen_labels, condition, top: int = 50,
                   gen_rest=None) -> dict:
    """Does the generated condition differ from the rest like the real one does?

    Per gene, logFC = mean expression of ``condition`` cells - mean of the "rest", in log1p
    space (difference of means of log1p CP10k, as scanpy's ``rank_genes_groups`` fold change
    approximates). Real: ``condition`` cells vs all other real cells. Generated: generated
    ``condition`` cells vs, in order of precedence,

    1. ``gen_rest`` if given (e.g. the real rest, or another generator's output),
    2. generated cells with other labels, if ``gen_labels`` contains any,
    3. the REAL rest (when the generated set holds only the one condition). Then the score
       measures how the generated condition sits against real data.

    ``gen_labels=None`` means every generated cell is ``condition``.

    Returns
    -------
    dict
        ``logfc_pearson``: Pearson correlation of the two logFC vectors over genes.
        ``top_jaccard``: Jaccard overlap |A ∩ B| / |A ∪ B| of the ``top`` genes with the
        largest (up-regulated) logFC in each (ties broken by gene order).
    """
    r, g = _f64(real_expr), _f64(gen_expr)
    rl = np.asarray(real_labels)
    gl = np.full(len(g), condition, dtype=object) if gen_labels is None else np.asarray(gen_labels)
    in_r, in_g = rl == condition, gl == condition
    if not in_r.any() or in_r.all():
        raise ValueError(f"real data must hold cells of {condition!r} and of other labels")
    if not in_g.any():
        raise ValueError(f"no generated cells of {condition!r}")
    real_rest_mean = r[~in_r].mean(0)
    if gen_rest is not None:
        rest_mean = _f64(gen_rest).mean(0)
    elif (~in_g).any():
        rest_mean = g[~in_g].mean(0)
    else:
        rest_mean = real_rest_mean
    lfc_r = r[in_r].mean(0) - real_rest_mean
    lfc_g = g[in_g].mean(0) - rest_mean
    top = min(top, len(lfc_r))
    a = set(np.argsort(-lfc_r, kind="stable")[:top].tolist())
    b = set(np.argsort(-lfc_g, kind="stable")[:top].tolist())
    return {"logfc_pearson": _pearson(lfc_r, lfc_g), "top_jaccard": len(a & b) / len(a | b)}


# ----------------------------------------------------------------------------- memorisation


def memorisation(gen, heldout_real, train) -> dict:
    """Copying of training cells, by distance to the closest record (DCR; Park et al. 2018,
    "Data Synthesis based on Generative Adversarial Networks", PVLDB 11:1071) compared with
    held-out real cells, the reference of Meehan, Chaudhuri & Dasgupta 2020 ("A Non-Parametric
    Test to Detect Data-Copying in Generative Models", AISTATS).

    For every generated cell, d_gen = Euclidean distance to its nearest training cell; for
    every held-out real cell, d_real = the same (exact, ``NearestNeighbors`` on ``train``).
    ``train`` is the (n, d) training embeddings, or a ``NearestNeighbors`` already fitted on
    them, to build the index once for many generators.

    Returns
    -------
    dict
        ``gen_nn_median``, ``real_nn_median``: medians of d_gen and d_real.
        ``ratio``: gen_nn_median / real_nn_median: ~1 for fresh samples of the training
        distribution, -> 0 for copies of training cells, > 1 for off-manifold cells.
        ``frac_gen_closer_than_real_5th_percentile``: share of generated cells with
        d_gen < the 5th percentile of d_real: ~0.05 for fresh samples, -> 1 for copies.
        ``p_gen_closer``: P(d_gen < d_real) over all pairs, ties counting 1/2, i.e. the
        Mann-Whitney U / (n m) of Meehan et al.'s test (un-partitioned): 0.5 = no copying.
    """
    nn = train if isinstance(train, NearestNeighbors) else NearestNeighbors(n_neighbors=1).fit(_f64(train))
    d_gen = nn.kneighbors(_f64(gen))[0][:, 0]
    d_real = nn.kneighbors(_f64(heldout_real))[0][:, 0]
    g_med, r_med = float(np.median(d_gen)), float(np.median(d_real))
    u = stats.mannwhitneyu(d_real, d_gen, alternative="two-sided").statistic  # pairs real > gen
    return {"gen_nn_median": g_med, "real_nn_median": r_med,
            "ratio": g_med / r_med if r_med > 0 else float("nan"),
            "frac_gen_closer_than_real_5th_percentile": float(np.mean(d_gen < np.percentile(d_real, 5))),
            "p_gen_closer": float(u / (len(d_gen) * len(d_real)))}


# ----------------------------------------------------------------------------- categorical, summaries


def total_variation(p: Mapping, q: Mapping) -> float:
    """Total variation distance ``0.5 * sum_c |p_c - q_c|`` over the union of categories
    (missing = 0). Each dict is normalised to sum 1 first, so counts work as well as
    probabilities. 0 for identical distributions, 1 for disjoint supports."""
    keys = sorted(set(p) | set(q), key=str)
    a = np.array([float(p.get(c, 0.0)) for c in keys])
    b = np.array([float(q.get(c, 0.0)) for c in keys])
    if np.any(a < 0) or np.any(b < 0) or a.sum() <= 0 or b.sum() <= 0:
        raise ValueError("p and q need non-negative weights with a positive sum")
    return float(0.5 * np.abs(a / a.sum() - b / b.sum()).sum())


def mean_ci(values, level: float = 0.95) -> dict:
    """Mean over seeds with a Student-t confidence interval.

    With n finite values (non-finite ones dropped), mean m and sample standard deviation s
    (ddof=1): ``m -+ t_{(1+level)/2, n-1} * s / sqrt(n)``. For n=1 the interval is nan
    (undefined), for n=0 everything is nan.

    Returns dict(mean, lo, hi, n).
    """
    v = np.asarray(values, np.float64).ravel()
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    m = float(v.mean())
    if n == 1:
        return {"mean": m, "lo": float("nan"), "hi": float("nan"), "n": 1}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / np.sqrt(n))
    return {"mean": m, "lo": m - half, "hi": m + half, "n": n}
