"""``clopdit <verb>``: the command line. Launchers in ``launchers/`` are thin files over this.

    clopdit data synth  --out ATLAS --cells 20000 --seed 0
    clopdit data ingest FILE.h5ad --out ATLAS --map cell_type=louvain
    clopdit data shards --source ATLAS --out SHARDS --workers 2
    clopdit data verify SHARDS
    clopdit train ae --config configs/ae.yaml --shards SHARDS --run RUN train.steps=500
    clopdit plan --params 1.3B --gpus 8 --nodes 2 --gpu-mem 80
    clopdit sweep --config configs/sweeps/dit.yaml --trials 8 --shards SHARDS --run-root R --base-run RUN
    clopdit demo --out runs/demo
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from .errors import ClopditError, IngestError, PromptError, PromptWarning, ShardError


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _at_least(low: int):
    """An argparse type: an integer >= ``low`` ("--n 0" is refused by argparse, not by a reshape deep inside)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{text!r}: must be at least {low}")
        return v
    return parse


def _non_negative(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number") from None
    if not v >= 0.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0 or more")
    return v


def _positive(text: str) -> float:
    v = _non_negative(text)
    if v == 0.0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
    return v


def _weights(text: str) -> tuple[float, ...]:
    """Compositional guidance weights, one per field ("2,1,1"), each >= 0."""
    try:
        return tuple(_non_negative(w) for w in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers >= 0 separated by commas, e.g. 2,1,1") from None


def _named_run(text: str) -> str:
    """``NAME=RUN_DIR`` of ``evaluate --compare``."""
    name, _, path = text.partition("=")
    if not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=RUN_DIR, e.g. pca=runs/pca_codec")
    return text


def _interval(text: str) -> tuple[float, float]:
    """``LO,HI`` with 0 <= LO <= HI <= 1: the part of the path (t) that guidance acts on."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give two numbers LO,HI, e.g. 0,0.5") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= LO <= HI <= 1 (t runs from 0, noise, to 1, data)")
    return lo, hi


def add_shard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True,
                   help="local Census-shaped collection, or a Census version such as 'stable' (needs network)")
    p.add_argument("--out", required=True, help="directory for the tar shards and manifest.json")
    p.add_argument("--organism", default="homo_sapiens")
    p.add_argument("--obs-filter", default=None,
                   help="TileDB-SOMA value filter, e.g. \"is_primary_data == True and tissue_general == 'lung'\"")
    p.add_argument("--genes", type=_csv, default=[], help="comma-separated feature ids/names (default: all)")
    p.add_argument("--workers", type=_at_least(1), default=1)
    p.add_argument("--node-rank", type=int, default=0,
                   help="this machine's rank when several build into one shared --out (e.g. $SLURM_NODEID)")
    p.add_argument("--num-nodes", type=int, default=1, help="machines building into --out (e.g. $SLURM_NNODES)")
    p.add_argument("--cells-per-block", type=int, default=256)
    p.add_argument("--blocks-per-shard", type=int, default=16)
    p.add_argument("--val-studies", type=_csv, default=[], help="comma-separated dataset_ids held out for validation")
    p.add_argument("--test-studies", type=_csv, default=[], help="comma-separated dataset_ids held out for test")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of cells (whole studies) for val")
    p.add_argument("--test-fraction", type=float, default=0.1, help="fraction of cells (whole studies) for test")
    p.add_argument("--heldout-cell-fraction", type=float, default=0.03,
                   help="fraction of each training study's cells held out as val_cells, and again as test_cells "
                        "(stratified by cell type, tissue and disease; 0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="print the plan's counts and exit")
    p.add_argument("--no-progress", action="store_true")


def cmd_shards(args) -> None:
    from .data.shards import ShardConfig, build_shards

    cfg = ShardConfig(source=args.source, out=args.out, organism=args.organism, obs_filter=args.obs_filter,
                      genes=args.genes, cells_per_block=args.cells_per_block, blocks_per_shard=args.blocks_per_shard,
                      val_studies=args.val_studies, test_studies=args.test_studies, val_fraction=args.val_fraction,
                      test_fraction=args.test_fraction, heldout_cell_fraction=args.heldout_cell_fraction,
                      seed=args.seed, workers=args.workers, node_rank=args.node_rank, num_nodes=args.num_nodes)
    build_shards(cfg, dry_run=args.dry_run, progress=not args.no_progress)


def cmd_synth(args) -> None:
    from .data.synthetic import SynthConfig, write_synthetic_atlas

    cfg = SynthConfig(n_cells=args.cells, n_genes=args.genes, n_studies=args.studies, seed=args.seed,
                      organism=args.organism)
    atlas = write_synthetic_atlas(args.out, cfg, workers=args.workers, progress=not args.no_progress)
    print(f"wrote {cfg.n_cells} cells x {cfg.n_genes} genes, {len(atlas.studies)} studies, "
          f"{len(atlas.types)} cell types to {args.out}")


def cmd_ingest(args) -> None:
    from .data.ingest import ingest_h5ad

    mapping = {}
    for item in args.map:
        if "=" not in item:
            raise IngestError(f"--map {item!r}: write CENSUS_COLUMN=SOURCE_COLUMN, e.g. cell_type=louvain")
        k, v = item.split("=", 1)
        mapping[k.strip()] = v.strip()
    n = ingest_h5ad(args.file, args.out, organism=args.organism, mapping=mapping, layer=args.layer,
                    dataset_id=args.dataset_id, match_by=args.match_by)
    print(f"appended {n} cells from {args.file} to {args.out}")


def cmd_verify(args) -> None:
    from .data.manifest import Manifest

    m = Manifest.load(args.shards)
    bad = m.verify()
    print(json.dumps({"shards": len(m.data["shards"]), "bad": bad}))
    if bad:
        raise ShardError(f"{len(bad)} shard(s) are missing or differ from the manifest: {bad}. Delete them and "
                         "rerun build_shards.py with the same arguments; it rebuilds only missing shards.")


STAGES = {"ae": ("clopdit_dist.stages.ae", "AEStage", "AEStageConfig"),
          "clop": ("clopdit_dist.stages.clop", "ClopStage", "ClopStageConfig"),
          "dit": ("clopdit_dist.stages.dit", "DiTStage", "DiTStageConfig")}


def cmd_train(args) -> None:
    import importlib

    from .config import load_config
    from .train.trainer import train

    module, stage_cls, cfg_cls = STAGES[args.stage]
    mod = importlib.import_module(module)
    overrides = list(args.overrides)
    if args.shards:
        overrides.append(f"data.shards={args.shards}")
    if args.run:
        overrides.append(f"train.run_dir={args.run}")
    cfg = load_config(getattr(mod, cfg_cls), args.config, overrides)
    train(getattr(mod, stage_cls)(cfg))


def cmd_generate(args) -> None:
    from .generate import CellGenerator, sampler_from
    from .models.condition import check_prompts

    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            with open(args.prompts_file) as f:
                prompts += [line.strip() for line in f if line.strip() and not line.startswith("#")]
        except (OSError, UnicodeDecodeError) as exc:
            why = f"{exc.__class__.__name__}: {getattr(exc, 'strerror', None) or exc}"
            raise PromptError(f"cannot read --prompts-file {args.prompts_file!r} ({why}); give a text file of one "
                              "prompt per line") from None
    if not prompts and not args.interpolate:
        raise PromptError("give at least one --prompt, a --prompts-file, or --interpolate A B")
    check_prompts(prompts + list(args.interpolate or []))  # before minutes of model loading
    _check_output(args.out)
    gen = CellGenerator.from_run(args.run, device=args.device, precision=args.precision, compile=args.compile)
    sampler = sampler_from(gen.default_sampler, guidance=args.guidance, steps=args.steps, method=args.sampler,
                           noise=args.noise, interval=args.interval, field_weights=args.field_weights)
    if args.interpolate:
        adata = gen.interpolate(*args.interpolate, points=args.points, n=args.n, sampler=sampler, seed=args.seed)
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PromptWarning)
            adata = gen.generate(prompts, n=args.n, sampler=sampler, seed=args.seed)
        for w in caught:  # a prompt's warning as one line; any other as Python shows it
            if issubclass(w.category, PromptWarning):
                print(f"warning: {w.message}", file=sys.stderr)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    adata.write_h5ad(args.out)
    print(f"wrote {adata.n_obs} cells x {adata.n_vars} genes to {args.out}")


def _check_output(path: str) -> None:
    """Refuse an output file that cannot be written (no such folder, no permission), before any work."""
    import os

    existed = os.path.exists(path)
    try:
        open(path, "ab").close()
    except OSError as exc:
        raise ClopditError(f"cannot write --out {path!r} ({exc.strerror}); give a file path in a folder that "
                           "exists and you can write") from None
    if not existed:
        os.remove(path)


def cmd_plan(args) -> None:
    from .train.plan import format_plan, plan

    result = plan(args.params, args.gpus, args.nodes, args.gpu_mem, args.headroom, args.largest_layer, args.cpu_mem)
    print(json.dumps(result) if args.json else format_plan(result))


def cmd_sweep(args) -> None:
    from .train.sweep import run_sweep

    run_sweep(args.config, trials=args.trials, shards=args.shards, run_root=args.run_root,
              base_config=args.base_config, base_run=args.base_run, overrides=list(args.overrides))


def cmd_evaluate(args) -> None:
    from .evaluate.evaluator import EvalConfig, evaluate_run

    cfg = EvalConfig(split=args.split, seeds=args.seeds, max_cells=args.cells, steps=args.steps, method=args.sampler,
                     noise=args.noise, interval=args.interval,
                     guidance=args.guidance, report=not args.no_report, compare=tuple(args.compare))
    result = evaluate_run(args.run, args.shards, args.out, cfg, progress=not args.no_progress)
    print(f"wrote {args.out}/metrics.json and {args.out}/report.md in {result['seconds']:.0f} s")


def cmd_assay_capture(args) -> None:
    from .models.assay_capture import add_to_run

    stats = add_to_run(args.run, args.shards)
    print(f"wrote the capture of {len(stats['effects'])} assays ({', '.join(stats['effects'])}; "
          f"{stats['pseudobulks']} pseudobulks) into {args.run}/dit/latent_stats.json")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, n_cells=args.cells, workers=args.workers, seed=args.seed, overrides=args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clopdit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)

    data = verbs.add_parser("data", help="atlas and shards").add_subparsers(dest="data_verb", required=True)
    p = data.add_parser("synth", help="write the synthetic Census-shaped atlas")
    p.add_argument("--out", required=True)
    p.add_argument("--cells", type=_at_least(1), default=20_000)
    p.add_argument("--genes", type=_at_least(1), default=3_000)
    p.add_argument("--studies", type=_at_least(1), default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--organism", default="homo_sapiens")
    p.add_argument("--workers", type=_at_least(1), default=1)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = data.add_parser("ingest", help="append an AnnData file with raw counts")
    p.add_argument("file")
    p.add_argument("--out", required=True)
    p.add_argument("--organism", default="homo_sapiens")
    p.add_argument("--map", action="append", default=[], metavar="CENSUS=SOURCE")
    p.add_argument("--layer", default=None, help="layer holding raw counts")
    p.add_argument("--dataset-id", default=None)
    p.add_argument("--match-by", default="feature_id", choices=["feature_id", "feature_name"])
    p.set_defaults(func=cmd_ingest)

    p = data.add_parser("shards", help="SOMA query -> WebDataset shards + manifest.json")
    add_shard_args(p)
    p.set_defaults(func=cmd_shards)

    p = data.add_parser("verify", help="check shard files against the manifest's sha256")
    p.add_argument("shards")
    p.set_defaults(func=cmd_verify)

    train_p = verbs.add_parser("train", help="train a stage (one DeepSpeed loop for all)")
    train_p.add_argument("stage", choices=sorted(STAGES))
    train_p.add_argument("--config", default=None, help="stage YAML, e.g. configs/ae.yaml")
    train_p.add_argument("--shards", default=None, help="shortcut for data.shards=")
    train_p.add_argument("--run", default=None, help="shortcut for train.run_dir=")
    train_p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    train_p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=100")
    train_p.set_defaults(func=cmd_train)

    p = verbs.add_parser("generate", help="prompts -> generated cells (.h5ad)")
    p.add_argument("--run", required=True, help="run directory with trained ae, clop and dit stages")
    p.add_argument("--prompt", action="append", default=[], help="repeatable")
    p.add_argument("--prompts-file", default=None, help="one prompt per line")
    p.add_argument("--interpolate", nargs=2, metavar=("PROMPT_A", "PROMPT_B"), default=None)
    p.add_argument("--points", type=_at_least(2), default=10)
    p.add_argument("--n", type=_at_least(1), default=100, help="cells per prompt (per point when interpolating)")
    p.add_argument("--guidance", type=_non_negative, default=None)
    p.add_argument("--steps", type=_at_least(1), default=None)
    p.add_argument("--sampler", default=None, choices=["euler", "heun", "midpoint", "sde"])
    p.add_argument("--noise", type=_non_negative, default=None, help="SDE noise (diversity); with --sampler sde")
    p.add_argument("--field-weights", type=_weights, default=None, help="compositional guidance weights, e.g. 2,1,1")
    p.add_argument("--interval", default=None, type=_interval,
                   help="apply guidance only for t in LO,HI (0 = noise, 1 = data); the plain conditional elsewhere")
    p.add_argument("--seed", type=_at_least(0), default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: the DiT's matmuls in bf16 (CPUs with AVX512-BF16/AMX, GPUs); ~1.4x on CPU")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the DiT (one-time compile, then ~1.5-2x on CPU)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_generate)

    p = verbs.add_parser("plan", help="per-GPU memory under ZeRO 1/2/3 (+offload) and the config to use")
    p.add_argument("--params", required=True, help="parameter count, e.g. 350M, 1.3B")
    p.add_argument("--gpus", type=_at_least(1), required=True, help="GPUs per node")
    p.add_argument("--nodes", type=_at_least(1), default=1)
    p.add_argument("--gpu-mem", type=_positive, default=80.0, help="GiB per GPU")
    p.add_argument("--cpu-mem", type=_positive, default=None, help="GiB of CPU memory per node (checked if given)")
    p.add_argument("--headroom", type=float, default=0.3, help="share of GPU memory kept for activations")
    p.add_argument("--largest-layer", type=int, default=None, help="parameters of the largest layer (ZeRO-3)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = verbs.add_parser("sweep", help="run a W&B sweep YAML offline (the sweeps package proposes trials)")
    p.add_argument("--config", required=True, help="sweep YAML, e.g. configs/sweeps/dit.yaml")
    p.add_argument("--trials", type=_at_least(1), default=4)
    p.add_argument("--shards", required=True)
    p.add_argument("--run-root", required=True, help="one run directory per trial under it")
    p.add_argument("--base-config", default=None, help="stage YAML the trials start from (default: the sweep's)")
    p.add_argument("--base-run", default=None, help="run with the trained stages a trial needs (dit: ae, clop)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="fixed overrides for every trial")
    p.set_defaults(func=cmd_sweep)

    p = verbs.add_parser("evaluate", help="generated vs held-out real cells, beside ceilings and baselines")
    p.add_argument("--run", required=True, help="run directory with trained stages")
    p.add_argument("--shards", required=True, help="the shards the run was trained on")
    p.add_argument("--out", required=True, help="directory for metrics.json, report.md and the plots")
    p.add_argument("--split", default="test", choices=["test", "val"],
                   help="held-out studies (and <split>_cells) to report")
    p.add_argument("--seeds", type=_at_least(1), default=3)
    p.add_argument("--cells", type=_at_least(2), default=200, help="generated cells per condition (at most)")
    p.add_argument("--steps", type=_at_least(1), default=None, help="sampler steps (default: the run's)")
    p.add_argument("--sampler", default=None, choices=["euler", "heun", "midpoint", "sde"],
                   help="sampler method (default: the run's)")
    p.add_argument("--noise", type=_non_negative, default=None, help="SDE noise; with --sampler sde")
    p.add_argument("--interval", default=None, type=_interval, help="guidance interval LO,HI in t (default: the run's)")
    p.add_argument("--guidance", type=_non_negative, default=None, help="skip the val sweep and use this guidance")
    p.add_argument("--compare", action="append", default=[], type=_named_run, metavar="NAME=RUN",
                   help="another run on the same shards scored beside this one (repeatable)")
    p.add_argument("--no-report", action="store_true", help="metrics.json only, no report.md/plots")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = verbs.add_parser("assay-capture", help="add the per-assay capture estimate to a run trained before it existed")
    p.add_argument("--run", required=True, help="run directory with a trained DiT")
    p.add_argument("--shards", required=True, help="the shards the run was trained on")
    p.set_defaults(func=cmd_assay_capture)

    p = verbs.add_parser("demo", help="the whole path on the embedded atlas")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--cells", type=_at_least(1), default=20_000)
    p.add_argument("--workers", type=_at_least(1), default=2)
    p.add_argument("--seed", type=int, default=0, help="the synthetic atlas's seed (other seeds check that "
                   "defaults were not tuned to seed 0)")
    p.add_argument("overrides", nargs="*", metavar="STAGE:KEY=VALUE",
                   help="a stage's setting after the demo's own, e.g. dit:flow.prior=cell_type")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take positionals after options: KEY=VALUE overrides may come anywhere
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    unknown = [e for e in extra if e not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = list(args.overrides) + overrides
    try:
        args.func(args)
    except ClopditError as exc:  # a user's mistake: one line that says what to do, exit 2
        print(f"clopdit {args.verb}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def entry(argv: list[str] | None = None) -> None:
    """The ``clopdit`` command and the launchers: :func:`main`, then :func:`exit_process` (a
    training rank leaves without interpreter finalization; see there why)."""
    from .train.distributed import exit_process

    main(sys.argv[1:] if argv is None else argv)
    exit_process(0)


if __name__ == "__main__":
    entry()
