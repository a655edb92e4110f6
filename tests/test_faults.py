"""Faults of one process among several: a training rank killed under torchrun, a shard-build
worker killed under ``build_shards(workers=2)``. Each must stop the job with a message that
names what died, leave what was finished intact, and a rerun of the same command must end
where an uninterrupted run ends."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from test_train import SMALL, env, log_rows

from clopdit_dist.data.manifest import Manifest
from clopdit_dist.data.shards import BUILD_DIR
from clopdit_dist.run import RunDir

HERE = os.path.dirname(__file__)


# ---------------------------------------------------------------------- a shard worker dies
def _shard_cmd(atlas, out, workers):
    # small shards (32 cells each) so the build lasts long enough to be interrupted
    return [sys.executable, "-m", "clopdit_dist.cli", "data", "shards", "--source", atlas, "--out", out,
            "--cells-per-block", "32", "--blocks-per-shard", "1", "--workers", str(workers), "--no-progress"]


def _done_markers(build):
    return [f for f in os.listdir(build) if f.endswith(".json") and f != "plan.json"] if os.path.isdir(build) else []


def _pool_workers(pid):
    """The build's pool children (spawned: ``spawn_main``), not multiprocessing's resource tracker."""
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for k in kids:
        try:
            if "spawn_main" in " ".join(k.cmdline()):
                out.append(k)
        except psutil.Error:
            pass
    return out


def test_shard_build_with_a_killed_worker_stops_and_the_rerun_gives_the_same_shards(atlas_dir, tmp_path):
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    subprocess.run(_shard_cmd(atlas_dir, ref, 1), check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(_shard_cmd(atlas_dir, out, 2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    build = os.path.join(out, BUILD_DIR)
    victim, deadline = None, time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        workers = _pool_workers(proc.pid)
        if len(workers) == 2 and len(_done_markers(build)) >= 3:
            victim = workers[0]
            break
        time.sleep(0.01)
    assert victim is not None, "the build finished (or never started its two workers) before a worker was killed"
    victim.send_signal(signal.SIGKILL)
    try:
        _, stderr = proc.communicate(timeout=120)  # a lost worker must not hang the build
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the build hung after one of its workers was killed")
    print(stderr[-1500:])  # shown with pytest -rP
    assert proc.returncode != 0, "the build reported success although a worker died"
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    assert f"worker (pid {victim.pid}) died" in stderr and "SIGKILL" in stderr, stderr[-2000:]
    assert re.search(r"while building (train|val|test)-\d{6}\.tar|between two shards", stderr), stderr[-2000:]
    assert "rerun the same command" in stderr, stderr[-2000:]
    assert not [p for p in _pool_workers(proc.pid)], "pool workers left running"
    n_done = len(_done_markers(build))
    resumed = subprocess.run(_shard_cmd(atlas_dir, out, 2), check=False, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming: {n_done} of" in resumed.stdout
    a, b = Manifest.load(ref), Manifest.load(out)
    assert [(s["name"], s["sha256"]) for s in a.data["shards"]] == [(s["name"], s["sha256"]) for s in b.data["shards"]]
    assert b.verify() == []
    assert not [f for f in os.listdir(out) if f.endswith(".partial")]


# ---------------------------------------------------------------------- a training rank dies
RANK_SMALL = [*SMALL, "data.num_workers=0", "train.steps=12", "train.ckpt_every=4"]


def _free_port():
    import socket

    with socket.socket() as s:  # other jobs on a shared machine hold fixed ports
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(shards, run, pids):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
            os.path.join(HERE, "scripts", "train_rank_pid.py"), shards, run, pids, "ae", *RANK_SMALL]


def test_a_killed_rank_ends_the_job_naming_it_and_the_rerun_resumes_onto_the_same_curve(shards_dir, tmp_path):
    ref, run, pids = str(tmp_path / "ref"), str(tmp_path / "killed"), str(tmp_path / "pids")
    os.makedirs(pids)
    done = subprocess.run(_torchrun(shards_dir, ref, str(tmp_path / "ref_pids")), check=False, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    proc = subprocess.Popen(_torchrun(shards_dir, run, pids), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ckpt = os.path.join(run, "ae", "checkpoints")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(os.path.join(ckpt, "latest")) and os.path.exists(os.path.join(pids, "rank1")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before a rank could be killed"
    victim = int(open(os.path.join(pids, "rank1")).read())
    os.kill(victim, signal.SIGKILL)
    try:
        _, stderr = proc.communicate(timeout=120)  # the surviving rank must not hang in a collective
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("torchrun did not end after rank 1 was killed")
    print(stderr[-3000:])  # shown with pytest -rP
    assert proc.returncode != 0
    # torchrun's summary names the failed local/global rank, its pid and the signal
    assert "rank      : 1 (local_rank: 1)" in stderr, stderr[-4000:]
    assert "exitcode  : -9" in stderr and f"pid: {victim}" in stderr, stderr[-4000:]
    assert "Signal 9 (SIGKILL)" in stderr, stderr[-4000:]
    survivor = int(open(os.path.join(pids, "rank0")).read())
    assert not psutil.pid_exists(survivor) or psutil.Process(survivor).status() == psutil.STATUS_ZOMBIE

    # the last checkpoint is whole: `latest` names a tag whose files all load
    tag = open(os.path.join(ckpt, "latest")).read().strip()
    files = sorted(os.listdir(os.path.join(ckpt, tag)))
    assert "mp_rank_00_model_states.pt" in files and "meta.json" in files
    assert len([f for f in files if f.endswith("optim_states.pt")]) == 2
    for f in files:
        if f.endswith(".pt"):
            torch.load(os.path.join(ckpt, tag, f), map_location="cpu", weights_only=False)
    meta = json.load(open(os.path.join(ckpt, tag, "meta.json")))
    assert meta["world_size"] == 2 and meta["step"] % 4 == 0 and meta["step"] < 12
    stopped_at = len(log_rows(run))
    assert meta["step"] <= stopped_at < 12

    resumed = subprocess.run(_torchrun(shards_dir, run, pids), check=False, env=env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {ckpt} at step {meta['step']}" in resumed.stdout
    a = {r["step"]: r["loss"] for r in log_rows(ref)}
    b = {r["step"]: r["loss"] for r in log_rows(run)}  # steps after the checkpoint are logged twice: the rerun's win
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in range(1, 13):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-5), step
    wa, wb = RunDir(ref).load_weights("ae"), RunDir(run).load_weights("ae")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- a finished rank leaves cleanly
_EXIT_SCRIPT = """
import atexit, sys
import torch.distributed as dist
from clopdit_dist.train.distributed import exit_process, init_distributed

class Finalized:
    def __del__(self):
        print("finalized", flush=True)

keep = Finalized()
# registered before the group starts, so it runs after the group's own teardown handler
atexit.register(lambda: print(f"atexit ran, group up: {dist.is_initialized()}", flush=True))
if sys.argv[1] == "group":
    init_distributed()
print("done", end="")  # no newline: only an explicit flush gets this out
exit_process(0)
"""


@pytest.mark.parametrize("group", [True, False], ids=["trained", "never-trained"])
def test_exit_process_skips_finalization_only_after_a_process_group(group):
    """A launched rank that finished its run leaves through ``exit_process``: atexit handlers run
    (the process group is torn down, W&B would finish) and output is flushed, but interpreter
    finalization, where Gloo threads that outlive the group could abort the rank (SIGABRT, seen
    in CI on test_elastic zero3), is skipped. A process that never started a group exits as usual."""
    proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, "group" if group else "none"], env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done" in proc.stdout and "atexit ran, group up: False" in proc.stdout, proc.stdout
    assert ("finalized" in proc.stdout) is not group, proc.stdout
