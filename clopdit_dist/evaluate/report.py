"""``report.md`` and its PNG plots from an evaluation's ``metrics.json``.

Plots: UMAP of real and generated cells (by cell type and by source), the guidance sweep
(fidelity against diversity and coverage), per-condition energy distance against the
baselines, and a marker-gene dot plot of real against generated cells.
"""

from __future__ import annotations

import os

import numpy as np

TABLE_METRICS = (("identity_cell_type", "type id", "↑"), ("identity_tissue_general", "tissue id", "↑"),
                 ("identity_disease", "disease id", "↑"), ("coverage", "coverage", "↑"),
                 ("precision", "precision", "↑"), ("mmd", "RBF MMD", "↓"), ("mmd_u", "MMD (unbiased)", "↓"),
                 ("energy", "energy", "↓"), ("energy_u", "energy (unbiased)", "↓"), ("w2", "W2", "↓"),
                 ("auc", "real/gen AUC", "→0.5"), ("diversity", "diversity", "→1"),
                 ("diversity_means", "decoded-mean diversity", "→codec"),
                 ("gene_mean_r2", "gene mean R²", "↑"), ("de_logfc_pearson", "DE logFC r", "↑"),
                 ("memorisation_ratio", "NN-dist ratio", "→1"))
GENERATOR_ORDER = ("real_half", "codec_roundtrip", "training_copies", "gaussian", "type_mean_nb", "unconditional",
                   "model_canonical", "model_reworded", "model_freeform", "model_type_only", "model_assay",
                   "model_markers")
LABELS = {"real_half": "real held-out cells, half vs half (ceiling)",
          "codec_roundtrip": "real half encoded and decoded by the run's codec (its ceiling)",
          "training_copies": "copies of training-study cells of the condition",
          "gaussian": "per-condition Gaussian in PCA space (training cells)",
          "type_mean_nb": "training type mean + NB counts",
          "unconditional": "the model, unconditional (null condition)",
          "model_canonical": "**the model, canonical prompt** (no markers)",
          "model_reworded": "the model, reworded prompt", "model_freeform": "the model, free-form sentence",
          "model_type_only": "the model, cell type only",
          "model_assay": "the model, canonical prompt naming the held-out cells' assay",
          "model_markers": "the model, training caption with markers"}


def _fmt(ci: dict | None) -> str:
    if not ci or ci.get("mean") is None or not np.isfinite(ci["mean"]):
        return "–"
    if ci.get("n", 1) > 1 and np.isfinite(ci.get("lo", np.nan)):
        return f"{ci['mean']:.3f} ± {(ci['hi'] - ci['lo']) / 2:.3f}"
    return f"{ci['mean']:.3f}"


def baseline_table(generators: dict, scope: str = "macro") -> str:
    """One row per generator, macro over conditions (``scope``: macro, macro_seen, macro_novel)."""
    names = [g for g in GENERATOR_ORDER if g in generators] + [g for g in generators if g not in GENERATOR_ORDER]
    names = [g for g in names if generators[g].get(scope)]
    head = "| generator | " + " | ".join(f"{label} {arrow}" for _, label, arrow in TABLE_METRICS) + " |"
    rows = [head, "|" + "---|" * (len(TABLE_METRICS) + 1)]
    for g in names:
        macro = generators[g][scope]
        rows.append(f"| {LABELS.get(g, g)} | " + " | ".join(_fmt(macro.get(k)) for k, _, _ in TABLE_METRICS) + " |")
    return "\n".join(rows)


