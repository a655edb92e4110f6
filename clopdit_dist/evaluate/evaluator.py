"""``clopdit evaluate``: generated cells against real held-out cells, beside the ceiling and
the baselines, computed by the same code in the same run.

    clopdit evaluate --run RUN --shards SHARDS --out DIR [--split test] [--seeds 3]

Protocol (fixed before results were looked at; DESIGN.md "Evaluation contract"):

1. Two held-out sets, reported apart: ``studies`` (whole held-out studies of ``--split``:
   generalisation; a new study's batch effect is unknowable, so copies of training cells are
   the practical ceiling) and ``cells`` (``<split>_cells``: held-out cells of training
   studies: fidelity; the real-half ceiling is reachable).
2. Per set, an evaluation space fitted on its real cells (HVGs, log1p CP10k, PCA 50;
   :class:`~clopdit_dist.evaluate.metrics.EvalSpace`) and kNN judges (k=15) for cell type,
   tissue and disease trained on the same real cells.
3. Conditions: every (cell type, tissue, disease) of the set with at least ``min_cells``
   real cells; ``novel`` marks combinations no training study contains; ``assay`` is the most
   common assay of its real cells (what the ``assay`` prompt tier names; added in session 25).
4. Per condition and seed: the real cells are split in two halves; half A is the reference
   every generator is compared with, and every generator makes ``len(B)`` cells (at most
   ``max_cells``): half B itself (the ceiling), copies of training cells, the per-condition
   Gaussian, the type mean with NB counts, the unconditional model, and the model under
   each prompt tier.
5. Guidance is chosen on the ``val`` studies (canonical prompts, one seed) as the value of
   ``--guidance-grid`` with the lowest macro energy distance; the test split is then
   reported at that guidance, once.
6. Macro averages over conditions per seed; mean and 95% t-interval over seeds.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors
from tqdm.auto import tqdm

from ..data.conditions import CONDITION_FIELDS, condition_key
from ..data.loader import iter_split
from ..data.manifest import write_json_atomic
from ..errors import RunDirError, ShardError
from ..generate import CellGenerator, sampler_from
from . import metrics as M
from .baselines import CellSet, codec_roundtrip, condition_gaussian, real_half, training_copies, type_mean_nb
from .prompts import tier_prompt

FIELDS = CONDITION_FIELDS


@dataclass
class EvalConfig:
    split: str = "test"
    seeds: int = 3
    min_cells: int = 30  # a held-out condition needs this many real cells
    max_cells: int = 200  # generated cells per condition (and cap of each real half)
    max_conditions: int = 60  # per held-out set, largest first
    train_cells: int = 40_000  # training cells read for the baselines and memorisation
    guidance_grid: tuple[float, ...] = (0.0, 1.0, 1.5, 2.0, 3.0, 5.0)
    guidance: float | None = None  # skip the val sweep and use this
    tiers: tuple[str, ...] = ("canonical", "reworded", "freeform", "type_only", "assay")
    tier_seeds: int = 1  # seeds for the non-canonical tiers (canonical gets ``seeds``)
    steps: int | None = None  # sampler steps (default: the run's)
    method: str | None = None  # sampler method (default: the run's)
    noise: float | None = None  # SDE noise (default: the run's)
    interval: tuple[float, float] | None = None  # guidance interval (default: the run's)
    augmentation_types: int = 4  # rarest training cell types in the augmentation experiment
    report: bool = True
    # other runs on the same shards scored beside this one, "NAME=RUN_DIR" (e.g. the PCA-codec
    # ablation or CLOP-DiT's caption conditioning): canonical prompts, the same guidance and seeds
    compare: tuple[str, ...] = ()


@dataclass
class Cells:
    """Real cells of one split over the codec's genes, with their metadata."""

    counts: np.ndarray
    meta: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def keys(self) -> np.ndarray:
        return np.array([condition_key(dict(zip(FIELDS, v))) for v in zip(*(self.meta[f] for f in FIELDS))])


