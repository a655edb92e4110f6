"""Issue 11's floors, per atlas seed and across seeds, from the demos' ``metrics.json`` files.

Each demo (``clopdit demo --out DIR --seed S``) synthesizes an atlas of its own seed, trains
every stage and scores the test studies and held-out cells with ``clopdit evaluate``. This
script only reads those files; every quantity is one that README's floors name, computed the
same way for every seed:

* identity: model (canonical prompts) over the real-half ceiling, per judge, macro over every
  held-out-study condition (``macro``) and over those some training study has (``macro_seen``);
* fidelity: held-out cells of training studies (``cells`` set, macro), the model against the
  per-condition Gaussian and the type mean + NB counts on MMD, energy, W2 (lower is better) and
  coverage; coverage over the real half's; beside them the real half, copies and the codec round
  trip against the same Gaussian, and every generator's unbiased energy and MMD (``energy_u``,
  ``mmd_u``, absolute);
* generalisation: held-out studies, seen conditions, the model over copies of training cells;
* diversity: decoded-mean diversity (already a ratio to real cells) beside the codec's own;
  coverage against the Gaussian's; AUC minus the copies' AUC;
* wording: reworded and free-form identity against canonical; tissue-only total variation;
  unseen combinations' cell-type and disease identity over their ceilings; where the run was
  scored with the ``assay`` tier, its identity over the ceiling and its energy, MMD and W2 over
  the copies' (studies) and the Gaussian's (cells), as references;
* memorisation ratio; rare-type F1 without and with generated cells (and with oversampled copies);
* val studies at the chosen guidance (cell-type identity, energy): not floors, the numbers a
  change of defaults is judged on;
* the earlier stages' floors from ``demo_summary.json`` (autoencoder gene-mean Pearson, CLOP
  zero-shot accuracy).

Across seeds: the mean with its 95% Student-t interval half-width, the lowest and the highest, and how many
seeds meet each floor.

    python benchmarks/seed_summary.py benchmarks/results/demo benchmarks/results/demo_seed1 \\
        benchmarks/results/demo_seed2 --out benchmarks/results/seed_summary.json
"""

from __future__ import annotations

import argparse
import json
import os

LOWER_IS_BETTER = ("mmd", "energy", "w2")


def _mean(block: dict, metric: str) -> float | None:
    v = block.get(metric) if block else None
    return None if v is None else float(v["mean"] if isinstance(v, dict) else v)


