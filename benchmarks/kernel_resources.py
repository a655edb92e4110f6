"""Compile every Triton kernel for a GPU target without a GPU and report its resources.

Triton's wheel ships ptxas, so the kernels compile to cubins here exactly as on an H100
(sm_90) or A100 (sm_80), at the tile sizes the launchers pick for DiT shapes. Each line of
output is one compiled kernel as JSON: registers per thread, spilled bytes (``stack``),
shared memory. Spills or shared memory over the card's limit are what would make a kernel
slow, or fail to launch, on the GPU we cannot reach; ``tests/test_kernels.py`` runs this
and asserts there are none.

    python benchmarks/kernel_resources.py [--arch 90 80] [--quick]

TRITON_INTERPRET must be unset (the interpreter builds no GPU code).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

A = importlib.import_module("clopdit_dist.kernels.attention")  # ``kernels.attention`` is the function
M = importlib.import_module("clopdit_dist.kernels.modulate")

SHARED_LIMIT = {80: 166912, 90: 232448}   # bytes of shared memory per block (opt-in maximum)
FLOAT_ARGS = {"qk_scale", "sm_scale", "eps"}
INT_ARGS = {"H", "S", "D", "C"}  # sizes; every other upper-case argument is a pointer


def signature(fn, pointers: dict, constexprs: dict) -> dict:
    """Kernel arguments by our naming convention: upper-case names (bar sizes) are pointers."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif (name.isupper() or name == "Yin") and name not in INT_ARGS:
            sig[name] = pointers.get(name, pointers["*"])
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def compile_kernel(fn, pointers: dict, constexprs: dict, num_warps: int, arch: int) -> dict:
    src = ASTSource(fn=fn, signature=signature(fn, pointers, constexprs), constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(kv.split(":", 1) for kv in next(line for line in usage.splitlines() if "REG:" in line).split())
    return {"kernel": fn.__name__, "arch": f"sm_{arch}", "num_warps": num_warps,
            "regs": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields["LOCAL"]),
            "shared": kernel.metadata.shared, "shared_limit": SHARED_LIMIT.get(arch)}


def attention_kernels(S: int, D: int, dtype: str):
    """(fn, pointer types, constexprs, warps) for every kernel a fwd+bwd at (S, D) launches."""
    ptrs = {"*": f"*{dtype}", "LSE": "*fp32", "DELTA": "*fp32"}
    d2 = max(16, A.next_pow2(D))
    fwd, bwd = A.attention_blocks(S, D), A.attention_blocks(S, D, backward=True)
    flags = dict(CAUSAL=False, BLOCK_D=d2, ACC=tl.float32, UPCAST=False)
    yield A._attn_fwd_kernel, ptrs, dict(BLOCK_M=fwd.block_m, BLOCK_N=fwd.block_n, **flags), fwd.num_warps
    yield (A._attn_bwd_delta_kernel, ptrs, dict(BLOCK_M=bwd.block_m, BLOCK_D=d2, ACC=tl.float32), 4)
    one_block = triton.cdiv(S, bwd.block_n) == 1
    blocks = dict(BLOCK_M=bwd.block_m, BLOCK_N=bwd.block_n, **flags)
    yield A._attn_bwd_dkdv_kernel, ptrs, dict(WRITE_DQ=one_block, **blocks), bwd.num_warps
    if not one_block:
        yield A._attn_bwd_dq_kernel, ptrs, blocks, bwd.num_warps


def modulate_kernels(S: int, C: int, dtype: str):
    """Autocast-style dtypes: an fp32 residual stream, 16-bit modulation vectors and branch outputs."""
    bs, bc, warps = M.row_block(S, C)
    cs = dict(BLOCK_S=bs, BLOCK_C=bc, ACC=tl.float32)
    stream = {"*": "*fp32", "SHIFT": f"*{dtype}", "SCALE": f"*{dtype}", "GATE": f"*{dtype}",
              "Yin": f"*{dtype}", "DY": f"*{dtype}"}
    for fn in (M._ln_modulate_fwd_kernel, M._ln_modulate_bwd_kernel, M._gated_residual_fwd_kernel,
               M._gated_residual_bwd_kernel):
        yield fn, stream, cs, warps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (90 = H100/H200)")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--quick", action="store_true", help="fewer shapes (the test uses this)")
    args = p.parse_args(argv)
    attn_shapes = [(64, 64), (256, 64), (100, 40)] if args.quick else \
        [(S, D) for S in (16, 64, 100, 256, 1024) for D in (32, 40, 64, 128)]
    mod_shapes = [(16, 768)] if args.quick else [(16, 384), (16, 768), (256, 768), (256, 1152)]
    for arch in args.arch:
        for S, D in attn_shapes:
            for fn, ptrs, consts, warps in attention_kernels(S, D, args.dtype):
                print(json.dumps({**compile_kernel(fn, ptrs, consts, warps, arch), "S": S, "D": D,
                                  "blocks": [consts.get("BLOCK_M"), consts.get("BLOCK_N")]}), flush=True)
        for S, C in mod_shapes:
            for fn, ptrs, consts, warps in modulate_kernels(S, C, args.dtype):
                print(json.dumps({**compile_kernel(fn, ptrs, consts, warps, arch), "S": S, "C": C,
                                  "blocks": [consts["BLOCK_S"], consts["BLOCK_C"]]}), flush=True)


if __name__ == "__main__":
    main()
