"""Hostile and malformed inputs: each must end in ONE specific ``Error:`` line and a non-zero exit,
never a traceback, never a half-written output, never a read outside the input folders.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bot import errors
from bot.cli import main
from hub_fixtures import ALICE, BOB, adapter_files, folder_files
from test_errors import copy_adapter, good, run_failing, save_pickle_bomb  # noqa: F401  (good is a fixture)


# ---- helpers -------------------------------------------------------------------------------------

def set_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))  # json.dumps writes NaN / Infinity literals as Python's json accepts them


def copy_base(base: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "base"
    shutil.copytree(base, target)
    return target


def raw_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_raw(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def edit_header(path: Path, edit) -> None:
    """Rewrite a safetensors header in place (offsets are relative to the data, so the body stays)."""
    header, body = raw_header(path)
    edit(header)
    write_raw(path, header, body)


def merge_args(adapter: Path, base: Path | None = None) -> list[str]:
    return ["merge", str(adapter)] + (["--base", str(base)] if base else [])


def out_is_clean(out: Path) -> bool:
    return (not out.exists() or not any(out.iterdir())) and not list(out.parent.glob(f".{out.name}.partial-*"))


# ---- adapter_config.json with wrong types or values -----------------------------------------------

@pytest.mark.parametrize("changes, needle", [
    ({"r": "eight"}, "r"),
    ({"lora_alpha": [16]}, "lora_alpha"),
    ({"lora_alpha": {"x": 1}}, "lora_alpha"),
    ({"rank_pattern": {"q_proj": "big"}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": [1, 2]}}, "alpha_pattern"),
    ({"r": float("nan")}, "r"),
    ({"r": float("inf")}, "r"),
    ({"layers_to_transform": "0"}, "layers_to_transform"),
    ({"layers_to_transform": 1.5}, "layers_to_transform"),
    ({"base_model_name_or_path": 12345}, "base_model_name_or_path"),
    ({"base_model_name_or_path": ["a/b"]}, "base_model_name_or_path"),
])
def test_wrong_typed_config_fields_are_one_line(good, tmp_path, capsys, changes, needle):
    adapter = copy_adapter(good[1], tmp_path)
    if "base_model_name_or_path" not in changes:
        changes = {**changes, "base_model_name_or_path": str(good[0])}
    set_config(adapter, **changes)
    run_failing(capsys, merge_args(adapter), tmp_path / "out", errors.AdapterConfigError.exit_code, needle)


@pytest.mark.parametrize("changes", [{"lora_alpha": float("nan")}, {"lora_alpha": float("inf")},
                                     {"lora_alpha": 1e308}, {"alpha_pattern": {"q_proj": float("nan")}}])
def test_non_finite_scaling_is_refused(good, tmp_path, capsys, changes):
    """alpha NaN/Infinity (legal for Python's json) gives a NaN/inf model instead of a refusal."""
    adapter = copy_adapter(good[1], tmp_path)
    set_config(adapter, **changes)
    out = tmp_path / "out"
    code = main(merge_args(adapter) + ["--out", str(out), "--quiet"])
    if code == 0:
        bad = [k for k, v in load_file(out / "model.safetensors").items() if not torch.isfinite(v.float()).all()]
        pytest.fail(f"merged with exit 0; non-finite tensors written: {bad[:3]}")
    assert code == errors.AdapterConfigError.exit_code
    assert out_is_clean(out)


def test_deeply_nested_adapter_config_is_one_line(good, tmp_path, capsys):
    adapter = copy_adapter(good[1], tmp_path)
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    run_failing(capsys, merge_args(adapter), tmp_path / "out", errors.AdapterConfigError.exit_code,
                "adapter_config.json")


@pytest.mark.parametrize("changes, code, needle", [
    ({"target_modules": 5}, errors.AdapterConfigError.exit_code, "target_modules must be a list"),
    ({"rank_pattern": [1, 2]}, errors.AdapterConfigError.exit_code, "rank_pattern must be an object"),
    ({"peft_type": 7}, errors.AdapterConfigError.exit_code, "no peft_type"),
    ({"r": 3}, errors.AdapterConfigError.exit_code, "rank 4 but the config says r=3"),
    ({"r": -4}, errors.AdapterConfigError.exit_code, "r must be a positive whole number"),
    ({"base_model_name_or_path": "../../no-such-base-folder"}, errors.SourceNotFoundError.exit_code, "does not exist"),
])
def test_malformed_config_fields_are_one_line(good, tmp_path, capsys, changes, code, needle):
    adapter = copy_adapter(good[1], tmp_path)
    set_config(adapter, **{"base_model_name_or_path": str(good[0]), **changes})
    run_failing(capsys, merge_args(adapter), tmp_path / "out", code, needle)


def test_a_backtracking_target_regex_does_not_hang_the_merge(good, tmp_path, capsys):
    """Python's re (and so PEFT) needs minutes for this pattern on a 31-character module name."""
    import time

    adapter = copy_adapter(good[1], tmp_path)
    set_config(adapter, base_model_name_or_path=str(good[0]), target_modules=r"([\w.]+)+!")
    start = time.monotonic()
    run_failing(capsys, merge_args(adapter), tmp_path / "out", errors.AdapterConfigError.exit_code,
                "would not be used", "target_modules")  # it matches nothing, so no saved tensor is used
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("field, value", [("target_modules", "(q_proj"), ("exclude_modules", "[a-"),
                                          ("rank_pattern", {"q_proj(": 8})])
def test_an_invalid_regex_in_the_config_is_one_line(good, tmp_path, capsys, field, value):
    adapter = copy_adapter(good[1], tmp_path)
    set_config(adapter, base_model_name_or_path=str(good[0]), **{field: value})
    run_failing(capsys, merge_args(adapter), tmp_path / "out", errors.AdapterConfigError.exit_code,
                "not a valid regular expression")


def test_a_pattern_that_runs_out_of_time_is_one_line(monkeypatch):
    from bot import peft_rules

    def slow(*args, **kwargs):
        raise TimeoutError("regex timed out")

    monkeypatch.setattr(peft_rules.regex, "fullmatch", slow)
    with pytest.raises(errors.AdapterConfigError, match="takes too long to match"):
        peft_rules.is_targeted({"target_modules": "(a+)+$"}, "model.layers.0.q_proj")


def test_duplicate_keys_take_the_last_value_like_peft(good, tmp_path, capsys):
    """json.loads keeps the last duplicate, as PEFT's own json.load does: same adapter either way."""
    adapter = copy_adapter(good[1], tmp_path)
    text = (adapter / "adapter_config.json").read_text()
    (adapter / "adapter_config.json").write_text(text.replace('"r": 4', '"r": 99, "r": 4', 1))
    assert '"r": 99' in (adapter / "adapter_config.json").read_text()
    assert main(merge_args(adapter) + ["--out", str(tmp_path / "out"), "--quiet"]) == 0


# ---- adapter weights ------------------------------------------------------------------------------

def edit_weights(adapter: Path, edit) -> None:
    path = adapter / "adapter_model.safetensors"
    weights = load_file(path)
    edit(weights)
    save_file(weights, path)


def _first(weights: dict, suffix: str) -> str:
    return next(k for k in weights if k.endswith(suffix))


def _nan_in_b(w: dict) -> None:
    w[_first(w, "lora_B.weight")][0, 0] = float("nan")


def _int_a_of_wrong_rank(w: dict) -> None:
    key = _first(w, "lora_A.weight")
    w[key] = torch.ones(5, w[key].shape[1], dtype=torch.int32)


@pytest.mark.parametrize("edit, code, needle", [
    # an extra saved key replaces a base parameter: it must have the base's shape (PEFT's load_state_dict)
    (lambda w: w.update({"base_model.model.model.layers.0.mlp.down_proj.weight": torch.ones(3, 3)}),
     errors.IncompatibleBaseError.exit_code, "model.layers.0.mlp.down_proj"),
    (lambda w: w.update({"base_model.model.model.norm.weight": torch.ones(32, dtype=torch.complex64)}),
     errors.AdapterConfigError.exit_code, "model.norm"),
    (_nan_in_b, errors.AdapterConfigError.exit_code, "NaN"),
    (_int_a_of_wrong_rank, errors.AdapterConfigError.exit_code, "inconsistent shapes"),
], ids=["wrong-shaped-replacement", "complex-dtype", "nan-in-lora-B", "int-A-of-wrong-rank"])
def test_bad_adapter_tensors_are_refused(good, tmp_path, capsys, edit, code, needle):
    adapter = copy_adapter(good[1], tmp_path)
    edit_weights(adapter, edit)
    run_failing(capsys, merge_args(adapter), tmp_path / "out", code, needle)


def _scale_b(w: dict) -> None:
    key = _first(w, "lora_B.weight")
    w[key] = w[key] * 1e6


@pytest.mark.parametrize("edit, extra, needle", [(_nan_in_b, [], "NaN"), (_scale_b, ["--dtype", "float16"], "NaN or infinite")],
                         ids=["nan-in-lora-B", "float16-overflow"])
def test_the_peft_fallback_refuses_non_finite_results_too(good, tmp_path, capsys, edit, extra, needle):
    adapter = copy_adapter(good[1], tmp_path)
    set_config(adapter, a_field_from_a_future_peft={"on": True})  # sends the merge through PEFT's own merge
    edit_weights(adapter, edit)
    run_failing(capsys, merge_args(adapter) + extra, tmp_path / "out", errors.AdapterConfigError.exit_code, needle)


def test_adapter_keys_the_base_has_no_place_for_are_refused(good, tmp_path, capsys):
    """PEFT skips them with a warning; merge-bot uses every saved tensor or refuses (nothing written)."""
    adapter = copy_adapter(good[1], tmp_path)
    edit_weights(adapter, lambda w: w.update({"base_model.model.../../etc/passwd": torch.ones(2)}))
    run_failing(capsys, merge_args(adapter), tmp_path / "out", errors.AdapterConfigError.exit_code,
                "1 adapter tensor(s) would not be used", "../../etc/passwd")


@pytest.mark.parametrize("content", [b"", b"\x00" * 4, struct.pack("<Q", 2**40) + b"{}",
                                     struct.pack("<Q", 8) + b"[1,2,3] "])
def test_corrupt_adapter_safetensors_is_one_line(good, tmp_path, capsys, content):
    adapter = copy_adapter(good[1], tmp_path)
    (adapter / "adapter_model.safetensors").write_bytes(content)
    run_failing(capsys, merge_args(adapter), tmp_path / "out", errors.AdapterConfigError.exit_code, "corrupt")


def test_empty_adapter_safetensors_changes_nothing(good, tmp_path, capsys):
    adapter = copy_adapter(good[1], tmp_path)
    (adapter / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    run_failing(capsys, merge_args(adapter), tmp_path / "out", errors.IncompatibleBaseError.exit_code,
                "changes nothing")


# ---- base safetensors headers that lie -------------------------------------------------------------

def _set_entry(name: str, **fields):
    def edit(header: dict) -> None:
        header[name].update(fields)
    return edit


@pytest.mark.parametrize("edit, needle", [
    (_set_entry("model.norm.weight", shape=[-1, -32]), "model.norm.weight"),
    (_set_entry("model.norm.weight", shape=[0, 2**70], data_offsets=[0, 0]), "model.norm.weight"),
    (_set_entry("model.norm.weight", data_offsets=[0, 1e400]), "model.norm.weight"),
    (lambda h: h.__setitem__("__metadata__", ["not", "a", "mapping"]), "model.safetensors"),
    (lambda h: h.__setitem__("__metadata__", "text"), "model.safetensors"),
])
def test_lying_base_header_is_refused(good, tmp_path, capsys, edit, needle):
    base = copy_base(good[0], tmp_path)
    edit_header(base / "model.safetensors", edit)
    out = tmp_path / "out"
    run_failing(capsys, merge_args(good[1], base), out, errors.IncompatibleBaseError.exit_code, needle)


@pytest.mark.parametrize("edit, needle", [
    (_set_entry("model.norm.weight", dtype="F64"), "lies outside the file"),
    (_set_entry("model.norm.weight", dtype="Q4"), "unsupported dtype Q4"),
    (_set_entry("model.norm.weight", shape=[33]), "lies outside the file"),
    (_set_entry("model.norm.weight", data_offsets=[2**62, 2**62 + 128]), "lies outside the file"),
    (_set_entry("model.norm.weight", data_offsets=[-128, 0]), "malformed header entry"),
    (_set_entry("model.norm.weight", data_offsets=[128, 0]), "lies outside the file"),
    (_set_entry("model.norm.weight", data_offsets="0-128"), "malformed header entry"),
    (lambda h: h.__setitem__("model.norm.weight", None), "malformed header entry"),
])
def test_lying_base_header_is_one_line(good, tmp_path, capsys, edit, needle):
    base = copy_base(good[0], tmp_path)
    edit_header(base / "model.safetensors", edit)
    run_failing(capsys, merge_args(good[1], base), tmp_path / "out", errors.IncompatibleBaseError.exit_code, needle)


@pytest.mark.parametrize("prefix", [struct.pack("<Q", 100 * 1024 * 1024 + 1), struct.pack("<Q", 2**64 - 1), b"\x01"])
def test_base_header_length_over_cap_or_truncated_is_one_line(good, tmp_path, capsys, prefix):
    base = copy_base(good[0], tmp_path)
    body = (base / "model.safetensors").read_bytes()[8:]
    (base / "model.safetensors").write_bytes(prefix + (body if len(prefix) == 8 else b""))
    run_failing(capsys, merge_args(good[1], base), tmp_path / "out", errors.IncompatibleBaseError.exit_code,
                "model.safetensors")


def test_overlapping_tensors_in_base_are_refused(good, tmp_path, capsys):
    """Two tensors on the same bytes: the safetensors library refuses such a file; merge-bot copies it on."""
    base = copy_base(good[0], tmp_path)

    def alias(header: dict) -> None:
        header["model.layers.1.input_layernorm.weight"]["data_offsets"] = \
            header["model.layers.0.input_layernorm.weight"]["data_offsets"]
    edit_header(base / "model.safetensors", alias)
    with pytest.raises(SafetensorError):  # the reference reader agrees the file is invalid
        load_file(base / "model.safetensors")
    run_failing(capsys, merge_args(good[1], base), tmp_path / "out", errors.IncompatibleBaseError.exit_code,
                "model.safetensors")


# ---- base index (model.safetensors.index.json) -----------------------------------------------------

def _sharded_base(good, tmp_path: Path, weight_map) -> Path:
    base = copy_base(good[0], tmp_path)
    (base / "model.safetensors").rename(base / "model-00001-of-00001.safetensors")
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return base


def test_index_naming_a_file_outside_the_base_is_refused(good, tmp_path, capsys):
    """weight_map: {"x": "/abs/elsewhere.safetensors"} (or "../..") makes merge-bot read files outside the base."""
    outside = tmp_path / "elsewhere" / "secret.safetensors"
    outside.parent.mkdir()
    import shutil

    shutil.copyfile(good[0] / "model.safetensors", outside)
    base = _sharded_base(good, tmp_path, {"model.norm.weight": str(outside)})
    (base / "model-00001-of-00001.safetensors").unlink()
    run_failing(capsys, merge_args(good[1], base), tmp_path / "out", errors.IncompatibleBaseError.exit_code,
                "model.safetensors.index.json")


@pytest.mark.parametrize("weight_map", [["model-00001-of-00001.safetensors"], {"a": 5}, {"a": ["x"]}, "x"])
def test_index_with_wrong_types_is_one_line(good, tmp_path, capsys, weight_map):
    base = _sharded_base(good, tmp_path, weight_map)
    run_failing(capsys, merge_args(good[1], base), tmp_path / "out", errors.IncompatibleBaseError.exit_code,
                "model.safetensors.index.json")


def test_index_naming_a_missing_file_is_one_line(good, tmp_path, capsys):
    base = _sharded_base(good, tmp_path, {"model.norm.weight": "model-00002-of-00002.safetensors"})
    run_failing(capsys, merge_args(good[1], base), tmp_path / "out", errors.IncompatibleBaseError.exit_code,
                "model-00002-of-00002.safetensors", "missing")


def test_pickled_bin_base_is_refused(good, tmp_path, capsys):
    base = copy_base(good[0], tmp_path)
    (base / "model.safetensors").unlink()
    save_pickle_bomb(base / "pytorch_model.bin", "model.norm.weight")
    run_failing(capsys, merge_args(good[1], base), tmp_path / "out", errors.IncompatibleBaseError.exit_code,
                "cannot be read safely")


# ---- symlinks in local folders ---------------------------------------------------------------------

def test_symlink_out_of_a_local_adapter_is_refused(good, tmp_path, capsys):
    """A cloned adapter repo can carry a symlink; what it points at (here: a token) must never be copied into
    the folder that is then published."""
    secret = tmp_path / "home" / ".cache" / "huggingface" / "token"
    secret.parent.mkdir(parents=True)
    secret.write_text("hf_" + "S3cret" * 6)
    adapter = copy_adapter(good[1], tmp_path)
    (adapter / "tokenizer_config.json").symlink_to(secret)
    message = run_failing(capsys, merge_args(adapter), tmp_path / "out", errors.UsageError.exit_code,
                          "tokenizer_config.json", "links outside the folder")
    assert "S3cret" not in message


def test_a_folder_merely_named_like_a_snapshot_gets_no_exemption(good, tmp_path, capsys):
    secret = tmp_path / "home" / ".cache" / "huggingface" / "token"
    secret.parent.mkdir(parents=True)
    secret.write_text("hf_" + "S3cret" * 6)
    import shutil

    adapter = tmp_path / "home" / "snapshots" / "my-adapter"
    shutil.copytree(good[1], adapter)
    (adapter / "tokenizer_config.json").symlink_to(Path("../../.cache/huggingface/token"))
    run_failing(capsys, merge_args(adapter), tmp_path / "out", errors.UsageError.exit_code, "links outside the folder")


def test_a_symlink_loop_in_a_local_folder_is_one_line(good, tmp_path, capsys):
    adapter = copy_adapter(good[1], tmp_path)
    (adapter / "loop").symlink_to(adapter / "loop")
    run_failing(capsys, merge_args(adapter), tmp_path / "out", errors.UsageError.exit_code, "loop", "broken link")


def test_a_snapshot_folder_linking_into_its_own_cache_is_accepted(good, tmp_path, capsys):
    """huggingface_hub's cache layout: snapshots/<sha>/file -> ../../blobs/<hash>, a valid local --base."""
    import shutil

    repo = tmp_path / "models--org--base"
    snapshot, blobs = repo / "snapshots" / ("a" * 40), repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in good[0].iterdir():
        shutil.copyfile(f, blobs / f.name)
        (snapshot / f.name).symlink_to(Path("../../blobs") / f.name)
    assert main(merge_args(good[1], snapshot) + ["--out", str(tmp_path / "out"), "--quiet"]) == 0


# ---- command-line and request inputs ---------------------------------------------------------------

@pytest.mark.parametrize("adapter, code, needle", [
    ("owner/name@../../etc", errors.UsageError.exit_code, "Hub repo id"),
    ("owner/na..me", errors.UsageError.exit_code, "Hub repo id"),
    ("ownér/name", errors.UsageError.exit_code, "Hub repo id"),
    ("owner/name@" + "a" * 300, errors.UsageError.exit_code, "Hub repo id"),
    ("../../../../definitely-not-here", errors.SourceNotFoundError.exit_code, "does not exist"),
    ("owner/name@ma\u202ein", errors.UsageError.exit_code, "Hub repo id"),
])
def test_hostile_adapter_arguments_are_one_line(tmp_path, capsys, adapter, code, needle):
    run_failing(capsys, ["merge", adapter], tmp_path / "out", code, needle)


def test_overlong_adapter_argument_is_a_short_usage_error(tmp_path, capsys):
    """A 1000-char name: os.stat raises ENAMETOOLONG, caught as a disk problem (exit 8) and echoed in full."""
    message = run_failing(capsys, ["merge", "a" * 1000], tmp_path / "out", errors.UsageError.exit_code, "adapter")
    assert len(message) < 400


def test_nul_byte_in_batch_adapter_is_one_line(tmp_path, capsys):
    batch = tmp_path / "jobs.yaml"
    batch.write_text('jobs:\n  - adapter: "owner/ada\\0pter"\n    repo: owner/out\n')
    assert main(["batch", str(batch), "--token", "x"]) == errors.UsageError.exit_code
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("Error: ")


@pytest.mark.parametrize("line", ["/merge ../../etc/passwd", "/merge owner/a@../../x", "/merge /etc",
                                  "/merge owner/a --base ./local", "/merge owner/a --pr owner/b@main",
                                  "/merge " + "x" * 500, "/merge owner/a --dtype 'bf16; rm -rf /'",
                                  "/merge 'unterminated"])
def test_bot_command_rejects_hostile_lines(line):
    from bot.service.commands import CommandError, parse_command

    with pytest.raises(CommandError):
        parse_command(line)


# ---- Hub repos that lie ----------------------------------------------------------------------------

def _run(capsys, *argv: str, token: str = ALICE) -> tuple[int, str]:
    code = main([*argv, "--token", token])
    out, err = capsys.readouterr()
    assert ALICE not in out + err and BOB not in out + err
    return code, err


def test_hub_base_index_cannot_point_at_a_local_file(hub, models, capsys, tmp_path):
    """A Hub base whose index names an absolute path makes merge-bot read (and publish) a file on this machine."""
    outside = tmp_path / "someone-elses" / "private.safetensors"
    outside.parent.mkdir()
    outside.write_bytes((models["base"] / "model.safetensors").read_bytes())
    files = folder_files(models["base"])
    files.pop("model.safetensors")
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {}, "weight_map": {"model.norm.weight": str(outside)}}).encode()
    hub.create_repo("bob/index-points-outside", owner_token=BOB, files=files)
    hub.create_repo("alice/lora-on-outside", owner_token=ALICE,
                    files=adapter_files(models["adapter"], "bob/index-points-outside"))
    code, err = _run(capsys, "merge", "alice/lora-on-outside", "--out", str(tmp_path / "out"), "--quiet")
    assert code == errors.IncompatibleBaseError.exit_code, f"exit {code}: merged from {outside}"
    assert "Traceback" not in err and out_is_clean(tmp_path / "out")


