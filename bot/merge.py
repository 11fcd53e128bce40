"""execute_plan(plan) -> MergeResult: stream the base through the adapter into a new folder.

Tensors are read one at a time, merged (in float64 for float32 outputs, in float32 like PEFT
for bf16/fp16 outputs) and rounded once to the output dtype; untouched tensors are copied
byte for byte by the kernel. Output goes to a temporary
folder beside the destination and is renamed into place only when complete.
"""
from __future__ import annotations

import fnmatch
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from bot import __version__
from bot.card import CARD_NAME, build_card
from bot.checkpoint import read_base_tensor
from bot.errors import AdapterConfigError, OutputError, UsageError
from bot.plan import MergePlan, TensorJob
from bot.preflight import check_free_space
from bot.provenance import LOCAL_FOLDER, Pinned, fingerprint, output_options, pin_source
from bot.report import (REPORT_NAME, MergeReport, ReportOptions, ReportSource, ReportStamp, Verification, Versions,
                        write_report)
from bot.shards import DTYPE_FROM_CODE, ShardWriter, TensorInfo, index_json, layout_shards, read_into, shard_file_names
from bot.sources import is_side_file, is_tokenizer_file
from bot.tuners import apply_op, apply_op_tensors, row_slice_tensors, weight_delta

log = logging.getLogger(__name__)


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
    verification: Verification | None = None
    report: MergeReport | None = field(default=None, repr=False)
    warnings: list[str] = field(default_factory=list)  # found while writing (side files), besides the plan's


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# What a merge writes (merge_report.json, README.md and the side files included): a folder
# holding anything else is not only a previous merge-bot output, so --overwrite leaves it alone.
_OUTPUT_FILES = ("*.safetensors", "model.safetensors.index.json", "config.json", CARD_NAME, REPORT_NAME)


def is_output_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in _OUTPUT_FILES) or is_side_file(name)


def protected_folders(inputs: Iterable[Path]) -> list[tuple[Path, str]]:
    """Folders --out must neither be, contain, nor lie inside, each with how to name it in a message.

    An input given as a huggingface_hub snapshot (``models--org--name/snapshots/<sha>``) holds
    links into ``../../blobs``, so the whole cached repo is protected."""
    folders = []
    for folder in inputs:
        real = Path(folder).resolve()
        folders.append((real, "an input folder"))
        repo = real.parents[1] if len(real.parents) > 1 else None
        if real.parent.name == "snapshots" and repo is not None and repo.name.startswith(("models--", "datasets--")):
            folders.append((repo, "the Hub cache of an input"))
    return folders


def describe_contents(folder: Path, entries: list[Path] | None = None) -> str:
    """``holds 3 files, e.g. x.py`` for a refusal message (names only, at most three)."""
    entries = sorted(folder.iterdir()) if entries is None else entries
    files = sum(1 for e in entries if e.is_file() and not e.is_symlink())
    others = len(entries) - files
    counts = " and ".join(part for part in (f"{files} file{'s' * (files != 1)}" * bool(files),
                                             f"{others} other entr{'ies' if others != 1 else 'y'}" * bool(others)) if part)
    return f"holds {counts}, e.g. {', '.join(e.name for e in entries[:3])}"