def read_cells(shards: str, split: str, genes: list[str], max_cells: int) -> Cells:
    parts, meta = [], {f: [] for f in (*FIELDS, "dataset_id", "assay")}
    for batch in iter_split(shards, split, genes, max_cells, batch_size=2048, fields=tuple(meta)):
        parts.append(batch["counts"].numpy())
        for f in meta:
            meta[f] += list(batch[f])
    counts = np.concatenate(parts) if parts else np.zeros((0, len(genes)), np.float32)
    return Cells(counts[:max_cells], {f: np.asarray(v)[:max_cells] for f, v in meta.items()})


def baseline_rng(seed: int, index: int) -> np.random.Generator:
    """The draws of every baseline (and the codec round trip) for condition ``index`` of a held-out set at
    evaluation seed ``seed``: scripts that rescore the evaluator's baselines use it to get the same cells."""
    return np.random.default_rng([seed, 17, index])


def _condition_table(cells: Cells, train_keys: set[str], min_cells: int, max_conditions: int) -> list[dict]:
    keys, counts = np.unique(cells.keys, return_counts=True)
    assays = cells.meta.get("assay", np.full(len(cells.keys), ""))
    rows = [{**dict(zip(FIELDS, k.split("|"))), "n_real": int(n), "novel": k not in train_keys,
             "assay": Counter(assays[cells.keys == k].tolist()).most_common(1)[0][0]}
            for k, n in zip(keys, counts) if n >= min_cells]
    return sorted(rows, key=lambda r: -r["n_real"])[:max_conditions]


