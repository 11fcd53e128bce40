"""The merge report: one frozen type, one JSON mapping, and the same merge_report.json as always.

Published repos and ``push`` read merge_report.json back, so its keys are a contract: the key
paths below are written out (they must not change), while the values are computed from the
merge's inputs. A report must survive its own mapping losslessly, and a file whose key was
renamed or dropped is refused with one line naming the key.
"""
from __future__ import annotations

import copy
import json
import platform
from dataclasses import FrozenInstanceError
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from bot import __version__
from bot.cli import main
from bot.errors import UsageError
from bot.merge import execute_plan, holds_merge_output
from bot.plan import resolve_plan
from bot.provenance import fingerprint, output_options, pin_local
from bot.report import REPORT_NAME, MergeReport, ReportStamp, read_report
from bot.spec import MergeSpec, parse_source_ref
from factory import build_adapter, build_base

# Every key path merge_report.json has held since reports were published (verified causal LM merge).
# A rename or a dropped key breaks repos already on the Hub: change this list only with a migration.
PUBLISHED_KEYS = {
    "merge_bot_version", "fingerprint", "base_note", "requested_by", "architecture", "peft_type", "task_type",
    "method", "output_dtype", "tensors_written", "tensors_merged", "warnings", "timing_seconds", "peak_rss_bytes",
    "adapter", "adapter.ref", "adapter.repo_id", "adapter.revision",
    "base", "base.ref", "base.repo_id", "base.revision",
    "options", "options.dtype", "options.max_shard_bytes", "options.device",
    "scaling", "scaling.2.0", "module_counts", "module_counts.LORA",
    "versions", "versions.python", "versions.torch", "versions.transformers", "versions.peft",
    "versions.safetensors", "versions.huggingface_hub",
    "verification", "verification.passed", "verification.proof", "verification.end_to_end",
    *(f"verification.proof.{k}" for k in (
        "method", "peft_version", "modules_proved", "saved_copies", "unchanged_tensors", "probes_per_module",
        "max_error_ulp", "threshold_ulp", "max_share_beyond_half_ulp", "threshold_share",
        "max_dense_relative_delta", "worst_module", "passed")),
    *(f"verification.end_to_end.{k}" for k in (
        "max_abs_logit_delta", "max_abs_logit", "relative", "input_tokens", "reference", "generation", "latency")),
    *(f"verification.end_to_end.generation.{k}" for k in ("prompt", "new_tokens", "identical")),
    *(f"verification.end_to_end.latency.{k}" for k in (
        "merged_ms", "adapter_ms", "speedup", "batch", "sequence_length", "warmup", "runs", "dtype", "hardware")),
}


def key_paths(value, prefix: str = "") -> set[str]:
    if not isinstance(value, dict):
        return set()
    paths = set()
    for key, item in value.items():
        path = f"{prefix}{key}"
        paths |= {path} | key_paths(item, path + ".")
    return paths


