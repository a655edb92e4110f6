"""Structure the project promises: library code never imports training glue, no import
cycles, and known user errors reach the user as one line with exit code 2."""

import ast
import os
import subprocess
import sys

import clopdit_dist

PKG = os.path.dirname(clopdit_dist.__file__)
LIBRARY = ("clopdit_dist.data", "clopdit_dist.models", "clopdit_dist.evaluate", "clopdit_dist.generate",
           "clopdit_dist.run", "clopdit_dist.config", "clopdit_dist.errors")
TRAINING_GLUE = ("clopdit_dist.stages", "clopdit_dist.train")


def _module_imports() -> dict[str, set[str]]:
    """Every clopdit_dist module and the clopdit_dist modules it imports (anywhere in it)."""
    graph = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
            name = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
            package = name if f == "__init__.py" else name.rsplit(".", 1)[0]
            deps = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        parts = package.split(".")
                        base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                    if base.startswith("clopdit_dist"):
                        deps.add(base)
                        deps.update(f"{base}.{a.name}" for a in node.names)
                elif isinstance(node, ast.Import):
                    deps.update(a.name for a in node.names if a.name.startswith("clopdit_dist"))
            graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_library_modules_never_import_training_glue():
    graph = _module_imports()
    bad = sorted((m, d) for m, deps in graph.items() if m.startswith(LIBRARY) for d in deps
                 if d.startswith(TRAINING_GLUE))
    assert not bad, f"library modules importing stages/ or train/: {bad}"


def test_no_import_cycles_between_packages():
    graph = _module_imports()

    def pkg(m):  # clopdit_dist.data.loader -> clopdit_dist.data; top-level modules stand alone
        parts = m.split(".")
        return ".".join(parts[:2])

    pkgs: dict[str, set[str]] = {}
    for m, deps in graph.items():
        pkgs.setdefault(pkg(m), set()).update(pkg(d) for d in deps if pkg(d) != pkg(m))
    state, cycle = {}, []

    def visit(p, path):
        state[p] = "open"
        for q in sorted(pkgs.get(p, ())):
            if state.get(q) == "open":
                cycle.append(path + [q])
            elif q not in state:
                visit(q, path + [q])
        state[p] = "done"

    for p in sorted(pkgs):
        if p not in state:
            visit(p, [p])
    assert not cycle, f"import cycles between packages: {cycle}"


def _cli(*argv):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "clopdit_dist.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=300)