def holds_merge_output(folder: Path) -> bool:
    """Whether ``folder`` is a previous merge-bot output: its merge_report.json carries a fingerprint."""
    try:
        report = json.loads((folder / REPORT_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return ReportStamp.from_json(report).fingerprint is not None


def check_output_dir(out: Path, *, overwrite: bool, inputs: Iterable[Path] = ()) -> None:
    """Refuse an --out whose replacement could destroy something that is not a previous merge.

    --out may not be, contain or lie inside an input folder, nor be (or contain) the current
    folder or home, with or without --overwrite. A non-empty folder is replaced only with
    --overwrite and only when it holds a previous merge-bot output and nothing else.
    """
    given = out
    out = Path(out).resolve()  # symlinks too: a link to the base is the base
    for folder, what in ((Path.cwd().resolve(), "the current folder"), (Path.home().resolve(), "your home folder")):
        if out == folder or folder.is_relative_to(out):
            relation = "is" if out == folder else "contains"
            raise OutputError(f"--out {given} {relation} {what}; choose a new folder for the merge, such as ./merged")
    for folder, what in protected_folders(inputs):
        relation = ("is" if out == folder else "contains" if folder.is_relative_to(out)
                    else "lies inside" if out.is_relative_to(folder) else None)
        if relation:
            raise OutputError(f"--out {given} {relation} {what} ({folder.name}); merge-bot never writes over or into "
                              f"its inputs: choose a new folder elsewhere, such as ./merged")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {given} exists and is a file; choose another --out")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise OutputError(f"output folder {given} exists and is not empty ({describe_contents(out, entries)}); "
                          f"pass --overwrite to replace a previous merge-bot output, or choose another --out")
    if not holds_merge_output(out):
        raise OutputError(f"output folder {given} {describe_contents(out, entries)}, not a merge-bot output; "
                          f"--overwrite only replaces a folder written by merge-bot: choose another --out")
    foreign = [e for e in entries if not (e.is_file() and not e.is_symlink() and is_output_file(e.name))]
    if foreign:
        raise OutputError(f"output folder {given} is a merge-bot output but also {describe_contents(out, foreign)} "
                          f"that merge-bot did not write; move them out or choose another --out")


def check_disk_space(out: Path, needed: int) -> None:
    check_free_space(out if out.exists() else out.parent, needed, what="the merged model", hint="choose another --out")


@contextmanager
def staged_output(out: Path, *, overwrite: bool, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """A temp folder beside ``out`` that becomes ``out`` only if the body succeeds; an existing
    ``out`` is checked again (``check_output_dir``) right before it is replaced."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; the model folder should be like any other folder
    try:
        yield tmp
        if out.exists():
            check_output_dir(out, overwrite=overwrite, inputs=inputs)  # again: it may have changed during the merge
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
    return merge_value(job, start_value(job, adapter), adapter, device)


def start_value(job: TensorJob, adapter: dict[str, torch.Tensor]) -> torch.Tensor:
    """What ``job``'s ops start from: the adapter's replacement tensor, or the base tensor read from disk."""
    return adapter[job.replacement] if job.replacement is not None else read_base_tensor(job.source)


def merge_value(job: TensorJob, value: torch.Tensor, adapter: dict[str, torch.Tensor],
                device: torch.device) -> torch.Tensor:
    """``job``'s ops applied to its start ``value`` on ``device``, rounded once; the result is on the CPU."""
    out_dtype = DTYPE_FROM_CODE[job.dtype]
    if job.ops:
        value = value.to(device=device, dtype=compute_dtype(out_dtype))
        for op, is_bias in job.ops:
            value = apply_op(value, op, adapter, is_bias=is_bias)
    check_merged(job, value)
    return value.to(out_dtype).cpu()


@dataclass(frozen=True)
class TensorBatch:
    """Tensors merged in one go by a ``compute`` hook (on ZeroGPU: one GPU call), with all they read
    already in memory, so the arithmetic never waits on a disk or the network."""

    jobs: tuple[TensorJob, ...]
    starts: tuple[torch.Tensor, ...]  # each job's start value (``start_value``), on the CPU
    adapter: dict[str, torch.Tensor]  # the adapter tensors the jobs' ops read, on the CPU

    @property
    def nbytes(self) -> int:
        return sum(job.output.nbytes for job in self.jobs)


# (batch) -> each job's merged tensor, in order, on the CPU: where the arithmetic of a batch runs.
Compute = Callable[[TensorBatch], list[torch.Tensor]]
COMPUTE_BATCH_BYTES = 256 * 1024 * 1024  # output bytes per compute call: seconds on a GPU; inputs and results
# of a batch are in memory at once (with ZeroGPU's copies across processes), so this keeps RSS near 1 GiB


def merge_batch(batch: TensorBatch, device: torch.device) -> list[torch.Tensor]:
    """Every job of ``batch`` merged on ``device`` (``merge_value``, as ``merge_tensor`` does), back on the CPU."""
    return [merge_value(job, start, batch.adapter, device) for job, start in zip(batch.jobs, batch.starts)]


def batch_of(jobs: list[TensorJob], adapter: dict[str, torch.Tensor]) -> TensorBatch:
    """``jobs`` with their start values read now and the adapter tensors they need."""
    keys = {key for job in jobs for op, _ in job.ops for key in op.tensors.values()}
    return TensorBatch(tuple(jobs), tuple(start_value(job, adapter) for job in jobs),
                       {key: adapter[key] for key in sorted(keys)})


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
    assert isinstance(source, TensorInfo)  # rows_are_independent: a safetensors base tensor
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
    config.pop("_name_or_path", None)  # where transformers 4 loaded the base from (often a local path): not this model
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_side_files(plan: MergePlan, out: Path) -> tuple[list[str], list[str]]:
    """The base's side files overlaid with the adapter's, then the tokenizer checked (bot/sidefiles.py).
    Returns (file names written, warnings)."""
    from bot.sidefiles import check_tokenizer, plan_side_files, write_side_files

    side = plan_side_files(plan.adapter.path, plan.base.path)
    copied = write_side_files(side, out)
    return copied, check_tokenizer(out, plan.base.path, side)


def build_report(plan: MergePlan, result: MergeResult) -> MergeReport:
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    options = output_options(plan.spec.dtype, plan.spec.max_shard_bytes)
    scales = Counter(round(job_op.scaling, 6) for job in plan.jobs for job_op, on_bias in job.ops if not on_bias)
    adapter, base = pin_source(plan.adapter), pin_source(plan.base)
    base_entry = published_source(plan.base, base)
    if not base.hub and (named := hub_id_named_by(plan.base_config)):
        base_entry = replace(base_entry, config_names=named)

    report = MergeReport(
        merge_bot_version=__version__,
        fingerprint=fingerprint(adapter, base, options),
        adapter=published_source(plan.adapter, adapter),
        base=base_entry,
        base_note=plan.spec.base_note,
        requested_by=plan.spec.requested_by,
        architecture=(plan.config_updates.get("architectures") or plan.base_config.get("architectures") or [None])[0],
        peft_type=plan.adapter_config.peft_type,
        task_type=plan.adapter_config.task_type,
        options=ReportOptions(**options, device=plan.spec.device),
        scaling={str(k): n for k, n in sorted(scales.items())},
        method="peft-merge_and_unload" if result.fallback else "streaming",
        output_dtype=plan.config_updates.get("dtype"),
        module_counts=result.module_counts,
        tensors_written=result.tensors_written,
        tensors_merged=result.tensors_merged,
        warnings=tuple(plan.warnings) + tuple(result.warnings),
        timing_seconds=round(result.seconds, 3),
        peak_rss_bytes=result.peak_rss_bytes,
        verification=result.verification,
        versions=Versions(
            python=platform.python_version(),
            torch=torch.__version__,
            **{name: installed(name) for name in ("transformers", "peft", "safetensors", "huggingface_hub")},
        ),
    )
    # Warnings, notes and skip reasons come from many places: every string in the file is cleaned.
    return MergeReport.from_json(without_local_paths(report.to_json(), local_paths(plan)))


def published_source(source, pinned: Pinned) -> ReportSource:
    """An input as the published report names it: a Hub id at its commit, or "a local folder" at its
    content digest (provenance.folder_digest); never a path of this machine."""
    if pinned.hub:
        return ReportSource(ref=str(source.ref), repo_id=pinned.name, revision=pinned.revision)
    return ReportSource(ref=LOCAL_FOLDER, repo_id=None, revision=pinned.revision)


def hub_id_named_by(config: dict[str, Any]) -> str | None:
    """The Hub repo a local base's config.json names as its origin (``_name_or_path``, which
    transformers 4 wrote on save), when that is an ``owner/name`` id rather than a path."""
    from huggingface_hub.utils import validate_repo_id

    named = config.get("_name_or_path")
    if not isinstance(named, str) or named.count("/") != 1 or named.startswith((".", "~")):
        return None
    try:
        validate_repo_id(named)
    except Exception:  # HFValidationError: a path or junk, not a repo id
        return None
    return named


def local_paths(plan: MergePlan) -> list[tuple[str, str]]:
    """(path, what to say instead) for this machine's folders that a message might quote."""
    folders = [(plan.adapter.path, LOCAL_FOLDER), (plan.base.path, LOCAL_FOLDER), (Path(plan.spec.out), "the output"),
               (Path.home(), "~")]
    pairs: dict[str, str] = {}
    for folder, instead in folders:
        for form in (str(folder), str(Path(folder).absolute()), str(Path(folder).resolve())):
            if len(form) > 1:  # never "/" or "."
                pairs.setdefault(form, instead)
    return sorted(pairs.items(), key=lambda pair: -len(pair[0]))  # longest first: a folder inside home before home


def without_local_paths(value: Any, paths: list[tuple[str, str]]) -> Any:
    """``value`` with every quoted local folder replaced (warnings and notes come from many places)."""
    if isinstance(value, str):
        for path, instead in paths:
            value = value.replace(path, instead)
        return value
    if isinstance(value, dict):
        return {k: without_local_paths(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [without_local_paths(v, paths) for v in value]
    return value


def stream_merge(plan: MergePlan, out: Path, *, on_progress: ProgressFn | None = None, base_pieces=None,
                 on_shard: Callable[[Path], None] | None = None,
                 check_tensor: Callable[[str, TensorInfo], None] | None = None,
                 compute: Compute | None = None) -> tuple[list[str], int]:
    """Write every planned tensor into ``out``; return the weight file names and how many were merged.

    ``base_pieces`` (a ``bot.pipeline.PieceFetcher``) supplies base tensors that are still on the Hub;
    ``on_shard(path)`` runs as each shard is complete (the pipeline uploads it, then deletes it);
    ``check_tensor(name, where)`` as each tensor is written, while its base piece is still at hand
    (the per-module proof, ``bot.proof``), so every shard is proved before it is uploaded.
    ``compute``: where the arithmetic runs, a batch of tensors at a time (``compute_batches``; ZeroGPU's
    GPU calls); without it, each tensor is merged here, row blocks at a time on the CPU.
    """
    adapter = dict(plan.adapter_tensors)  # read once, by resolve_plan
    device = pick_device(plan.spec.device)
    outputs = [j.output for j in plan.jobs]
    shards = layout_shards(outputs, plan.shard_bytes)
    names = shard_file_names(len(shards))
    by_name = {j.name: j for j in plan.jobs}
    total, done, merged = len(plan.jobs), 0, 0
    for shard, file_name in zip(shards, names):
        writer = ShardWriter(out / file_name, shard)
        try:
            if compute is None:
                batches: Iterable[list[TensorJob]] = ([by_name[spec.name]] for spec in shard)
            else:
                batches = compute_batches([by_name[spec.name] for spec in shard], base_pieces)
            for batch in batches:
                values: dict[str, torch.Tensor] = {}
                if compute is not None:
                    arithmetic = [job for job in batch if not _is_raw_copy(job)]
                    if arithmetic:
                        values = dict(zip((job.name for job in arithmetic), compute(batch_of(arithmetic, adapter))))
                for job in batch:
                    if base_pieces is not None and compute is None:
                        job = base_pieces.localize(job)
                    if job.is_passthrough and isinstance(job.source, TensorInfo):
                        writer.copy_raw(job.name, job.source)
                    else:
                        blocks = [values.pop(job.name)] if compute is not None else tensor_blocks(job, adapter, device)
                        writer.write_blocks(job.name, blocks)
                        merged += bool(job.ops or job.replacement)
                    if check_tensor is not None:
                        check_tensor(job.name, writer.written(job.name))
                    if base_pieces is not None:
                        base_pieces.release(job)
                    done += 1
                    if on_progress:
                        on_progress(done, total, job.name)
        except BaseException:  # Ctrl-C or a failure keeps its own meaning; the shard is discarded with the stage
            writer.abort()
            raise
        writer.close()
        if on_shard is not None:
            on_shard(out / file_name)
    if len(names) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(index_json(shards, names), indent=2) + "\n")
        names = names + ["model.safetensors.index.json"]
    return names, merged


def _is_raw_copy(job: TensorJob) -> bool:
    return job.is_passthrough and isinstance(job.source, TensorInfo)


def compute_batches(jobs: list[TensorJob], base_pieces=None,
                    limit: int = COMPUTE_BATCH_BYTES) -> Iterator[list[TensorJob]]:
    """``jobs`` (one shard's, in order) in consecutive batches of at most ``limit`` output bytes (a larger
    tensor alone), each job reading from a fetched base piece.

    A batch also ends before a job whose piece is still downloading: the pieces a batch holds are
    released only once it is written, so waiting for more than the fetcher keeps ahead would never end.
    The caller must write each batch before asking for the next.
    """
    batch: list[TensorJob] = []
    size = 0
    for job in jobs:
        if batch and (size + job.output.nbytes > limit or (base_pieces is not None and not base_pieces.ready(job))):
            yield batch
            batch, size = [], 0
        batch.append(base_pieces.localize(job) if base_pieces is not None else job)
        size += job.output.nbytes
    if batch:
        yield batch


def execute_plan(plan: MergePlan, *, on_progress: ProgressFn | None = None, verify: bool = False,
                 compute: Compute | None = None) -> MergeResult:
    """Run a plan into ``plan.spec.out`` atomically; ``verify``: prove it against PEFT before the rename."""
    out = Path(plan.spec.out)
    inputs = (plan.adapter.path, plan.base.path)
    check_output_dir(out, overwrite=plan.spec.overwrite, inputs=inputs)
    check_disk_space(out, plan.output_bytes)
    with staged_output(out, overwrite=plan.spec.overwrite, inputs=inputs) as tmp:
        result = merge_into(plan, tmp, on_progress=on_progress, verify=verify, compute=compute)
    result.out_dir = out
    return result


def merge_into(plan: MergePlan, folder: Path, *, on_progress: ProgressFn | None = None, verify: bool = False,
               base_pieces=None, on_shard: Callable[[Path], None] | None = None,
               compute: Compute | None = None) -> MergeResult:
    """Write the whole output (weights, config, side files, report, card) into the empty ``folder``.

    ``verify``: every tensor is proved against PEFT's own layers as it is written (``bot.proof``), and
    the whole model end to end when it stays on disk and fits the memory budget (``bot.verify``);
    a failure raises ``VerificationError`` before anything is published.
    ``base_pieces`` and ``on_shard``: see ``stream_merge`` (the Hub-to-Hub pipeline); ``compute``: where
    the arithmetic runs (``stream_merge``).
    """
    start = time.perf_counter()
    proof, proved, proof_skipped = None, None, None
    if plan.fallback_reason:
        from bot.fallback import peft_merge

        log.info("%s: merging in memory with PEFT; peak memory will be the whole model", plan.fallback_reason)
        files, counts, written = peft_merge(plan, folder)
        merged = counts.get("merged_modules", 0)
        if verify:
            from bot.proof import ProofUnavailable, prove_folder

            try:
                proved = prove_folder(plan, folder)  # before any shard leaves
            except ProofUnavailable as e:
                proof_skipped = str(e)
        if on_shard is not None:
            for name in files:
                if name.endswith(".safetensors"):
                    on_shard(folder / name)
    else:
        if verify:
            from bot.proof import ModuleProof, base_lookup

            proof = ModuleProof(plan, base_lookup(plan, base_pieces.localize_info if base_pieces else None))
        files, merged = stream_merge(plan, folder, on_progress=on_progress, base_pieces=base_pieces,
                                     on_shard=on_shard, check_tensor=proof.check if proof else None,
                                     compute=compute)
        write_config(plan, folder)
        counts, written = dict(plan.module_counts), len(plan.jobs)
        if proof is not None:
            config = json.loads((folder / "config.json").read_text())
            proved = proof.finish(tie_word_embeddings=bool(config.get("tie_word_embeddings", True)))
    side_files, side_warnings = copy_side_files(plan, folder)
    files = files + ["config.json"] * ("config.json" not in files) + side_files
    result = MergeResult(out_dir=folder, files=sorted(set(files)), module_counts=counts, tensors_written=written,
                         tensors_merged=merged, seconds=time.perf_counter() - start,
                         peak_rss_bytes=peak_rss_bytes(), fallback=bool(plan.fallback_reason),
                         warnings=side_warnings)
    if verify:
        from bot.verify import verify_output

        result.verification = verify_output(plan, folder if on_shard is None else None, proved, proof_skipped)
    result.report = build_report(plan, result)
    write_report(result.report, folder)
    has_tokenizer = any(is_tokenizer_file(name) for name in result.files)
    card = build_card(result.report, plan.adapter.path, plan.base.path, hub_url=plan.hub_url,
                      has_tokenizer=has_tokenizer)
    (folder / CARD_NAME).write_text(without_local_paths(card, local_paths(plan)), encoding="utf-8")
    result.files = sorted(set(result.files) | {REPORT_NAME, CARD_NAME})
    return result