@pytest.mark.parametrize("weight_map", [["model.safetensors"], {"a": 5}])
def test_hub_base_index_with_wrong_types_is_one_line(hub, models, capsys, tmp_path, weight_map):
    files = folder_files(models["base"])
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    name = f"bob/bad-index-{type(weight_map).__name__}"
    hub.create_repo(name, owner_token=BOB, files=files)
    code, err = _run(capsys, "merge", models["adapter"].as_posix(), "--base", name,
                     "--out", str(tmp_path / "out"), "--quiet")
    assert code == errors.IncompatibleBaseError.exit_code and "Traceback" not in err


def test_hub_base_index_with_a_glob_is_refused_before_download(hub, models, capsys, tmp_path):
    """weight_map values become allow_patterns: "*" pulls every file of the repo (sizes not counted by pre-flight)."""
    files = folder_files(models["base"])
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": {"x": "*"}}).encode()
    files["huge-unrelated.bin"] = b"\0" * 1024
    hub.create_repo("bob/glob-index", owner_token=BOB, files=files)
    before = len(hub.requests_log)
    code, err = _run(capsys, "merge", models["adapter"].as_posix(), "--base", "bob/glob-index",
                     "--out", str(tmp_path / "out"), "--quiet")
    fetched = [r[1] for r in hub.requests_log[before:] if "huge-unrelated.bin" in r[1]]
    assert not fetched, f"downloaded a file the merge does not need: {fetched}"
    assert code == errors.IncompatibleBaseError.exit_code and "Traceback" not in err


