"""``clopdit plan``: per-GPU memory of the model states (parameters, gradients, Adam states)
under ZeRO 1/2/3 with and without CPU offload, from DeepSpeed's own estimators, and the ZeRO
configuration this project recommends for the hardware.

    clopdit plan --params 1.3B --gpus 8 --nodes 2 --gpu-mem 80

Sources (DeepSpeed 0.19): ``deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs``
and ``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs``, the functions that
``estimate_zero{2,3}_model_states_mem_needs_all_cold`` print tables of (they return numbers;
the ``_all_cold`` wrappers only print). DeepSpeed ships no ZeRO-1 estimator: ZeRO-1 is ZeRO-2's
formula with the 16-bit gradients kept whole on every GPU (2P + 2P + 16P/N instead of
2P + 18P/N, in bytes, P parameters, N GPUs); with offload ZeRO-1 and ZeRO-2 keep the same
16-bit parameters on the GPU, so they share DeepSpeed's ZeRO-2 offload figure.

What the estimate leaves out: activations (they scale with micro-batch and sequence length),
communication buckets and fragmentation. ``headroom`` (default 30%) is the share of GPU
memory reserved for them: a configuration "fits" when its model states take at most
``(1 - headroom) * gpu_mem``. The recommendation is the lowest ZeRO stage that fits without
offload (lower stages communicate less), else the lowest that fits with offload.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ..errors import ConfigError

GIB = 1024**3


def parse_count(text: str | int | float) -> int:
    """'1.3B', '350M', '12k', '7e9' or a number -> parameters."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kKmMbBtT]?)\s*", str(text))
    if not m:
        raise ConfigError(f"--params {text!r}: write a count such as 350M, 1.3B or 7e9")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


@dataclass
class Option:
    zero_stage: int
    offload: bool
    gpu_gib: float  # model states per GPU
    cpu_gib: float  # per node (DeepSpeed's "per CPU")
    fits: bool


def estimate(params: int, gpus_per_node: int, nodes: int, largest_layer: int | None = None) -> list[Option]:
    """Model-state memory for ZeRO 1/2/3 x offload (``fits`` filled by :func:`plan`)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n = gpus_per_node * nodes
    largest = largest_layer if largest_layer is not None else max(1, params // 20)
    out = []
    for offload in (False, True):
        cpu2, gpu2 = estimate_zero2_model_states_mem_needs(params, gpus_per_node, nodes, cpu_offload=offload)
        gpu1 = gpu2 if offload else 4 * params + int(16 * params / n)  # see the module docstring
        cpu3, gpu3, _ = estimate_zero3_model_states_mem_needs(params, largest, gpus_per_node, nodes,
                                                              cpu_offload=offload, cpu_offload_params=offload,
                                                              zero_init=True)
        out += [Option(1, offload, gpu1 / GIB, cpu2 / GIB, False), Option(2, offload, gpu2 / GIB, cpu2 / GIB, False),
                Option(3, offload, gpu3 / GIB, cpu3 / GIB, False)]
    return sorted(out, key=lambda o: (o.offload, o.zero_stage))


def plan(params: int | str, gpus_per_node: int, nodes: int = 1, gpu_mem_gib: float = 80.0, headroom: float = 0.3,
         largest_layer: int | None = None, cpu_mem_gib: float | None = None) -> dict:
    p = parse_count(params)
    options = estimate(p, gpus_per_node, nodes, largest_layer)
    budget = (1 - headroom) * gpu_mem_gib
    for o in options:
        o.fits = o.gpu_gib <= budget and (cpu_mem_gib is None or o.cpu_gib <= (1 - headroom) * cpu_mem_gib)
    best = next((o for o in options if o.fits), None)
    rec = None
    if best is not None:
        ds = f"configs/ds/zero{best.zero_stage}{'_offload' if best.offload else ''}.json"
        if best.offload and best.zero_stage == 1:
            ds = "configs/ds/zero2_offload.json"  # no ZeRO-1 offload JSON ships; ZeRO-2 costs the same on the GPU
            best = next(o for o in options if o.offload and o.zero_stage == 2)
        rec = {"zero_stage": best.zero_stage, "offload": best.offload, "ds_config": ds,
               "overrides": [f"train.zero_stage={best.zero_stage}", f"train.offload={str(best.offload).lower()}"],
               "model_states_gib_per_gpu": round(best.gpu_gib, 2)}
    return {"params": p, "gpus_per_node": gpus_per_node, "nodes": nodes, "gpus": gpus_per_node * nodes,
            "gpu_mem_gib": gpu_mem_gib, "headroom": headroom, "budget_gib": round(budget, 2),
            "largest_layer_params": largest_layer if largest_layer is not None else max(1, p // 20),
            "options": [asdict(o) for o in options], "recommended": rec}


def format_plan(result: dict) -> str:
    lines = [f"{result['params'] / 1e6:,.1f}M parameters on {result['nodes']} node(s) x {result['gpus_per_node']} "
             f"GPU(s), {result['gpu_mem_gib']:g} GiB each; model states may use {result['budget_gib']:g} GiB "
             f"({result['headroom']:.0%} kept for activations and buffers)",
             f"{'ZeRO':>4} {'offload':>7} {'GiB/GPU':>9} {'GiB/node CPU':>13}  fits"]
    for o in result["options"]:
        lines.append(f"{o['zero_stage']:>4} {'yes' if o['offload'] else 'no':>7} {o['gpu_gib']:>9.2f} "
                     f"{o['cpu_gib']:>13.2f}  {'yes' if o['fits'] else 'no'}")
    rec = result["recommended"]
    if rec is None:
        lines.append("recommended: nothing fits; add GPUs or nodes, or reduce the model")
    else:
        lines.append(f"recommended: ZeRO-{rec['zero_stage']}{' + CPU offload' if rec['offload'] else ''} "
                     f"({rec['ds_config']}): {' '.join(rec['overrides'])}")
    lines.append("estimates: DeepSpeed's estimate_zero2/zero3_model_states_mem_needs (activations not included; "
                 f"ZeRO-3 assumes a largest layer of {result['largest_layer_params']:,} parameters)")
    return "\n".join(lines)
