"""Judge a generation-only change (sampler settings, no retraining) of a trained run the way the
demo would use it: the evaluator's own val guidance sweep (``Evaluation.guidance_sweep``: the
protocol's grid, lowest macro energy on the val studies), then the held-out cells of training
studies (``val_cells``) at the guidance that sweep chose, with the Gaussian, the copies and the
real-half ceiling beside the model. The run's own sampler is scored first, in the same process.

    python benchmarks/val_rule.py --run RUN --shards SHARDS --out benchmarks/results/val_rule.jsonl \\
        --variant heun:method=heun --variant euler50:steps=50

This is what the adoption rule written in session 15 reads (``val_rule_judge.py``; README, "guidance on
the first half of the path"):
over atlas seeds 0/1/2, (a) val studies at the chosen guidance: energy at most 2% higher and
cell-type identity at most 0.01 lower; (b) val cells at that guidance: lower energy; (c) val disease
identity at most 0.02 lower. ``--grid`` narrows the sweep for a quick screen (a screen's line says so).

One JSON line per (variant, set); the val-cells line carries each generator's macro metrics.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import asdict, replace

import yaml
from _measure import emit

KEEP = ("energy", "energy_u", "mmd", "mmd_u", "w2", "coverage", "identity_cell_type", "identity_tissue_general",
        "identity_disease", "diversity_means")
GENERATORS = ("real_half", "codec_roundtrip", "training_copies", "gaussian", "type_mean_nb", "model_canonical")


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    # split at the commas that start the next field=, so "interval=[0.5,1.0]" keeps its own
    kw = dict(item.split("=", 1) for item in re.split(r",(?=\w+=)", rest) if item)
    return name, {k: yaml.safe_load(v) for k, v in kw.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--out", default=None)
    p.add_argument("--variant", action="append", default=[], help="NAME:field=value,field=value (SamplerConfig)")
    p.add_argument("--grid", default=None, help="comma-separated guidances instead of the protocol's grid (screens)")
    p.add_argument("--cells-seeds", type=int, default=3, help="generation seeds on val cells (the test protocol's 3)")
    p.add_argument("--no-base", action="store_true", help="skip the run's own sampler")
    args = p.parse_args()

    from clopdit_dist.evaluate.evaluator import EvalConfig, Evaluation, HeldoutSet, read_cells
    from clopdit_dist.generate import CellGenerator

    cfg = EvalConfig(split="val", seeds=1, tiers=("canonical",), report=False)
    if args.grid:
        cfg.guidance_grid = tuple(float(w) for w in args.grid.split(","))
    gen = CellGenerator.from_run(args.run)
    ev = Evaluation(gen, args.shards, cfg, progress=False)
    studies = HeldoutSet("val studies", read_cells(args.shards, "val", ev.genes, 20_000), ev.train, ev.train_keys, cfg)
    cells = HeldoutSet("val cells", read_cells(args.shards, "val_cells", ev.genes, 20_000), ev.train,
                       ev.train_keys, cfg)
    base = gen.default_sampler
    variants = ([] if args.no_base else [("run_sampler", {})]) + [parse_variant(v) for v in args.variant]
    results: list[dict] = []
    for name, kw in variants:
        sampler = replace(base, **kw)
        ev.sampler = sampler  # what the evaluator generates this run's cells with
        sweep = ev.guidance_sweep(studies)
        w = sweep["chosen"]
        common = {"bench": "val_rule", "run": args.run, "variant": name, "sampler": asdict(sampler),
                  "grid": list(cfg.guidance_grid), "screen": bool(args.grid), "chosen_guidance": w}
        emit(args.out, results, **common, set="val_studies",
             sweep={g: {k: round(v[k], 4) for k in KEEP if k in v} for g, v in sweep["grid"].items()},
             **{k: sweep["grid"][str(w)][k] for k in KEEP if k in sweep["grid"].get(str(w), {})})
        res = ev.run_set(cells, w, args.cells_seeds, ("canonical",))
        emit(args.out, results, **common, set="val_cells", conditions=len(cells.conditions),
             seeds=args.cells_seeds,
             **{g: {k: round(res[g]["macro"][k]["mean"], 4) for k in KEEP if k in res[g]["macro"]}
                for g in GENERATORS if g in res})
        res = ev.run_set(studies, w, args.cells_seeds, ("canonical",))
        emit(args.out, results, **common, set="val_studies_parts", seeds=args.cells_seeds,
             **{part: {"conditions": sum(c["novel"] == (part == "new") for c in studies.conditions),
                       **{g: {k: round(res[g][key][k]["mean"], 4) for k in KEEP if k in res[g][key]}
                          for g in GENERATORS if g in res and res[g][key]}}
                for part, key in (("seen", "macro_seen"), ("new", "macro_novel"))})


if __name__ == "__main__":
    main()
