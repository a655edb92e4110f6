"""The embedded default atlas: a synthetic, Census-shaped single-cell atlas.

Generative model, per cell ``i`` of study ``s``, donor ``d``, tissue, disease, type ``c``::

    logit_ig = base_g + Σ_{n ∈ lineage(c)} program_ng          (children share parents' programs)
             + tissue_g + donor_dg + batch_sg + capture_ag      (donor < study batch, assay capture)
             + a_i · disease_g   [if the disease acts on c]     (per-cell intensity a_i)
             + state_{k_i, g}    [if c has sub-states]          (discrete state k_i, its gene module)
             + cycle_i · cc_g + act_i · activation_g + stress_i · stress_g + mito_i · mt_g
             + u_i · axes_cg                                    (2 within-type continuous axes)
    mu_ig    = L_i · softmax(logit_i)_g,   L_i ~ LogNormal(assay, type, study)
    x_ig     ~ NB(mu_ig, theta_g)                                (Gamma-Poisson)

This follows the count model that scVI (Lopez et al., 2018) and scLDM decode with
(softmax proportions × library size, per-gene inverse dispersion), so generated cells can
only match it by getting proportions, library sizes and overdispersion right; the
sub-states and continuous programs (on expressed genes, so they show in the counts) make sure
cells of one type are not clones, and the study and donor effects make a held-out study more
than a resample of training studies (``benchmarks/atlas_discrimination.py`` measures both).

Each study pairs its tissue with a disease no earlier study has in that tissue where it can
(``_make_studies``), so held-out studies bring (cell type, tissue, disease) combinations that
no training study has, although training sees each label.

Cells are produced in chunks from per-chunk RNG streams, so the atlas is deterministic for a
seed and any size builds in bounded memory.
"""

from __future__ import annotations

import multiprocessing
import uuid
from dataclasses import dataclass
from importlib import resources

import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import biology as bio
from .census_layout import CensusWriter


# Effect sizes (log scale, per gene): a study's batch factors are dense and larger than a
# donor's; the continuous axes act on genes a cell actually expresses.
STUDY_EFFECT_SD = 0.3
DONOR_EFFECT_SD = 0.15
AXIS_GENES, AXIS_SD, AXIS_SCORE_SD = 40, 1.0, 0.8
STATE_SD = 0.7


@dataclass
class SynthConfig:
    n_cells: int = 20_000
    n_genes: int = 3_000
    n_studies: int = 12
    seed: int = 0
    chunk_size: int = 4_096
    organism: str = "homo_sapiens"


def gene_vocabulary(n_genes: int, seed: int) -> pd.DataFrame:
    """Program genes plus filler human gene symbols, shuffled so markers are not adjacent.
    feature_ids are synthetic (``SYN`` + index): the symbols are real, the ids are not Ensembl."""
    named = bio.named_genes()
    if n_genes < len(named):
        raise ValueError(f"n_genes={n_genes} is below the {len(named)} genes the programs need")
    text = resources.files("clopdit_dist.data").joinpath("resources/gene_symbols.txt").read_text()
    named_set = set(named)
    pool = [g for g in text.split() if not g.startswith("#") and g not in named_set]
    rng = np.random.default_rng([seed, 1])
    filler = rng.choice(len(pool), size=n_genes - len(named), replace=False)
    names = np.array(named + [pool[i] for i in sorted(filler)])
    names = names[rng.permutation(n_genes)]
    return pd.DataFrame({"feature_id": [f"SYN{i:08d}" for i in range(n_genes)], "feature_name": names,
                         "feature_length": rng.integers(500, 8000, n_genes)})


@dataclass
class Study:
    dataset_id: str
    title: str
    tissues: list[str]
    diseases: list[str]  # besides "normal"
    assay: str
    suspension_type: str
    donors: pd.DataFrame  # donor_id, sex, development_stage, ethnicity, disease
    n_cells: int
    stress: float
    log_lib_offset: float


