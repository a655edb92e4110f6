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
