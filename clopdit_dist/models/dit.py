"""CLOP-DiT: a Diffusion Transformer over autoencoder latents of cells, conditioned on text.

The network follows DiT (Peebles & Xie, 2023, "Scalable Diffusion Models with
Transformers", arXiv:2212.09748): tokens go through transformer blocks whose LayerNorms are
modulated by a conditioning vector c (adaLN), with a per-channel gate on each residual
branch; the modulation layers and the output layer start at zero ("adaLN-Zero"), so every
block is the identity and the predicted velocity is exactly 0 at initialisation.

What differs from image DiT:

* Input: a cell's latent z (stage 0's ``encode``: 64 numbers in the demo's autoencoder, 256 in
  the cluster preset) reshaped to ``tokens × token_dim`` (4 × 16, 16 × 16), embedded linearly,
  plus learned position embeddings.
* Time: flow matching, t ∈ [0, 1] (scaled by 1000 for the sinusoidal embedding); the model
  predicts the velocity v(x_t, t, cond), same shape as x.
* Condition: ``cond`` (B, K, cond_dim) holds K fields. K = 1: the whole-caption CLOP text
  embedding. K > 1: one embedding per field (cell type, tissue, disease, ...) for
  compositional guidance as in scLDM. ``drop`` (B, K) replaces a field by that field's
  learned null embedding. Each field goes through its own first layer, the SiLU outputs are
  summed over fields and share the output layer; the result is added to the time
  embedding to form c.

Guidance is the sampler's job (``flow.py``, by batching): the unconditional velocity v_∅
is ``model(x, t, cond, drop=torch.ones(B, K, dtype=torch.bool))``; field k alone is
``drop[:, j] = j != k``. Drop fields at random during training (the trainer passes
``drop``) so that these paths are learned.

The elementwise adaLN pieces and attention go through ``kernels`` (Triton on CUDA, PyTorch
elsewhere; ``backend`` picks). The Triton attention takes 16-bit activations, as under bf16
autocast or a bf16 model: with ``backend="auto"`` fp32 attention falls back to SDPA, with
``backend="triton"`` it is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from clopdit_dist.kernels.attention import attention
from clopdit_dist.kernels.modulate import gated_residual, layernorm_modulate

#################################################################################
#               Embedding layers for timesteps and conditions                   #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Flow-matching time t ∈ [0, 1] → sinusoidal features of 1000·t → MLP (as in DiT)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(B,) fractional times → (B, dim) cos/sin features (GLIDE's embedding)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(1000.0 * t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class ConditionEmbedder(nn.Module):
    """K condition fields (B, K, cond_dim) → one (B, hidden) vector; a learned null per field.

    Field k goes through its own layer ``SiLU(W_k e_k + b_k)``; the K results are summed and
    share the output layer. Summing keeps the cost independent of which fields are present
    and lets guidance add or remove one field at a time.
    """

    def __init__(self, cond_dim: int, num_fields: int, hidden_size: int):
        super().__init__()
        self.null = nn.Parameter(torch.zeros(num_fields, cond_dim))
        self.weight = nn.Parameter(torch.zeros(num_fields, cond_dim, hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_fields, hidden_size))
        self.out = nn.Linear(hidden_size, hidden_size)

    def forward(self, cond: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        if drop is not None:
            cond = torch.where(drop[..., None], self.null.to(cond.dtype), cond)
        h = torch.einsum("bkc,kch->bkh", cond, self.weight.to(cond.dtype)) + self.bias.to(cond.dtype)
        return self.out(F.silu(h).sum(dim=1))


#################################################################################
#                                 Core DiT model                                #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention over tokens; the core runs in ``kernels.attention``."""

    def __init__(self, hidden_size: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, C = x.shape
        qkv = self.qkv(x).reshape(B, S, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                     # (B, H, S, D) views
        out = attention(q, k, v, backend=self.backend)              # (B, H, S, D)
        return self.proj(out.transpose(1, 2).reshape(B, S, C))


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_ratio: float):
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, inner)
        self.fc2 = nn.Linear(inner, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning: shift, scale and gate for attention and MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, backend: str = "auto"):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads, backend)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.backend = backend

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = self.attn(layernorm_modulate(x, shift_msa, scale_msa, backend=self.backend))
        x = gated_residual(x, gate_msa, h, backend=self.backend)
        h = self.mlp(layernorm_modulate(x, shift_mlp, scale_mlp, backend=self.backend))
        return gated_residual(x, gate_mlp, h, backend=self.backend)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map back to token_dim (zero-initialised)."""

    def __init__(self, hidden_size: int, token_dim: int, backend: str = "auto"):
        super().__init__()
        self.linear = nn.Linear(hidden_size, token_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.backend = backend

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(layernorm_modulate(x, shift, scale, backend=self.backend))


class DiT(nn.Module):
    """Velocity model v(x_t, t, cond) over latent cells x of shape (B, tokens, token_dim)."""

    def __init__(
        self,
        tokens: int = 16,
        token_dim: int = 16,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        cond_dim: int = 256,
        num_fields: int = 1,
        backend: str = "auto",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.tokens, self.token_dim, self.cond_dim, self.num_fields = tokens, token_dim, cond_dim, num_fields
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = nn.Linear(token_dim, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, hidden_size))
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.c_embedder = ConditionEmbedder(cond_dim, num_fields, hidden_size)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, backend) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, token_dim, backend)
        self.set_backend(backend)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.apply(_basic_init)

        nn.init.normal_(self.pos_embed, std=0.02)
        # Embedding MLPs and the null condition as DiT initialises its embedders.
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.c_embedder.weight, std=0.02)
        nn.init.normal_(self.c_embedder.out.weight, std=0.02)
        nn.init.normal_(self.c_embedder.null, std=0.02)

        # adaLN-Zero: modulation and output layers start at zero, so each block is the identity.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def set_backend(self, backend: str) -> "DiT":
        """Route every kernel call through ``backend`` ("auto" | "triton" | "torch")."""
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend={backend!r} is not one of 'auto', 'triton', 'torch'")
        self.backend = backend
        for m in self.modules():
            if m is not self and hasattr(m, "backend"):
                m.backend = backend
        return self

    @property
    def latent_dim(self) -> int:
        return self.tokens * self.token_dim

    def _check_inputs(self, x, t, cond, drop):
        B = x.shape[0]
        if tuple(x.shape[1:]) != (self.tokens, self.token_dim):
            raise ValueError(f"x must be (B, {self.tokens}, {self.token_dim}) (a {self.latent_dim}-d latent "
                             f"reshaped to tokens × token_dim), got {tuple(x.shape)}")
        if t.dim() == 0:
            t = t.expand(B)
        if cond.dim() == 2 and self.num_fields == 1:
            cond = cond[:, None]
        if tuple(cond.shape) != (B, self.num_fields, self.cond_dim):
            raise ValueError(f"cond must be (B, num_fields, cond_dim) = ({B}, {self.num_fields}, {self.cond_dim}), "
                             f"got {tuple(cond.shape)}")
        if drop is not None:
            if drop.dim() == 1:
                drop = drop[:, None].expand(B, self.num_fields)
            if tuple(drop.shape) != (B, self.num_fields) or drop.dtype != torch.bool:
                raise ValueError(f"drop must be a bool tensor (B, num_fields) = ({B}, {self.num_fields}), "
                                 f"got {drop.dtype} {tuple(drop.shape)}")
        return t, cond, drop

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """
        x:    (B, tokens, token_dim) noisy latents x_t
        t:    (B,) flow-matching times in [0, 1] (or a scalar)
        cond: (B, num_fields, cond_dim) condition embeddings ((B, cond_dim) when num_fields is 1)
        drop: optional bool (B, num_fields) (or (B,) for every field): True = use the null embedding
        returns the predicted velocity, (B, tokens, token_dim)
        """
        t, cond, drop = self._check_inputs(x, t, cond, drop)
        h = self.x_embedder(x) + self.pos_embed                     # (B, T, hidden)
        c = self.t_embedder(t) + self.c_embedder(cond, drop)        # (B, hidden)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, c, use_reentrant=False)
            else:
                h = block(h, c)
        return self.final_layer(h, c)                               # (B, T, token_dim)

    def train_flops_per_sample(self) -> float:
        """Forward + backward FLOPs of one sample (3 × forward, 2 per multiply-add), for MFU.

        Token-wise matmuls run once per token, the conditioning ones once per sample;
        attention adds 4·T²·hidden per block (q kᵀ and P v).
        """
        per_sample_modules = (self.t_embedder, self.c_embedder, *[b.adaLN_modulation for b in self.blocks],
                              self.final_layer.adaLN_modulation)
        per_sample_ids = {id(p) for m in per_sample_modules for p in m.parameters()}
        per_token = sum(p.numel() for n, p in self.named_parameters()
                        if id(p) not in per_sample_ids and p.dim() > 1 and n != "pos_embed")
        per_sample = sum(p.numel() for p in self.parameters() if id(p) in per_sample_ids and p.dim() > 1)
        fwd = 2 * per_token * self.tokens + 2 * per_sample + 4 * self.depth * self.tokens ** 2 * self.hidden_size
        return 3.0 * fwd


#################################################################################
#                                DiT size presets                               #
#################################################################################

def _preset(hidden_size: int, depth: int, num_heads: int, token_dim: int | None = None):
    def make(**kwargs) -> DiT:
        sizes = {"hidden_size": hidden_size, "depth": depth, "num_heads": num_heads}
        if token_dim is not None:
            sizes["token_dim"] = token_dim
        return DiT(**{**sizes, **kwargs})
    make.token_dim = token_dim
    return make


# A cell latent is 64-256 numbers, not a 32x32x4 image latent: the CPU presets are sized for it
# (DiT-S is what the demo trains). Like DiT's patch size, a preset may fix the token width:
# DiT-S reads a 256-number latent as 8 tokens of 32, half the FLOPs of the autoencoder's 16 x 16
# view; the demo's configs/dit.yaml sets token_dim 16 for its 64-number latent (4 tokens). B and
# L are DiT's image sizes, for GPUs, on the autoencoder's token view. ``model.token_dim`` in a
# config overrides either.
DiT_XS = _preset(64, 2, 2)                  # unit tests
DiT_S = _preset(128, 4, 4, token_dim=32)    # CPU: the demo
DiT_B = _preset(768, 12, 12)
DiT_L = _preset(1024, 24, 16)

DiT_models = {"DiT-XS": DiT_XS, "DiT-S": DiT_S, "DiT-B": DiT_B, "DiT-L": DiT_L}


def build_dit(name: str, **kwargs) -> DiT:
    """``build_dit("DiT-B", num_fields=4)``; keyword arguments override the preset's sizes too."""
    if name not in DiT_models:
        raise ValueError(f"unknown DiT preset {name!r}; valid presets: {', '.join(DiT_models)}")
    return DiT_models[name](**kwargs)


