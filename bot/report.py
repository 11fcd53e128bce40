"""The merge report (``merge_report.json``): what a merge did, as one frozen type with one JSON mapping.

Every part is a frozen dataclass whose field names ARE the JSON keys, and ``to_json`` /
``from_json`` are the only code that turns one into the other: a renamed field changes the
file (the golden-keys test fails) and a file missing a required key, or carrying an unknown
one, is refused with the key's dotted path. The JSON is what merge-bot has always written
(already-published repos and ``push`` read it back), so the layout mirrors it: mostly flat,
with nested objects where the file has them. A field marked ``_omitted_when_none`` is left
out of the file when None (the file never had the key then); every other field is always
written, ``null`` included.

Reports on a target repo may come from an older merge-bot or another tool: publishing reads
only their stamp (``ReportStamp``), leniently, never the whole type.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Union

from bot.errors import UsageError

REPORT_NAME = "merge_report.json"


def _omitted_when_none() -> Any:
    """A field the file leaves out (rather than writing ``null``) when it is None."""
    return field(default=None, metadata={"omit_none": True})


@dataclass(frozen=True)
class ReportSource:
    """An input as the published report names it: a Hub id at its commit, or "a local folder" at its
    content digest (``bot.provenance.folder_digest``); never a path of this machine."""

    ref: str  # the reference as typed (Hub inputs) or "a local folder"
    repo_id: str | None
    revision: str  # commit SHA, or "local-<digest>"
    config_names: str | None = _omitted_when_none()  # local base: the Hub repo its config.json names as origin


@dataclass(frozen=True)
class ReportOptions:
    dtype: str
    max_shard_bytes: str | int  # "auto" or bytes
    device: str


@dataclass(frozen=True)
class ProofSummary:
    """The per-module proof's numbers (``bot.proof``)."""

    method: str
    peft_version: str
    modules_proved: int
    saved_copies: int
    unchanged_tensors: int
    probes_per_module: int
    max_error_ulp: float
    threshold_ulp: float
    max_share_beyond_half_ulp: float
    threshold_share: float
    max_dense_relative_delta: float
    worst_module: str | None
    passed: bool


@dataclass(frozen=True)
class Skipped:
    """A measurement that could not run, with why (``bot.verify._unless_broken``)."""

    skipped: str


@dataclass(frozen=True)
class GenerationCheck:
    """Greedy generation of both models from the same prompt (``bot.verify.compare_generation``)."""

    prompt: str
    new_tokens: int
    identical: bool
    first_difference: int | None = _omitted_when_none()  # only when the tokens differ
    reference_margin: float | None = _omitted_when_none()


@dataclass(frozen=True)
class Latency:
    """Median warm forward time of both models (``bot.verify.measure_latency``)."""

    merged_ms: float
    adapter_ms: float
    speedup: float | None
    batch: int
    sequence_length: int
    warmup: int
    runs: int
    dtype: str
    hardware: str


@dataclass(frozen=True)
class EndToEnd:
    """PEFT's unmerged model against the merged folder on fixed inputs (``bot.verify.end_to_end``)."""

    max_abs_logit_delta: float
    max_abs_logit: float
    relative: float
    input_tokens: int
    reference: str
    latency: Latency | Skipped
    generation: GenerationCheck | Skipped | None = _omitted_when_none()  # causal LMs only


@dataclass(frozen=True)
class Verification:
    """The verification record: the proof and the end-to-end comparison, each with why it did not run."""

    proof: ProofSummary | None
    end_to_end: EndToEnd | None
    passed: bool
    proof_skipped: str | None = _omitted_when_none()
    end_to_end_skipped: str | None = _omitted_when_none()


@dataclass(frozen=True)
class Versions:
    python: str
    torch: str
    transformers: str | None  # None: not installed
    peft: str | None
    safetensors: str | None
    huggingface_hub: str | None


@dataclass(frozen=True)
class MergeReport:
    """What a merge did (built by ``bot.merge.build_report``, written as ``merge_report.json``)."""

    merge_bot_version: str
    fingerprint: str  # bot.provenance.fingerprint of (adapter, base, options, version)
    adapter: ReportSource
    base: ReportSource
    base_note: str | None  # set when the base differs from the one adapter_config.json names
    requested_by: str | None  # the Hub user who asked the self-service bot
    architecture: str | None
    peft_type: str
    task_type: str | None
    options: ReportOptions
    scaling: Mapping[str, int]  # scale (rounded, as text) -> how many tensors got it
    method: str  # "streaming" or "peft-merge_and_unload"
    output_dtype: str | None
    module_counts: Mapping[str, int]  # op kind -> modules ("merged_modules": PEFT's fallback's total)
    tensors_written: int
    tensors_merged: int
    warnings: tuple[str, ...]
    timing_seconds: float
    peak_rss_bytes: int
    verification: Verification | None  # None: merged with --no-verify
    versions: Versions

    @property
    def streamed(self) -> bool:
        return self.method == "streaming"

    @property
    def adapted_counts(self) -> dict[str, int]:
        """Module counts by op kind, without the fallback's ``merged_modules`` total."""
        return {kind: n for kind, n in self.module_counts.items() if kind != "merged_modules"}

    def to_json(self) -> dict[str, Any]:
        return to_json(self)

    @classmethod
    def from_json(cls, data: Any, *, where: str = REPORT_NAME) -> MergeReport:
        """The report in ``data``; a missing, unknown or mistyped key raises ``UsageError`` naming it."""
        return from_json(cls, data, where=where)

    def dumps(self) -> str:
        """The file's text: sorted keys, so the same merge writes the same bytes."""
        return json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"


