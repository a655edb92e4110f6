"""The latent codec: the one contract between counts and the latent ``z`` the later stages see.

    codec.encode(counts)               -> z (B, latent_dim)
    codec.decode(z, library_size)      -> {"mu", "theta"[, "pi_logits"]}: NB / ZINB over counts
    codec.sample(z, library_size, g)   -> integer counts (float32), drawn from that distribution

CLOP and the DiT only see ``z`` (DESIGN.md, "one fixed latent contract"), so any encoder /
decoder pair plugs in here. Two ship:

* ``autoencoder``: the NB/ZINB count autoencoder trained by the ``ae`` stage
  (:mod:`clopdit_dist.models.autoencoder`; scVI's decoder, Lopez et al., Nat. Methods 2018).
* ``pca``: log1p CP10k → PCA fitted on training cells; decoding inverts the projection to
  proportions, and counts are drawn NB with a per-gene inverse dispersion fitted on the
  residuals of training cells. No training loop: fitted from the shards in seconds. It is
  the latent-diffusion ablation of the evaluation (a linear latent against a learned one).

A run records its codec in ``RUN/codec.json`` (name, the stage directory holding its
weights, its config); :func:`load_codec` is the one way to get it back. Adding a codec (an
external encoder such as scGPT or SCimilarity, a permutation-invariant VAE) is one class
with ``encode``/``decode``/``sample``, ``save``/``load`` and ``@register_codec("name")``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn as nn

from ..data.manifest import write_json_atomic
from ..run import RunDir, RunDirError
from .autoencoder import AEConfig, CountAutoencoder, draw_counts, log_normalize, nb_theta_by_moments


@runtime_checkable
class LatentCodec(Protocol):
    name: str
    genes: list[str]  # feature_ids of the counts it reads and writes, in order
    latent_dim: int
    token_dim: int  # the codec's natural token width (the DiT's default split of z)

    def encode(self, counts: torch.Tensor) -> torch.Tensor: ...

    def decode(self, z: torch.Tensor, library_size: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def sample(self, z: torch.Tensor, library_size: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor: ...


@dataclass
class CodecConfig:
    """Which codec the CLOP and DiT stages read (``codec.name=pca`` switches a run to PCA)."""

    name: str = "autoencoder"  # autoencoder (trained by the ae stage) or pca (fitted from the shards)
    genes: str = "hvg:2000"  # pca: the genes it models
    n_components: int = 64  # pca: latent width
    fit_cells: int = 20_000  # pca: training cells the PCA and dispersions are fitted on
    seed: int = 0


CODECS: dict[str, type] = {}
CODEC_FILE = "codec.json"


def register_codec(name: str):
    def deco(cls):
        cls.name = name
        CODECS[name] = cls
        return cls
    return deco


# ----------------------------------------------------------------------------- autoencoder
@register_codec("autoencoder")
class AutoencoderCodec(nn.Module):
    """The trained count autoencoder of the run's ``ae`` stage."""

    stage = "ae"

    def __init__(self, model: CountAutoencoder, genes: list[str]):
        super().__init__()
        self.model, self.genes = model, list(genes)
        self.latent_dim, self.token_dim = model.cfg.latent_dim, model.cfg.token_dim

    def encode(self, counts):
        return self.model.encode(counts)

    def decode(self, z, library_size):
        return self.model.decode(z, library_size)

    def sample(self, z, library_size, generator=None):
        return self.model.sample(z, library_size, generator=generator)

    @classmethod
    def load(cls, run: RunDir, device="cpu") -> "AutoencoderCodec":
        from ..config import load_config_section

        cfg = load_config_section(AEConfig, run.config_path(cls.stage), "model")
        model = CountAutoencoder(cfg)
        model.load_state_dict(run.load_weights(cls.stage))
        genes = json.loads(run.load_weights_metadata(cls.stage)["genes"])
        return cls(model, genes).eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------- PCA
