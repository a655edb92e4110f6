"""`clopdit plan`: DeepSpeed's memory estimators and the recommended ZeRO stage."""

import json

import pytest

from clopdit_dist.train.plan import parse_count, plan


def test_plan_uses_deepspeeds_estimators_and_picks_the_lowest_stage_that_fits(capsys):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    assert parse_count("1.3B") == 1_300_000_000 and parse_count("350M") == 350_000_000
    small = plan("1.3B", gpus_per_node=8, nodes=2, gpu_mem_gib=80)
    z2 = next(o for o in small["options"] if o["zero_stage"] == 2 and not o["offload"])
    assert z2["gpu_gib"] * 1024**3 == pytest.approx(estimate_zero2_model_states_mem_needs(
        1_300_000_000, 8, 2, cpu_offload=False)[1], rel=1e-9)
    per_gpu = {(o["zero_stage"], o["offload"]): o["gpu_gib"] for o in small["options"]}
    assert per_gpu[1, False] > per_gpu[2, False] > per_gpu[3, False]  # more partitioning, less per GPU
    assert small["recommended"]["zero_stage"] == 1 and not small["recommended"]["offload"]
    big = plan("20B", gpus_per_node=8, nodes=1, gpu_mem_gib=80)  # 18 B/param of states over 8 GPUs: ZeRO-3
    assert big["recommended"]["zero_stage"] == 3 and big["recommended"]["ds_config"] == "configs/ds/zero3.json"
    huge = plan("70B", gpus_per_node=1, nodes=1, gpu_mem_gib=80)  # only offload of everything fits
    assert huge["recommended"]["offload"] and huge["recommended"]["zero_stage"] == 3
    assert plan("1T", gpus_per_node=1, gpu_mem_gib=16, largest_layer=5_000_000_000)["recommended"] is None

    from clopdit_dist.cli import main

    main(["plan", "--params", "20B", "--gpus", "8", "--gpu-mem", "80"])
    out = capsys.readouterr().out
    assert "recommended: ZeRO-3 (configs/ds/zero3.json)" in out and "train.zero_stage=3" in out
    main(["plan", "--params", "350M", "--gpus", "2", "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["recommended"]["zero_stage"] == 1