def _block(generators: dict, name: str, part: str) -> dict | None:
    """One generator's aggregate (``macro``, ``macro_seen``, ...), None where the set has none: a small atlas
    can leave a set without a condition of enough cells (8,000 cells: no training-study condition has 30
    held-out cells, so the fidelity set is empty)."""
    return (generators.get(name) or {}).get(part)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def floors(metrics: dict, summary: dict) -> dict[str, dict]:
    """name -> {"value": v, "floor": text, "met": bool} for one seed's demo."""
    S, C = metrics["sets"]["studies"]["generators"], metrics["sets"]["cells"]["generators"]
    out: dict[str, dict] = {}

    def put(name, value, floor, met=None):  # met=None: a reference beside a floor, not a floor
        out[name] = {"value": None if value is None else round(value, 4), "floor": floor,
                     "met": None if value is None or met is None else bool(met(value))}

    model, real = S.get("model_canonical", {}), S.get("real_half", {})
    for judge, need in (("cell_type", 0.95), ("tissue_general", 0.9), ("disease", 0.9)):
        for part in ("macro", "macro_seen"):
            put(f"identity_{judge}_{part}_over_ceiling",
                _ratio(_mean(model.get(part), f"identity_{judge}"), _mean(real.get(part), f"identity_{judge}")),
                f">= {need}", lambda v, n=need: v >= n)
    put("identity_cell_type_macro_codec_roundtrip_over_ceiling",
        _ratio(_mean(_block(S, "codec_roundtrip", "macro"), "identity_cell_type"),
               _mean(real.get("macro"), "identity_cell_type")),
        "(reference)")
    # references beside the tissue and cell-type floors: on a new study, what training-study cells of the right
    # condition score (the cell-type ones since session 27: at 50,000 cells they fail where the model fails)
    for judge in ("tissue_general", "cell_type"):
        for base in ("training_copies", "gaussian", "codec_roundtrip"):
            put(f"identity_{judge}_macro_seen_{base}_over_ceiling",
                _ratio(_mean(_block(S, base, "macro_seen"), f"identity_{judge}"),
                       _mean(real.get("macro_seen"), f"identity_{judge}")), "(reference)")
    # the canonical prompt naming the held-out cells' assay (the "assay" tier, session 25): beside the floors
    # above, which read canonical prompts, what the assay in the prompt changes
    if "model_assay" in S:
        for judge in ("cell_type", "tissue_general", "disease"):
            for part in ("macro", "macro_seen"):
                put(f"assay_tier_identity_{judge}_{part}_over_ceiling",
                    _ratio(_mean(_block(S, "model_assay", part), f"identity_{judge}"),
                           _mean(real.get(part), f"identity_{judge}")), "(reference)")
        for metric in LOWER_IS_BETTER:
            put(f"assay_tier_generalisation_{metric}_over_copies",
                _ratio(_mean(_block(S, "model_assay", "macro_seen"), metric),
                       _mean(_block(S, "training_copies", "macro_seen"), metric)),
                "(reference)")
            if "model_assay" in C:  # not where the cells set has no condition with an assay of its own to name
                put(f"assay_tier_fidelity_{metric}_over_gaussian",
                    _ratio(_mean(_block(C, "model_assay", "macro"), metric),
                           _mean(_block(C, "gaussian", "macro"), metric)),
                    "(reference)")
    for metric in (*LOWER_IS_BETTER, "coverage"):
        mine = _mean(_block(C, "model_canonical", "macro"), metric)
        for base in ("gaussian", "type_mean_nb"):
            other = _mean(_block(C, base, "macro"), metric)
            if mine is None or other is None:
                continue
            if metric in LOWER_IS_BETTER:
                put(f"fidelity_{metric}_over_{base}", mine / other, "< 1", lambda v: v < 1)
            else:
                put(f"fidelity_{metric}_over_{base}", mine / other, ">= 1", lambda v: v >= 1)
    # references beside the fidelity floors: a perfect model of the training cells (copies of them), the
    # codec's own ceiling (the held-out cells encoded and decoded) and the real half, against the same Gaussian
    for base in ("training_copies", "codec_roundtrip", "real_half"):
        for metric in LOWER_IS_BETTER:
            put(f"fidelity_{metric}_{base}_over_gaussian",
                _ratio(_mean(_block(C, base, "macro"), metric), _mean(_block(C, "gaussian", "macro"), metric)),
                "(reference)")
    # the unbiased (U-statistic) energy and MMD of every generator, absolute: they can be <= 0, so no ratio
    for metric in ("energy_u", "mmd_u"):
        for base in ("model_canonical", "real_half", "gaussian", "training_copies", "codec_roundtrip", "type_mean_nb"):
            put(f"fidelity_{metric}_{base}", _mean(_block(C, base, "macro"), metric), "(reference)")
        for base in ("model_canonical", "real_half", "training_copies", "codec_roundtrip"):
            put(f"generalisation_{metric}_{base}", _mean(_block(S, base, "macro_seen"), metric), "(reference)")
    put("fidelity_coverage_over_real_half", _ratio(_mean(_block(C, "model_canonical", "macro"), "coverage"),
                                                   _mean(_block(C, "real_half", "macro"), "coverage")),
        ">= 0.8", lambda v: v >= 0.8)
    seen = "macro_seen"
    for metric in (*LOWER_IS_BETTER, "coverage"):
        r = _ratio(_mean(model.get(seen), metric), _mean(_block(S, "training_copies", seen), metric))
        if metric in LOWER_IS_BETTER:
            put(f"generalisation_{metric}_over_copies", r, "<= 1.1", lambda v: v <= 1.1)
        else:
            put(f"generalisation_{metric}_over_copies", r, ">= 0.9", lambda v: v >= 0.9)
    put("decoded_mean_diversity", _mean(model.get(seen), "diversity_means"), "0.9 .. 1.1", lambda v: 0.9 <= v <= 1.1)
    put("decoded_mean_diversity_codec_ceiling", _mean(_block(S, "codec_roundtrip", seen), "diversity_means"),
        "(reference)")
    put("coverage_over_gaussian",
        _ratio(_mean(model.get(seen), "coverage"), _mean(_block(S, "gaussian", seen), "coverage")),
        ">= 1", lambda v: v >= 1)
    auc_model, auc_copies = _mean(model.get(seen), "auc"), _mean(_block(S, "training_copies", seen), "auc")
    put("auc_minus_copies", None if auc_model is None or auc_copies is None else auc_model - auc_copies, "<= 0.1",
        lambda v: v <= 0.1)
    canon = _mean(model.get(seen), "identity_cell_type")
    reworded = _mean(_block(S, "model_reworded", seen), "identity_cell_type")
    put("reworded_minus_canonical_identity", None if reworded is None or canon is None else reworded - canon,
        ">= -0.03", lambda v: v >= -0.03)
    put("freeform_over_canonical_identity",
        _ratio(_mean(_block(S, "model_freeform", seen), "identity_cell_type"), canon),
        ">= 0.8", lambda v: v >= 0.8)
    put("tissue_only_tv", metrics.get("field_subset", {}).get("mean_tv"), "<= 0.25", lambda v: v <= 0.25)
    if model.get("macro_novel"):
        for judge, need in (("cell_type", 0.9), ("disease", 0.8)):
            put(f"unseen_{judge}_over_ceiling", _ratio(_mean(model["macro_novel"], f"identity_{judge}"),
                                                       _mean(real.get("macro_novel"), f"identity_{judge}")),
                f">= {need}", lambda v, n=need: v >= n)
            # the latent space's own ceiling: real cells of the new combination encoded and decoded by the codec
            put(f"unseen_{judge}_codec_roundtrip_over_ceiling",
                _ratio(_mean(_block(S, "codec_roundtrip", "macro_novel"), f"identity_{judge}"),
                       _mean(real.get("macro_novel"), f"identity_{judge}")), "(reference)")
    for name, gens in (("studies", S), ("cells", C)):
        put(f"memorisation_{name}", _mean(_block(gens, "model_canonical", "macro"), "memorisation_ratio"), ">= 1",
            lambda v: v >= 1)
        for base in ("gaussian", "codec_roundtrip"):
            put(f"memorisation_{name}_{base}", _mean(_block(gens, base, "macro"), "memorisation_ratio"), "(reference)")
    aug = metrics.get("augmentation", {})
    if "real_only" in aug:
        before, after = aug["real_only"]["f1_rare_mean"], aug["plus_generated"]["f1_rare_mean"]
        put("augmentation_f1_gain", after - before, "> 0", lambda v: v > 0)
        # the same number of the rare types' own training cells added instead (oversampled copies)
        put("augmentation_f1_gain_copies", aug["plus_oversampled_copies"]["f1_rare_mean"] - before, "(reference)")
    sweep = metrics.get("guidance_sweep", {})
    chosen = sweep.get("grid", {}).get(str(float(sweep["chosen"]))) if "chosen" in sweep else None
    for metric in ("identity_cell_type", "energy"):  # val studies: where defaults are chosen, not a floor
        put(f"val_{metric}_at_chosen_guidance", chosen.get(metric) if chosen else None, "(reference)")
    put("ae_gene_mean_pearson", summary.get("ae", {}).get("gene_mean_pearson"), ">= 0.95", lambda v: v >= 0.95)
    put("clop_zero_shot_canonical", summary.get("clop", {}).get("zero_shot_canonical", {}).get("accuracy"),
        ">= 0.90", lambda v: v >= 0.90)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("demos", nargs="+", help="directories holding a demo's metrics.json and demo_summary.json")
    p.add_argument("--out", default=None, help="write the summary here (JSON)")
    args = p.parse_args()
    per_seed = {}
    for d in args.demos:
        with open(os.path.join(d, "metrics.json")) as f:
            metrics = json.load(f)
        summary_path = os.path.join(d, "demo_summary.json")
        summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
        per_seed[d] = floors(metrics, summary)
    names = list(next(iter(per_seed.values())))
    across = {}
    for name in names:
        rows = [s[name] for s in per_seed.values() if name in s and s[name]["value"] is not None]
        if not rows:
            continue
        values = [r["value"] for r in rows]
        across[name] = {"floor": rows[0]["floor"], "mean": round(sum(values) / len(values), 4),
                        "ci95": _t_half_width(values), "min": min(values), "max": max(values), "seeds": len(rows),
                        "seeds_met": None if rows[0]["met"] is None else sum(bool(r["met"]) for r in rows)}
    result = {"demos": args.demos, "per_seed": per_seed, "across_seeds": across}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    width = max(map(len, across))
    print(f"{'floor':<{width}}  {'need':>11}  {'mean':>7}  {'± 95%':>7}  {'min':>7}  {'max':>7}  met")
    for name, a in across.items():
        met = "-" if a["seeds_met"] is None else f"{a['seeds_met']}/{a['seeds']}"
        ci = "" if a["ci95"] is None else f"{a['ci95']:.3f}"
        print(f"{name:<{width}}  {a['floor']:>11}  {a['mean']:>7.3f}  {ci:>7}  {a['min']:>7.3f}  {a['max']:>7.3f}  {met}")


def _t_half_width(values: list[float]) -> float | None:
    """Half-width of the 95% Student-t interval of the mean over seeds (None for one seed)."""
    import numpy as np
    from scipy import stats

    if len(values) < 2:
        return None
    return round(float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values))), 4)


if __name__ == "__main__":
    main()
