"""Does the fidelity comparison measure the generators, or the evaluation space and estimator?

``clopdit evaluate`` scores the held-out cells of training studies (``<split>_cells``) in a PCA
fitted on those very cells, with the V-statistic energy distance. Both choices can favour a
generator with less spread than real cells when the halves are small (15-100 cells here): the
PCA captures the held-out cells' own noise, so any other sample (copies, the Gaussian, the
model) projects with less spread than the real half; and the V form charges each set about its
own mean pairwise distance over its size. This scores the same generators, halves and seeds in
two spaces, with both estimators:

* ``official``: the evaluator's space (:class:`~clopdit_dist.evaluate.metrics.EvalSpace` on the
  held-out cells);
* ``train_fit``: the same construction fitted on training cells only, so the real half is as
  much out of sample as every generator;

and per generator the macro (over conditions, mean over seeds) V energy, U energy
(``energy_distance(..., unbiased=True)``) and diversity ratio to half A.
The Gaussian is refitted in each space on the condition's training cells. Nothing here changes
how ``clopdit evaluate`` scores.

    python benchmarks/fidelity_space.py --run RUN --shards SHARDS --guidance 0 --interval 0,0.35 \\
        --sampler sde --noise 1.5 --name pu45_i35_thmom_s0 --out benchmarks/results/fidelity_space.jsonl
"""

from __future__ import annotations

import argparse

import numpy as np
from _measure import emit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--guidance", type=float, required=True, help="the guidance the evaluation chose on val")
    p.add_argument("--sampler", default=None)
    p.add_argument("--noise", type=float, default=None)
    p.add_argument("--interval", default=None, help="LO,HI")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train-fit-cells", type=int, default=20_000)
    p.add_argument("--name", required=True)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from clopdit_dist.data.conditions import condition_key
    from clopdit_dist.evaluate import metrics as M
    from clopdit_dist.evaluate.baselines import condition_gaussian
    from clopdit_dist.evaluate.evaluator import EvalConfig, Evaluation, HeldoutSet, baseline_rng, read_cells
    from clopdit_dist.evaluate.prompts import tier_prompt
    from clopdit_dist.generate import CellGenerator

    interval = None if args.interval is None else tuple(float(v) for v in args.interval.split(","))
    cfg = EvalConfig(split=args.split, seeds=args.seeds, method=args.sampler, noise=args.noise, interval=interval,
                     report=False)  # the evaluator's defaults otherwise (max_cells, min_cells, train_cells)
    ev = Evaluation(CellGenerator.from_run(args.run), args.shards, cfg, progress=False)
    real = read_cells(args.shards, f"{args.split}_cells", ev.genes, 20_000)
    hs = HeldoutSet("cells", real, ev.train, ev.train_keys, cfg)
    spaces = {"official": hs.space, "train_fit": M.EvalSpace(ev.train.counts[: args.train_fit_cells])}
    train_embed = {name: space.embed(ev.train.counts) for name, space in spaces.items()}
    conds = hs.conditions
    per_seed: dict[tuple[str, str], list[list[dict]]] = {}
    for seed in range(args.seeds):
        halves = [hs.halves(m, seed) for m in conds]
        model = ev.model_cells(hs, [tier_prompt(m, "canonical") for m in conds], [len(b) for _, b in halves],
                               args.guidance, seed)  # the evaluator's own batch and seed: the same cells
        for i, (meta, (a, b)) in enumerate(zip(conds, halves)):
            # the evaluator's baselines with its draws, so the official space reproduces metrics.json
            sets = ev.baselines(hs, meta, b, len(b), baseline_rng(seed, i))
            sets["model_canonical"] = model[i]
            in_cond = ev.train_key_of_cell == condition_key(meta)
            for space_name, space in spaces.items():
                if space_name == "official":
                    ref, embeds = hs.real_embed[a], {g: cs.embed for g, cs in sets.items() if cs is not None}
                else:
                    ref = space.embed(real.counts[a])
                    embeds = {g: space.embed(cs.counts) for g, cs in sets.items()
                              if cs is not None and cs.counts is not None}
                    gauss = condition_gaussian(space, train_embed[space_name][in_cond], len(b),
                                               np.random.default_rng([seed, 18, i]))
                    if gauss is not None:
                        embeds["gaussian"] = gauss.embed
                for g, e in embeds.items():
                    per_seed.setdefault((space_name, g), [[] for _ in range(args.seeds)])[seed].append(
                        {"energy": M.energy_distance(ref, e), "energy_u": M.energy_distance(ref, e, unbiased=True),
                         "diversity": M.diversity_ratio(e, ref)})
    results: list[dict] = []
    for (space_name, g), by_seed in per_seed.items():
        macros = [{k: float(np.mean([r[k] for r in rows])) for k in rows[0]} for rows in by_seed]
        emit(args.out, results, bench="fidelity_space", name=args.name, run=args.run, split=f"{args.split}_cells",
             space=space_name, generator=g, conditions=len(conds), seeds=args.seeds, guidance=args.guidance,
             **{k: M.mean_ci([m[k] for m in macros]) for k in macros[0]})


if __name__ == "__main__":
    main()
