"""Shared fixtures: one small synthetic atlas and its shards per test session.

Triton kernels run under the interpreter on machines without a GPU; the variable must be
set before anything imports triton.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest

from clopdit_dist.data.shards import ShardConfig, build_shards
from clopdit_dist.data.synthetic import SynthConfig, write_synthetic_atlas


@pytest.fixture(autouse=True)
def _restore_environ():
    """A test that trains in-process (a world of one) sets RANK, MASTER_PORT...: restore the
    environment afterwards, or the next test's subprocesses inherit a stale rendezvous."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


ATLAS_CFG = SynthConfig(n_cells=4000, n_genes=600, n_studies=12, seed=7, chunk_size=1024)


@pytest.fixture(scope="session")
def atlas_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("atlas") / "census")
    write_synthetic_atlas(out, ATLAS_CFG, progress=False)
    return out


def shard_config(atlas: str, out: str, **kw) -> ShardConfig:
    return ShardConfig(source=atlas, out=out, cells_per_block=64, blocks_per_shard=4, **kw)


@pytest.fixture(scope="session")
def shards_dir(atlas_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards") / "shards")
    build_shards(shard_config(atlas_dir, out), progress=False, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory):
    """A tiny BERT with a WordPiece tokenizer trained here on caption words (loads through
    the Auto classes like any hub model, in a fraction of a second)."""
    from clopdit_dist.data.captions import caption_corpus
    from clopdit_dist.models.text import build_tiny_text_model

    return build_tiny_text_model(str(tmp_path_factory.mktemp("text") / "tiny-bert"), caption_corpus())


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def pca_run(shards_dir, tiny_text_model, tmp_path_factory):
    """CLOP and a field-conditioned DiT trained for a few steps on the PCA codec (no autoencoder
    stage), in one torchrun process: the small run generation and evaluation tests share."""
    import subprocess
    import sys

    from omegaconf import OmegaConf

    run, cfgdir = str(tmp_path_factory.mktemp("pca_run") / "run"), tmp_path_factory.mktemp("pca_cfg")
    common = ["train.steps=4", "train.log_every=1", "data.batch_size=32", "data.num_workers=0",
              "optim.warmup_steps=1", "train.wandb.mode=disabled", "data.eval_cells=200"]
    OmegaConf.save(OmegaConf.from_dotlist([*common, f"model.text_model={tiny_text_model}", "model.embed_dim=16",
                                           "model.hidden=32", "model.captions_per_condition=4", "codec.name=pca",
                                           "codec.genes=hvg:200", "codec.n_components=16", "codec.fit_cells=1500"]),
                   cfgdir / "clop.yaml")
    OmegaConf.save(OmegaConf.from_dotlist([*common, "model.hidden_size=32", "model.token_dim=8", "model.depth=2",
                                           "model.num_heads=2", "eval_conditions=2", "eval_cells_per_condition=20",
                                           "stats_cells=500", "sampler.steps=4", "conditioning=fields"]),
                   cfgdir / "dit.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
           os.path.join(os.path.dirname(__file__), "scripts", "train_stages.py"), shards_dir, run, "clop,dit",
           f"--config-dir={cfgdir}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return run
