"""Score a sampler variant of a trained run on the val studies, beside the run's own sampler:
how a generation-only change (no retraining) is judged before it becomes a default.

    python benchmarks/val_sampler.py --run RUN --shards SHARDS --name disease_shift \\
        --out benchmarks/results/sampler_val.jsonl disease_shift=true

Overrides are ``SamplerConfig`` fields (``clopdit_dist/models/flow.py``), values read as YAML.
Both samplers are scored by ``val_ablation.all_val_conditions`` (every val condition with >= 30
cells, guidance 1, generation seed 0; seen and unseen combinations apart). One JSON line per
(variant, generator, seen/unseen/all); the real half and the codec round trip once.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import yaml
from _measure import emit
from val_ablation import KEEP, all_val_conditions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--name", required=True, help="the variant's name in the output")
    p.add_argument("--out", default=None)
    p.add_argument("overrides", nargs="+", help="SamplerConfig field=value")
    args = p.parse_args()

    from clopdit_dist.generate import CellGenerator

    gen = CellGenerator.from_run(args.run)
    base = gen.default_sampler
    variant = replace(base, **{k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.overrides)})
    results: list[dict] = []
    for name, sampler in (("run_sampler", base), (args.name, variant)):
        gen.default_sampler = sampler
        for key, m in all_val_conditions(gen, args.shards).items():
            generator, part = key.split("/")
            if generator != "model_canonical" and name != "run_sampler":
                continue  # real cells and the codec do not depend on the sampler
            emit(args.out, results, bench="sampler_val", run=args.run, variant=name,
                 overrides=[] if sampler is base else args.overrides, guidance=1.0, generator=generator,
                 conditions_kind=part, conditions=m["conditions"], **{k: m[k] for k in KEEP if k in m})


if __name__ == "__main__":
    main()
