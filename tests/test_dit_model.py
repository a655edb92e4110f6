"""The CLOP-DiT velocity model: shapes, adaLN-Zero init, null conditions, kernel backends.

The Triton backend runs in the interpreter without a GPU; the variable must be set before
triton is first imported (see tests/test_kernels.py).
"""

import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from clopdit_dist.models.dit import DiT, DiTConfig, DiT_models, build_dit  # noqa: E402
from clopdit_dist.kernels import _dispatch  # noqa: E402
from clopdit_dist.kernels.attention import _attn_fwd_kernel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETING = _dispatch.triton_interpreting(_attn_fwd_kernel)
# float64 through the interpreter (exact comparison); on a GPU, fp32 weights under bf16
# autocast, as training runs (the GPU attention kernel takes 16-bit inputs).
DTYPE = torch.float64 if INTERPRETING else torch.float32

TINY = dict(tokens=5, token_dim=4, hidden_size=48, depth=2, num_heads=2, cond_dim=8, num_fields=2)


def tiny(**overrides) -> DiT:
    return build_dit("DiT-XS", **{**TINY, **overrides}).to(DEVICE, DTYPE)


def randomize_(model: DiT, std: float = 0.2) -> DiT:
    """Replace the zero-initialised layers so that every path carries signal."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * std)
    return model


def inputs(B=3, model_kwargs=TINY):
    x = torch.randn(B, model_kwargs["tokens"], model_kwargs["token_dim"], device=DEVICE, dtype=DTYPE)
    t = torch.rand(B, device=DEVICE, dtype=DTYPE)
    cond = torch.randn(B, model_kwargs["num_fields"], model_kwargs["cond_dim"], device=DEVICE, dtype=DTYPE)
    return x, t, cond


def test_shapes_and_zero_init():
    model = tiny()
    x, t, cond = inputs()
    out = model(x, t, cond)
    assert out.shape == x.shape
    # adaLN-Zero: the output layer is zero, whatever the input.
    assert torch.equal(out, torch.zeros_like(out))
    for block in model.blocks:
        assert not block.adaLN_modulation[-1].weight.any()


def test_single_field_condition_and_scalar_time():
    model = randomize_(tiny(num_fields=1))
    x, t, cond = inputs(model_kwargs={**TINY, "num_fields": 1})
    full = model(x, t, cond)
    torch.testing.assert_close(model(x, t, cond[:, 0]), full)                 # (B, Dc) for K = 1
    torch.testing.assert_close(model(x, t[0], cond)[0], full[0])              # scalar t


def test_drop_gives_the_null_path():
    model = randomize_(tiny())
    x, t, cond = inputs()
    all_dropped = torch.ones(3, 2, dtype=torch.bool, device=DEVICE)
    other = torch.randn_like(cond)
    v_null = model(x, t, cond, all_dropped)
    # v_∅ ignores the condition entirely, and the (B,) shorthand drops every field.
    torch.testing.assert_close(model(x, t, other, all_dropped), v_null, rtol=0, atol=0)
    torch.testing.assert_close(model(x, t, other, all_dropped[:, 0]), v_null, rtol=0, atol=0)
    assert not torch.allclose(model(x, t, cond), v_null)
    # Dropping one field: only the other field's value matters.
    only_first = torch.tensor([[False, True]] * 3, device=DEVICE)
    mixed = torch.cat([cond[:, :1], other[:, 1:]], dim=1)
    torch.testing.assert_close(model(x, t, mixed, only_first), model(x, t, cond, only_first), rtol=0, atol=0)


def test_bad_inputs_name_the_expected_shape():
    model = tiny()
    x, t, cond = inputs()
    with pytest.raises(ValueError, match=r"x must be \(B, 5, 4\)"):
        model(x[:, :4], t, cond)
    with pytest.raises(ValueError, match="cond must be"):
        model(x, t, cond[:, :1])
    with pytest.raises(ValueError, match="drop must be a bool"):
        model(x, t, cond, torch.zeros(3, 2, device=DEVICE))


@pytest.mark.skipif(not (DEVICE == "cuda" or INTERPRETING), reason="needs a GPU or TRITON_INTERPRET=1")
def test_triton_backend_matches_torch_backend():
    model = randomize_(tiny())
    x, t, cond = inputs()
    drop = torch.tensor([[True, False], [False, False], [True, True]], device=DEVICE)
    results = {}
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if DEVICE == "cuda" else contextlib.nullcontext())
    for backend in ("torch", "triton"):
        model.set_backend(backend).zero_grad()
        with autocast:
            out = model(x, t, cond, drop).float()
        (out * torch.sin(out)).sum().backward()   # a cotangent that depends on the output
        results[backend] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    tol = 1e-10 if DTYPE == torch.float64 else 5e-2
    ref_out, ref_grads = results["torch"]
    out, grads = results["triton"]
    assert ((out - ref_out).abs().max() / ref_out.abs().max()).item() <= tol
    for name, g in grads.items():
        err = ((g - ref_grads[name]).abs().max() / ref_grads[name].abs().max().clamp_min(1e-30)).item()
        assert err <= tol, f"grad of {name}: relative error {err:.2e}"


def test_grad_checkpointing_gives_the_same_grads():
    plain = randomize_(tiny(backend="torch"))
    ckpt = tiny(backend="torch", grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, cond = inputs()
    for model in (plain, ckpt):
        model.train()
        model(x, t, cond).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=0, msg=name)


def test_presets_and_config():
    assert set(DiT_models) == {"DiT-XS", "DiT-S", "DiT-B", "DiT-L"}
    with pytest.raises(ValueError, match="valid presets: DiT-XS"):
        build_dit("DiT-XXL")
    cfg = DiTConfig(preset="DiT-XS", num_fields=3, depth=2, backend="torch")
    cfg.split_latent(256, 16)
    model = cfg.build()
    assert (model.hidden_size, model.depth, model.num_heads, model.num_fields) == (64, 2, 2, 3)
    assert model.latent_dim == 256 and model.backend == "torch"
    assert all(b.attn.backend == "torch" for b in model.blocks)
    # The FLOP count is about 6 × (parameters touched per token) × tokens.
    n_block = sum(p.numel() for n, p in model.blocks.named_parameters() if "adaLN" not in n)
    assert 6 * n_block * model.tokens <= model.train_flops_per_sample() <= 6 * 1.5 * n_block * model.tokens
    with pytest.raises(ValueError, match="not divisible"):
        DiT(hidden_size=100, num_heads=3)


def test_token_split_of_the_latent():
    """DiT-S reads a 256-d latent as 8 tokens of 32, B takes the autoencoder's view, a config
    overrides either; a width that does not divide the latent is named."""
    s = DiTConfig(preset="DiT-S")
    s.split_latent(256, 16)
    assert (s.tokens, s.token_dim) == (8, 32) and s.build().pos_embed.shape[1] == 8
    b = DiTConfig(preset="DiT-B")
    b.split_latent(256, 16)
    assert (b.tokens, b.token_dim) == (16, 16)
    narrow = DiTConfig(preset="DiT-S", token_dim=16)
    narrow.split_latent(256, 16)
    assert (narrow.tokens, narrow.token_dim) == (16, 16)
    bad = DiTConfig(preset="DiT-S", token_dim=24)
    with pytest.raises(ValueError, match="token_dim=24 does not divide.*256"):
        bad.split_latent(256, 16)