def write_report(result: dict, ev, held: dict, out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    plots = {}
    try:
        plots["guidance"] = _guidance_plot(result, out_dir)
    except Exception as e:  # noqa: BLE001 - a plot that fails must not lose the metrics
        print(f"guidance plot skipped: {e}")
    if "studies" in held:
        hs = held["studies"]
        for name, fn in (("umap", _umap_plot), ("per_condition", _per_condition_plot), ("dotplot", _dot_plot)):
            try:
                plots[name] = fn(result, ev, hs, out_dir)
            except Exception as e:  # noqa: BLE001
                print(f"{name} plot skipped: {e}")
    lines = ["# Held-out evaluation", "",
             f"Run `{result['run']}`, codec `{result['codec']}`, split `{result['config']['split']}`, "
             f"{result['config']['seeds']} seeds (mean ± 95% t-interval half-width), sampler "
             f"{result['sampler']['method']} {result['sampler']['steps']} steps, guidance "
             f"{result['guidance_sweep']['chosen']} ({result['guidance_sweep']['rule']}).", ""]
    for set_name, s in result["sets"].items():
        if not s.get("cells"):
            continue
        novel = sum(c["novel"] for c in s["conditions"])
        lines += [f"## Held-out {set_name} (`{s['split']}`: {s['cells']} real cells, {len(s['conditions'])} conditions "
                  f"with ≥ {result['config']['min_cells']} cells, {novel} of them combinations no training study "
                  "has)", ""]
        if novel:
            lines += [f"Conditions some training study has ({len(s['conditions']) - novel}; every generator):", "",
                      baseline_table(s["generators"], "macro_seen"), "",
                      f"Combinations no training study has ({novel}; no training cells to copy or fit):", "",
                      baseline_table(s["generators"], "macro_novel"), ""]
        else:
            lines += [baseline_table(s["generators"], "macro_seen"), ""]
    if "field_subset" in result:
        fs = result["field_subset"]
        lines += ["## Tissue-only prompts", "",
                  f"Total-variation distance between the cell-type composition a tissue-only prompt yields (judge) "
                  f"and the real composition of that tissue: mean **{fs['mean_tv']:.3f}**.", "",
                  "| tissue | TV | tissue identity |", "|---|---|---|"]
        lines += [f"| {t} | {v['tv']:.3f} | {v['identity_tissue']:.2f} |" for t, v in fs["per_tissue"].items()]
        lines.append("")
    if "augmentation" in result:
        a = result["augmentation"]
        lines += ["## Rare-cell augmentation", "",
                  f"Logistic regression on the evaluation PCA, trained on training cells; F1 of the rarest types "
                  f"({', '.join(a['rare_types'])}) on held-out real cells, {a['added_per_type']} cells added per type.",
                  "", "| training set | mean F1 (rare types) |", "|---|---|"]
        lines += [f"| {k} | {a[k]['f1_rare_mean']:.3f} |" for k in ("real_only", "plus_oversampled_copies",
                                                                   "plus_generated")]
        lines.append("")
    for name, path in plots.items():
        lines += [f"![{name}]({os.path.basename(path)})", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def _guidance_plot(result, out_dir):
    import matplotlib.pyplot as plt

    grid = result["guidance_sweep"].get("grid")
    if not grid:
        raise ValueError("no sweep (guidance given)")
    ws = sorted(grid, key=float)
    x = [float(w) for w in ws]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(x, [grid[w]["identity_cell_type"] for w in ws], "o-", label="cell-type identity")
    ax[0].plot(x, [grid[w]["coverage"] for w in ws], "s-", label="coverage (k=5)")
    ax[0].plot(x, [grid[w]["diversity"] for w in ws], "^-", label="diversity ratio")
    ax[0].axvline(result["guidance_sweep"]["chosen"], color="grey", ls=":")
    ax[0].set_xlabel("guidance w")
    ax[0].legend()
    ax[0].set_title("val studies: fidelity vs diversity")
    ax[1].plot([grid[w]["diversity"] for w in ws], [grid[w]["identity_cell_type"] for w in ws], "o-")
    for w in ws:
        ax[1].annotate(w, (grid[w]["diversity"], grid[w]["identity_cell_type"]))
    ax[1].set_xlabel("diversity ratio (generated / real)")
    ax[1].set_ylabel("cell-type identity")
    ax[1].set_title("trade-off curve")
    fig.tight_layout()
    path = os.path.join(out_dir, "guidance_sweep.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sample_generated(result, ev, hs, n_conditions=8, n=100):
    """Canonical-prompt cells of the largest held-out conditions, at the chosen guidance."""
    from .prompts import tier_prompt

    w = result["guidance_sweep"]["chosen"]
    conds = hs.conditions[:n_conditions]
    return conds, list(zip(conds, ev.model_cells(hs, [tier_prompt(c, "canonical") for c in conds], [n] * len(conds),
                                                 w, 0)))


def _umap_plot(result, ev, hs, out_dir):
    import anndata as ad
    import matplotlib.pyplot as plt
    import scanpy as sc

    conds, parts = _sample_generated(result, ev, hs)
    keys = {c["cell_type"] + "|" + c["tissue_general"] + "|" + c["disease"] for c in conds}
    real_idx = np.flatnonzero(np.isin(hs.real_keys, list(keys)))
    emb = np.concatenate([hs.real_embed[real_idx]] + [cs.embed for _, cs in parts])
    types = np.concatenate([hs.real.meta["cell_type"][real_idx]] + [[c["cell_type"]] * len(cs) for c, cs in parts])
    source = ["real"] * len(real_idx) + ["generated"] * sum(len(cs) for _, cs in parts)
    a = ad.AnnData(obsm={"X_pca": emb.astype(np.float32)}, obs={"cell_type": types, "source": source})
    a.obs_names = [str(i) for i in range(a.n_obs)]
    sc.pp.neighbors(a, use_rep="X_pca", random_state=0)
    sc.tl.umap(a, random_state=0)
    fig, ax = plt.subplots(1, 2, figsize=(13, 5))
    sc.pl.umap(a, color="cell_type", ax=ax[0], show=False, title="cell type (real and generated)")
    sc.pl.umap(a, color="source", ax=ax[1], show=False, title="source")
    fig.tight_layout()
    path = os.path.join(out_dir, "umap.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    ev._report_parts = (conds, parts)
    return path


def _per_condition_plot(result, ev, hs, out_dir):
    import matplotlib.pyplot as plt

    gens = result["sets"]["studies"]["generators"]
    names = [g for g in ("real_half", "training_copies", "gaussian", "type_mean_nb", "model_canonical", "model_assay")
             if g in gens]
    labels = [f"{r['cell_type']}\n{r['tissue_general']}, {r['disease']}" for r in gens[names[0]]["per_condition"]]
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(labels)), 5))
    width = 0.8 / len(names)
    for i, g in enumerate(names):
        by_key = {(r["cell_type"], r["tissue_general"], r["disease"]): r["energy"] for r in gens[g]["per_condition"]}
        vals = [by_key.get((r["cell_type"], r["tissue_general"], r["disease"]), np.nan)
                for r in gens[names[0]]["per_condition"]]
        ax.bar(np.arange(len(labels)) + i * width, vals, width, label=g)
    ax.set_xticks(np.arange(len(labels)) + 0.4)
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_ylabel("energy distance to real half A (lower is better)")
    ax.set_title("held-out studies: per condition, seed 0")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "per_condition_energy.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _dot_plot(result, ev, hs, out_dir):
    import anndata as ad
    import matplotlib.pyplot as plt
    import scanpy as sc

    conds, parts = getattr(ev, "_report_parts", None) or _sample_generated(result, ev, hs)
    manifest_markers = ev.gen.run.manifest().data.get("markers", {})
    names = ev.gen.var["feature_name"].to_numpy()[hs.space.hvg]
    genes = []
    for c in conds:  # the top two markers of each type (manifest: training cells) that are HVGs here
        own = [m["feature_name"] for m in manifest_markers.get(c["cell_type"], [])]
        genes += [g for g in own if g in names and g not in genes][:2]
    keys = {c["cell_type"] + "|" + c["tissue_general"] + "|" + c["disease"]: c["cell_type"] for c in conds}
    real_idx = np.flatnonzero(np.isin(hs.real_keys, list(keys)))
    x = np.concatenate([hs.real_expr[real_idx]] + [cs.expr for _, cs in parts])
    group = np.concatenate([[f"{t} | real" for t in hs.real.meta["cell_type"][real_idx]]] +
                           [[f"{c['cell_type']} | generated"] * len(cs) for c, cs in parts])
    a = ad.AnnData(X=x, obs={"group": group})
    a.var_names = [str(n) for n in names]
    a.var_names_make_unique()
    a.obs["group"] = a.obs["group"].astype("category")
    dp = sc.pl.dotplot(a, var_names=[g for g in genes if g in a.var_names], groupby="group", show=False,
                       title="marker genes: real vs generated (held-out studies)")
    fig = next(iter(dp.values())).figure
    path = os.path.join(out_dir, "marker_dotplot.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
