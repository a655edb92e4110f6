"""CLOP's contrastive losses: multi-positive targets, a loop-by-hand reference, learning on a
toy problem, the temperature clamp, and two real gloo ranks matching one process."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clopdit_dist.models.clop import (CLOP, MAX_LOGIT_SCALE, ContrastiveLoss, SigLipLoss, gather_features,
                                      multi_positive_targets)

HERE = os.path.dirname(__file__)


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def test_positives_are_not_negatives():
    keys = torch.tensor([7, 7, 2])
    t = multi_positive_targets(keys, keys)
    torch.testing.assert_close(t, torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))
    # two cells of one condition with identical captions: pulling both towards that caption
    # costs nothing against each other, so the loss sits at its floor, the targets' entropy
    cell = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    loss = ContrastiveLoss()(cell, cell.clone(), torch.tensor(math.log(100.0)), keys)
    assert loss.item() == pytest.approx(2 * math.log(2) / 3, abs=1e-6)
    # captions of one condition are interchangeable: swapping them leaves the loss alone,
    # while one-hot (CLIP) targets would call that a different batch
    cell, text = _unit(3, 4, seed=5), _unit(3, 4, seed=6)
    swapped = text[[1, 0, 2]]
    scale = torch.tensor(math.log(10.0), dtype=torch.float64)
    assert ContrastiveLoss()(cell, text, scale, keys).item() == pytest.approx(
        ContrastiveLoss()(cell, swapped, scale, keys).item(), rel=1e-12)
    one_hot = torch.tensor([0, 1, 2])
    assert ContrastiveLoss()(cell, text, scale, one_hot).item() != pytest.approx(
        ContrastiveLoss()(cell, swapped, scale, one_hot).item(), rel=1e-3)


def test_infonce_matches_a_reference_by_hand():
    cell, text = _unit(5, 4, seed=1), _unit(5, 4, seed=2)
    keys = torch.tensor([0, 1, 0, 2, 1])
    s = 3.0
    loss = ContrastiveLoss()(cell, text, torch.tensor(math.log(s), dtype=torch.float64), keys).item()
    c, t, k = cell.numpy(), text.numpy(), keys.numpy()
    total = 0.0
    for a, b in ((c, t), (t, c)):
        for i in range(5):
            logits = s * b @ a[i]
            logp = logits - np.log(np.exp(logits).sum())
            pos = np.flatnonzero(k == k[i])
            total += -logp[pos].mean() / 5
    assert abs(loss - 0.5 * total) < 1e-12


def test_siglip_matches_a_reference_by_hand():
    cell, text = _unit(4, 3, seed=3), _unit(4, 3, seed=4)
    keys = torch.tensor([1, 1, 0, 2])
    s, bias = 5.0, -2.0
    loss = SigLipLoss()(cell, text, torch.tensor(math.log(s), dtype=torch.float64),
                        torch.tensor(bias, dtype=torch.float64), keys).item()
    ref = 0.0
    for i in range(4):
        for j in range(4):
            y = 1.0 if keys[i] == keys[j] else -1.0
            ref += np.log1p(np.exp(-y * (s * float(cell[i] @ text[j]) + bias)))
    assert abs(loss - ref / 4) < 1e-12


def test_gather_is_identity_on_one_process():
    x, k = torch.randn(3, 2), torch.arange(3)
    (a, b), keys = gather_features((x, x), k)
    assert a is x and keys is k


@pytest.mark.parametrize("loss", ["infonce", "siglip"])
def test_loss_decreases_on_a_toy_problem(loss):
    torch.manual_seed(0)
    n_cond, latent, text_dim = 6, 12, 10
    centres, captions = torch.randn(n_cond, latent), torch.randn(n_cond, text_dim)
    model = CLOP(text_dim, latent, embed_dim=16, hidden=32, loss=loss)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses, pos_gap = [], []
    for step in range(40):
        keys = torch.randint(0, n_cond, (48,))
        z = centres[keys] + 0.3 * torch.randn(48, latent)
        t = captions[keys] + 0.05 * torch.randn(48, text_dim)
        value, metrics = model(z, t, keys)
        opt.zero_grad()
        value.backward()
        opt.step()
        # multi-positive InfoNCE cannot go below the entropy of its targets
        floor = 0.0
        if loss == "infonce":
            t = multi_positive_targets(keys, keys)
            floor = -(t * t.clamp(min=1e-30).log()).sum(1).mean().item()
        losses.append(value.item() - floor)
        pos_gap.append(metrics["pos_sim"] - metrics["neg_sim"])
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    assert np.mean(pos_gap[-5:]) > 0.5


def test_logit_scale_is_clamped():
    model = CLOP(4, 4, embed_dim=4, hidden=8)
    assert abs(model.logit_scale.item() - math.log(1 / 0.07)) < 1e-6
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    loss, metrics = model(torch.randn(6, 4), torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 3]))
    assert metrics["logit_scale"] == pytest.approx(100.0)
    loss.backward()
    assert model.logit_scale.grad.item() == 0.0  # clamped: no push further up
    assert MAX_LOGIT_SCALE == pytest.approx(math.log(100))
    e = model.encode_cell(torch.randn(3, 4))
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    siglip = CLOP(4, 4, loss="siglip")
    assert siglip.logit_bias.item() == -10.0 and abs(siglip.logit_scale.item() - math.log(10)) < 1e-6
    with pytest.raises(ValueError, match="infonce"):
        CLOP(4, 4, loss="triplet")


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29541", os.path.join(HERE, "scripts", "two_rank_clop_loss.py"),
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    z, text, keys = ranks[0]["batch"]
    for case, r0 in ranks[0]["results"].items():
        loss_name, split = case
        r1 = ranks[1]["results"][case]
        model = CLOP(text_dim=text.shape[1], latent_dim=z.shape[1], embed_dim=6, hidden=16, loss=loss_name).double()
        model.load_state_dict(r0["init"])
        torch.testing.assert_close(r1["init"], r0["init"])
        zf, tf = z.clone().requires_grad_(True), text.clone().requires_grad_(True)
        loss, _ = model(zf, tf, keys)
        loss.backward()
        # the loss DeepSpeed reports (mean over ranks) is the one-process loss ...
        assert r0["mean_loss"] == pytest.approx(loss.item(), rel=1e-10), case
        assert (r0["loss"] + r1["loss"]) / 2 == pytest.approx(loss.item(), rel=1e-10), case
        # ... so are the rank-averaged parameter gradients ...
        for name, p in model.named_parameters():
            torch.testing.assert_close(r0["grads"][name], p.grad, rtol=1e-5, atol=1e-12, msg=f"{case} {name}")
            torch.testing.assert_close(r1["grads"][name], p.grad, rtol=1e-5, atol=1e-12, msg=f"{case} {name}")
        # ... and each rank's input gradients are world_size x the one-process ones
        for r in (r0, r1):
            rows = slice(*r["rows"])
            torch.testing.assert_close(r["z_grad"], 2 * zf.grad[rows], rtol=1e-5, atol=1e-12, msg=str(case))
            torch.testing.assert_close(r["text_grad"], 2 * tf.grad[rows], rtol=1e-5, atol=1e-12, msg=str(case))
        # the local losses differ (the split matters), only their mean is global
        assert r0["loss"] != pytest.approx(r1["loss"])
