"""execute_plan(plan) -> MergeResult: stream the base through the adapter into a new folder.

Tensors are read one at a time, merged (in float64 for float32 outputs, in float32 like PEFT
for bf16/fp16 outputs) and rounded once to the output dtype; untouched tensors are copied
byte for byte by the kernel. Output goes to a temporary
folder beside the destination and is renamed into place only when complete.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import resource
import shutil
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from bot import __version__
from bot.card import CARD_NAME, build_card
from bot.checkpoint import read_base_tensor
from bot.errors import AdapterConfigError, OutputError, UsageError
from bot.plan import MergePlan, TensorJob
from bot.preflight import check_free_space
from bot.provenance import fingerprint, output_options, pin_source
from bot.shards import DTYPE_FROM_CODE, ShardWriter, TensorInfo, index_json, layout_shards, read_into, shard_file_names
from bot.sources import is_tokenizer_file
from bot.tuners import apply_op, apply_op_tensors, row_slice_tensors, weight_delta

log = logging.getLogger(__name__)

REPORT_NAME = "merge_report.json"


def _read_umask() -> int:
    """The process umask, read without changing it where Linux allows (other threads may be creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
ProgressFn = Callable[[int, int, str], None]  # (done, total, what)


@dataclass
class MergeResult:
    out_dir: Path
    files: list[str]
    module_counts: dict[str, int]
    tensors_written: int
    tensors_merged: int
    seconds: float
    peak_rss_bytes: int
    fallback: bool = False
    verification: dict[str, Any] | None = None
    report: dict[str, Any] = field(default_factory=dict, repr=False)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def check_output_dir(out: Path, *, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is a file; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"output folder {out} exists and is not empty; pass --overwrite or choose another --out")


def check_disk_space(out: Path, needed: int) -> None:
    check_free_space(out if out.exists() else out.parent, needed, what="the merged model", hint="choose another --out")


@contextmanager
def staged_output(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """A temp folder beside ``out`` that becomes ``out`` only if the body succeeds."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; the model folder should be like any other folder
    try:
        yield tmp
        if out.exists():
            if not overwrite and any(out.iterdir()):
                raise OutputError(f"output folder {out} appeared during the merge; nothing was replaced")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(device)


_BLOCK_BYTES = 1024 * 1024  # working block for row-wise merging: stays in L2 cache


def compute_dtype(out_dtype: torch.dtype) -> torch.dtype:
    """The arithmetic's dtype for a merge whose output is ``out_dtype``.

    bf16/fp16 outputs: float32, PEFT's own arithmetic, so the result is bit-identical to its
    CPU merge (float32 carries 16 more bits than bf16, so nearly every element is the
    correctly rounded exact merge anyway). float32 outputs: float64, rounded once, so a large
    alpha/r does not magnify float32's rounding error in B @ A; float64 outputs likewise.
    """
    return torch.float64 if out_dtype in (torch.float32, torch.float64) else torch.float32


def tensor_blocks(job: TensorJob, adapter: dict[str, torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """One output tensor as consecutive row blocks: streamed through cache on CPU where the ops
    allow it, else the whole tensor at once."""
    if device.type == "cpu" and rows_are_independent(job, adapter):
        yield from merge_rows_blockwise(job, adapter)
    else:
        yield merge_tensor(job, adapter, device)


def merge_tensor(job: TensorJob, adapter: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Produce one output tensor: start value, adapter ops in ``compute_dtype``, one rounding at the end."""
    value = adapter[job.replacement] if job.replacement is not None else read_base_tensor(job.source)
    out_dtype = DTYPE_FROM_CODE[job.dtype]
    if job.ops:
        value = value.to(device=device, dtype=compute_dtype(out_dtype))
        for op, is_bias in job.ops:
            value = apply_op(value, op, adapter, is_bias=is_bias)
    check_merged(job, value)
    return value.to(out_dtype).cpu()


# Where rounding to the output dtype overflows to inf: its largest value plus half its last step.
_OVERFLOW_FROM = {torch.float16: 65520.0, torch.float32: 2.0 ** 128 - 2.0 ** 103}


def check_merged(job: TensorJob, value: torch.Tensor) -> None:
    """Refuse a merged value that is NaN or infinite, or that the output dtype cannot hold.

    A float32 sum is non-finite when any element is, at a few percent of the merge's time;
    a float16 output from wider values, and a float32 output from float64 arithmetic, also
    need the range (float16 overflows to inf from 65520 on, float32 from about 3.4e38).
    """
    out_dtype = DTYPE_FROM_CODE[job.dtype]
    if not (job.ops or value.dtype != out_dtype) or not value.is_floating_point() or not value.numel():
        return
    limit = _OVERFLOW_FROM.get(out_dtype)
    if limit is not None and torch.finfo(value.dtype).max > torch.finfo(out_dtype).max:
        low, high = torch.aminmax(value)
        if bool(low > -limit) and bool(high < limit):  # NaN fails both comparisons
            return
        if out_dtype == torch.float16:
            raise UsageError(f"merged {job.name} has values beyond float16's range (or NaN); "
                             f"use --dtype bfloat16 or float32")
        raise AdapterConfigError(f"merging {job.name} gave NaN or values beyond float32's range; the adapter's "
                                 f"weights or alpha (or the base's weights) are broken")
    if job.ops and not bool(torch.isfinite(value.sum())):
        raise AdapterConfigError(f"merging {job.name} gave NaN or infinite values; the adapter's weights or alpha "
                                 f"(or the base's weights) are broken")


# Above this LoRA rank, BLAS splits the inner (rank) dimension of a row block's product
# differently from the whole product's, and the float32 sums no longer match PEFT's bit for
# bit (measured with MKL: exact up to r=512 on every shape tried, not from about r=800).
# Float64 arithmetic (float32 outputs) has no such limit: there a row block's float64 sums
# differ from the whole product's in the last bit at every rank (r=16 included), and what
# keeps the paths equal is the single rounding to float32 (see merge_rows_blockwise).
_MAX_BLOCK_RANK = 256


def rows_are_independent(job: TensorJob, adapter: dict[str, torch.Tensor]) -> bool:
    """Whether each row of the output can be computed from the same row of the start value alone,
    with the same result as the whole tensor."""
    if job.replacement is not None or not isinstance(job.source, TensorInfo) or job.source.shape != job.shape:
        return False
    if not job.ops:  # a dtype change only
        return len(job.shape) >= 1
    max_rank = _MAX_BLOCK_RANK if compute_dtype(DTYPE_FROM_CODE[job.dtype]) == torch.float32 else None
    return len(job.shape) == 2 and all(
        not is_bias and row_slice_tensors(op, adapter, slice(0, 1)) is not None
        and (max_rank is None or "lora_A" not in op.tensors or adapter[op.tensors["lora_A"]].shape[0] <= max_rank)
        for op, is_bias in job.ops)


def row_blocks(rows_total: int, step: int) -> list[slice]:
    """Consecutive row ranges of about ``step`` rows, none of them a single row (unless the tensor is).

    A one-row matrix product takes BLAS's matrix-vector path, whose float32 sums can differ
    in the last bit from the same rows inside a bigger product (PEFT's whole-weight merge).
    """
    step = max(4, step)
    blocks = [slice(s, min(s + step, rows_total)) for s in range(0, rows_total, step)]
    if len(blocks) > 1 and blocks[-1].stop - blocks[-1].start == 1:
        blocks[-2:] = [slice(blocks[-2].start, blocks[-2].stop - 1), slice(blocks[-1].start - 1, blocks[-1].stop)]
    return blocks


def merge_rows_blockwise(job: TensorJob, adapter: dict[str, torch.Tensor]) -> Iterator[torch.Tensor]:
    """Read, merge and round a weight a few rows at a time, in reused buffers that stay in cache.

    Every element sees the same operations as ``merge_tensor``: in float32 (bf16/fp16
    outputs) the results are identical, BLAS summing each row alike in a block and in
    the whole product (see row_blocks and _MAX_BLOCK_RANK). In float64 (float32 outputs) a
    block's sums may differ from the whole product's in the last float64 bit; both round
    to the same float32 unless the exact value lies within that bit of a float32 rounding
    boundary (a chance of about 2^-29 per element; never seen in the tests' or measured
    shapes), and either way the result is a float64 computation rounded once.
    Nothing is allocated per block (fresh pages cost more than the arithmetic).
    Yields views of one reused buffer: the caller must consume each before the next.
    """
    source = job.source
    rows_total = job.shape[0]
    cols = 1
    for d in job.shape[1:]:
        cols *= d
    dtype = compute_dtype(DTYPE_FROM_CODE[job.dtype])
    blocks = row_blocks(rows_total, _BLOCK_BYTES // (dtype.itemsize * max(cols, 1)))
    buffer_shape = (max((b.stop - b.start for b in blocks), default=0), cols)
    in_buf = torch.empty(buffer_shape, dtype=source.torch_dtype)
    work = torch.empty(buffer_shape, dtype=dtype)
    out_buf = torch.empty(buffer_shape, dtype=DTYPE_FROM_CODE[job.dtype])
    row_bytes = cols * in_buf.element_size()
    # The job's adapter tensors in the arithmetic's dtype, upcast once (exactly) rather than per block.
    upcast = {key: adapter[key].to(dtype) for op, _ in job.ops for key in op.tensors.values()}
    for rows in blocks:
        start, n = rows.start, rows.stop - rows.start
        block, out = in_buf[:n], out_buf[:n]
        read_into(source, start * row_bytes, block)
        ops = [(op, row_slice_tensors(op, upcast, rows)) for op, _ in job.ops]
        delta = weight_delta(*ops[0], (n, cols), block.device, scratch=work[:n], dtype=dtype) if len(ops) == 1 else None
        if delta is not None:
            value = delta.add_(block)
        else:
            value = work[:n].copy_(block) if ops else block
            for op, tensors in ops:
                value = apply_op_tensors(value, op, tensors)
        check_merged(job, value)
        out.copy_(value)
        yield out.view((n, *job.shape[1:]))


def write_config(plan: MergePlan, out: Path) -> None:
    config = dict(plan.base_config)
    config.update(plan.config_updates)
    if "torch_dtype" in config:
        config["torch_dtype"] = config["dtype"]
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_side_files(plan: MergePlan, out: Path) -> list[str]:
    """generation_config.json from the base, tokenizer files from the adapter if it has any, else the base."""
    copied = []
    gen = plan.base.path / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, out / gen.name)
        copied.append(gen.name)
    folder = plan.tokenizer_folder or plan.base.path
    for path in sorted(folder.iterdir()):
        if path.is_file() and is_tokenizer_file(path.name):
            shutil.copyfile(path, out / path.name)
            copied.append(path.name)
    return copied


def build_report(plan: MergePlan, result: MergeResult) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    def source(s):
        return {"ref": str(s.ref), "repo_id": s.repo_id, "revision": s.sha, "path": None if s.repo_id else str(s.path)}

    options = output_options(plan.spec.dtype, plan.spec.max_shard_bytes)
    scales = Counter(round(job_op.scaling, 6) for job in plan.jobs for job_op, on_bias in job.ops if not on_bias)

    return {
        "merge_bot_version": __version__,
        "fingerprint": fingerprint(pin_source(plan.adapter), pin_source(plan.base), options),
        "adapter": source(plan.adapter),
        "base": source(plan.base),
        "base_note": plan.spec.base_note,
        "requested_by": plan.spec.requested_by,
        "architecture": (plan.config_updates.get("architectures") or plan.base_config.get("architectures") or [None])[0],
        "peft_type": plan.adapter_config.peft_type,
        "task_type": plan.adapter_config.task_type,
        "options": {**options, "device": plan.spec.device},
        "scaling": {str(k): n for k, n in sorted(scales.items())},
        "method": "peft-merge_and_unload" if result.fallback else "streaming",
        "output_dtype": plan.config_updates.get("dtype"),
        "module_counts": result.module_counts,
        "tensors_written": result.tensors_written,
        "tensors_merged": result.tensors_merged,
        "warnings": list(plan.warnings),
        "timing_seconds": round(result.seconds, 3),
        "peak_rss_bytes": result.peak_rss_bytes,
        "verification": result.verification,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            **{name: installed(name) for name in ("transformers", "peft", "safetensors", "huggingface_hub")},
        },
    }


def write_report(result: MergeResult, folder: Path) -> None:
    (folder / REPORT_NAME).write_text(json.dumps(result.report, indent=2, sort_keys=True) + "\n")


def stream_merge(plan: MergePlan, out: Path, *, on_progress: ProgressFn | None = None) -> tuple[list[str], int]:
    """Write every planned tensor into ``out``; return the weight file names and how many were merged."""
    adapter = {}
    needed = {j.replacement for j in plan.jobs if j.replacement} | {
        key for j in plan.jobs for op, _ in j.ops for key in op.tensors.values()}
    if needed:
        from bot.adapter import read_adapter_weights

        adapter = {k: v for k, v in read_adapter_weights(plan.adapter.path).items() if k in needed}
    device = pick_device(plan.spec.device)
    outputs = [j.output for j in plan.jobs]
    shards = layout_shards(outputs, plan.spec.max_shard_bytes)
    names = shard_file_names(len(shards))
    by_name = {j.name: j for j in plan.jobs}
    total, done, merged = len(plan.jobs), 0, 0
    for shard, file_name in zip(shards, names):
        writer = ShardWriter(out / file_name, shard)
        try:
            for spec in shard:
                job = by_name[spec.name]
                if job.is_passthrough and isinstance(job.source, TensorInfo):
                    writer.copy_raw(job.name, job.source)
                else:
                    writer.write_blocks(job.name, tensor_blocks(job, adapter, device))
                    merged += bool(job.ops or job.replacement)
                done += 1
                if on_progress:
                    on_progress(done, total, job.name)
        except BaseException:  # Ctrl-C or a failure keeps its own meaning; the shard is discarded with the stage
            writer.abort()
            raise
        writer.close()
    if len(names) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(index_json(shards, names), indent=2) + "\n")
        names = names + ["model.safetensors.index.json"]
    return names, merged


