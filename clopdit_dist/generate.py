"""Stage 3: text → cells.

    clopdit generate --run RUN --prompt "cell type: B cell; tissue: lung" --n 1000 --guidance 2 --out gen.h5ad
    clopdit generate --run RUN --interpolate "cell type: naive B cell" "cell type: plasma cell" --points 10 --out traj.h5ad

prompt → frozen text tower → CLOP text projection → DiT sampler with guidance (EMA weights)
→ latent z → frozen decoder → counts drawn from the negative binomial, with library sizes
drawn (log-normal) from the training statistics of the condition nearest to the prompt in
CLOP's text space, so free wording works for library sizes too.

Output: AnnData with integer counts in X, obs holding the prompt, the fields parsed from it,
the matched condition, guidance, steps, sampler, seed and library size, var holding
feature_id and feature_name, and the latents in ``obsm["X_latent"]``.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .config import load_config_section
from .data.conditions import (CONDITION_FIELDS, FIELD_NAMES, ResolvedPrompt, organisms_named, parse_fields,
                              vocab_from_conditions)
from .errors import ConfigError, PromptWarning
from .models.assay_capture import capture_shift
from .models.autoencoder import draw_counts
from .models.codec import LatentCodec, load_codec
from .models.condition import check_prompts, load_condition_encoder
from .models.dit import DiTConfig, LatentDiT
from .models.flow import CellNoise, FlowConfig, GaussianPrior, SamplerConfig, load_prior, sample, start_from
from .models.marker_table import MarkerTable
from .run import RunDir


def prompt_seed(seed: int, i: int) -> int:
    """The seed of prompt ``i``'s noise, library sizes and counts: a prompt gives the same cells
    alone or beside others."""
    return seed + 1000 * i


def check_device(device: str) -> None:
    """Refuse a torch device this machine does not have, by name (:class:`~clopdit_dist.errors.ConfigError`)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is no torch device; give cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {device!r}: this machine's torch sees {torch.cuda.device_count()} CUDA GPUs; "
                          "use --device cpu" + (" or cuda:0" if torch.cuda.device_count() else ""))


