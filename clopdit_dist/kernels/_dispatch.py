"""Backend choice shared by every kernel module: ``"auto" | "triton" | "torch"``.

``auto`` runs the Triton kernel on CUDA tensors and the PyTorch reference everywhere else.
``triton`` insists on the kernel: on CUDA, or on CPU tensors when Triton's interpreter is
on (``TRITON_INTERPRET=1`` set *before* ``triton`` is imported; it runs the kernels in
numpy, slowly, which is how the tests check them on a machine without a GPU). ``torch``
always takes the reference.

Triton itself is optional: without the wheel (macOS, Windows) the kernel modules still
import, ``auto`` and ``torch`` work, and ``triton`` says what is missing.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where no Triton wheel exists
    HAS_TRITON = False

    class _NoTriton:
        """Just enough of ``triton``/``triton.language`` for the kernel modules to import."""

        constexpr = object

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()

BACKENDS = ("auto", "triton", "torch")

# Tests flip this on: outputs the kernels own are then allocated full of NaN instead of
# uninitialised, so an element a kernel forgets to write shows up as NaN, not as whatever
# the allocator happened to hand back.
POISON_OUTPUTS = os.environ.get("CLOPDIT_KERNEL_POISON", "0") == "1"


def new_output(shape, dtype, device) -> torch.Tensor:
    """Allocate a buffer a kernel is meant to fill completely (NaN-poisoned under tests)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def triton_interpreting(kernel) -> bool:
    """True when ``kernel`` was built by Triton's CPU interpreter (``TRITON_INTERPRET=1``).

    Triton reads the variable when ``@triton.jit`` runs, i.e. when the kernel module is
    imported, so the kernel object is the ground truth, not the environment now.
    """
    return HAS_TRITON and type(kernel).__name__ == "InterpretedFunction"


def resolve_backend(backend: str, name: str, kernel, tensors, supported: str | None = None) -> str:
    """Return ``"triton"`` or ``"torch"`` for one call of kernel ``name``.

    ``supported`` is ``None`` when the Triton kernel can take these inputs, otherwise the
    reason it cannot (a dtype, a head dim too large): ``auto`` then falls back to the
    reference and ``triton`` raises with that reason.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{name}: backend={backend!r} is not one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{name}: inputs are on several devices {sorted(map(str, devices))}")
    on_cuda = next(iter(devices)).type == "cuda"
    interpreting = triton_interpreting(kernel)
    if backend == "auto":
        return "triton" if (HAS_TRITON and on_cuda and supported is None) else "torch"
    if not HAS_TRITON:
        raise RuntimeError(f"{name}: backend='triton' needs the triton package (pip install triton); "
                           "use backend='auto' or 'torch' for the PyTorch reference")
    if not on_cuda and not interpreting:
        raise RuntimeError(
            f"{name}: backend='triton' got CPU tensors but Triton's interpreter is off. "
            "Run on a CUDA GPU, or set TRITON_INTERPRET=1 before triton is first imported "
            "(slow numpy emulation, meant for tests), or use backend='auto'/'torch'.")
    if on_cuda and interpreting:
        raise RuntimeError(f"{name}: TRITON_INTERPRET=1 was set when the kernels were imported, "
                           "so they run in numpy and cannot take CUDA tensors; unset it")
    if supported is not None:
        raise ValueError(f"{name}: the Triton kernel does not support these inputs: {supported}; "
                         "use backend='auto' or 'torch'")
    return "triton"


def check_float_dtype(t: torch.Tensor, interpreting: bool,
                      gpu_dtypes=(torch.float16, torch.bfloat16, torch.float32)) -> str | None:
    """``None`` if the kernels take ``t``'s dtype, else the reason they do not.

    The interpreter computes in numpy and takes fp16 to float64 (float64 for gradcheck).
    """
    ok = (torch.float16, torch.bfloat16, torch.float32, torch.float64) if interpreting else tuple(gpu_dtypes)
    if t.dtype not in ok:
        return f"dtype {t.dtype} (supported: {', '.join(str(d) for d in ok)})"
    return None


def compute_dtype(dtype: torch.dtype):
    """The Triton dtype kernels accumulate in: float32, or float64 for float64 inputs."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