def test_user_errors_print_one_line_and_exit_2(tmp_path, atlas_dir, shards_dir):
    bad_h5ad = tmp_path / "bad.h5ad"
    import anndata as ad
    import numpy as np

    ad.AnnData(X=np.full((3, 4), 0.5, np.float32)).write_h5ad(bad_h5ad)
    cases = [
        (["train", "ae", "--config", str(tmp_path / "missing.yaml")], "does not exist"),  # config
        (["train", "ae", "--shards", shards_dir, "--run", str(tmp_path / "r"), "model.laten_dim=3"],
         "unknown config key 'model.laten_dim'"),
        (["data", "ingest", str(bad_h5ad), "--out", str(tmp_path / "atlas")], "non-integer"),  # ingest
        (["generate", "--run", str(tmp_path / "nope"), "--prompt", "B cell", "--out", str(tmp_path / "x.h5ad")],
         "not a clopdit run directory"),  # run directory
        (["data", "verify", str(tmp_path / "no_shards")], "no shard manifest"),  # shards
        (["data", "shards", "--source", atlas_dir, "--out", str(tmp_path / "s"), "--obs-filter", "tissue_genral == 'x'"],
         "obs filter"),  # filter
        (["data", "shards", "--source", str(tmp_path / "no_atlas"), "--out", str(tmp_path / "s2")], "does not exist"),
        (["demo", "--out", str(tmp_path / "d"), "flow.prior=cell_type"], "prefix it with its stage"),  # before any work
        # session 33: these raised tracebacks
        (["data", "ingest", str(tmp_path / "none.h5ad"), "--out", str(tmp_path / "atlas")], "is no file"),
        (["plan", "--params", "lots", "--gpus", "8"], "--params 'lots'"),
        (["sweep", "--config", str(tmp_path / "none.yaml"), "--shards", shards_dir, "--run-root", str(tmp_path / "w")],
         "sweep config"),
    ]
    for argv, expect in cases:
        r = _cli(*argv)
        assert r.returncode == 2, (argv, r.stdout[-1000:], r.stderr[-3000:])
        lines = r.stderr.strip().splitlines()
        assert "Traceback" not in r.stderr and len(lines) == 1 and expect in lines[0], (argv, r.stderr[-3000:])
    assert not (tmp_path / "d").exists()  # the demo refused its override before building anything


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    """Counts below one, negative guidance or noise, an unreadable prompts file, an output that
    cannot be written, a GPU the machine lacks and a malformed --compare are refused by name (exit 2,
    no traceback; argparse's usage lines above the error); they used to fail inside the sampler, after
    generating or after evaluating (session 33). The run directory does not exist: each is refused
    before it is looked at."""
    run, out = str(tmp_path / "no_run"), str(tmp_path / "x.h5ad")
    cases = [
        (["--prompt", "B cells", "--n", "0"], "argument --n: '0': must be at least 1"),
        (["--prompt", "B cells", "--guidance", "-1"], "argument --guidance: '-1': must be 0 or more"),
        (["--prompt", "B cells", "--field-weights", "2,x"], "argument --field-weights"),
        (["--prompts-file", str(tmp_path / "none.txt")], "cannot read --prompts-file"),
        (["--prompt", "B cells", "--out", str(tmp_path / "no_dir" / "x.h5ad")], "cannot write --out"),
        (["--prompt", "B cells", "--device", "cuda:64"], "--device 'cuda:64'"),
    ]
    cases = [(["generate", "--run", run, *argv] + ([] if "--out" in argv else ["--out", out]), expect)
             for argv, expect in cases]
    cases += [(["evaluate", "--run", run, "--shards", str(tmp_path), "--out", str(tmp_path / "e"), "--compare", "pca"],
               "give NAME=RUN_DIR"), (["plan", "--params", "1B", "--gpus", "0"], "must be at least 1")]
    for argv, expect in cases:
        r = _cli(*argv)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and "Traceback" not in r.stderr and expect in last, (argv, r.stderr[-2000:])
    assert not os.path.exists(out)


def test_no_top_level_package_shared_with_another_distribution():
    """Every top-level import name this distribution installs is its own: a top-level
    ``kernels`` once shadowed Hugging Face's ``kernels`` (a dependency of transformers 5), and
    loading a text tower from the repository root failed on the wrong package."""
    import importlib.metadata as md

    owners = md.packages_distributions()
    ours = {name for name, dists in owners.items() if "clopdit-dist" in dists or "clopdit_dist" in dists}
    assert "clopdit_dist" in ours
    shared = {name: dists for name, dists in owners.items() if name in ours and len(set(dists)) > 1}
    assert not shared, f"top-level names installed by clopdit-dist and by other distributions: {shared}"


def test_no_script_shadows_an_installed_package():
    """A script's directory is the first entry of ``sys.path`` when it runs, so a file there named
    like an installed top-level package hides that package from everything the script imports
    (``benchmarks/kernels.py`` once hid Hugging Face's ``kernels`` from transformers)."""
    import importlib.metadata as md

    installed = set(md.packages_distributions())
    root = os.path.dirname(PKG)
    clashes = [os.path.join(d, f) for d in ("benchmarks", "launchers", "scripts") if os.path.isdir(os.path.join(root, d))
               for f in os.listdir(os.path.join(root, d)) if f.endswith(".py") and f[:-3] in installed]
    assert not clashes, f"scripts named like installed packages (rename them): {clashes}"
