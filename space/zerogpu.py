"""ZeroGPU: the GPU only for the arithmetic, in short calls; everything else on the CPU side.

On a ZeroGPU Space the job streams Hub to Hub as anywhere else (downloads, the proof, uploads and
the commit run in the Space's own process); only ``bot.merge.stream_merge``'s ``compute`` hook
crosses over, one ``@spaces.GPU`` call per batch of tensors already read into memory
(``bot.merge.TensorBatch``), each asking for a duration well inside ZeroGPU's limits. When
ZeroGPU refuses a call (the visitor's quota is used up, no GPU is free), the rest of the job is
merged on the CPU and the page says so.
"""
from __future__ import annotations

import math
from typing import Any, Callable

try:  # before torch: spaces patches it on import
    import spaces  # type: ignore
except ImportError:
    spaces = None

GPU_DEVICE = "cuda"  # tests run the "GPU" arithmetic on the CPU
DEFAULT_GPU_SECONDS = 60  # ZeroGPU's default duration; a batch of COMPUTE_BATCH_BYTES takes seconds
MAX_GPU_SECONDS = 300  # about the longest call ZeroGPU grants
# What spaces raises when it will not give a GPU: gr.Error with one of these titles (spaces 0.51,
# spaces/zero/client.py). The quota ones mean "not today"; any other "ZeroGPU ..." title is a refusal too.
QUOTA_TITLES = ("ZeroGPU quota exceeded", "ZeroGPU pending credits exceeded")
FALLBACK_NOTE = "merging the rest on the CPU"


def on_zerogpu() -> bool:
    return spaces is not None


def gpu_seconds(batch: Any) -> int:
    """The duration one GPU call asks for: the default for a batch up to ``COMPUTE_BATCH_BYTES`` (far
    more than its arithmetic and copies take), more for one larger tensor alone, at most ``MAX_GPU_SECONDS``."""
    from bot.merge import COMPUTE_BATCH_BYTES

    share = batch.nbytes / COMPUTE_BATCH_BYTES
    return int(min(MAX_GPU_SECONDS, max(DEFAULT_GPU_SECONDS, math.ceil(DEFAULT_GPU_SECONDS * share))))


def _merge_batch_on_gpu(batch: Any) -> list:
    """One GPU call: the batch's arithmetic only; its inputs are in memory and its results come back on the CPU."""
    import torch

    from bot.merge import merge_batch

    # Full float32 matmuls: TF32 (10-bit mantissa), if anything in the process turned it on, would
    # put the merged weights outside the proof's 1-ulp bound.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return merge_batch(batch, torch.device(GPU_DEVICE))


def _gpu(fn: Callable) -> Callable:
    """``spaces.GPU`` on ZeroGPU (decorated at import, as ZeroGPU expects), else the function itself."""
    if spaces is None:
        return fn
    return spaces.GPU(duration=gpu_seconds)(fn)


merge_batch_on_gpu = _gpu(_merge_batch_on_gpu)


def gpu_refusal(error: BaseException) -> str | None:
    """Why ZeroGPU gave no GPU for a call, in words for the page; None when ``error`` is not a refusal
    (the merge's own errors, such as NaN in the adapter, must stop the job, not move it to the CPU)."""
    title = str(getattr(error, "title", "") or "")
    if title in QUOTA_TITLES:
        return "ZeroGPU quota used up"
    if title.startswith("ZeroGPU"):
        return f"ZeroGPU unavailable ({title.removeprefix('ZeroGPU').strip() or 'no GPU'})"
    if type(error).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError: a tensor too big for the GPU
        return "the GPU ran out of memory"
    return None


class ZeroGpuCompute:
    """A ``bot.merge.Compute``: each batch in one GPU call until ZeroGPU refuses one, then that batch and
    every later one on the CPU (same arithmetic, ``bot.merge.merge_batch``); ``on_event`` hears why, once."""

    def __init__(self, on_event: Callable[[str], None], gpu_call: Callable | None = None):
        self.on_event = on_event
        self.gpu_call = gpu_call or merge_batch_on_gpu
        self.fallback: str | None = None  # why the job left the GPU, once it has

    def __call__(self, batch: Any) -> list:
        if self.fallback is None:
            try:
                return self.gpu_call(batch)
            except Exception as e:
                reason = gpu_refusal(e)
                if reason is None:
                    raise
                self.fallback = reason
                self.on_event(f"{reason}; {FALLBACK_NOTE}")
        import torch

        from bot.merge import merge_batch

        return merge_batch(batch, torch.device("cpu"))
