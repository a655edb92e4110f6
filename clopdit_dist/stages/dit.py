"""Stage 2: the latent Diffusion Transformer, trained by flow matching on stage-0 latents,
conditioned on stage-1 CLOP text embeddings of augmented captions.

    deepspeed --num_gpus 2 launchers/train_dit.py --config configs/dit.yaml

Conditioning is either the whole caption (one field, the default) or one field per
metadata attribute (cell type, tissue, disease; compositional guidance as in scLDM); each
field is replaced by a learned null with probability ``flow.p_uncond`` during training
(classifier-free guidance). Latents are standardised per dimension with statistics taken
from the training split at setup, and the library sizes of the autoencoder's genes are
recorded per condition, so generation can draw realistic ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from ..config import load_config
from ..data.conditions import CONDITION_FIELDS, train_conditions
from ..data.loader import CellLoader, LoaderConfig
from ..data.stats import LIBRARY_KEYS
from ..models.assay_capture import capture_statistics
from ..models.codec import load_codec
from ..models.condition import field_banks, load_condition_encoder, mix_field_codes, shared_caption_bank
from ..models.dit import DiTConfig, LatentDiT
from ..models.flow import (PRIOR_FIELDS, PRIOR_STATS, FlowConfig, GaussianPrior, SamplerConfig, flow_matching_loss,
                           load_prior)
from ..run import RunDir
from ..train.config import StageConfig
from ..train.stage import Stage
from .clop import ClopStageConfig


@dataclass
class DiTStageConfig(StageConfig):
    model: DiTConfig = field(default_factory=lambda: DiTConfig(preset="DiT-S"))
    flow: FlowConfig = field(default_factory=FlowConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    # fields: one embedding per field (cell type, tissue, disease), prompts resolved to fields at
    # generation; caption: CLOP's embedding of the whole caption (CLOP-DiT's design). On the demo's
    # val studies fields gave cell-type identity 0.91 vs 0.75 and coverage 0.63 vs 0.55 (README).
    conditioning: str = "fields"
    # fields mode: "text" conditions each field value on the CLOP embedding of one canonical text
    # ("cell type: X"); "code" on its own fixed code (a learned embedding per value, no semantic
    # neighbours); "text+code" on both, summed (models/condition.py, mix_field_codes); "bank" on
    # augmented captions that name only that field. On the demo's val
    # studies (12 conditions, one seed) text gave identity 0.93 / coverage 0.67, code 0.88 / 0.63;
    # text+code with data.balance=0.5 is the default (configs/dit.yaml says why).
    field_encoding: str = "text+code"
    stats_cells: int = 20_000  # training cells used for latent and library-size statistics
    eval_split: str = "val"  # held-out studies of the end-of-training check (clopdit evaluate reports test)
    eval_conditions: int = 12  # held-out conditions generated at the end of training
    eval_cells_per_condition: int = 200
    # std of Gaussian noise on the text-tower features of training captions before CLOP's
    # projection (as CLOP's model.text_noise), so the DiT is trained on the neighbourhood of
    # each caption rather than on the bank's points only. The demo's numbers were measured
    # with it; on a 16x16-token DiT its effect on reworded prompts was within run-to-run noise.
    cond_noise: float = 0.02


class DiTStage(Stage):
    name = "dit"

    def fields(self):
        return ("cell_type", "tissue_general", "disease", "assay")

    def genes(self, run: RunDir):
        self.codec = load_codec(run)
        return self.codec.genes

    def setup(self, run: RunDir, loader, device) -> None:
        self.device = device
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.codec = self.codec.to(device)
        self.cond = load_condition_encoder(run, self.cfg.conditioning, self.codec.latent_dim, device,
                                           "text" if self.cfg.field_encoding == "bank" else self.cfg.field_encoding)
        self.cfg.model.split_latent(self.codec.latent_dim, self.codec.token_dim)
        self.cfg.model.cond_dim = self.cond.dim
        self.cfg.model.num_fields = self.cond.num_fields
        stage_dir = run.stage_dir(self.name)
        os.makedirs(stage_dir, exist_ok=True)
        conditions = train_conditions(run.manifest())
        if self.cfg.conditioning == "caption":  # CLOP's own bank (rebuilt as CLOP built it, if deleted)
            clop_cfg = load_config(ClopStageConfig, run.config_path("clop"))
            banks = {"caption": shared_caption_bank(os.path.join(run.stage_dir("clop"), "caption_bank.pt"),
                                                    self.cond.builder, conditions,
                                                    clop_cfg.model.captions_per_condition, self.cond.tower,
                                                    clop_cfg.train.seed, self.rank)}
        elif self.cfg.field_encoding == "code":  # conditions_of looks the codes up per batch
            banks = {}
        elif self.cfg.field_encoding in ("text", "text+code"):  # one fixed text per value, as generation feeds it
            banks = field_banks(self.cond.tower, conditions)
        else:  # one bank per field, of augmented captions that mention only that field
            banks = {}
            for f in CONDITION_FIELDS:
                field_conditions = list({c[f]: {f: c[f]} for c in conditions}.values())
                banks[f] = shared_caption_bank(os.path.join(stage_dir, f"field_bank_{f}.pt"), self.cond.builder,
                                               field_conditions, 8, self.cond.tower, self.cfg.train.seed, self.rank)
        self.banks = banks  # text-tower features; projected (with cond_noise) per batch
        self.balance = self.balance_weights(run)
        stats_path = os.path.join(stage_dir, "latent_stats.json")
        if self.rank == 0 and not set(PRIOR_STATS.values()) <= set(_read_json(stats_path)):
            with open(stats_path + ".tmp", "w") as f:
                json.dump(self._statistics(run), f)
            os.replace(stats_path + ".tmp", stats_path)
        if dist.is_initialized():
            dist.barrier()
        with open(stats_path) as f:
            self.stats = json.load(f)
        self.prior = load_prior(self.stats, self.cfg.flow)

    @torch.no_grad()
    def _statistics(self, run: RunDir) -> dict:
        """Per-dimension latent mean/std; per cell type, and per condition, the Gaussians of the
        standardised latents (the sources of ``flow.prior=cell_type`` and ``condition``); and per
        (cell_type, tissue_general, disease, assay) the log library size (over the autoencoder's
        genes) and the mean latent (what a disease shift is estimated from,
        :meth:`CellGenerator.disease_shift`); per cell type the pseudobulk expression proportions
        (what marker genes in a prompt are read against, :class:`~clopdit_dist.models.marker_table.MarkerTable`),
        from up to ``stats_cells`` cells; per assay its capture effect (what an assay named in a prompt
        is given, :mod:`~clopdit_dist.models.assay_capture`)."""
        loader = CellLoader(self.cfg.data.shards, LoaderConfig(
            split="train", genes=self.codec.genes, batch_size=1024, num_workers=0, resampled=False,
            fields=LIBRARY_KEYS), rank=0, world_size=1)
        zs, libs, keys = [], [], []
        type_counts: dict[str, torch.Tensor] = {}
        for batch in loader:
            x = batch["counts"].to(self.device)
            zs.append(self.codec.encode(x).float().cpu())
            libs.append(torch.log(x.sum(-1).clamp_min(1)).cpu())
            keys += ["\x1f".join(v) for v in zip(*(batch[k] for k in LIBRARY_KEYS))]
            types = np.array(batch["cell_type"])
            for t in np.unique(types):
                summed = x[torch.from_numpy(types == t)].sum(0).double().cpu()
                type_counts[str(t)] = type_counts[str(t)] + summed if str(t) in type_counts else summed
            if sum(len(z) for z in zs) >= self.cfg.stats_cells:
                break
        z, lib = torch.cat(zs), torch.cat(libs).numpy()
        groups = []
        keys = np.array(keys)
        for k in np.unique(keys):
            rows = keys == k
            v = lib[rows]
            groups.append({**dict(zip(LIBRARY_KEYS, k.split("\x1f"))), "n": int(len(v)),
                           "mean_log": float(v.mean()), "sd_log": float(v.std()) if len(v) > 1 else 0.3,
                           "z_mean": [round(float(x), 5) for x in z[torch.from_numpy(rows)].mean(0)]})
        mean, std = z.mean(0), z.std(0).clamp_min(1e-3)
        cells = [dict(zip(LIBRARY_KEYS, k.split("\x1f"))) for k in keys]
        z_std = (z - mean) / std
        return {"latent_mean": mean.tolist(), "latent_std": std.tolist(),
                **{key: GaussianPrior.fit(cells, z_std, PRIOR_FIELDS[p]).to_dict() for p, key in PRIOR_STATS.items()},
                "library": {"keys": list(LIBRARY_KEYS), "unit": "total counts over the autoencoder's genes",
                            "groups": groups},
                "type_expression": {t: [float(f"{v:.4g}") for v in (c / c.sum()).tolist()]  # pseudobulk proportions
                                    for t, c in sorted(type_counts.items())},
                "assay_capture": capture_statistics(self.cfg.data.shards, self.codec.genes)}

    def build_model(self) -> torch.nn.Module:
        module = LatentDiT(self.cfg.model.build(), self.codec.latent_dim)
        module.latent_mean.copy_(torch.tensor(self.stats["latent_mean"]))
        module.latent_std.copy_(torch.tensor(self.stats["latent_std"]))
        return module

    def conditions_of(self, batch: dict, rng: np.random.Generator) -> torch.Tensor:
        """(B, K, C) training conditions: a random bank caption per cell (per field), its
        text features jittered by ``cond_noise`` and projected by the frozen CLOP head (plus
        each value's code for ``text+code``)."""
        cells = [dict(zip(CONDITION_FIELDS, v)) for v in zip(*(batch[f] for f in CONDITION_FIELDS))]
        if self.cfg.conditioning == "fields" and self.cfg.field_encoding == "code":
            return self.cond.encode_fields(cells)
        if self.cfg.conditioning == "caption":
            feats = [self.banks["caption"].sample(self.cond.builder.batch_keys(batch), rng)[0]]
        else:
            feats = [self.banks[f].sample([self.cond.builder.condition_key({f: v}) for v in batch[f]], rng)[0]
                     for f in CONDITION_FIELDS]
        feats = torch.stack(feats, dim=1).float()
        if self.cfg.cond_noise > 0:
            feats = feats + self.cfg.cond_noise * torch.from_numpy(rng.standard_normal(feats.shape, np.float32))
        emb = self.cond.project(feats.flatten(0, 1)).view(*feats.shape[:2], -1)
        if self.cfg.conditioning == "fields" and self.cfg.field_encoding == "text+code":
            emb = mix_field_codes(emb, cells)
        return emb

    def loss(self, model, batch, generator):
        module = model.module if hasattr(model, "module") else model
        with torch.no_grad():
            x1 = module.standardize(self.codec.encode(batch["counts"].to(self.device)))
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        cond = self.conditions_of(batch, rng).to(self.device)
        weight = self.balance(batch["cell_type"]).to(self.device) if self.balance else None
        cells = [dict(zip(CONDITION_FIELDS, v)) for v in zip(*(batch[f] for f in CONDITION_FIELDS))]
        source = self.prior.loc_scale(cells) if self.prior else None
        loss = flow_matching_loss(model, x1, cond, self.cfg.flow, generator, weight, source)
        return loss, {}

    def flops_per_cell(self, model) -> float | None:
        dit = model.dit if hasattr(model, "dit") else None
        return dit.train_flops_per_sample() if dit is not None else None

    @torch.no_grad()
    def evaluate(self, model, run: RunDir, device) -> dict:
        from ..evaluate.evaluator import quick_evaluation
        from ..generate import CellGenerator

        gen = CellGenerator(run, self.codec, self.cond, model, self.stats["library"], device, self.cfg.sampler,
                            prior=self.prior)
        return quick_evaluation(gen, self.cfg.data.shards, self.cfg.eval_split, self.cfg.sampler.guidance,
                                self.cfg.eval_conditions, self.cfg.eval_cells_per_condition)

    def export(self, state_dict, run: RunDir) -> None:
        run.save_weights(self.name, state_dict, {"conditioning": self.cfg.conditioning,
                                                 "field_encoding": self.cfg.field_encoding})


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)
