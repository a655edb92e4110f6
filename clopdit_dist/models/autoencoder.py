"""Stage 0: the count autoencoder that defines the latent space every later stage uses.

    encode(counts)            -> z            (B, latent_tokens * token_dim)
    decode(z, library_size)   -> NB / ZINB distribution over counts (mean, inverse dispersion, dropout)

Encoder: log1p of counts per 10k → MLP → z (LayerNorm'd, so every cell's latent has zero mean
and unit variance across dimensions: a scale the diffusion model can rely on). Decoder: MLP →
softmax proportions over genes × library size = NB mean, with a per-gene inverse dispersion
(learned with the loss; the ``ae`` stage's ``dispersion=moments`` re-estimates it after training,
:func:`nb_theta_by_moments`), and optionally a zero-inflation logit per gene and cell. This is the
decoder of scVI (Lopez et al., Nat. Methods 2018) and scLDM, and the frozen decoder of CLOP-DiT's stage 3
(which used scGPT's; its weights cannot be fetched here, so ours is the default).
``decoder=linear`` or ``mlp+linear`` replaces or joins the MLP with a linear map from z to the
logits (LDVAE); they reconstruct better, but the DiT models their latent worse (README,
"The codec is a ceiling of its own"), so the MLP stays the default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError


@dataclass
class AEConfig:
    n_genes: int = 2000  # set from the data (the HVG count)
    latent_tokens: int = 16
    token_dim: int = 16
    hidden: tuple[int, ...] = (1024, 512)
    dropout: float = 0.1
    # dropout in the decoder's hidden layers (None: ``dropout``, as every default run trained). scVI's
    # decoder has none. Screened in session 19 and left off: the learned dispersion barely moved (0.69 ->
    # 0.72 of the atlas's true one at the median, seed 0) and the round trip's val energy rose 3.03 -> 3.14
    # (benchmarks/results/codec_screen.jsonl, dd0_s0); the ae stage's ``dispersion`` is what fixed theta
    decoder_dropout: float | None = None
    likelihood: str = "nb"  # nb or zinb
    input_noise: float = 0.0  # multiplicative dropout of input counts (a denoising AE)
    # mlp: logits = MLP(z) (scVI); linear: logits = W z (LDVAE, Svensson et al., Bioinformatics
    # 2020: additive programs compose, so unseen combinations of seen programs decode);
    # mlp+linear: both, summed (the linear path carries additive programs, the MLP the rest)
    decoder: str = "mlp"
    # the decoder is trained on z + latent_noise·ε, so latents a little off the data manifold
    # (a DiT's samples) decode to cells near it: the smoothing a VAE's KL term gives scLDM
    latent_noise: float = 0.0
    # a linear cell-type classifier on z, trained with the NB loss (scANVI's classification term,
    # Xu et al., Mol. Syst. Biol. 2021): the encoder must keep types linearly apart in z, rare ones
    # included, where the reconstruction loss alone lets a type of a few dozen cells fold into its
    # neighbour. Weight of its cross-entropy per cell (0 = no classifier); n_types is set from the data.
    type_loss: float = 0.0
    n_types: int = 0
    # the same for disease (n_diseases set from the data, "normal" one of them), meant to give each disease
    # one direction in z that every type shares. Off: on the demo atlas it learns the diseased donors'
    # own effects and keeps less of a disease in new combinations, not more (README, "Session 18: what
    # the codec loses on a new combination")
    disease_loss: float = 0.0
    n_diseases: int = 0

    @property
    def latent_dim(self) -> int:
        return self.latent_tokens * self.token_dim


def _mlp(dims: list[int], dropout: float, last_plain: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2 or not last_plain:
            layers += [nn.LayerNorm(b), nn.GELU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def log_normalize(counts: torch.Tensor, target_sum: float = 1e4) -> torch.Tensor:
    lib = counts.sum(-1, keepdim=True).clamp_min(1.0)
    return torch.log1p(counts / lib * target_sum)


def nb_log_prob(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """log NB(x; mean mu, inverse dispersion theta), elementwise (scVI's parameterisation)."""
    log_theta_mu = torch.log(theta + mu + eps)
    return (theta * (torch.log(theta + eps) - log_theta_mu) + x * (torch.log(mu + eps) - log_theta_mu)
            + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1))