class SyntheticAtlas:
    """All parameters of the generative model, drawn once from ``cfg.seed``."""

    def __init__(self, cfg: SynthConfig):
        self.cfg = cfg
        rng = np.random.default_rng([cfg.seed, 0])
        self.var = gene_vocabulary(cfg.n_genes, cfg.seed)
        G = cfg.n_genes
        gi = {g: i for i, g in enumerate(self.var["feature_name"])}
        self.gene_index = gi

        def vec(genes, lo, hi) -> np.ndarray:
            v = np.zeros(G, np.float32)
            idx = [gi[g] for g in genes]
            v[idx] = rng.uniform(lo, hi, len(idx))
            return v

        def sparse_noise(frac, sd) -> np.ndarray:
            v = np.zeros(G, np.float32)
            idx = rng.choice(G, int(frac * G), replace=False)
            v[idx] = rng.normal(0, sd, len(idx))
            return v

        base = rng.normal(-2.5, 2.0, G).astype(np.float32)
        for g in bio.named_genes():  # a list: set order would differ between processes  # program genes are off unless a program switches them on
            base[gi[g]] = rng.normal(-2.5, 0.5)
        base += vec(bio.HOUSEKEEPING, 4.0, 6.0) + vec(bio.MITOCHONDRIAL, 3.0, 4.5)
        self.base = base
        self.theta = np.clip(np.exp(rng.normal(np.log(3.0), 0.8, G)), 0.3, 50).astype(np.float32)

        # Lineage programs: own markers plus a sparse random program over other genes.
        node_program = {c.name: vec(c.markers, 3.0, 5.0) + sparse_noise(0.04, 0.7) for c in bio.CELL_TYPES}
        self.types = list(bio.LEAF_TYPES)
        self.type_index = {c.name: i for i, c in enumerate(self.types)}
        self.type_program = np.stack([sum(node_program[n.name] for n in bio.lineage(c.name)) for c in self.types])
        # continuous axes on genes a cell counts a few UMIs of (the top 15% of baseline logits):
        # on genes that are off, a program would change nothing one could see in the counts
        expressed = np.flatnonzero(base >= np.quantile(base, 0.85))
        k_axis = min(AXIS_GENES, len(expressed) // 2)
        self.type_axes = np.stack([np.stack([_axis(rng, G, expressed, k_axis, AXIS_SD) for _ in range(2)])
                                   for _ in self.types])
        # discrete sub-states: a named gene module each, plus shifts of some expressed genes
        self.state_program: list[np.ndarray | None] = []
        self.state_weights: list[np.ndarray | None] = []
        for c in self.types:
            states = bio.SUB_STATES.get(c.name, ())
            self.state_program.append(np.stack([vec(st.genes, 2.5, 4.0) + _axis(rng, G, expressed, k_axis, STATE_SD)
                                                for st in states]) if states else None)
            self.state_weights.append(_normalise([st.weight for st in states]) if states else None)
        self.type_cycling = np.array([c.cycling for c in self.types])
        self.type_libfactor = np.log([c.library_factor for c in self.types])
        self.type_activatable = np.array([c.activatable for c in self.types])

        self.tissues = list(bio.TISSUES)
        self.tissue_effect = np.stack([sparse_noise(0.1, 0.3) for _ in self.tissues])
        self.diseases = list(bio.DISEASES)
        self.disease_program = np.stack([vec(d.program, 2.0, 3.5) + (sparse_noise(0.02, 0.5) if d.program else 0)
                                         for d in self.diseases])
        self.disease_affects = np.array([[any(n.name in d.affects for n in bio.lineage(c.name)) for c in self.types]
                                         for d in self.diseases])
        self.assays = list(bio.ASSAYS)
        self.assay_capture = np.stack([rng.normal(0, 0.25, G).astype(np.float32) for _ in self.assays])
        def cols(genes, lo, hi) -> tuple[np.ndarray, np.ndarray]:  # a program on few genes, kept sparse
            return np.array([gi[g] for g in genes]), rng.uniform(lo, hi, len(genes)).astype(np.float32)

        self.programs = {  # continuous within-type programs
            "s": cols(bio.CELL_CYCLE_S, 2.5, 3.5), "g2m": cols(bio.CELL_CYCLE_G2M, 3.0, 4.0),
            "activation": cols(bio.ACTIVATION, 3.0, 4.5), "stress": cols(bio.STRESS, 2.5, 3.5),
            "mito": cols(bio.MITOCHONDRIAL, 1.0, 1.0)}
        self.sex_program = {s: cols(genes, 3.0, 4.0) for s, genes in bio.SEX_GENES.items()}

        self.studies = self._make_studies(rng)
        self.study_batch = np.stack([rng.normal(0, STUDY_EFFECT_SD, G).astype(np.float32) for _ in self.studies])
        self.study_start = np.concatenate([[0], np.cumsum([s.n_cells for s in self.studies])])
        self.donor_effect = [rng.normal(0, DONOR_EFFECT_SD, (len(s.donors), G)).astype(np.float32)
                             for s in self.studies]

    # ------------------------------------------------------------------ studies
    def _make_studies(self, rng) -> list[Study]:
        cfg = self.cfg
        weights = rng.dirichlet(np.full(cfg.n_studies, 4.0))
        sizes = np.floor(weights * cfg.n_cells).astype(int)
        sizes[: cfg.n_cells - sizes.sum()] += 1
        studies, used = [], {}  # used: (tissue, disease) -> studies that have it
        for i in range(cfg.n_studies):
            primary = self.tissues[i % len(self.tissues)].name
            tissues = [primary] + (["blood"] if i % 4 == 3 and primary != "blood" else [])
            # the disease of the primary tissue whose (tissue, disease) pairs earlier studies have
            # least, ties in a seeded order: each study brings a combination of its own where it can
            candidates = [d.name for d in self.diseases if primary in d.tissues]
            candidates = [candidates[k] for k in rng.permutation(len(candidates))]
            overlap = [sum(used.get((t, d), 0) for t in tissues if t in bio.DISEASE_BY_NAME[d].tissues)
                       for d in candidates]
            diseases = [candidates[int(np.argmin(overlap))]] if candidates else []
            for d in diseases:
                for t in tissues:
                    if t in bio.DISEASE_BY_NAME[d].tissues:
                        used[(t, d)] = used.get((t, d), 0) + 1
            n_donors = int(rng.integers(3, 9))
            donors = pd.DataFrame({
                "donor_index": np.arange(n_donors),
                "donor_id": [f"S{i:02d}-D{k}" for k in range(n_donors)],
                "sex": rng.choice(list(bio.SEXES), n_donors),
                "development_stage": rng.choice(bio.DEVELOPMENT_STAGES, n_donors),
                "ethnicity": rng.choice(bio.ETHNICITIES, n_donors),
                "disease": [diseases[0] if diseases and k % 2 == 1 else "normal" for k in range(n_donors)],
            })
            studies.append(Study(
                dataset_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"clopdit-synthetic/{cfg.seed}/{i}")),
                title=f"Synthetic {' and '.join(tissues)} atlas {i}" + (f" ({diseases[0]})" if diseases else ""),
                tissues=tissues, diseases=diseases, assay=self.assays[int(rng.integers(len(self.assays)))],
                suspension_type="nucleus" if i % 7 == 5 else "cell", donors=donors, n_cells=int(sizes[i]),
                stress=float(rng.uniform(0, 0.6)), log_lib_offset=float(rng.normal(0, 0.2))))
        return studies

    def datasets_table(self) -> pd.DataFrame:
        return pd.DataFrame([{
            "collection_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"clopdit-synthetic/{self.cfg.seed}")),
            "collection_name": "clopdit-dist synthetic atlas", "collection_doi": "",
            "dataset_id": s.dataset_id, "dataset_version_id": s.dataset_id, "dataset_title": s.title,
            "dataset_h5ad_path": f"{s.dataset_id}.h5ad", "dataset_total_cell_count": s.n_cells} for s in self.studies])

    # ------------------------------------------------------------------ cells
    def sample(self, start: int, n: int, with_means: bool = False):
        """Cells ``start .. start+n`` of the atlas (each chunk has its own RNG stream): ``(obs, counts)``,
        and with ``with_means`` also each cell's true NB mean ``mu`` (n, genes), the mean its counts
        were drawn around at inverse dispersion ``self.theta`` (a perfect generator's target; the
        counts are the same either way). ``start`` must be a chunk start for the written atlas's cells."""
        rng = np.random.default_rng([self.cfg.seed, 2, start])
        G = self.cfg.n_genes
        cell = np.arange(start, start + n)
        study_idx = np.searchsorted(self.study_start, cell, side="right") - 1
        rows, logits = [], np.empty((n, G), np.float32)
        log_lib = np.empty(n)
        for si in np.unique(study_idx):
            sel = np.flatnonzero(study_idx == si)
            obs, lg, ll = self._sample_study(rng, int(si), len(sel))
            rows.append(obs)
            logits[sel], log_lib[sel] = lg, ll
        obs = pd.concat(rows, ignore_index=True)
        logits -= logits.max(axis=1, keepdims=True)
        mu = np.exp(logits, out=logits)
        mu *= (np.exp(log_lib) / mu.sum(axis=1))[:, None].astype(np.float32)
        # NB(mu, theta) as a Gamma-Poisson mixture: lambda ~ Gamma(theta, mu / theta).
        lam = rng.standard_gamma(np.broadcast_to(self.theta, mu.shape), dtype=np.float32)
        lam *= mu / self.theta
        counts = rng.poisson(lam).astype(np.float32)
        if with_means:
            return obs, sp.csr_matrix(counts), mu
        return obs, sp.csr_matrix(counts)

    def study_effects(self, obs: pd.DataFrame) -> np.ndarray:
        """Each cell's log-scale study batch plus donor effect (cells, genes), from its ``dataset_id`` and
        ``donor_id``: what a cell's study and donor add to its logits beyond its labels."""
        out = np.zeros((len(obs), self.cfg.n_genes), np.float32)
        dataset, donor = obs["dataset_id"].to_numpy(), obs["donor_id"].to_numpy()
        for si, s in enumerate(self.studies):
            rows = np.flatnonzero(dataset == s.dataset_id)
            if len(rows):
                index = s.donors.set_index("donor_id").loc[donor[rows], "donor_index"].to_numpy()
                out[rows] = self.study_batch[si] + self.donor_effect[si][index]
        return out

    def _sample_study(self, rng, si: int, n: int):
        s = self.studies[si]
        donor = s.donors.iloc[rng.integers(len(s.donors), size=n)].reset_index(drop=True)
        tissue_names = rng.choice(s.tissues, n, p=_normalise([1.0] + [0.35] * (len(s.tissues) - 1)))
        disease_names = np.where([d in bio.DISEASE_BY_NAME and t in bio.DISEASE_BY_NAME[d].tissues
                                  for d, t in zip(donor["disease"], tissue_names)], donor["disease"], "normal")
        tissue_idx = np.array([self._tissue_index(t) for t in tissue_names])
        disease_idx = np.array([self._disease_index(d) for d in disease_names])
        type_idx = np.empty(n, int)
        for key in sorted(set(zip(tissue_idx, disease_idx))):
            sel = np.flatnonzero((tissue_idx == key[0]) & (disease_idx == key[1]))
            type_idx[sel] = rng.choice(len(self.types), len(sel), p=self._composition(*key))

        lg = self.type_program[type_idx]  # a fresh (n, G) array; the rest is added in place
        lg += self.base + self.study_batch[si] + self.assay_capture[self.assays.index(s.assay)]
        lg += self.tissue_effect[tissue_idx]
        lg += self.donor_effect[si][donor["donor_index"].to_numpy()]
        for sex, (cols, weights) in self.sex_program.items():
            rows = np.flatnonzero((donor["sex"] == sex).to_numpy())
            lg[np.ix_(rows, cols)] += weights
        intensity = rng.beta(2, 2, n) * self.disease_affects[disease_idx, type_idx]
        for d in np.unique(disease_idx[intensity > 0]):
            rows = np.flatnonzero((disease_idx == d) & (intensity > 0))
            lg[rows] += intensity[rows, None].astype(np.float32) * self.disease_program[d]
        cycling = rng.random(n) < self.type_cycling[type_idx]
        phase = rng.random(n) < 0.5
        cc = cycling * rng.uniform(0.5, 1.0, n)
        act = rng.beta(1.5, 4.0, n) * self.type_activatable[type_idx]
        stress = np.clip(s.stress * rng.exponential(1.0, n), 0, 2)
        mito = rng.normal(0, 0.4, n) - (1.5 if s.suspension_type == "nucleus" else 0.0)
        for name, score in (("s", cc * phase), ("g2m", cc * ~phase), ("activation", act),
                            ("stress", stress), ("mito", mito)):
            cols, weights = self.programs[name]
            lg[:, cols] += np.outer(score, weights).astype(np.float32)
        u = rng.normal(0, AXIS_SCORE_SD, (n, 2))
        for t in np.unique(type_idx):
            sel = np.flatnonzero(type_idx == t)
            lg[sel] += u[sel] @ self.type_axes[t]
            if self.state_program[t] is not None:
                lg[sel] += self.state_program[t][rng.choice(len(self.state_weights[t]), len(sel),
                                                            p=self.state_weights[t])]

        mean, sd = np.log(bio.ASSAYS[s.assay][1]), bio.ASSAYS[s.assay][2]
        log_lib = mean + s.log_lib_offset + self.type_libfactor[type_idx] + rng.normal(0, sd, n)
        if s.suspension_type == "nucleus":
            log_lib += np.log(0.6)

        sub = {t.name: np.array(t.sub_tissues) for t in self.tissues}
        obs = pd.DataFrame({
            "dataset_id": s.dataset_id,
            "assay": s.assay, "assay_ontology_term_id": bio.ASSAYS[s.assay][0],
            "cell_type": [self.types[t].name for t in type_idx],
            "cell_type_ontology_term_id": [self.types[t].ontology_id for t in type_idx],
            "development_stage": donor["development_stage"].to_numpy(), "development_stage_ontology_term_id": "unknown",
            "disease": disease_names,
            "disease_ontology_term_id": [bio.DISEASE_BY_NAME[d].ontology_id for d in disease_names],
            "donor_id": donor["donor_id"].to_numpy(), "is_primary_data": True,
            "self_reported_ethnicity": donor["ethnicity"].to_numpy(),
            "self_reported_ethnicity_ontology_term_id": "unknown",
            "sex": donor["sex"].to_numpy(), "sex_ontology_term_id": [bio.SEXES[x] for x in donor["sex"]],
            "suspension_type": s.suspension_type,
            "tissue": [sub[t][rng.integers(len(sub[t]))] for t in tissue_names],
            "tissue_ontology_term_id": "unknown", "tissue_type": "tissue",
            "tissue_general": tissue_names,
            "tissue_general_ontology_term_id": [bio.TISSUE_BY_NAME[t].ontology_id for t in tissue_names],
        })
        return obs, lg, log_lib

    def _tissue_index(self, name: str) -> int:
        return next(i for i, t in enumerate(self.tissues) if t.name == name)

    def _disease_index(self, name: str) -> int:
        return next(i for i, d in enumerate(self.diseases) if d.name == name)

    def _composition(self, tissue_idx: int, disease_idx: int) -> np.ndarray:
        comp = self.tissues[tissue_idx].composition
        shift = self.diseases[disease_idx].composition
        w = np.array([comp.get(c.name, 0.0) * shift.get(c.name, 1.0) for c in self.types])
        return w / w.sum()


