"""Where a run's distance to real cells comes from: the DiT, the codec, or the library sizes.

On every seen condition (a combination training studies have, >= 30 cells) of one held-out
split, each real condition is split in halves A and B as ``clopdit evaluate`` splits it, and
energy distances to half A are taken

* in the DiT's standardised latent: half B encoded (the ceiling), the model's latents
  (canonical prompt, guidance 1), and a Gaussian fitted on the condition's training latents
  (Ledoit-Wolf): does the DiT model the latent as well as a per-condition Gaussian does?
* in the evaluation space (PCA of log1p CP10k, as ``clopdit evaluate``): half B's latents
  decoded with B's own library sizes (the codec round trip), the same latents with the library
  sizes the generator drew for the model's cells, the latent Gaussian decoded, the model's
  cells, and the Gaussian in PCA space (the round trip and that Gaussian by the evaluator's own
  ``evaluate/baselines.py``): what do the decoder and the library sizes cost beyond the latent?

With ``--atlas-seed`` (an embedded synthetic atlas, whose true parameters are known) one more
line compares the codec's per-gene NB inverse dispersion with the atlas's.

    python benchmarks/fidelity_gap.py --run runs/demo/run --shards runs/demo/shards --split val \\
        --atlas-seed 0 --name demo_s0 --out benchmarks/results/fidelity_gap.jsonl
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch
from _measure import emit


def split_energies(gen, shards: str, split: str, seed: int = 0) -> dict:
    from sklearn.covariance import LedoitWolf

    from clopdit_dist.evaluate import metrics as M
    from clopdit_dist.evaluate.baselines import codec_roundtrip, condition_gaussian
    from clopdit_dist.evaluate.evaluator import EvalConfig, Evaluation, HeldoutSet, condition_key, read_cells
    from clopdit_dist.evaluate.prompts import tier_prompt

    cfg = EvalConfig(split=split, seeds=1, max_conditions=40, max_cells=150, tiers=("canonical",), report=False)
    ev = Evaluation(gen, shards, cfg, progress=False)
    hs = HeldoutSet(split, read_cells(shards, split, ev.genes, 20_000), ev.train, ev.train_keys, cfg)
    conds = [c for c in hs.conditions if not c["novel"]]
    halves = [hs.halves(m, seed) for m in conds]
    sizes = [len(b) for _, b in halves]
    cells = gen.generate([tier_prompt(m, "canonical") for m in conds], n=sizes,
                         sampler=replace(gen.default_sampler, guidance=1.0), seed=seed, strict=False)
    mean, std = gen.dit.latent_mean.numpy(), gen.dit.latent_std.numpy()
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)

    def encode(counts):
        with torch.no_grad():
            return gen.codec.encode(torch.from_numpy(counts)).numpy()

    def decode(z, lib):
        with torch.no_grad():
            return gen.codec.sample(torch.from_numpy(np.asarray(z, np.float32)),
                                    torch.from_numpy(np.asarray(lib, np.float32)), generator=g).numpy()

    def gaussian(x, n):
        return rng.multivariate_normal(x.mean(0), LedoitWolf().fit(x).covariance_, size=n)

    z_train = (encode(ev.train.counts) - mean) / std
    rows, start = [], 0
    for meta, (a, b), n in zip(conds, halves, sizes):
        rows_gen = slice(start, start + n)
        start += n
        z_gen = (np.asarray(cells.obsm["X_latent"][rows_gen]) - mean) / std
        lib_gen = cells.obs["library_size"].to_numpy(np.float32)[rows_gen]
        za, zb = ((encode(hs.real.counts[i]) - mean) / std for i in (a, b))
        in_cond = ev.train_key_of_cell == condition_key(meta)
        z_gauss = gaussian(z_train[in_cond], n)
        ref, counts_b = hs.real_embed[a], hs.real.counts[b]
        embed = hs.space.embed
        rows.append({
            "latent_real_half": M.energy_distance(za, zb),
            "latent_model": M.energy_distance(za, z_gen),
            "latent_gaussian": M.energy_distance(za, z_gauss),
            "real_half": M.energy_distance(ref, hs.real_embed[b]),
            "codec_roundtrip": M.energy_distance(ref, codec_roundtrip(hs.space, gen.codec, counts_b, rng).embed),
            "codec_roundtrip_model_libraries": M.energy_distance(ref, embed(decode(zb * std + mean, lib_gen))),
            "latent_gaussian_decoded": M.energy_distance(ref, embed(decode(z_gauss * std + mean, lib_gen))),
            "model": M.energy_distance(ref, embed(cells.X[rows_gen].toarray().astype(np.float32))),
            "pca_gaussian": M.energy_distance(ref, condition_gaussian(hs.space, hs.train_embed[in_cond], n, rng).embed),
            "log_library_real_minus_model": float(np.log(counts_b.sum(1)).mean() - np.log(lib_gen).mean()),
        })
    return {"conditions": len(rows), **{k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]}}


def dispersion_check(gen, atlas_seed: int) -> dict:
    """The codec's per-gene NB inverse dispersion against the synthetic atlas's true one."""
    from clopdit_dist.data.synthetic import SynthConfig, SyntheticAtlas

    atlas = SyntheticAtlas(SynthConfig(seed=atlas_seed))
    index = {f: i for i, f in enumerate(atlas.var["feature_id"])}
    true = atlas.theta[[index[f] for f in gen.codec.genes]]
    est = gen.codec.model.log_theta.detach().exp().numpy()
    ratio = est / true
    return {"genes": len(true), "log_theta_pearson": round(float(np.corrcoef(np.log(true), np.log(est))[0, 1]), 4),
            **{f"theta_ratio_q{int(q * 100)}": round(float(np.quantile(ratio, q)), 4) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--split", default="val", help="comma-separated held-out splits (val studies, val_cells)")
    p.add_argument("--atlas-seed", type=int, default=None, help="the embedded atlas's seed, for the dispersion check")
    p.add_argument("--name", required=True)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from clopdit_dist.generate import CellGenerator

    gen = CellGenerator.from_run(args.run)
    results: list[dict] = []
    for split in args.split.split(","):
        emit(args.out, results, bench="fidelity_gap", name=args.name, run=args.run, split=split,
             **split_energies(gen, args.shards, split))
    if args.atlas_seed is not None and gen.codec.name == "autoencoder":
        emit(args.out, results, bench="fidelity_gap_dispersion", name=args.name, run=args.run,
             atlas_seed=args.atlas_seed, **dispersion_check(gen, args.atlas_seed))


if __name__ == "__main__":
    main()