def write_report(report: MergeReport, folder: Path) -> None:
    (Path(folder) / REPORT_NAME).write_text(report.dumps())


def read_report(folder: Path) -> MergeReport:
    """``folder``'s merge_report.json as a ``MergeReport``; one-line ``UsageError`` when it is absent or not one."""
    from bot.jsonfile import read_json_object

    path = Path(folder) / REPORT_NAME
    if not path.is_file():
        raise UsageError(f"{folder} has no {REPORT_NAME}; publish a folder written by `python -m bot merge`")
    data = read_json_object(path, error=UsageError, what=str(path), fix="re-run the merge")
    if not isinstance(data.get("fingerprint"), str) or not data["fingerprint"]:
        raise UsageError(f"{path} has no fingerprint; re-run the merge with this merge-bot version")
    return MergeReport.from_json(data, where=str(path))


@dataclass(frozen=True)
class ReportStamp:
    """What publishing needs of a report already on a target (any merge-bot version, or none): read leniently."""

    fingerprint: str | None = None
    verified: bool = False
    adapter_repo_id: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> ReportStamp:
        if not isinstance(data, dict):
            return cls()
        fp, adapter = data.get("fingerprint"), data.get("adapter")
        repo_id = adapter.get("repo_id") if isinstance(adapter, dict) else None
        return cls(fingerprint=fp if isinstance(fp, str) and fp else None, verified=bool(data.get("verification")),
                   adapter_repo_id=repo_id if isinstance(repo_id, str) else None)


# ---- the one mapping ---------------------------------------------------------------------------


def to_json(value: Any) -> Any:
    """A report part as JSON values: dataclasses by field name, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get("omit_none") and getattr(value, f.name) is None)}
    if isinstance(value, Mapping):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def from_json(cls: type, data: Any, *, where: str) -> Any:
    """``data`` (the JSON of file ``where``) as the dataclass ``cls``: each field read from its key by its type."""
    return _read_object(cls, data, _Place(where, ""))


@dataclass(frozen=True)
class _Place:
    """Where in which file a value sits, for messages: ``merge_report.json: verification.proof.passed``."""

    file: str
    key: str  # dotted; "" for the whole file

    def child(self, name: Any) -> _Place:
        return _Place(self.file, f"{self.key}.{name}" if self.key else str(name))

    def __str__(self) -> str:
        return f"{self.file}: {self.key}" if self.key else self.file


def _read_object(cls: type, data: Any, place: _Place) -> Any:
    _expect(isinstance(data, dict), data, "a JSON object", place)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UsageError(f"{place.child(unknown[0])} is not a key this merge-bot version knows; re-run the merge")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _read_value(hints[name], data[name], place.child(name))
        elif not f.metadata.get("omit_none"):
            raise UsageError(f"{place.child(name)} is missing; re-run the merge with this merge-bot version")
    return cls(**values)


def _read_value(kind: Any, value: Any, place: _Place) -> Any:
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):  # X | None, or one of several parts (GenerationCheck | Skipped)
        arms = [arm for arm in typing.get_args(kind) if arm is not type(None)]
        if value is None and len(arms) < len(typing.get_args(kind)):
            return None
        failures = []
        for arm in arms:
            try:
                return _read_value(arm, value, place)
            except UsageError as e:
                failures.append(e)
        raise failures[0]
    if dataclasses.is_dataclass(kind):
        return _read_object(typing.cast(type, kind), value, place)
    if origin is tuple:  # tuple[X, ...]: a JSON list
        _expect(isinstance(value, list), value, "a list", place)
        item = typing.get_args(kind)[0]
        return tuple(_read_value(item, v, place.child(i)) for i, v in enumerate(value))
    if origin in (dict, Mapping, typing.get_origin(Mapping)):  # Mapping[str, X]: a JSON object
        _expect(isinstance(value, dict), value, "a JSON object", place)
        item = typing.get_args(kind)[1]
        return {k: _read_value(item, v, place.child(k)) for k, v in value.items()}
    if kind is float:  # an int is a number too (a hand-made file may say 1 for 1.0); kept as written
        _expect(isinstance(value, (int, float)) and not isinstance(value, bool), value, "a number", place)
    elif kind is int:
        _expect(isinstance(value, int) and not isinstance(value, bool), value, "an integer", place)
    elif kind in (str, bool):
        _expect(isinstance(value, kind), value, f"a {'string' if kind is str else 'boolean'}", place)
    return value


def _expect(ok: bool, value: Any, what: str, place: _Place) -> None:
    if not ok:
        raise UsageError(f"{place} must be {what}, found {_json_type(value)}; re-run the merge")


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