@pytest.mark.parametrize("revision", [123, ["main"]])
def test_non_string_base_revision_in_hub_adapter_config_is_one_line(hub, models, capsys, tmp_path, revision):
    files = adapter_files(models["adapter"], "bob/tiny-llama")
    cfg = json.loads(files["adapter_config.json"])
    cfg["revision"] = revision
    files["adapter_config.json"] = json.dumps(cfg).encode()
    name = f"alice/bad-revision-{type(revision).__name__}"
    hub.create_repo(name, owner_token=ALICE, files=files)
    code, err = _run(capsys, "merge", name, "--out", str(tmp_path / "out"), "--quiet")
    assert code in (errors.UsageError.exit_code, errors.AdapterConfigError.exit_code), err
    assert "Traceback" not in err and "revision" in err


def test_hub_base_revision_with_dotdot_is_not_found(hub, models, capsys, tmp_path):
    files = adapter_files(models["adapter"], "bob/tiny-llama")
    cfg = json.loads(files["adapter_config.json"])
    cfg["revision"] = "../../../../tmp"
    files["adapter_config.json"] = json.dumps(cfg).encode()
    hub.create_repo("alice/dotdot-revision", owner_token=ALICE, files=files)
    code, err = _run(capsys, "merge", "alice/dotdot-revision", "--out", str(tmp_path / "out"), "--quiet")
    assert code != 0 and "Traceback" not in err and err.strip().startswith("Error: "), err