class CellGenerator:
    """The three frozen stages of a run, ready to generate."""

    def __init__(self, run: RunDir, codec: LatentCodec, cond, dit_module: LatentDiT, library: dict, device="cpu",
                 sampler: SamplerConfig | None = None, precision: str = "fp32", compile: bool = False,
                 prior: GaussianPrior | None = None, type_expression: dict | None = None,
                 assay_capture: dict | None = None):
        self.run, self.codec, self.cond, self.dit, self.device = run, codec, cond, dit_module, torch.device(device)
        self.prior = prior  # the flow's per-type or per-condition source (flow.prior), else N(0, I)
        self.default_sampler = sampler or SamplerConfig()  # the DiT config's sampler, unless a call says otherwise
        self.dit.eval()
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision={precision!r}: choose 'fp32' or 'bf16'")
        # bf16 runs the DiT's matmuls in bf16 (autocast); the ODE state stays fp32
        self._autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        self._velocity = Compiled(self.dit) if compile else self.dit
        self.library = library
        # per-assay capture effects over the codec's genes (latent_stats.json's assay_capture); None for runs
        # whose statistics predate them: an assay in a prompt then picks library sizes and cells, not capture
        self.capture = None if not assay_capture else {a: np.asarray(e, np.float32)
                                                       for a, e in assay_capture["effects"].items()}
        manifest = run.manifest()
        organism = (manifest.data.get("source") or {}).get("organism") or ""  # Census style: "homo_sapiens"
        self.organism = organism.replace("_", " ").capitalize() or None  # "Homo sapiens"
        ids = codec.genes
        index = {f: i for i, f in enumerate(manifest.feature_ids)}
        self.var = pd.DataFrame({"feature_id": ids, "feature_name": [manifest.feature_names[index[f]] for f in ids]},
                                index=ids)  # feature_id: unique, unlike symbols
        groups = library["groups"]
        self.resolver = self._group_text = None
        if cond.mode == "caption" and groups:  # library sizes of the group nearest a prompt in CLOP space
            captions = [cond.builder.canonical({k: g[k] for k in CONDITION_FIELDS}) for g in groups]
            self._group_text = cond.project(cond.features(captions))
        if cond.mode == "fields":  # prompts are resolved to field values, then completed from training conditions
            from .models.prompt_resolver import PromptResolver

            markers = MarkerTable.of_run(type_expression, groups, codec, self.var["feature_name"].tolist())
            self.assays = sorted({g["assay"] for g in groups if g.get("assay")})
            self.resolver = PromptResolver(cond.tower, vocab_from_conditions(groups),
                                           ontology_ids=manifest.ontology_term_ids(), markers=markers,
                                           assays=self.assays)
            weight: dict[tuple, float] = {}
            for g in groups:
                key = tuple(g[f] for f in CONDITION_FIELDS)
                weight[key] = weight.get(key, 0.0) + g["n"]
            self._train_conditions, self._train_weight = list(weight), np.array(list(weight.values()))
            self._condition_row = {c: i for i, c in enumerate(self._train_conditions)}
            self._assay_weight = np.zeros((len(weight), len(self.assays)))  # training cells per condition and assay
            for g in groups:
                if g.get("assay") in self.assays:
                    i = self._condition_row[tuple(g[f] for f in CONDITION_FIELDS)]
                    self._assay_weight[i, self.assays.index(g["assay"])] += g["n"]
            self._train_combinations = set(weight)
            self._latent_means = condition_latent_means(groups)

    @classmethod
    def from_run(cls, run_dir: str, device="cpu", precision: str = "fp32", compile: bool = False) -> "CellGenerator":
        check_device(device)  # before anything is read: "cuda" on a machine without one failed deep inside torch
        run = RunDir(run_dir)
        run.info()  # schema check with a clear message
        codec = load_codec(run, device)
        state = run.load_weights("dit")  # names the missing stage
        meta = run.load_weights_metadata("dit")
        encoding = meta.get("field_encoding", "text")
        cond = load_condition_encoder(run, meta.get("conditioning", "caption"), codec.latent_dim, device,
                                      "text" if encoding == "bank" else encoding)
        model_cfg = load_config_section(DiTConfig, run.config_path("dit"), "model")
        module = LatentDiT(model_cfg.build(), codec.latent_dim)
        module.load_state_dict(state)
        with open(os.path.join(run.stage_dir("dit"), "latent_stats.json")) as f:
            stats = json.load(f)
        sampler = load_config_section(SamplerConfig, run.config_path("dit"), "sampler")
        flow = load_config_section(FlowConfig, run.config_path("dit"), "flow")
        prior = load_prior(stats, flow)
        return cls(run, codec, cond, module.to(device), stats["library"], device, sampler, precision, compile, prior,
                   stats.get("type_expression"), stats.get("assay_capture"))

    # ------------------------------------------------------------------ pieces
    def match_library(self, prompt_emb: torch.Tensor) -> list[dict]:
        """For each prompt, the library-size group whose caption is nearest in CLOP space."""
        sims = prompt_emb.float().mean(1) @ self._group_text.float().T  # field mode: mean over fields
        return [self.library["groups"][i] for i in sims.argmax(1).tolist()]

    @torch.no_grad()
    def latents(self, cond: torch.Tensor, n: int, sampler: SamplerConfig, seed: int, batch_size: int = 2048,
                drop: torch.Tensor | None = None, x0: torch.Tensor | None = None,
                source: tuple[torch.Tensor, torch.Tensor] | None = None,
                noise: CellNoise | None = None) -> torch.Tensor:
        """(n, latent_dim) latents: ``cond`` is one condition (1, K, C) or one per cell (n, K, C);
        ``drop`` (1 or n, K) marks fields left on the learned null; ``x0`` (n, tokens, token_dim)
        is the starting noise and ``noise`` the SDE's step noise (else both drawn from ``seed``);
        ``source`` (loc, scale), each (n, latent_dim), moves it to each cell's prior (a DiT
        trained with ``flow.prior=cell_type`` needs it: :meth:`source_of`)."""
        if (self.prior is None) != (source is None):
            raise ValueError("this DiT starts from per-type priors: pass source" if source is None
                             else "this DiT starts from N(0, I): it takes no source")
        g = torch.Generator(device=self.device).manual_seed(seed)
        cond = cond.expand(n, -1, -1) if cond.shape[0] == 1 else cond
        drop = None if drop is None else (drop.expand(n, -1) if drop.shape[0] == 1 else drop)
        out, start = [], 0
        shape = (self.dit.dit.tokens, self.dit.dit.token_dim)
        for b in equal_batches(n, batch_size):
            rows = slice(start, start + b)
            start += b
            model = self._velocity if drop is None else _WithMissingFields(self._velocity, drop[rows].to(self.device))
            start_noise = None if x0 is None else x0[rows]
            prior = None if source is None else (source[0][rows].to(self.device), source[1][rows].to(self.device))
            if prior is not None:  # the same draw sample() would make, moved to the cells' priors
                if start_noise is None:
                    start_noise = torch.randn((b, *shape), generator=g, device=self.device)
                start_noise = start_from(start_noise.to(self.device), prior)
            with self._autocast:
                x = sample(model, cond[rows].to(self.device), shape, sampler, g, start_noise, prior,
                           None if noise is None else noise.take(rows))
            out.append(self.dit.unstandardize(x))
        return torch.cat(out)

    def source_of(self, cells: list[dict]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Each cell's prior (loc, scale) from its fields (:meth:`asked`); None without a prior."""
        return None if self.prior is None else self.prior.loc_scale(cells)

    @staticmethod
    def asked(conditions: list[dict], groups: list[dict]) -> list[dict]:
        """Each cell's fields: those its condition names, the rest from the library group the cell
        was given (values its named fields make likely)."""
        return [{f: c.get(f) or g[f] for f in CONDITION_FIELDS} for c, g in zip(conditions, groups, strict=True)]

    @torch.no_grad()
    def decode(self, z: torch.Tensor, groups: list[dict], seed: int,
               log_shift: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Counts of latents ``z`` with library sizes drawn from ``groups``; ``log_shift`` (n, genes),
        where given, is added to the decoded log-proportions before the draw."""
        g = torch.Generator(device=self.device).manual_seed(seed + 1)
        mean = torch.tensor([gr["mean_log"] for gr in groups], device=self.device)
        sd = torch.tensor([gr["sd_log"] for gr in groups], device=self.device)
        lib = torch.exp(mean + sd * torch.randn(len(groups), generator=g, device=self.device)).round().clamp_min(1)
        if log_shift is None:
            counts = self.codec.sample(z, lib, generator=g)
        else:
            params = self.codec.decode(z, lib)
            mu = params["mu"] * log_shift.to(params["mu"]).exp()
            params["mu"] = mu / mu.sum(-1, keepdim=True) * lib.unsqueeze(-1)
            counts = draw_counts(params, g)
        return counts.cpu().numpy(), lib.cpu().numpy()

    def matching_groups(self, condition: dict, with_assay: bool = False) -> list[dict]:
        """The training library-size groups of the most specific match of ``condition`` (all its
        fields, else cell type and tissue, else cell type, else any); with ``with_assay`` and an
        ``assay`` in ``condition``, the groups of that assay at each of those levels first."""
        groups = self.library["groups"]
        levels = [CONDITION_FIELDS, ("cell_type", "tissue_general"), ("cell_type",), ()]
        if with_assay and condition.get("assay"):
            levels = [(*fields, "assay") for fields in levels] + levels
        for fields in levels:
            match = [g for g in groups if all(condition.get(f) in (None, g.get(f)) for f in fields)]
            if match:
                return match
        raise ValueError("the run's latent_stats.json lists no library-size groups")

    def library_groups(self, condition: dict, n: int, rng: np.random.Generator) -> list[dict]:
        """``n`` library-size groups drawn ∝ cell count among :meth:`matching_groups` (the
        condition's assay first, where it names one): library sizes come from the cells the
        prompt denotes."""
        match = self.matching_groups(condition, with_assay=True)
        w = np.array([g["n"] for g in match], float)
        return [match[i] for i in rng.choice(len(match), n, p=w / w.sum())]

    def assay_shift(self, condition: dict) -> torch.Tensor | None:
        """For a condition with an ``assay`` (a prompt naming one), the log-scale gene shift from
        the capture its cells have to that assay's (:func:`~clopdit_dist.models.assay_capture.capture_shift`):
        the DiT learned the condition's training cells, whose capture is the mixture of their assays
        (:meth:`matching_groups`, assay ignored, weighted by cells). None where nothing moves (no
        assay asked, no estimate in the run, or its training cells are all of that assay)."""
        assay = condition.get("assay")
        if not assay or self.capture is None or assay not in self.capture:
            return None
        source: dict[str, float] = {}
        for g in self.matching_groups(condition):
            source[g.get("assay")] = source.get(g.get("assay"), 0.0) + g["n"]
        if set(source) == {assay}:
            return None
        return torch.from_numpy(capture_shift(self.capture, assay, source))

    def plan_groups(self, plan: list[tuple[dict, int]], rng: np.random.Generator) -> list[dict]:
        """The library-size group of each cell of a plan, in plan order."""
        return [g for c, m in plan for g in self.library_groups(c, m, rng)]

    def plan(self, prompt: str, n: int, rng: np.random.Generator, strict: bool = True) -> list[tuple[dict, int]]:
        """Field mode: the full (or, for combinations no training study has, partial)
        conditions the ``n`` cells of ``prompt`` are generated under.

        The prompt is resolved to field values (a field it does not name is None; a parent
        name such as "T cells" gives its child types as candidates). Where training
        conditions agree with every named field, each cell's missing fields are drawn from
        them in proportion to their training cell counts: ancestral sampling of p(missing |
        named), so "lung" yields lung's cell-type composition; a mixture whose shares the prompt
        states ("70% classical and 30% non-classical monocytes") gets its types in those shares
        instead. Where none agrees (a new combination), the named fields are used as given and the missing ones stay on the
        DiT's learned null (compositional conditioning). A prompt that names nothing this
        model can give raises :class:`~clopdit_dist.errors.PromptError` unless ``strict=False``
        (evaluation), where it gets the training marginal. A field it names but the model cannot
        give (a tissue it was not trained on, "kidney") is left out, as if not named, with a
        :class:`~clopdit_dist.errors.PromptWarning` (not under ``strict=False``); so is another
        organism than the one the model was trained on ("mouse" of a human model). A field it
        names more narrowly than the model knows ("Kupffer cells") is generated as the model's
        label ("macrophage"), with a warning that says so. An assay it names ("10x 5' v2") goes
        into each condition as ``assay``: missing fields are then drawn from that assay's training
        cells, and :meth:`library_groups` and :meth:`assay_shift` read it.
        """
        r = self.resolver.resolve(prompt, allow_empty=not strict)
        if strict and r.unresolved:
            warnings.warn(PromptWarning(f"prompt {prompt!r}: {self.resolver.unresolved_reason(r)}; generated over "
                                        "all of its values instead"), stacklevel=3)
        if strict and r.markers:
            types = [repr(c) for c, _ in r.candidates["cell_type"]]
            which = "types of this model that express" if len(types) > 1 else "type of this model that expresses"
            named = r.spans["cell_type"] if r.spans["cell_type"] != r.markers else None  # a group its markers narrowed
            lead = f"names {named!r}; by its markers" if named else "names no cell type; by its markers"
            warnings.warn(PromptWarning(f"prompt {prompt!r} {lead} ({r.markers}) it is generated as "
                                        f"{' or '.join(types)}, the {which} them most"), stacklevel=3)
        if strict and r.excluded:
            said = "; ".join(f"{FIELD_NAMES[f]} {' and '.join(map(repr, labels))}" for f, labels in r.excluded.items())
            warnings.warn(PromptWarning(f"prompt {prompt!r} excludes {said}: generated without them"), stacklevel=3)
        has = ", ".join(map(repr, self.assays))
        if strict and r.assay_absent:
            warnings.warn(PromptWarning(f"prompt {prompt!r} names the assay {' or '.join(map(repr, r.assay_absent))}, "
                                        f"which this model was not trained on (it has {has}): generated with its "
                                        "training studies' assays instead"), stacklevel=3)
        elif strict and r.assay_text and not r.assays:
            warnings.warn(PromptWarning(f"prompt {prompt!r}: assay {r.assay_text!r} names no assay this model knows "
                                        f"(it has {has}): generated with its training studies' assays instead"),
                          stacklevel=3)
        elif strict and r.assays and self.capture is None:
            warnings.warn(PromptWarning(f"prompt {prompt!r} names the assay {' or '.join(map(repr, r.assays))}: its "
                                        "library sizes and cells come from that assay's training cells, but this run "
                                        "has no capture estimate to give them its capture (add it with `clopdit "
                                        "assay-capture --run RUN --shards SHARDS`)"), stacklevel=3)
        if strict and r.narrowed:
            said = "; ".join(f"{FIELD_NAMES[f]} {text!r} is generated as {r.fields[f]!r}, " + (
                "the tissue it is part of" if f == "tissue_general" else
                f"the nearest {FIELD_NAMES[f]} this model was trained on") for f, text in r.narrowed.items())
            warnings.warn(PromptWarning(f"prompt {prompt!r}: {said}"), stacklevel=3)
        other = sorted(organisms_named(prompt) - {self.organism}) if strict and self.organism else []
        if other:
            warnings.warn(PromptWarning(f"prompt {prompt!r} names {' and '.join(other)}, but this model was trained "
                                        f"on {self.organism} cells only: these are {self.organism} cells"), stacklevel=3)
        if r.shares:  # a mixture in stated shares: each type's cells planned as if it alone were asked for
            counts = rng.multinomial(n, list(r.shares.values()))
            return [item for t, m in zip(r.shares, counts) if m for item in self._plan_resolved(replace(
                r, fields={**r.fields, "cell_type": t}, candidates={**r.candidates, "cell_type": [(t, 1.0)]},
                shares={}), int(m), rng)]
        return self._plan_resolved(r, n, rng)

    def _plan_resolved(self, r: ResolvedPrompt, n: int, rng: np.random.Generator) -> list[tuple[dict, int]]:
        """:meth:`plan` of a resolved prompt."""
        allowed = {f: {v for v, _ in r.candidates.get(f) or []} or ({r.fields[f]} if r.fields[f] else None)
                   for f in CONDITION_FIELDS}
        ok = np.array([all(allowed[f] is None or c[i] in allowed[f] for i, f in enumerate(CONDITION_FIELDS))
                       for c in self._train_conditions])
        complete = all(v is not None for v in r.fields.values())
        if not ok.any() or (complete and not any(len(r.candidates.get(f) or []) > 1 for f in CONDITION_FIELDS)):
            return self._with_assays([({f: v for f, v in r.fields.items()}, n)], r.assays, rng)
        idx = np.flatnonzero(ok)
        if r.assays:  # p(missing fields | named fields, assay): the conditions' training cells under the assays
            cols = [self.assays.index(a) for a in r.assays]
            w = self._assay_weight[np.ix_(idx, cols)].ravel()
            if w.sum() > 0:
                drawn = np.bincount(rng.choice(len(w), n, p=w / w.sum()), minlength=len(w))
                return [({**dict(zip(CONDITION_FIELDS, self._train_conditions[idx[j // len(cols)]])),
                          "assay": r.assays[j % len(cols)]}, int(drawn[j])) for j in np.flatnonzero(drawn)]
        w = self._train_weight[idx] / self._train_weight[idx].sum()
        drawn = np.bincount(rng.choice(len(idx), n, p=w), minlength=len(idx))
        return self._with_assays([(dict(zip(CONDITION_FIELDS, self._train_conditions[idx[j]])), int(drawn[j]))
                                  for j in np.flatnonzero(drawn)], r.assays, rng)

    def _with_assays(self, items: list[tuple[dict, int]], assays: list[str],
                     rng: np.random.Generator) -> list[tuple[dict, int]]:
        """Each plan item's cells split over the asked ``assays`` (one, or several for a family name),
        in proportion to the condition's training cells under each, else to the assays' cells."""
        if not assays:
            return items
        cols = [self.assays.index(a) for a in assays]
        out = []
        for c, m in items:
            row = self._condition_row.get(tuple(c.get(f) for f in CONDITION_FIELDS))
            w = self._assay_weight[row, cols] if row is not None else np.zeros(len(cols))
            w = w if w.sum() > 0 else self._assay_weight[:, cols].sum(0) + 1e-9
            split = rng.multinomial(m, w / w.sum()) if len(cols) > 1 else [m]
            out += [({**c, "assay": a}, int(k)) for a, k in zip(assays, split) if k]
        return out

    # ------------------------------------------------------------------ API
    def generate(self, prompts: list[str], n: int | list[int] = 100, sampler: SamplerConfig | None = None,
                 seed: int = 0, batch_size: int = 2048, strict: bool = True) -> ad.AnnData:
        """``n`` cells of each prompt (or ``n[i]`` of prompt i), in prompt order."""
        sampler = sampler or self.default_sampler
        n = [n] * len(prompts) if isinstance(n, int) else list(n)
        if self.cond.mode == "fields":
            return self._generate_fields(prompts, n, sampler, seed, batch_size, strict)
        cond = self.cond.encode_prompts(prompts)
        groups = self.match_library(cond)
        parts = []
        for i, prompt in enumerate(prompts):
            s = prompt_seed(seed, i)
            z = self.latents(cond[i:i + 1], n[i], sampler, s, batch_size, source=self.source_of([groups[i]] * n[i]))
            counts, lib = self.decode(z, [groups[i]] * n[i], s)
            parts.append(self._anndata(counts, z, prompt, [groups[i]] * n[i], sampler, s, lib))
        return self._concat(parts, "gen")

    def _generate_fields(self, prompts, n, sampler, seed, batch_size, strict) -> ad.AnnData:
        """All prompts' cells in one batched sampling run (each cell carries its own condition),
        with each prompt's starting noise, SDE step noise, library sizes and counts drawn from its
        own seed, so a prompt gives the same cells alone or beside others."""
        check_prompts(prompts)
        shape = (self.dit.dit.tokens, self.dit.dit.token_dim)
        plans = [self.plan(p, n[i], np.random.default_rng([seed, i, 7]), strict) for i, p in enumerate(prompts)]
        x0 = [torch.randn((n[i], *shape), generator=torch.Generator().manual_seed(prompt_seed(seed, i)))
              for i in range(len(prompts))]
        noise = CellNoise([prompt_seed(seed, i) for i in range(len(prompts))], n, shape)
        items = [(c, m) for plan in plans for c, m in plan]  # (condition, cells), prompt after prompt
        counts_per = torch.tensor([m for _, m in items])
        shifts = [self.disease_shift(c, sampler) for c, _ in items]
        sampled = [c if sh is None else sh[0] for (c, _), sh in zip(items, shifts)]  # what the DiT is given
        cond = self.cond.encode_fields(sampled).repeat_interleave(counts_per, dim=0)
        drop = torch.tensor([[c.get(f) is None for f in CONDITION_FIELDS] for c in sampled])
        drop = drop.repeat_interleave(counts_per, dim=0) if drop.any() else None
        samplers = [self.sampler_for(c, sampler) for c in sampled]  # per item, in plan order
        composed = torch.tensor([s is not sampler for s in samplers]).repeat_interleave(counts_per)
        x0 = torch.cat(x0)
        # library-size groups, prompt after prompt in plan order (as the cells): they also pick each cell's prior
        groups = [self.plan_groups(plan, np.random.default_rng([seed, i, 8])) for i, plan in enumerate(plans)]
        source = self.source_of(self.asked([c for c, m in items for _ in range(m)], [g for gs in groups for g in gs]))
        z = torch.empty((len(cond), self.dit.latent_mean.numel()))
        for rows, smp in ((~composed, sampler), (composed, self.sampler_for(None, sampler))):
            if rows.any():
                z[rows] = self.latents(cond[rows], int(rows.sum()), smp, seed, batch_size,
                                       None if drop is None else drop[rows], x0[rows],
                                       None if source is None else (source[0][rows], source[1][rows]),
                                       noise.take(rows)).float().cpu()
        log_shift = None
        if any(sh is not None for sh in shifts):
            width = z.shape[1] if sampler.disease_shift == "latent" else len(self.codec.genes)
            shift = torch.cat([torch.zeros((m, width)) if sh is None else sh[1].expand(m, -1)
                               for (_, m), sh in zip(items, shifts)])
            if sampler.disease_shift == "latent":
                z += shift
            else:
                log_shift = shift
        captures = [self.assay_shift(c) for c, _ in items]  # an assay the prompt names: its capture
        if any(c is not None for c in captures):
            capture = torch.cat([torch.zeros((m, len(self.codec.genes))) if c is None else c.expand(m, -1)
                                 for (_, m), c in zip(items, captures)])
            log_shift = capture if log_shift is None else log_shift + capture
        modes = ["disease_shift" if sh is not None else "composed" if smp.field_weights else "joint"
                 for sh, smp in zip(shifts, samplers)]
        parts, start, item_modes = [], 0, iter(modes)
        for i, (prompt, plan) in enumerate(zip(prompts, plans)):
            zi = z[start:start + n[i]]
            shift_i = None if log_shift is None else log_shift[start:start + n[i]]
            counts, lib = self.decode(zi, groups[i], prompt_seed(seed, i),
                                      shift_i if shift_i is not None and shift_i.any() else None)
            at = 0
            for c, m in plan:
                rows = slice(at, at + m)
                at += m
                parts.append(self._anndata(counts[rows], zi[rows], prompt, groups[i][rows], sampler,
                                           prompt_seed(seed, i), lib[rows], c, next(item_modes)))
            start += n[i]
        return self._concat(parts, "gen")

    def sampler_for(self, condition: dict | None, sampler: SamplerConfig) -> SamplerConfig:
        """``sampler``, or for a full (type, tissue, disease) combination that no training study
        has (``condition`` None: any such one) the same with compositional guidance, every field
        at the guidance weight: v = v_null + w sum_k (v_k - v_null), v_k conditioned on field k
        alone (Liu et al., 2022, "Compositional Visual Generation with Composable Diffusion
        Models"; CFGen, Palma et al., 2025). Each field's branch was trained on its own (field
        dropout); the joint branch never saw the combination. On the demo's 11 new val combinations
        (guidance 1, training seeds 0 / 1) energy distance fell 4.91 / 4.69 -> 4.47 / 4.47 and the
        disease judge rose 0.24 / 0.22 -> 0.28 / 0.26, for cell-type identity 0.95 / 0.96 -> 0.94 /
        0.93 (``compose_unseen*`` lines of benchmarks/results/dit_val_ablation.jsonl). On the
        test studies it helped on the seed-1 atlas and hurt tissue and disease on seed 0, where
        a disease's own branch carries the one tissue it was trained in (README)."""
        if not sampler.compose_unseen or sampler.field_weights or self.cond.mode != "fields":
            return sampler
        if condition is not None and (any(condition.get(f) is None for f in CONDITION_FIELDS) or tuple(
                condition[f] for f in CONDITION_FIELDS) in self._train_combinations):
            return sampler
        return replace(sampler, field_weights=(sampler.guidance,) * len(CONDITION_FIELDS))

    def disease_shift(self, condition: dict, sampler: SamplerConfig) -> tuple[dict, torch.Tensor] | None:
        """For a full combination (T, S, D) no training study has, with D not normal: the seen
        healthy combination (T, S, normal) to sample, and the disease's mean effect on type T in
        the tissues S' where training has both (T, S', D) and (T, S', normal), weighted by the
        smaller cell count of the two, to add to its cells.

        ``latent``: the effect in the latent, sum_S' w_S' (mean z(T,S',D) - mean z(T,S',normal)):
        scGen's latent vector arithmetic (Lotfollahi et al., Nat. Methods 2019) per cell type.
        ``expression``: the same pairs' effect on the decoded log-proportions, log p(mean
        z(T,S',D)) - log p(mean z(T,S',normal)), added to the healthy cells' decoded
        log-proportions: the additive model of perturbation effects in log expression, which
        linear baselines of perturbation prediction use (Ahlmann-Eltze et al., Nat. Methods 2025).
        Either way the DiT keeps the healthy cells' spread. None where it does not apply (the
        option off, a partial or seen combination, no healthy counterpart, or no tissue to
        estimate the effect in): compositional guidance then."""
        if sampler.disease_shift == "off" or self.cond.mode != "fields" or not self._latent_means:
            return None
        if any(condition.get(f) is None for f in CONDITION_FIELDS):
            return None
        t, s, d = (condition[f] for f in CONDITION_FIELDS)
        healthy = (t, s, HEALTHY)
        if d == HEALTHY or (t, s, d) in self._train_combinations or healthy not in self._train_combinations:
            return None
        pairs = []  # (weight, mean z with the disease, mean z without it) per tissue that has both
        for (t2, s2, d2), (n, mu) in self._latent_means.items():
            well = self._latent_means.get((t, s2, HEALTHY))
            if t2 == t and d2 == d and well is not None:
                pairs.append((min(n, well[0]), mu, well[1]))
        if not pairs:
            return None
        w = torch.tensor([n for n, _, _ in pairs], dtype=torch.float32)[:, None]
        sick, well = torch.stack([p[1] for p in pairs]), torch.stack([p[2] for p in pairs])
        if sampler.disease_shift == "expression":
            with torch.no_grad():
                one = torch.ones(len(pairs), device=self.device)
                log_p = [self.codec.decode(x.to(self.device), one)["mu"].float().clamp_min(1e-12).log().cpu()
                         for x in (sick, well)]
            sick, well = log_p
        return dict(zip(CONDITION_FIELDS, healthy)), (w * (sick - well)).sum(0) / w.sum()

    def _concat(self, parts, prefix: str) -> ad.AnnData:
        for k, part in enumerate(parts):  # unique names before concat; renamed below
            part.obs_names = [f"{k}-{name}" for name in part.obs_names]
        out = ad.concat(parts, index_unique=None)
        out.var = self.var.copy()
        out.obs_names = [f"{prefix}{i}" for i in range(out.n_obs)]
        return out

    def interpolate(self, a: str, b: str, points: int = 10, n: int = 100, sampler: SamplerConfig | None = None,
                    seed: int = 0) -> ad.AnnData:
        """Cells along a path between two prompts: conditions slerped in their embedding space
        (the role of scDiffusion's gradient interpolation). Field mode resolves both prompts
        to fields first; a field only one of them names is kept from that one, a field
        neither names stays on the null. Library sizes follow the nearer end."""
        sampler = sampler or self.default_sampler
        check_prompts([a, b])
        drop = None
        if self.cond.mode == "fields":
            fa, fb = (self.resolver.resolve(p).fields for p in (a, b))
            ends = [{f: fa[f] or fb[f] for f in CONDITION_FIELDS}, {f: fb[f] or fa[f] for f in CONDITION_FIELDS}]
            ca, cb = self.cond.encode_fields(ends)
            missing = torch.tensor([[ends[0][f] is None for f in CONDITION_FIELDS]])
            drop = missing if missing.any() else None
        else:
            ca, cb = self.cond.encode_prompts([a, b])
        parts = []
        rng = np.random.default_rng([seed, 11])
        prior_rng = np.random.default_rng([seed, 12])
        for j, alpha in enumerate(np.linspace(0, 1, points)):
            c = _slerp(ca, cb, float(alpha))[None]
            if self.cond.mode == "fields":
                groups = self.library_groups(ends[int(alpha > 0.5)], n, rng)
            else:
                groups = self.match_library(c) * n
            source = None
            if self.prior is not None:  # each cell's prior moves from one end's type to the other's
                if self.cond.mode == "fields":
                    sa, sb = (self.source_of(self.asked([e] * n, self.library_groups(e, n, prior_rng))) for e in ends)
                else:
                    sa, sb = (self.source_of(self.match_library(e[None]) * n) for e in (ca, cb))
                source = tuple((1 - alpha) * a_ + alpha * b_ for a_, b_ in zip(sa, sb))
            z = self.latents(c, n, sampler, seed + j, drop=drop, source=source)
            counts, lib = self.decode(z, groups, seed + j)
            part = self._anndata(counts, z, f"{a} -> {b}", groups, sampler, seed + j, lib)
            part.obs["interpolation_alpha"] = float(alpha)
            parts.append(part)
        return self._concat(parts, "traj")

    def _anndata(self, counts, z, prompt, groups, sampler, seed, lib, condition: dict | None = None,
                 fields_mode: str | None = None) -> ad.AnnData:
        """Cells of one prompt: ``condition`` is what the cells were generated under (field
        mode; its None fields were left to the null), else the fields parsed from the prompt;
        ``matched_*`` is the training group each cell's library size was drawn from;
        ``guidance_fields`` says how the condition was applied (joint, composed over fields, or
        a healthy combination with a disease shift)."""
        n = counts.shape[0]
        fields = condition if condition is not None else parse_fields(prompt)
        obs = pd.DataFrame({
            "prompt": prompt, **{f: fields.get(f) or "" for f in (*CONDITION_FIELDS, "assay")},
            **{f"matched_{k}": [g[k] for g in groups] for k in (*CONDITION_FIELDS, "assay")},
            "guidance": sampler.guidance,
            "guidance_fields": fields_mode or ("composed" if sampler.field_weights else "joint"),
            "steps": sampler.steps,
            "sampler": sampler.method, "noise": sampler.noise,
            "guidance_interval": ",".join(f"{v:g}" for v in sampler.interval),
            "seed": seed, "library_size": lib.astype(np.float32),
        }, index=[f"{seed}-{i}" for i in range(n)])
        a = ad.AnnData(X=sp.csr_matrix(counts.astype(np.int32)), obs=obs)
        a.obsm["X_latent"] = z.cpu().numpy().astype(np.float32)
        return a


class _WithMissingFields(torch.nn.Module):
    """Field-mode prompts that leave a field out: that field stays on the learned null."""

    def __init__(self, module, missing: torch.Tensor):
        super().__init__()
        self.module, self.missing = module, missing

    def forward(self, x, t, cond, drop):  # guidance stacks its branches along the batch: tile to match
        return self.module(x, t, cond, drop | self.missing.repeat(drop.shape[0] // self.missing.shape[0], 1))


def equal_batches(n: int, batch_size: int) -> list[int]:
    """Sizes of the fewest batches of at most ``batch_size`` that hold ``n``, as equal as
    possible: one input shape (two at most), so a compiled DiT compiles once."""
    return [int(b) for b in np.diff(np.linspace(0, n, -(-n // batch_size) + 1).round().astype(int))]


class Compiled(torch.nn.Module):
    """``torch.compile`` of a module (Inductor fuses the DiT's LayerNorm/modulate/GELU/residual
    chains, which dominate on CPU at hidden 128). Where this machine cannot compile (no C++
    compiler, unsupported platform) the first call warns and the module runs eagerly."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module, self.fast = module, torch.compile(module, dynamic=False)

    def forward(self, *args):
        if self.fast is not None:
            try:
                return self.fast(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
                import warnings

                warnings.warn(f"torch.compile failed here ({type(e).__name__}: {str(e)[:200]}); "
                              "generating with the eager model")
                self.fast = None
        return self.module(*args)


def _slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    a_n, b_n = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    omega = torch.arccos((a_n * b_n).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    return (torch.sin((1 - alpha) * omega) / so) * a + (torch.sin(alpha * omega) / so) * b


HEALTHY = "normal"  # Census's disease label of healthy donors


def condition_latent_means(groups: list[dict]) -> dict[tuple, tuple[int, torch.Tensor]]:
    """(cell type, tissue, disease) -> (cells, mean latent) pooled over assays, from the
    library groups of ``latent_stats.json`` (runs whose statistics predate ``z_mean``: empty)."""
    pooled: dict[tuple, tuple[int, torch.Tensor]] = {}
    for g in groups:
        if "z_mean" not in g:
            return {}
        key = tuple(g[f] for f in CONDITION_FIELDS)
        n0, s0 = pooled.get(key, (0, 0.0))
        pooled[key] = (n0 + g["n"], s0 + g["n"] * torch.tensor(g["z_mean"], dtype=torch.float32))
    return {k: (n, s / n) for k, (n, s) in pooled.items()}


def sampler_from(base: SamplerConfig, **kw) -> SamplerConfig:
    return replace(base, **{k: v for k, v in kw.items() if v is not None})
