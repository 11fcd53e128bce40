"""A tuner plugs in by adding one file (tests/scale_tuner.py) and registering it: no other module changes."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import bot.merge
from bot import errors
from bot.cli import main
from bot.plan import resolve_plan
from bot.spec import MergeSpec, parse_source_ref
from bot.tuners import is_streamed, register, unregister
from factory import build_base
from scale_tuner import TUNER

TARGETS = ("q_proj", "v_proj")


@pytest.fixture
def scale_tuner():
    register(TUNER)
    yield TUNER
    unregister(TUNER.peft_type)


def scale_adapter(folder, base, factors: dict[str, torch.Tensor]):
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "SCALE", "target_modules": list(TARGETS), "base_model_name_or_path": str(base)}))
    save_file({f"base_model.model.{m}.scale_s": s for m, s in factors.items()}, folder / "adapter_model.safetensors")
    return folder


@pytest.fixture
def scaled(cache_dir, tmp_path):
    base = build_base(cache_dir, "llama")  # float32, hidden 32, 2 layers
    base_weights = load_file(base / "model.safetensors")
    factors = {f"model.layers.{i}.self_attn.{p}": torch.linspace(-2.0, 3.0, base_weights[
        f"model.layers.{i}.self_attn.{p}.weight"].shape[0]) for i in range(2) for p in TARGETS}
    return base, base_weights, factors, scale_adapter(tmp_path / "adapter", base, factors)


def test_a_tuner_in_one_file_merges_through_the_cli(scale_tuner, scaled, tmp_path):
    base, base_weights, factors, adapter = scaled
    out = tmp_path / "merged"
    # --no-verify: the proof is PEFT's own layers, and PEFT has no SCALE tuner to compare with
    assert main(["merge", str(adapter), "--out", str(out), "--quiet", "--no-verify"]) == 0

    merged = load_file(out / "model.safetensors")
    assert set(merged) == set(base_weights)
    for name, w in base_weights.items():
        module = name.removesuffix(".weight")
        if module in factors:
            # hand-computed: row i times s[i], in float64 (a float32 output) and rounded once
            expected = (w.double() * factors[module].double()[:, None]).float()
            assert torch.equal(merged[name], expected), name
            assert torch.equal(merged[name][0], (w[0].double() * -2.0).float())  # s[0] = -2: exact
        else:
            assert torch.equal(merged[name], w), name  # untouched tensors are copied bit for bit
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"] == "streaming" and report["module_counts"]["SCALE"] == 4


def test_the_registered_tuner_is_planned_and_streams_by_rows(scale_tuner, scaled, tmp_path):
    base, _, factors, adapter = scaled
    plan = resolve_plan(MergeSpec(adapter=parse_source_ref(str(adapter)), out=tmp_path / "never-written"))
    assert plan.fallback_reason is None and plan.module_counts == {"SCALE": 4}
    touched = {j.name: j for j in plan.jobs if j.ops}
    assert sorted(touched) == sorted(f"{m}.weight" for m in factors)
    adapter_tensors = load_file(adapter / "adapter_model.safetensors")
    for job in touched.values():
        ((op, is_bias),) = job.ops
        assert (op.tuner, op.kind, is_bias, op.tensors) == \
            ("SCALE", "SCALE", False, {"s": f"base_model.model.{job.name.removesuffix('.weight')}.scale_s"})
        assert bot.merge.rows_are_independent(job, adapter_tensors)  # its row_slice lets it stream
    assert not (tmp_path / "never-written").exists()


def test_a_tuner_mismatch_uses_the_shared_shape_error(scale_tuner, cache_dir, tmp_path):
    base = build_base(cache_dir, "llama")
    factors = {f"model.layers.{i}.self_attn.{p}": torch.ones(5) for i in range(2) for p in TARGETS}
    adapter = scale_adapter(tmp_path / "adapter", base, factors)
    assert main(["merge", str(adapter), "--out", str(tmp_path / "out"), "--quiet"]) == \
        errors.IncompatibleBaseError.exit_code


def test_without_registration_the_peft_type_is_unknown(scaled, tmp_path):
    _, _, _, adapter = scaled
    assert not is_streamed("SCALE")
    code = main(["merge", str(adapter), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == errors.UnsupportedAdapterError.exit_code