def zinb_log_prob(x, mu, theta, pi_logits, eps: float = 1e-8) -> torch.Tensor:
    """Zero-inflated NB with dropout probability sigmoid(pi_logits) (scVI's stable form)."""
    softplus_pi = F.softplus(-pi_logits)
    log_theta_eps = torch.log(theta + eps)
    log_theta_mu = torch.log(theta + mu + eps)
    pi_theta_log = -pi_logits + theta * (log_theta_eps - log_theta_mu)
    case_zero = F.softplus(pi_theta_log) - softplus_pi
    case_nonzero = (-softplus_pi + pi_theta_log + x * (torch.log(mu + eps) - log_theta_mu)
                    + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1))
    return torch.where(x < eps, case_zero, case_nonzero)


class CountAutoencoder(nn.Module):
    def __init__(self, cfg: AEConfig):
        super().__init__()
        self.cfg = cfg
        dims = [cfg.n_genes, *cfg.hidden, cfg.latent_dim]
        self.encoder = _mlp(dims, cfg.dropout)
        self.latent_norm = nn.LayerNorm(cfg.latent_dim, elementwise_affine=False)
        if cfg.decoder not in ("mlp", "linear", "mlp+linear"):
            raise ConfigError(f"model.decoder={cfg.decoder!r}: choose mlp, linear or mlp+linear")
        if cfg.decoder == "linear":
            self.decoder, width = nn.Identity(), cfg.latent_dim
        else:
            p_drop = cfg.dropout if cfg.decoder_dropout is None else cfg.decoder_dropout
            self.decoder, width = _mlp(dims[::-1][:-1], p_drop, last_plain=False), dims[1]
        self.px_logits = nn.Linear(width, cfg.n_genes)
        self.px_linear = nn.Linear(cfg.latent_dim, cfg.n_genes, bias=False) if cfg.decoder == "mlp+linear" else None
        self.px_dropout = nn.Linear(width, cfg.n_genes) if cfg.likelihood == "zinb" else None
        self.log_theta = nn.Parameter(torch.zeros(cfg.n_genes))
        self.type_head = nn.Linear(cfg.latent_dim, cfg.n_types) if cfg.type_loss > 0 and cfg.n_types > 0 else None
        self.disease_head = (nn.Linear(cfg.latent_dim, cfg.n_diseases)
                             if cfg.disease_loss > 0 and cfg.n_diseases > 0 else None)

    def encode(self, counts: torch.Tensor) -> torch.Tensor:
        x = log_normalize(counts.float())
        return self.latent_norm(self.encoder(x.to(self.px_logits.weight.dtype)))

    def decode(self, z: torch.Tensor, library_size: torch.Tensor) -> dict[str, torch.Tensor]:
        """NB (or ZINB) parameters for counts summing to ``library_size`` in expectation."""
        z = z.to(self.px_logits.weight.dtype)
        h = self.decoder(z)
        logits = self.px_logits(h)
        if self.px_linear is not None:
            logits = logits + self.px_linear(z)
        scale = torch.softmax(logits.float(), dim=-1)
        out = {"mu": scale * library_size.float().unsqueeze(-1), "theta": self.log_theta.float().exp().expand_as(scale)}
        if self.px_dropout is not None:
            out["pi_logits"] = self.px_dropout(h).float()
        return out

    def log_prob(self, counts: torch.Tensor, params: dict) -> torch.Tensor:
        """Per-cell log-likelihood (summed over genes)."""
        x = counts.float()
        if "pi_logits" in params:
            lp = zinb_log_prob(x, params["mu"], params["theta"], params["pi_logits"])
        else:
            lp = nb_log_prob(x, params["mu"], params["theta"])
        return lp.sum(-1)

    def forward(self, counts: torch.Tensor, weight: torch.Tensor | None = None,
                cell_type: torch.Tensor | None = None, type_weight: torch.Tensor | None = None,
                disease: torch.Tensor | None = None, disease_weight: torch.Tensor | None = None) -> dict:
        """The training loss: mean NB negative log-likelihood per cell (``weight``: optional per-cell
        weights), plus ``type_loss`` × the type classifier's cross-entropy where ``cell_type`` (type
        indices, -1 for none) is given, each cell weighted by ``type_weight``, and likewise
        ``disease_loss`` × the disease classifier's for ``disease`` and ``disease_weight``."""
        inputs = counts
        if self.training and self.cfg.input_noise > 0:
            keep = torch.rand_like(counts, dtype=torch.float32) > self.cfg.input_noise
            inputs = counts * keep
        z = self.encode(inputs)
        out = {}
        loss = 0.0
        for name, head, labels, w, scale in (("type_ce", self.type_head, cell_type, type_weight, self.cfg.type_loss),
                                             ("disease_ce", self.disease_head, disease, disease_weight,
                                              self.cfg.disease_loss)):
            if head is not None and labels is not None:
                out[name] = _weighted_ce(head(z), labels, w)
                loss = loss + scale * out[name]
        if self.training and self.cfg.latent_noise > 0:
            z = z + self.cfg.latent_noise * torch.randn_like(z)
        params = self.decode(z, counts.float().sum(-1))
        nll = -self.log_prob(counts, params)
        out["nll"] = (nll * weight.to(nll)).mean() if weight is not None else nll.mean()
        out["loss"] = out["nll"] + loss
        return out

    @torch.no_grad()
    def sample(self, z: torch.Tensor, library_size: torch.Tensor, generator: torch.Generator | None = None):
        """Counts drawn from the decoded NB/ZINB (Gamma-Poisson), as float32 integers."""
        return draw_counts(self.decode(z, library_size), generator)