def _base_and_adapter(cache_dir):
    """The tiny seeded Llama and the LoRA (q_proj, v_proj) whose merges this module reads the reports of."""
    base = build_base(cache_dir, "llama")
    return base, build_adapter(cache_dir, "report-lora", base, "llama",
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


@pytest.fixture(scope="module")
def merged(cache_dir, tmp_path_factory):
    """A tiny seeded LoRA merge, verified: (plan, result, folder)."""
    base, adapter = _base_and_adapter(cache_dir)
    out = tmp_path_factory.mktemp("report") / "merged"
    plan = resolve_plan(MergeSpec(adapter=parse_source_ref(str(adapter)), base=parse_source_ref(str(base)), out=out))
    return plan, execute_plan(plan, verify=True), out


def test_the_written_report_keeps_its_published_keys_and_values(merged):
    plan, result, out = merged
    written = json.loads((out / REPORT_NAME).read_text())
    assert key_paths(written) == PUBLISHED_KEYS
    adapter, base = pin_local(plan.adapter.path), pin_local(plan.base.path)
    assert written["fingerprint"] == fingerprint(adapter, base, output_options("auto", None))
    assert written["adapter"] == {"ref": "a local folder", "repo_id": None, "revision": adapter.revision}
    assert written["base"] == {"ref": "a local folder", "repo_id": None, "revision": base.revision}
    assert written["options"] == {"dtype": "auto", "max_shard_bytes": "auto", "device": "auto"}
    assert written["scaling"] == {str(8 / 4): 4} and written["module_counts"] == plan.module_counts == {"LORA": 4}
    assert written["tensors_written"] == len(plan.jobs) and written["tensors_merged"] == 4
    assert (written["merge_bot_version"], written["method"], written["peft_type"]) == (__version__, "streaming", "LORA")
    assert (written["architecture"], written["output_dtype"], written["task_type"]) == \
        ("LlamaForCausalLM", "float32", plan.adapter_config.task_type)
    assert written["versions"] == {"python": platform.python_version(), "torch": torch.__version__,
                                   **{name: version(name) for name in ("transformers", "peft", "safetensors",
                                                                       "huggingface_hub")}}
    proof = written["verification"]["proof"]
    assert proof["passed"] and proof["modules_proved"] == 4 and proof["peft_version"] == version("peft")
    assert written["verification"]["end_to_end"]["generation"]["identical"] is True
    # The file is the type's own text: sorted keys, two-space indent, one trailing newline.
    assert (out / REPORT_NAME).read_text() == json.dumps(written, indent=2, sort_keys=True) + "\n"


def test_a_real_report_round_trips_losslessly(merged):
    _, result, out = merged
    text = (out / REPORT_NAME).read_text()
    report = read_report(out)
    assert report == result.report  # what the merge held in memory is what push reads back
    assert report.dumps() == text
    assert MergeReport.from_json(report.to_json()) == report
    assert report.verification is not None and report.verification.end_to_end is not None
    assert report.verification.end_to_end.max_abs_logit_delta < 1e-4
    with pytest.raises(FrozenInstanceError):
        report.fingerprint = "x"  # type: ignore[misc]


def test_an_unverified_report_round_trips_with_null_verification(good_unverified):
    report = read_report(good_unverified)
    assert report.verification is None and json.loads((good_unverified / REPORT_NAME).read_text())["verification"] is None
    assert report.dumps() == (good_unverified / REPORT_NAME).read_text()


@pytest.fixture(scope="module")
def good_unverified(cache_dir, tmp_path_factory):
    base, adapter = _base_and_adapter(cache_dir)
    out = tmp_path_factory.mktemp("report-plain") / "merged"
    assert main(["merge", str(adapter), "--base", str(base), "--out", str(out), "--no-verify", "--quiet"]) == 0
    return out


def edited(data: dict, path: str, how: str) -> dict:
    data = copy.deepcopy(data)
    *parents, key = path.split(".")
    where = data
    for name in parents:
        where = where[name]
    if how == "rename":
        where[key + "_renamed"] = where.pop(key)
    elif how == "drop":
        del where[key]
    else:
        where[key] = "not a number"
    return data


@pytest.mark.parametrize(("path", "how", "named"), [
    ("tensors_written", "rename", "tensors_written_renamed"),
    ("verification.end_to_end.max_abs_logit_delta", "rename", "verification.end_to_end.max_abs_logit_delta_renamed"),
    ("fingerprint", "drop", "fingerprint"),
    ("adapter.revision", "drop", "adapter.revision"),
    ("verification.proof.modules_proved", "drop", "verification.proof.modules_proved"),
    ("verification.end_to_end.latency.runs", "retype", "verification.end_to_end.latency"),
    ("timing_seconds", "retype", "timing_seconds"),
])
def test_a_renamed_missing_or_mistyped_key_is_refused_by_name(merged, path, how, named):
    _, _, out = merged
    data = edited(json.loads((out / REPORT_NAME).read_text()), path, how)
    with pytest.raises(UsageError) as caught:
        MergeReport.from_json(data)
    message = str(caught.value)
    assert message.startswith(f"{REPORT_NAME}: {named}") and "\n" not in message, message


def test_push_refuses_a_folder_whose_report_was_edited(good_unverified, tmp_path, capsys):
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(good_unverified, folder)
    data = json.loads((folder / REPORT_NAME).read_text())
    (folder / REPORT_NAME).write_text(json.dumps(edited(data, "module_counts", "rename")))
    assert main(["push", str(folder), "--repo", "alice/never-published", "--token", "unused"]) == UsageError.exit_code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "module_counts" in err and "Traceback" not in err, err


@pytest.mark.parametrize(("data", "stamp"), [
    ({}, ReportStamp()),
    ([], ReportStamp()),
    ({"fingerprint": 7, "adapter": "x"}, ReportStamp()),  # someone else's file: nothing to match
    ({"fingerprint": "ab", "verification": {"passed": True}, "adapter": {"repo_id": "a/b"}},
     ReportStamp(fingerprint="ab", verified=True, adapter_repo_id="a/b")),
    ({"fingerprint": "ab", "verification": None}, ReportStamp(fingerprint="ab")),
])
def test_a_target_report_is_read_for_its_stamp_only(data, stamp):
    """A report already on a target may come from any merge-bot version: publishing needs only its stamp."""
    assert ReportStamp.from_json(data) == stamp


def test_an_older_report_still_marks_a_merge_output(tmp_path):
    (tmp_path / REPORT_NAME).write_text(json.dumps({"fingerprint": "0123", "from": "an older merge-bot"}))
    assert holds_merge_output(tmp_path)
    (tmp_path / REPORT_NAME).write_text("{}")
    assert not holds_merge_output(tmp_path)


def test_the_report_file_name_is_defined_once():
    import bot.hub
    import bot.merge

    assert bot.hub.REPORT_NAME is bot.merge.REPORT_NAME is REPORT_NAME
    root = Path(__file__).resolve().parents[1] / "bot"
    defined = [p for p in root.rglob("*.py") if 'REPORT_NAME = "' in p.read_text()]
    assert [p.name for p in defined] == ["report.py"]
