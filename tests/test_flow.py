"""Flow matching and the samplers, checked against the exact velocity field of Gaussian data
and on a small conditional DiT trained for a few hundred steps."""

import math

import pytest
import torch

from clopdit_dist.models.dit import DiTConfig
from clopdit_dist.models.flow import (CellNoise, FlowConfig, GaussianPrior, SamplerConfig, condition_drop,
                                      flow_matching_loss, guided_velocity, load_prior, sample, start_from)


class GaussianVelocity(torch.nn.Module):
    """E[x1 - x0 | x_t] for x1 ~ N(mu_c, s^2 I), x0 ~ N(0, I), x_t = t x1 + (1-t) x0; the mean
    mu_c is the first coordinate of each condition field, summed over kept fields (0 if all
    dropped)."""

    def __init__(self, s: float = 0.5):
        super().__init__()
        self.s = s

    def forward(self, x, t, cond, drop):
        mu = (cond[..., 0] * (~drop)).sum(1).view(-1, 1, 1)
        t = t.view(-1, 1, 1).double()
        x = x.double()
        var = t**2 * self.s**2 + (1 - t) ** 2
        r = x - t * mu
        e1 = mu + t * self.s**2 / var * r
        e0 = (1 - t) / var * r
        return (e1 - e0).float()


def cond_for(mu: float, n: int, fields: int = 1) -> torch.Tensor:
    c = torch.zeros(n, fields, 4)
    c[:, 0, 0] = mu
    return c


@pytest.mark.parametrize("method,steps,tol", [("euler", 100, 0.05), ("heun", 20, 0.02), ("midpoint", 20, 0.02),
                                             ("sde", 200, 0.06)])
def test_samplers_reach_the_data_distribution(method, steps, tol):
    model = GaussianVelocity(s=0.5)
    cfg = SamplerConfig(method=method, steps=steps, guidance=1.0, noise=1.0 if method == "sde" else 0.0)
    g = torch.Generator().manual_seed(0)
    x = sample(model, cond_for(3.0, 4000), (2, 2), cfg, g)
    assert x.mean().item() == pytest.approx(3.0, abs=tol * 3)
    assert x.std().item() == pytest.approx(0.5, abs=tol * 2)


class ShiftedSourceVelocity(torch.nn.Module):
    """The exact velocity for x1 ~ N(mu, s^2 I) from the source x0 ~ N(loc, scale^2 I): in the
    coordinates (x - loc) / scale it is :class:`GaussianVelocity`'s, times ``scale``."""

    def __init__(self, mu: float, s: float, loc: float, scale: float):
        super().__init__()
        self.white, self.mu, self.loc, self.scale = GaussianVelocity(s / scale), (mu - loc) / scale, loc, scale

    def forward(self, x, t, cond, drop):
        return self.scale * self.white((x - self.loc) / self.scale, t, cond_for(self.mu, len(x)), drop)