def _weighted_ce(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy averaged with per-cell weights; cells labelled -1 (a label training never saw) count 0."""
    ce = F.cross_entropy(logits.float(), labels.clamp_min(0), reduction="none")
    w = (labels >= 0).float() * (weight.to(ce) if weight is not None else 1.0)
    return (ce * w).sum() / w.sum().clamp_min(1e-8)


def draw_counts(params: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
    """Counts (float32 integers) from decoded NB parameters (``mu``, ``theta``) as a Gamma-Poisson
    mixture, zero-inflated where ``pi_logits`` is given."""
    x = nb_sample(params["mu"], params["theta"], generator)
    if "pi_logits" in params:
        drop = torch.rand(x.shape, generator=generator, device=x.device) < torch.sigmoid(params["pi_logits"])
        x = x.masked_fill(drop, 0.0)
    return x


def nb_sample(mu: torch.Tensor, theta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Negative-binomial counts as a Gamma–Poisson mixture (mean ``mu``, inverse dispersion ``theta``)."""
    return torch.poisson(_gamma(theta, generator) * (mu / theta), generator=generator)


def nb_theta_by_moments(counts: torch.Tensor, mu: torch.Tensor, lo: float = 0.01, hi: float = 1e4) -> torch.Tensor:
    """Per-gene NB inverse dispersion by the method of moments, from Var(x) = mu + mu^2 / theta summed
    over cells: theta_g = sum mu^2 / sum ((x - mu)^2 - mu), clipped to [lo, hi] (a gene without excess
    variance over Poisson gets ``hi``). ``counts`` and ``mu`` (cells, genes); sums in float64."""
    x, m = counts.double(), mu.double()
    return ((m ** 2).sum(0) / ((x - m) ** 2 - m).sum(0).clamp_min(1e-8)).clamp(lo, hi).float()


def _gamma(alpha: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Gamma(alpha, 1) with an explicit generator (torch's _standard_gamma has none):
    Marsaglia & Tsang (2000) for alpha >= 1, boosted by U^(1/alpha) below 1."""
    boost = alpha < 1
    a = torch.where(boost, alpha + 1, alpha)
    d = a - 1.0 / 3
    c = 1.0 / torch.sqrt(9 * d)
    out = torch.empty_like(a)
    todo = torch.ones_like(a, dtype=torch.bool)
    while todo.any():
        n = torch.randn(a.shape, generator=generator, device=a.device)
        v = (1 + c * n) ** 3
        u = torch.rand(a.shape, generator=generator, device=a.device)
        ok = (v > 0) & (torch.log(u) < 0.5 * n**2 + d - d * v + d * torch.log(v.clamp_min(1e-30)))
        take = todo & ok
        out[take] = (d * v)[take]
        todo &= ~ok
    u = torch.rand(a.shape, generator=generator, device=a.device)
    return torch.where(boost, out * u ** (1.0 / alpha.clamp_min(1e-8)), out)
