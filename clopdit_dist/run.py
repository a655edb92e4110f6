"""The run directory: what a user copies to another machine to generate.

    RUN/
      run.json             schema version, clopdit-dist version, the shards' manifest path + sha256
      manifest.json        a copy of that manifest (vocabulary, markers, library sizes)
      <stage>/config.yaml  the resolved config of each stage (ae, clop, dit)
      <stage>/model.safetensors   inference weights (no pickle to load)
      <stage>/metrics.json        held-out evaluation
      <stage>/checkpoints/        DeepSpeed checkpoints for resuming
      <stage>/log.jsonl           training log
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .data.manifest import Manifest, write_json_atomic
from .errors import RunDirError

RUN_SCHEMA_VERSION = 1


class RunDir:
    def __init__(self, root: str):
        self.root = root

    @property
    def info_path(self) -> str:
        return os.path.join(self.root, "run.json")

    def init(self, shards: str) -> None:
        """Create the run (rank 0) or check that an existing one was made from the same shards."""
        manifest = Manifest.load(shards)
        sha = manifest.sha256()
        if os.path.exists(self.info_path):
            info = self.info()
            if info["manifest"]["sha256"] != sha:
                raise RunDirError(f"{self.root} was made from shards {info['manifest']['path']} "
                                  f"(manifest sha256 {info['manifest']['sha256'][:12]}), not {manifest.path} "
                                  f"({sha[:12]}); use another train.run_dir")
            return
        os.makedirs(self.root, exist_ok=True)
        shutil.copyfile(manifest.path, os.path.join(self.root, "manifest.json"))
        write_json_atomic(self.info_path, {"schema_version": RUN_SCHEMA_VERSION, "created_by": f"clopdit-dist {__version__}",
                                           "manifest": {"path": os.path.abspath(manifest.path), "sha256": sha}})

    def info(self) -> dict:
        if not os.path.exists(self.info_path):
            raise RunDirError(f"{self.root} is not a clopdit run directory (no run.json); train one with "
                              "launchers/train_ae.py, train_clop.py and train_dit.py")
        with open(self.info_path) as f:
            info = json.load(f)
        if info.get("schema_version") != RUN_SCHEMA_VERSION:
            raise RunDirError(f"{self.root} has run schema version {info.get('schema_version')} "
                              f"({info.get('created_by')}); this clopdit-dist {__version__} reads version "
                              f"{RUN_SCHEMA_VERSION}. Retrain with this version or install the one that made it.")
        return info

    def manifest(self) -> Manifest:
        self.info()
        return Manifest.load(os.path.join(self.root, "manifest.json"))

    def stage_dir(self, stage: str) -> str:
        return os.path.join(self.root, stage)

    def save_weights(self, stage: str, state_dict: dict[str, torch.Tensor], metadata: dict | None = None) -> str:
        os.makedirs(self.stage_dir(stage), exist_ok=True)
        path = os.path.join(self.stage_dir(stage), "model.safetensors")
        meta = {"stage": stage, "schema_version": str(RUN_SCHEMA_VERSION), **(metadata or {})}
        save_file({k: v.contiguous() for k, v in state_dict.items()}, path, metadata=meta)
        return path

    def load_weights(self, stage: str) -> dict[str, torch.Tensor]:
        path = os.path.join(self.stage_dir(stage), "model.safetensors")
        if not os.path.exists(path):
            raise RunDirError(f"{path} is missing: train the '{stage}' stage into {self.root} first")
        return load_file(path)

    def load_weights_metadata(self, stage: str) -> dict[str, str]:
        from safetensors import safe_open

        path = os.path.join(self.stage_dir(stage), "model.safetensors")
        if not os.path.exists(path):
            raise RunDirError(f"{path} is missing: train the '{stage}' stage into {self.root} first")
        with safe_open(path, "pt") as f:
            return dict(f.metadata() or {})

    def config_path(self, stage: str) -> str:
        return os.path.join(self.stage_dir(stage), "config.yaml")

    def save_metrics(self, stage: str, metrics: dict) -> None:
        write_json_atomic(os.path.join(self.stage_dir(stage), "metrics.json"), metrics)

    def metrics(self, stage: str) -> dict:
        with open(os.path.join(self.stage_dir(stage), "metrics.json")) as f:
            return json.load(f)