@pytest.mark.parametrize("cell_noise", [False, True], ids=["one_generator", "cell_noise"])
def test_the_sde_keeps_the_data_distribution_from_a_shifted_scaled_source(cell_noise):
    loc, scale = 2.0, 0.4
    model = ShiftedSourceVelocity(mu=3.0, s=0.5, loc=loc, scale=scale)
    n = 4000
    source = (torch.full((n, 4), loc), torch.full((n, 4), scale))
    cfg = SamplerConfig(method="sde", steps=200, guidance=1.0, noise=1.0)
    g = torch.Generator().manual_seed(0)
    noise = CellNoise([0, 1000], [n // 2, n // 2], (2, 2)) if cell_noise else None  # step noise per prompt's block
    x = sample(model, cond_for(0.0, n), (2, 2), cfg, g, start_from(torch.randn(n, 2, 2, generator=g), source), source,
               noise)
    assert x.mean().item() == pytest.approx(3.0, abs=0.1)
    assert x.std().item() == pytest.approx(0.5, abs=0.05)
    # the same SDE told the source is N(0, I) pulls the cells off the data distribution
    g = torch.Generator().manual_seed(0)
    wrong = sample(model, cond_for(0.0, n), (2, 2), cfg, g, start_from(torch.randn(n, 2, 2, generator=g), source))
    assert abs(wrong.mean().item() - 3.0) > 0.3 or abs(wrong.std().item() - 0.5) > 0.15


def test_cell_noise_is_each_blocks_own_stream():
    noise = CellNoise([0, 1000], [300, 5], (2, 2), block=256)
    full = next(noise.steps())
    # a cell's noise is the same however the cells are split, and alone or beside another prompt's
    split = torch.cat([next(noise.take(slice(0, 100)).steps()), next(noise.take(slice(100, 305)).steps())])
    assert torch.equal(split, full)
    assert torch.equal(next(CellNoise([0], [300], (2, 2), block=256).steps()), full[:300])
    every_third = torch.arange(305) % 3 == 0
    assert torch.equal(next(noise.take(every_third).steps()), full[every_third])
    assert not torch.equal(next(CellNoise([7], [300], (2, 2)).steps()), full[:300])


def test_joint_dropout_trains_the_all_null_branch_and_is_off_by_default():
    def drops(cfg):
        return condition_drop(200_000, 3, cfg, torch.Generator().manual_seed(0), "cpu")

    per_field = drops(FlowConfig(p_uncond=0.15))
    assert per_field.float().mean().item() == pytest.approx(0.15, abs=0.005)
    assert per_field.all(1).float().mean().item() == pytest.approx(0.15**3, abs=0.001)  # ~0.3% of cells
    joint = drops(FlowConfig(p_uncond=0.15, p_null=0.1))
    assert joint.all(1).float().mean().item() == pytest.approx(0.1 + 0.9 * 0.15**3, abs=0.005)
    # p_null = 0 draws nothing extra: runs trained before the option see the same masks
    assert torch.equal(per_field, drops(FlowConfig(p_uncond=0.15, p_null=0.0)))


def test_heun_beats_euler_at_equal_steps():
    model = GaussianVelocity(s=0.3)
    err = {}
    for method in ("euler", "heun"):
        g = torch.Generator().manual_seed(1)
        x = sample(model, cond_for(2.0, 2000), (1, 2), SamplerConfig(method=method, steps=8, guidance=1.0), g)
        err[method] = abs(x.std().item() - 0.3)
    assert err["heun"] < err["euler"]


def test_guidance_extrapolates_and_composes():
    model = GaussianVelocity()
    x = torch.randn(5, 2, 2)
    c = cond_for(1.0, 5, fields=2)
    c[:, 1, 0] = 2.0
    null = guided_velocity(model, x, 0.5, c, SamplerConfig(guidance=0.0))
    cond = guided_velocity(model, x, 0.5, c, SamplerConfig(guidance=1.0))
    w3 = guided_velocity(model, x, 0.5, c, SamplerConfig(guidance=3.0))
    torch.testing.assert_close(w3, null + 3 * (cond - null))
    assert not torch.allclose(null, cond)
    # outside the guidance interval the plain conditional velocity is used
    torch.testing.assert_close(guided_velocity(model, x, 0.5, c, SamplerConfig(guidance=3.0, interval=(0.6, 1.0))),
                               cond)
    # compositional: v_null + sum_k w_k (v_k - v_null)
    comp = guided_velocity(model, x, 0.5, c, SamplerConfig(field_weights=(2.0, 0.5)))
    only = [model(x, torch.full((5,), 0.5), c, torch.tensor([[k != j for j in range(2)]] * 5)) for k in range(2)]
    torch.testing.assert_close(comp, null + 2.0 * (only[0] - null) + 0.5 * (only[1] - null))
    assert SamplerConfig(method="heun", field_weights=(1.0, 1.0)).nfe_per_step() == 6


def test_a_small_dit_learns_two_conditions():
    torch.manual_seed(0)
    model = DiTConfig(preset="DiT-XS", tokens=2, token_dim=2, cond_dim=4, hidden_size=64, depth=2,
                      num_heads=2, backend="torch").build()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    flow = FlowConfig(p_uncond=0.2)
    losses = []
    for step in range(300):
        which = torch.randint(0, 2, (128,), generator=g)
        mu = torch.where(which == 1, 2.0, -2.0).view(-1, 1, 1)
        x1 = mu + 0.3 * torch.randn(128, 2, 2, generator=g)
        cond = torch.nn.functional.one_hot(which, 4).float().unsqueeze(1)
        loss = flow_matching_loss(model, x1, cond, flow, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.6 * sum(losses[:20]) / 20
    model.eval()
    for which, target in ((0, -2.0), (1, 2.0)):
        cond = torch.nn.functional.one_hot(torch.full((500,), which), 4).float().unsqueeze(1)
        x = sample(model, cond, (2, 2), SamplerConfig(method="heun", steps=10, guidance=2.0),
                   torch.Generator().manual_seed(1))
        assert math.copysign(1, x.mean().item()) == math.copysign(1, target)
        assert abs(x.mean().item() - target) < 0.6


def test_a_type_prior_is_fitted_per_type_and_a_dit_trained_from_it_keeps_each_cell_in_its_type():
    """flow.prior=cell_type: the source is the type's Gaussian; an unknown type starts from N(0, I).
    One condition for both types, so only the source tells them apart: a DiT trained from the
    prior must carry each start to its own type's cells (with N(0, I) it could not)."""
    g = torch.Generator().manual_seed(0)
    types = ["a"] * 3000 + ["b"] * 3000
    mu = torch.tensor([-2.0] * 3000 + [2.0] * 3000).view(-1, 1)
    data = mu + 0.3 * torch.randn(6000, 4, generator=g)
    prior = GaussianPrior.fit([{"cell_type": t} for t in types], data)
    loc, scale = prior.loc_scale([{"cell_type": t} for t in ("b", "a", "unknown")])
    torch.testing.assert_close(loc[:2, 0], torch.tensor([2.0, -2.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(scale[:2], torch.full((2, 4), 0.3), atol=0.03, rtol=0)
    assert loc[2].abs().sum() == 0 and (scale[2] == 1).all()
    assert GaussianPrior.from_dict(prior.to_dict()).loc_scale([{"cell_type": "a"}])[0].allclose(loc[1:2], atol=1e-4)
    old = {"types": ["a", "b"], "loc": prior.loc.tolist(), "scale": prior.scale.tolist()}  # a run's pre-session-21 form
    assert GaussianPrior.from_dict(old).loc_scale([{"cell_type": "b"}])[0].allclose(loc[0:1], atol=1e-4)
    with pytest.raises(Exception, match="flow.prior='gene'"):
        FlowConfig(prior="gene")

    torch.manual_seed(0)
    model = DiTConfig(preset="DiT-XS", tokens=2, token_dim=2, cond_dim=4, hidden_size=64, depth=2,
                      num_heads=2, backend="torch").build()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    cond = torch.zeros(128, 1, 4)
    for step in range(200):
        rows = torch.randint(0, 6000, (128,), generator=g)
        loss = flow_matching_loss(model, data[rows].view(128, 2, 2), cond, FlowConfig(p_uncond=0.0), g,
                                  source=prior.loc_scale([{"cell_type": types[i]} for i in rows]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for t, target in (("a", -2.0), ("b", 2.0)):
        start = start_from(torch.randn(500, 2, 2, generator=g), prior.loc_scale([{"cell_type": t}] * 500))
        x = sample(model, torch.zeros(500, 1, 4), (2, 2), SamplerConfig(steps=10, guidance=1.0), g, start)
        assert abs(x.mean().item() - target) < 0.3 and 0.15 < x.std().item() < 0.5


def test_a_condition_prior_keys_seen_combinations_and_composes_unseen_ones_from_the_type():
    """flow.prior=condition: a combination with enough training cells gets its own Gaussian; an
    unseen one, the additive model's mean over the type's conditions."""
    g = torch.Generator().manual_seed(0)
    fields = ("cell_type", "tissue_general", "disease")
    # latent dim 0: the type (+0 / +4), dim 1: the tissue (lung +1), dim 2: the disease (COVID-19 +2)
    combos = [("T", "blood", "normal"), ("T", "lung", "normal"), ("T", "blood", "COVID-19"), ("B", "blood", "normal")]
    cells, rows = [], []
    for t, ti, d in combos:
        for _ in range(200):
            cells.append(dict(zip(fields, (t, ti, d))))
            rows.append([4.0 * (t == "B"), 1.0 * (ti == "lung"), 2.0 * (d == "COVID-19")])
    cells.append(dict(zip(fields, ("T", "liver", "normal"))))  # one cell: too few for a combination of its own
    rows.append([0.0, 0.0, 0.0])
    x = torch.tensor(rows) + 0.1 * torch.randn(len(rows), 3, generator=g)
    prior = GaussianPrior.fit(cells, x, fields, min_cells=20)
    asked = [("T", "lung", "normal"), ("T", "lung", "COVID-19"), ("T", "liver", "normal"), ("NK", "lung", "normal")]
    prior = GaussianPrior.from_dict(prior.to_dict())
    loc, scale = prior.loc_scale([dict(zip(fields, a)) for a in asked])
    torch.testing.assert_close(loc[0], torch.tensor([0.0, 1.0, 0.0]), atol=0.05, rtol=0)  # its own Gaussian
    assert scale[0].max() < 0.15
    # unseen: lung's and COVID-19's effects add up, although lung's T cells are all healthy
    torch.testing.assert_close(loc[1], torch.tensor([0.0, 1.0, 2.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(scale[1], prior.loc_scale([{"cell_type": "T"}])[1][0])  # with the type's spread
    assert abs(loc[2, 2]) < 0.1  # liver (one cell, healthy): healthy
    assert loc[3].abs().sum() == 0 and (scale[3] == 1).all()  # an unknown type: N(0, I)
    wide = load_prior({"condition_prior": prior.to_dict()}, FlowConfig(prior="condition", prior_spread="type"))
    w_loc, w_scale = wide.loc_scale([dict(zip(fields, a)) for a in asked])
    torch.testing.assert_close(w_loc, loc)  # flow.prior_spread=type: the same centres, every one the type's spread
    torch.testing.assert_close(w_scale[:2], prior.loc_scale([{"cell_type": "T"}] * 2)[1])
    with pytest.raises(Exception, match="prior_spread='wide'"):
        FlowConfig(prior="condition", prior_spread="wide")


def test_the_disease_shift_option_reads_its_old_boolean_and_names_its_choices(tmp_path):
    from clopdit_dist.config import load_config_section
    from clopdit_dist.errors import ConfigError

    old = tmp_path / "dit.yaml"  # a run's saved config from when the option was a bool
    old.write_text("sampler:\n  disease_shift: false\n")
    assert load_config_section(SamplerConfig, str(old), "sampler").disease_shift == "off"
    old.write_text("sampler:\n  disease_shift: true\n")
    assert load_config_section(SamplerConfig, str(old), "sampler").disease_shift == "latent"
    assert SamplerConfig(disease_shift="expression").disease_shift == "expression"
    with pytest.raises(ConfigError, match="choose off, latent, expression"):
        SamplerConfig(disease_shift="genes")
