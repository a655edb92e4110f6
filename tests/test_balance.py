"""Rare-cell-type loss weights (data/balance.py) and the weighted losses that use them."""

import pytest
import torch

from clopdit_dist.data.balance import CellTypeWeights
from clopdit_dist.errors import ConfigError
from clopdit_dist.models.flow import FlowConfig, flow_matching_loss

COUNTS = {"T cell": 1000, "B cell": 250, "neutrophil": 10, "stem cell": 1}


def test_weights_have_mean_one_over_training_cells_rise_for_rare_types_and_respect_the_cap():
    w = CellTypeWeights(COUNTS, power=0.5, max_weight=10.0)
    cells = [t for t, n in COUNTS.items() for _ in range(n)]
    assert w(cells).mean().item() == pytest.approx(1.0, abs=0.02)
    t = w.table
    assert t["T cell"] < t["B cell"] < t["neutrophil"] <= t["stem cell"] <= 10.0
    assert t["B cell"] / t["T cell"] == pytest.approx(2.0)  # (1000 / 250) ** 0.5
    assert torch.equal(CellTypeWeights(COUNTS, power=0.0)(cells), torch.ones(len(cells)))
    assert w(["a type no training cell has"]).item() == 1.0
    with pytest.raises(ValueError):
        CellTypeWeights(COUNTS, power=-1.0)


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, xt, t, cond, drop):
        return self.w * xt


def test_weighted_flow_loss_is_the_weighted_mean_of_per_cell_errors():
    model, x1, cond, flow = Linear(), torch.randn(6, 2, 3), torch.zeros(6, 1, 4), FlowConfig()

    def loss(weight):
        return flow_matching_loss(model, x1, cond, flow, torch.Generator().manual_seed(0), weight).item()

    plain = loss(None)
    assert loss(torch.ones(6)) == pytest.approx(plain, rel=1e-6)
    per_cell = [loss(6 * torch.eye(6)[i]) for i in range(6)]  # each cell's own error
    assert sum(per_cell) / 6 == pytest.approx(plain, rel=1e-5)
    w = torch.tensor([3.0, 0.0, 1.0, 0.5, 0.5, 1.0])
    assert loss(w) == pytest.approx(sum(wi * e for wi, e in zip(w.tolist(), per_cell)) / 6, rel=1e-5)


def test_clop_refuses_balance_it_cannot_apply():
    from clopdit_dist.stages.clop import ClopStage, ClopStageConfig

    cfg = ClopStageConfig()
    cfg.data.balance = 0.5
    with pytest.raises(ConfigError, match="data.balance"):
        ClopStage(cfg).setup(None, None, torch.device("cpu"))