@register_codec("pca")
class PCACodec(nn.Module):
    """log1p CP10k → PCA (fitted on training cells) → z; back through the inverse projection
    to proportions, counts NB with per-gene inverse dispersion.

    ``z`` is the PCA scores divided by one scalar (the root mean component variance), so its
    scale is about 1 like the autoencoder's LayerNorm'd latent.
    """

    stage = "pca"

    def __init__(self, genes: list[str], mean: torch.Tensor, components: torch.Tensor, scale: float,
                 theta: torch.Tensor, token_dim: int = 8):
        super().__init__()
        self.genes = list(genes)
        self.register_buffer("mean", mean.float())
        self.register_buffer("components", components.float())  # (k, G), orthonormal rows
        self.register_buffer("theta", theta.float())
        self.scale = float(scale)
        self.latent_dim = int(components.shape[0])
        self.token_dim = token_dim if self.latent_dim % token_dim == 0 else 1

    def encode(self, counts):
        x = log_normalize(counts.float().to(self.mean.device))
        return (x - self.mean) @ self.components.T / self.scale

    def decode(self, z, library_size):
        expr = (z.float() * self.scale) @ self.components + self.mean
        cp10k = torch.expm1(expr.clamp_min(0))
        prop = cp10k / cp10k.sum(-1, keepdim=True).clamp_min(1e-8)
        mu = prop * library_size.float().unsqueeze(-1)
        return {"mu": mu, "theta": self.theta.expand_as(mu)}

    @torch.no_grad()
    def sample(self, z, library_size, generator=None):
        return draw_counts(self.decode(z, library_size), generator)

    @classmethod
    def fit(cls, counts: np.ndarray, genes: list[str], n_components: int, seed: int = 0) -> "PCACodec":
        """Fit on training counts (cells × genes): PCA of log1p CP10k (scikit-learn), then the
        per-gene NB inverse dispersion by moments on the residuals of the reconstruction,
        ``theta_g = Σ mu² / Σ ((x − mu)² − mu)`` (clipped to [0.01, 1e4])."""
        from sklearn.decomposition import PCA

        x = torch.from_numpy(np.asarray(counts, np.float32))
        logx = log_normalize(x).numpy()
        k = min(n_components, logx.shape[1], logx.shape[0] - 1)
        pca = PCA(n_components=k, random_state=seed).fit(logx)
        scale = float(np.sqrt(pca.explained_variance_.mean()))
        codec = cls(genes, torch.from_numpy(pca.mean_), torch.from_numpy(pca.components_), scale,
                    torch.ones(len(genes)))
        with torch.no_grad():
            mu = codec.decode(codec.encode(x), x.sum(-1))["mu"]
        codec.theta.copy_(nb_theta_by_moments(x, mu))
        return codec

    def save(self, run: RunDir, cfg: CodecConfig) -> None:
        run.save_weights(self.stage, {"mean": self.mean, "components": self.components, "theta": self.theta},
                         {"genes": json.dumps(self.genes), "scale": repr(self.scale),
                          "token_dim": str(self.token_dim), "config": json.dumps(asdict(cfg))})

    @classmethod
    def load(cls, run: RunDir, device="cpu") -> "PCACodec":
        w, meta = run.load_weights(cls.stage), run.load_weights_metadata(cls.stage)
        return cls(json.loads(meta["genes"]), w["mean"], w["components"], float(meta["scale"]), w["theta"],
                   int(meta["token_dim"])).to(device)


def fit_pca_codec(run: RunDir, shards: str, cfg: CodecConfig) -> PCACodec:
    """Fit the PCA codec on up to ``cfg.fit_cells`` training cells of ``shards`` and save it in the run."""
    from ..data.loader import CellLoader, LoaderConfig

    loader = CellLoader(shards, LoaderConfig(split="train", genes=cfg.genes, batch_size=2048, num_workers=0,
                                             resampled=False, fields=("cell_type",), seed=cfg.seed),
                        rank=0, world_size=1)
    parts, n = [], 0
    for batch in loader:
        parts.append(batch["counts"].numpy())
        n += len(parts[-1])
        if n >= cfg.fit_cells:
            break
    codec = PCACodec.fit(np.concatenate(parts)[: cfg.fit_cells], loader.gene_ids, cfg.n_components, cfg.seed)
    codec.save(run, cfg)
    return codec


# ----------------------------------------------------------------------------- the run's codec
def record_codec(run: RunDir, name: str, config: dict | None = None) -> None:
    """Write ``RUN/codec.json`` (rank 0). A run has one codec; naming another is an error."""
    path = os.path.join(run.root, CODEC_FILE)
    if os.path.exists(path):
        have = codec_info(run)["name"]
        if have != name:
            raise RunDirError(f"{run.root} already uses codec '{have}', not '{name}': train into another run "
                              f"directory (train.run_dir=...) or set codec.name={have}")
        return
    write_json_atomic(path, {"name": name, "stage": CODECS[name].stage, "config": config or {}})


def codec_info(run: RunDir) -> dict:
    path = os.path.join(run.root, CODEC_FILE)
    if not os.path.exists(path):
        raise RunDirError(f"{run.root} has no codec yet ({CODEC_FILE} is missing): train the 'ae' stage into it, "
                          "or train CLOP with codec.name=pca")
    with open(path) as f:
        return json.load(f)


def prepare_codec(run: RunDir, cfg: CodecConfig, shards: str, rank: int = 0) -> None:
    """Make sure the run has the codec ``cfg`` names: fit the PCA codec (rank 0) if it is
    missing; the autoencoder must have been trained by the ``ae`` stage."""
    import torch.distributed as dist

    if cfg.name not in CODECS:
        raise RunDirError(f"codec.name={cfg.name!r} is not a codec; valid: {', '.join(sorted(CODECS))}")
    if rank == 0:
        if cfg.name == "pca" and not os.path.exists(os.path.join(run.stage_dir("pca"), "model.safetensors")):
            fit_pca_codec(run, shards, cfg)
        if cfg.name == "autoencoder" and not os.path.exists(os.path.join(run.root, CODEC_FILE)):
            run.load_weights("ae")  # names the missing stage
        record_codec(run, cfg.name, asdict(cfg))
    if dist.is_initialized():
        dist.barrier()


def load_codec(run: RunDir, device="cpu") -> LatentCodec:
    """The run's codec, frozen, on ``device``."""
    return CODECS[codec_info(run)["name"]].load(run, device)