@dataclass
class DiTConfig:
    """Everything that builds a DiT; ``None`` sizes come from the preset."""

    preset: str = "DiT-B"
    tokens: int = 16
    token_dim: int | None = None  # None: the preset's token width, else the autoencoder's
    cond_dim: int = 256
    num_fields: int = 1
    mlp_ratio: float = 4.0
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    backend: str = "auto"
    grad_checkpointing: bool = False

    def split_latent(self, latent_dim: int, default_token_dim: int) -> None:
        """Set ``tokens × token_dim = latent_dim``: the configured token width, else the
        preset's, else ``default_token_dim`` (the autoencoder's token view)."""
        if self.preset not in DiT_models:
            raise ValueError(f"unknown DiT preset {self.preset!r}; valid presets: {', '.join(DiT_models)}")
        width = self.token_dim or DiT_models[self.preset].token_dim or default_token_dim
        if latent_dim % width:
            raise ValueError(f"model.token_dim={width} does not divide the autoencoder latent ({latent_dim}); "
                             f"choose a divisor of {latent_dim}")
        self.token_dim, self.tokens = width, latent_dim // width

    def build(self) -> DiT:
        sizes = {k: v for k, v in dict(hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads,
                                       token_dim=self.token_dim).items() if v is not None}
        return build_dit(self.preset, tokens=self.tokens, cond_dim=self.cond_dim,
                         num_fields=self.num_fields, mlp_ratio=self.mlp_ratio, backend=self.backend,
                         grad_checkpointing=self.grad_checkpointing, **sizes)


class LatentDiT(nn.Module):
    """The DiT plus the latent standardisation it was trained with (saved with the weights)."""

    def __init__(self, dit: DiT, latent_dim: int):
        super().__init__()
        self.dit = dit
        self.register_buffer("latent_mean", torch.zeros(latent_dim))
        self.register_buffer("latent_std", torch.ones(latent_dim))

    def standardize(self, z: torch.Tensor) -> torch.Tensor:
        x = (z.float() - self.latent_mean.float()) / self.latent_std.float()
        return x.view(z.shape[0], self.dit.tokens, self.dit.token_dim)

    def unstandardize(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1).float() * self.latent_std.float() + self.latent_mean.float()

    def forward(self, x, t, cond, drop=None):
        dtype = self.dit.pos_embed.dtype  # bf16 engines do not cast inputs
        return self.dit(x.to(dtype), t, cond.to(dtype), drop)
