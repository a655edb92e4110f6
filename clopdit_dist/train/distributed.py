"""Process-group setup that works under ``deepspeed``, ``torchrun`` and plain ``python``,
and the DeepSpeed config a run uses."""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from .config import OptimConfig, TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
_GROUP_STARTED = False  # whether this process ever started a process group (see exit_process)


def accelerator() -> str:
    """'cuda' on GPUs, else 'cpu' (DeepSpeed reads DS_ACCELERATOR, which we set to match)."""
    if os.environ.get("DS_ACCELERATOR", "") == "cpu" or not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return "cpu"
    return "cuda"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise torch.distributed (gloo on CPU, nccl on GPU) through DeepSpeed. A plain
    ``python`` launch is a world of one. Returns (rank, world_size, device)."""
    dev = accelerator()
    if "RANK" not in os.environ:  # plain python: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if dev == "cpu":
        # One thread per rank unless the user chose: the launcher does not set it, and two
        # ranks fighting over two cores run bf16 two to three times slower.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    import deepspeed

    if not dist.is_initialized():
        from deepspeed.utils import groups

        # DeepSpeed caches a clone of the world group; after an earlier process group in this
        # process was destroyed (a second run in one process: sweeps, tests) that clone is stale
        groups._WORLD_GROUP = None
        deepspeed.init_distributed(dist_backend="gloo" if dev == "cpu" else "nccl", verbose=False)
        atexit.unregister(_destroy_process_group)  # once, however many runs this process starts
        atexit.register(_destroy_process_group)
        global _GROUP_STARTED
        _GROUP_STARTED = True
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu") if dev == "cpu" else torch.device("cuda", local_rank)
    if dev == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def _destroy_process_group() -> None:
    """At exit, tear the process groups down, and DeepSpeed's references to them, while the
    interpreter is whole."""
    if dist.is_initialized():
        import deepspeed.comm

        if deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()
        else:
            dist.destroy_process_group()


def exit_process(code: int = 0) -> NoReturn:
    """End the process. One that started a process group runs the atexit handlers (process-group
    teardown, W&B), flushes and leaves without interpreter finalization; any other exits as usual.

    Finalization is where a launched rank could abort after its run had finished ("terminate
    called without an active exception", SIGABRT; twice in CI, tests/test_elastic.py zero3,
    about 1 run in 50 here): Gloo's worker threads outlive ``destroy_process_group`` because
    ZeRO-3 parameters (``ds_process_group``) and DeepSpeed module globals (its forward-module
    stack, an lru_cache in the parameter coordinator) still hold the groups, and a worker thread
    that drops a tensor once finalization has begun needs the GIL, which Python 3.11 answers with
    pthread_exit, fatal inside C++. The same hazard is described in pytorch/pytorch#179291.
    Entry points call this after a run that succeeded; a failed run exits as usual."""
    if not _GROUP_STARTED:
        raise SystemExit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def resolve_path(path: str) -> str:
    """A path as given, or relative to the repository (for the shipped configs/)."""
    if os.path.exists(path):
        return path
    candidate = REPO_ROOT / path
    if candidate.exists():
        return str(candidate)
    raise FileNotFoundError(f"{path} does not exist (looked in {os.getcwd()} and {REPO_ROOT})")


def deepspeed_config(train: TrainConfig, optim: OptimConfig, micro_batch: int, world_size: int) -> dict:
    """Load the ZeRO JSON for this run and fill in what the run config decides."""
    default = f"configs/ds/zero{train.zero_stage}{'_offload' if train.offload else ''}.json"
    if train.zero_stage == 0:
        default = "configs/ds/zero1.json"
    path = resolve_path(train.ds_config or default)
    with open(path) as f:
        cfg = json.load(f)
    if train.precision not in ("fp32", "bf16"):
        raise ValueError(f"train.precision={train.precision!r}: use 'fp32' or 'bf16' (fp16 is not supported on CPU)")
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = train.grad_accum
    cfg["train_batch_size"] = micro_batch * train.grad_accum * world_size
    cfg["gradient_clipping"] = optim.grad_clip
    cfg["bf16"] = {"enabled": train.precision == "bf16"}
    cfg.setdefault("zero_optimization", {})["stage"] = train.zero_stage
    if train.zero_stage == 0:
        cfg["zero_optimization"] = {"stage": 0}
    # the client optimizer is a plain torch AdamW: DeepSpeed's fused/CPU Adam would JIT-build
    # on first use, and ZeRO-Offload needs DeepSpeed's CPUAdam, which it builds itself
    cfg["zero_allow_untested_optimizer"] = True
    return cfg