class HeldoutSet:
    """One held-out set: its real cells, evaluation space, judges and conditions."""

    def __init__(self, name: str, real: Cells, train: Cells, train_keys: set[str], cfg: EvalConfig):
        self.name, self.real, self.cfg = name, real, cfg
        self.space = M.EvalSpace(real.counts)
        self.real_expr = self.space.expr(real.counts)  # each condition's reference half reads it many times
        self.real_embed = self.space.embed_expr(self.real_expr)
        self.judges = {f: M.KNNJudge(self.real_embed, real.meta[f]) for f in FIELDS}
        self.bandwidths = M.mmd_bandwidths(self.real_embed)
        self.conditions = _condition_table(real, train_keys, cfg.min_cells, cfg.max_conditions)
        self.real_keys = real.keys
        self.train = train
        self.train_embed = self.space.embed(train.counts)
        self.train_index = NearestNeighbors(n_neighbors=1).fit(self.train_embed.astype(np.float64))

    def halves(self, meta: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.flatnonzero(self.real_keys == condition_key(meta))
        idx = np.random.default_rng([seed, len(idx)]).permutation(idx)
        h = len(idx) // 2
        return idx[:h][: self.cfg.max_cells], idx[h:][: self.cfg.max_cells]

    def score(self, meta: dict, ref_idx: np.ndarray, gen: CellSet, memorisation: bool = False) -> dict:
        """Every metric of one generated set against the reference half of its condition."""
        ref_e, ref_x = self.real_embed[ref_idx], self.real_expr[ref_idx]
        out = {}
        for f in FIELDS:
            ident = self.judges[f].identity(gen.embed, meta[f])
            out[f"identity_{f}"], out[f"f1_{f}"] = ident["accuracy"], ident["macro_f1"]
        out.update(M.prdc(ref_e, gen.embed, k=min(5, len(ref_e) - 1)))
        out["mmd"] = M.mmd_rbf(ref_e, gen.embed, self.bandwidths)
        out["mmd_u"] = M.mmd_rbf(ref_e, gen.embed, self.bandwidths, unbiased=True)
        out["energy"] = M.energy_distance(ref_e, gen.embed)
        out["energy_u"] = M.energy_distance(ref_e, gen.embed, unbiased=True)
        out["w2"] = M.wasserstein2(ref_e, gen.embed)
        out["auc"] = M.classifier_auc(ref_e, gen.embed, k=min(15, len(ref_e) // 2))
        out["diversity"] = M.diversity_ratio(gen.embed, ref_e)
        out.update({f"gene_{k}": v for k, v in M.gene_moments(ref_x, gen.expr).items()})
        out["corr_distance"] = M.correlation_distance(ref_x, gen.expr)
        rest = self.real_keys != condition_key(meta)
        if rest.any():
            rest_x = self.real_expr[np.flatnonzero(rest)[:2000]]
            de = M.de_concordance(np.concatenate([ref_x, rest_x]),
                                  np.r_[np.ones(len(ref_x), bool), np.zeros(len(rest_x), bool)],
                                  gen.expr, np.ones(len(gen.expr), bool), True, gen_rest=rest_x)
            out["de_logfc_pearson"], out["de_top50_jaccard"] = de["logfc_pearson"], de["top_jaccard"]
        if memorisation:
            mem = M.memorisation(gen.embed, ref_e, self.train_index)
            out["memorisation_ratio"], out["p_gen_closer"] = mem["ratio"], mem["p_gen_closer"]
        if gen.mean_embed is not None:
            out["diversity_means"] = M.diversity(gen.mean_embed) / max(M.diversity(ref_e), 1e-12)
        return out


def _macro(rows: list[dict]) -> dict:
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return {k: float(np.nanmean([r.get(k, np.nan) for r in rows])) for k in keys}


class Evaluation:
    """A generator (a trained run) and the training cells the baselines are built from."""

    def __init__(self, gen: CellGenerator, shards: str, cfg: EvalConfig, progress: bool = True):
        self.cfg, self.shards, self.progress = cfg, shards, progress
        self.gen = gen
        self.codec = self.gen.codec
        self.genes = self.codec.genes
        self.train = read_cells(shards, "train", self.genes, cfg.train_cells)
        self.train_key_of_cell = self.train.keys
        self.train_keys = set(self.train_key_of_cell)
        self.theta = self._dispersion()
        self.sampler = sampler_from(self.gen.default_sampler, steps=cfg.steps, method=cfg.method, noise=cfg.noise,
                                    interval=None if cfg.interval is None else tuple(cfg.interval))
        self.compare = {}
        for item in cfg.compare:
            name, _, path = item.partition("=")
            other = CellGenerator.from_run(path)
            if other.codec.genes != self.genes:
                raise RunDirError(f"--compare {item}: its codec reads other genes than {gen.run.root}'s; compare runs "
                                  "trained on the same shards with the same gene selection")
            self.compare[name] = other

    def _dispersion(self) -> np.ndarray:
        with torch.no_grad():
            z = self.codec.encode(torch.from_numpy(self.train.counts[:256]))
            return self.codec.decode(z, torch.ones(len(z)))["theta"][0].cpu().numpy()

    # ---------------------------------------------------------------- generation
    def model_cells(self, hs: HeldoutSet, prompts: list[str], sizes: list[int], guidance: float,
                    seed: int, gen: CellGenerator | None = None,
                    interval: tuple[float, float] | None = None) -> list[CellSet]:
        """A model's cells (this run's, or ``gen``'s) for several prompts in one batched run:
        ``sizes[i]`` cells of ``prompts[i]``; ``interval`` replaces the sampler's guidance interval."""
        own = gen is None or gen is self.gen
        gen = gen or self.gen
        sampler = sampler_from(self.sampler if own else gen.default_sampler, steps=self.cfg.steps, guidance=guidance,
                               interval=interval)
        adata = gen.generate(prompts, n=sizes, sampler=sampler, seed=seed, strict=False)  # unresolved: marginal
        counts = adata.X.toarray().astype(np.float32)
        z = torch.from_numpy(np.asarray(adata.obsm["X_latent"]))
        with torch.no_grad():
            mu = gen.codec.decode(z, torch.from_numpy(adata.obs["library_size"].to_numpy(np.float32)))["mu"]
        mean_embed = hs.space.embed(mu.cpu().numpy())
        out, start = [], 0
        for m in sizes:  # generate() returns each prompt's cells as one block, in prompt order
            rows = slice(start, start + m)
            start += m
            out.append(CellSet.from_counts(hs.space, counts[rows], mean_embed=mean_embed[rows]))
        return out

    def baselines(self, hs: HeldoutSet, meta: dict, b_idx: np.ndarray, n: int, rng) -> dict[str, CellSet | None]:
        in_cond = self.train_key_of_cell == condition_key(meta)
        of_type = self.train.meta["cell_type"] == meta["cell_type"]
        libs = self.train.counts[in_cond].sum(1) if in_cond.any() else self.train.counts[of_type].sum(1)
        return {"real_half": real_half(hs.space, hs.real.counts[b_idx]),
                "codec_roundtrip": codec_roundtrip(hs.space, self.codec, hs.real.counts[b_idx], rng),
                "training_copies": training_copies(hs.space, self.train.counts[in_cond], n, rng),
                "gaussian": condition_gaussian(hs.space, hs.train_embed[in_cond], n, rng),
                "type_mean_nb": type_mean_nb(hs.space, self.train.counts[of_type], libs, self.theta, n, rng)}

    # ---------------------------------------------------------------- one held-out set
    def run_set(self, hs: HeldoutSet, guidance: float, seeds: int, tiers, with_baselines: bool = True,
                desc: str = "") -> dict:
        per_seed: dict[str, list[list[dict]]] = {}
        conds = hs.conditions
        if not conds:
            return {}
        for seed in tqdm(range(seeds), desc=desc or hs.name, disable=not self.progress or seeds == 1):
            halves = [hs.halves(meta, seed) for meta in conds]
            sizes = [len(b) for _, b in halves]
            model: dict[str, list[CellSet]] = {}
            for tier in tiers:
                if tier == "canonical" or seed < self.cfg.tier_seeds:
                    model[f"model_{tier}"] = self.model_cells(hs, [tier_prompt(m, tier) for m in conds], sizes,
                                                              guidance, seed)
            if with_baselines:
                canonical = [tier_prompt(m, "canonical") for m in conds]
                # the null model: guidance 0 on the whole path. Inside a guidance interval alone (the default
                # sampler's) guidance 0 is the null branch up to the interval's end and the prompt after it.
                model["unconditional"] = self.model_cells(hs, canonical, sizes, 0.0, seed, interval=(0.0, 1.0))
                for name, other in self.compare.items():
                    model[f"model_{name}"] = self.model_cells(hs, canonical, sizes, guidance, seed, other)
            for i, (meta, (a_idx, b_idx)) in enumerate(zip(conds, halves)):
                rng = baseline_rng(seed, i)
                sets = self.baselines(hs, meta, b_idx, len(b_idx), rng) if with_baselines else {}
                sets.update({name: cells[i] for name, cells in model.items()})
                for name, cs in sets.items():
                    if cs is None:
                        continue
                    row = {**meta, **hs.score(meta, a_idx, cs, memorisation=name in (
                        "training_copies", "model_canonical", "real_half", "gaussian", "type_mean_nb",
                        "codec_roundtrip"))}
                    per_seed.setdefault(name, [[] for _ in range(seeds)])[seed].append(row)
        def over_seeds(by_seed, keep) -> dict:
            macros = [_macro([r for r in rows if keep(r)]) for rows in by_seed if any(keep(r) for r in rows)]
            keys = sorted({k for m in macros for k in m})
            return {k: M.mean_ci([m.get(k, np.nan) for m in macros]) for k in keys}

        # "macro": every condition the generator has cells for (the copy and Gaussian baselines
        # have none for combinations no training study contains); "macro_seen" / "macro_novel":
        # the conditions with / without training cells, the same set for every generator
        out = {}
        for name, by_seed in per_seed.items():
            out[name] = {"macro": over_seeds(by_seed, lambda r: True),
                         "macro_seen": over_seeds(by_seed, lambda r: not r["novel"]),
                         "macro_novel": over_seeds(by_seed, lambda r: r["novel"]),
                         "per_condition": by_seed[0]}
        return out

    # ---------------------------------------------------------------- the whole protocol
    def guidance_sweep(self, val: HeldoutSet | None = None) -> dict:
        """The protocol's guidance choice on the val studies (``val``: that set, if already built)."""
        if val is None:
            val = HeldoutSet("val studies", read_cells(self.shards, "val", self.genes, 20_000), self.train,
                             self.train_keys, self.cfg)
        rows = {}
        for w in tqdm(self.cfg.guidance_grid, desc="guidance sweep on val", disable=not self.progress):
            res = self.run_set(val, w, 1, ("canonical",), with_baselines=False)
            if res:
                rows[str(w)] = {k: v["mean"] for k, v in res["model_canonical"]["macro"].items()}
        if not rows:  # no val condition has min_cells cells
            return {"rule": "the run's sampler guidance (no val condition to sweep on)", "grid": {},
                    "chosen": float(self.sampler.guidance)}
        best = min(rows, key=lambda w: rows[w]["energy"])
        return {"rule": "lowest macro energy distance on val studies, canonical prompts, seed 0",
                "grid": rows, "chosen": float(best)}

    def field_subset(self, hs: HeldoutSet, guidance: float) -> dict:
        """Tissue-only prompts: the cell-type composition they yield (by the judge) against
        the real composition of that tissue in the held-out set."""
        out = {}
        for tissue in sorted(set(hs.real.meta["tissue_general"])):
            real_types = hs.real.meta["cell_type"][hs.real.meta["tissue_general"] == tissue]
            if len(real_types) < self.cfg.min_cells:
                continue
            meta = {"cell_type": "", "tissue_general": tissue, "disease": ""}
            cs = self.model_cells(hs, [tier_prompt(meta, "tissue_only")], [self.cfg.max_cells], guidance, 0)[0]
            pred = hs.judges["cell_type"].predict(cs.embed)
            real_p = dict(zip(*np.unique(real_types, return_counts=True)))
            gen_p = dict(zip(*np.unique(pred, return_counts=True)))
            out[tissue] = {"tv": M.total_variation(real_p, gen_p),
                           "identity_tissue": float(np.mean(hs.judges["tissue_general"].predict(cs.embed) == tissue)),
                           "real": {k: int(v) for k, v in real_p.items()},
                           "generated": {k: int(v) for k, v in gen_p.items()}}
        return {"per_tissue": out, "mean_tv": float(np.mean([v["tv"] for v in out.values()])) if out else float("nan")}

    def augmentation(self, hs: HeldoutSet, guidance: float) -> dict:
        """The seed paper's rare-cell experiment: a cell-type classifier (logistic regression
        on the evaluation PCA) trained on training cells, alone or with generated cells of
        the rarest training types (or with those types' training cells oversampled); F1 of
        each rare type on the held-out real cells."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import f1_score

        types, counts = np.unique(self.train.meta["cell_type"], return_counts=True)
        held = set(hs.real.meta["cell_type"])
        by_size = [t for t, _ in sorted(zip(types, counts), key=lambda tc: tc[1]) if t in held]
        rare = by_size[: self.cfg.augmentation_types]
        x, y = hs.train_embed, self.train.meta["cell_type"]
        n_add = 200
        extra_copy = []
        rng = np.random.default_rng(0)
        prompts = [tier_prompt({"cell_type": t, "tissue_general": "", "disease": ""}, "type_only") for t in rare]
        extra_gen = [cs.embed for cs in self.model_cells(hs, prompts, [n_add] * len(rare), guidance, 0)]
        for t in rare:
            extra_copy.append(x[rng.choice(np.flatnonzero(y == t), n_add)])
        yr = np.repeat(rare, n_add)
        variants = {"real_only": (x, y), "plus_generated": (np.concatenate([x, *extra_gen]), np.concatenate([y, yr])),
                    "plus_oversampled_copies": (np.concatenate([x, *extra_copy]), np.concatenate([y, yr]))}
        out = {"rare_types": rare, "added_per_type": n_add}
        for name, (xt, yt) in variants.items():
            clf = LogisticRegression(max_iter=300).fit(xt, yt)
            pred = clf.predict(hs.real_embed)
            f1 = f1_score(hs.real.meta["cell_type"], pred, labels=rare, average=None, zero_division=0)
            out[name] = {"f1_per_type": dict(zip(rare, map(float, f1))), "f1_rare_mean": float(np.mean(f1))}
        return out


def evaluate_run(run: str, shards: str, out_dir: str, cfg: EvalConfig | None = None, progress: bool = True) -> dict:
    cfg = cfg or EvalConfig()
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    ev = Evaluation(CellGenerator.from_run(run), shards, cfg, progress)
    sweep = {"chosen": cfg.guidance, "rule": "given with --guidance"} if cfg.guidance is not None \
        else ev.guidance_sweep()
    w = sweep["chosen"]
    result = {"run": os.path.abspath(run), "shards": os.path.abspath(shards), "config": asdict(cfg),
              "codec": ev.codec.name, "sampler": asdict(sampler_from(ev.sampler, guidance=w)),
              "guidance_sweep": sweep, "sets": {}}
    held = {}
    for name, split in (("studies", cfg.split), ("cells", f"{cfg.split}_cells")):
        try:
            real = read_cells(shards, split, ev.genes, 20_000)
        except ShardError:  # shards built before the held-out-cells split existed
            real = Cells(np.zeros((0, len(ev.genes)), np.float32))
        if len(real.counts) == 0:
            result["sets"][name] = {"split": split, "cells": 0}
            continue
        hs = HeldoutSet(name, real, ev.train, ev.train_keys, cfg)
        held[name] = hs
        res = ev.run_set(hs, w, cfg.seeds, cfg.tiers)
        result["sets"][name] = {"split": split, "cells": int(len(real.counts)), "conditions": hs.conditions,
                                "generators": res}
    if "studies" in held:
        result["field_subset"] = ev.field_subset(held["studies"], w)
        result["augmentation"] = ev.augmentation(held["studies"], w)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(os.path.join(out_dir, "metrics.json"), result)
    if cfg.report:
        from .report import write_report

        write_report(result, ev, held, out_dir)
    return result


def summary(generators: dict) -> dict:
    """{generator: {metric: mean over seeds}}: the compact form a training run logs."""
    return {g: {k: v["mean"] for k, v in res["macro"].items()} for g, res in generators.items()}


def identity_per_condition(generator_result: dict) -> dict[str, float]:
    """{condition key: cell-type identity} of one generator's ``run_set`` result (seed 0)."""
    return {condition_key(c): round(c["identity_cell_type"], 4) for c in generator_result["per_condition"]}


def quick_evaluation(gen: CellGenerator, shards: str, split: str, guidance: float, max_conditions: int,
                     max_cells: int) -> dict:
    """The end-of-training check of the DiT stage: the same scoring as ``clopdit evaluate`` on
    one held-out set (``split`` studies), one seed, canonical and reworded prompts, the
    real-half ceiling and the Gaussian baseline beside them, at the configured guidance."""
    cfg = EvalConfig(split=split, seeds=1, max_conditions=max_conditions, max_cells=max_cells,
                     tiers=("canonical", "reworded"), guidance=guidance, report=False)
    ev = Evaluation(gen, shards, cfg, progress=False)
    hs = HeldoutSet(split, read_cells(shards, split, ev.genes, 20_000), ev.train, ev.train_keys, cfg)
    res = ev.run_set(hs, guidance, 1, cfg.tiers)
    keep = ("real_half", "gaussian", "training_copies", "model_canonical", "model_reworded")
    return {"split": split, "guidance": guidance, "conditions": len(hs.conditions),
            **summary({g: res[g] for g in keep if g in res}),
            "model_canonical_identity_per_condition": identity_per_condition(res["model_canonical"])}