def _axis(rng, G: int, genes: np.ndarray, k: int, sd: float) -> np.ndarray:
    v = np.zeros(G, np.float32)
    v[rng.choice(genes, k, replace=False)] = rng.normal(0, sd, k)
    return v


def _normalise(w) -> np.ndarray:
    w = np.asarray(w, float)
    return w / w.sum()


_WORKER_ATLAS: SyntheticAtlas | None = None


def _init_worker(cfg: SynthConfig) -> None:
    global _WORKER_ATLAS
    _WORKER_ATLAS = SyntheticAtlas(cfg)


def _sample_chunk(span: tuple[int, int]):
    return _WORKER_ATLAS.sample(*span)


def write_synthetic_atlas(out: str, cfg: SynthConfig, workers: int = 1, progress: bool = True) -> SyntheticAtlas:
    """Write the atlas as a Census-shaped collection at ``out``.

    ``workers`` processes sample chunks in parallel; this process writes them in order, so
    the result does not depend on the number of workers.
    """
    from tqdm.auto import tqdm

    atlas = SyntheticAtlas(cfg)
    spans = [(s, min(cfg.chunk_size, cfg.n_cells - s)) for s in range(0, cfg.n_cells, cfg.chunk_size)]
    with CensusWriter(out, cfg.organism, expected_cells=cfg.n_cells, var=atlas.var) as writer:
        if writer.n_cells:
            raise FileExistsError(f"{out} already holds {writer.n_cells} cells; choose an empty --out")
        writer.add_datasets(atlas.datasets_table())
        ids = atlas.var["feature_id"].tolist()
        with tqdm(total=cfg.n_cells, unit="cell", desc="synthesize", disable=not progress) as bar:
            if workers > 1:
                ctx = multiprocessing.get_context("spawn")
                with ctx.Pool(workers, initializer=_init_worker, initargs=(cfg,)) as pool:
                    for obs, X in pool.imap(_sample_chunk, spans):
                        writer.append(obs, X, ids)
                        bar.update(X.shape[0])
            else:
                for span in spans:
                    obs, X = atlas.sample(*span)
                    writer.append(obs, X, ids)
                    bar.update(X.shape[0])
    return atlas