def execute_plan(plan: MergePlan, *, on_progress: ProgressFn | None = None,
                 verify: Callable[[MergePlan, Path], dict[str, Any]] | None = None) -> MergeResult:
    """Run a plan into ``plan.spec.out`` atomically. ``verify`` runs on the staged folder before the rename."""
    out = Path(plan.spec.out)
    check_output_dir(out, overwrite=plan.spec.overwrite)
    check_disk_space(out, plan.output_bytes)
    start = time.perf_counter()
    with staged_output(out, overwrite=plan.spec.overwrite) as tmp:
        if plan.fallback_reason:
            from bot.fallback import peft_merge

            log.warning("%s: merging in memory with PEFT; peak memory will be the whole model", plan.fallback_reason)
            files, counts = peft_merge(plan, tmp)
            merged, written = counts.get("merged_modules", 0), 0
        else:
            files, merged = stream_merge(plan, tmp, on_progress=on_progress)
            write_config(plan, tmp)
            counts, written = dict(plan.module_counts), len(plan.jobs)
        files = files + ["config.json"] * ("config.json" not in files) + copy_side_files(plan, tmp)
        result = MergeResult(out_dir=out, files=sorted(set(files)), module_counts=counts, tensors_written=written,
                             tensors_merged=merged, seconds=time.perf_counter() - start,
                             peak_rss_bytes=peak_rss_bytes(), fallback=bool(plan.fallback_reason))
        if verify is not None:
            result.verification = verify(plan, tmp)
        result.report = build_report(plan, result)
        write_report(result, tmp)
        has_tokenizer = any(is_tokenizer_file(name) for name in result.files)
        (tmp / CARD_NAME).write_text(build_card(result.report, plan.adapter.path, plan.base.path,
                                                has_tokenizer=has_tokenizer), encoding="utf-8")
        result.files = sorted(set(result.files) | {REPORT_NAME, CARD_NAME})
    return result
