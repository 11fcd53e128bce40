"""Bad input: one specific line on stderr, a non-zero exit code, no traceback, nothing written."""
from __future__ import annotations

import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig, TaskType

from bot import errors
from bot.cli import main
from factory import BASE_CONFIGS, build_adapter, build_base


@pytest.fixture()
def good(cache_dir):
    base = build_base(cache_dir, "llama")
    adapter = build_adapter(cache_dir, "errors-lora", base, "llama", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return base, adapter


def copy_adapter(adapter: Path, tmp_path: Path) -> Path:
    target = tmp_path / "adapter"
    shutil.copytree(adapter, target)
    return target


def run_failing(capsys, args, out: Path, code: int, *needles: str) -> str:
    assert main(args + ["--out", str(out), "--quiet"]) == code
    err = capsys.readouterr().err.strip().splitlines()
    message = [line for line in err if line.startswith("Error: ")]
    assert len(message) == 1, err
    assert "Traceback" not in "\n".join(err)
    for needle in needles:
        assert needle in message[0], message[0]
    assert not out.exists() or not any(out.iterdir())
    assert not list(out.parent.glob(f".{out.name}.partial-*"))
    return message[0]


def test_missing_adapter_folder(tmp_path, capsys):
    run_failing(capsys, ["merge", str(tmp_path / "nope")], tmp_path / "out", errors.SourceNotFoundError.exit_code,
                "does not exist")


def test_no_adapter_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    run_failing(capsys, ["merge", str(tmp_path / "empty")], tmp_path / "out", errors.AdapterConfigError.exit_code,
                "no adapter_config.json")


def test_invalid_json(good, tmp_path, capsys):
    adapter = copy_adapter(good[1], tmp_path)
    (adapter / "adapter_config.json").write_text("{not json")
    run_failing(capsys, ["merge", str(adapter)], tmp_path / "out", errors.AdapterConfigError.exit_code, "not valid JSON")


def test_unknown_peft_type(good, tmp_path, capsys):
    adapter = copy_adapter(good[1], tmp_path)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["peft_type"] = "SUPER_LORA"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    run_failing(capsys, ["merge", str(adapter)], tmp_path / "out", errors.UnsupportedAdapterError.exit_code,
                "SUPER_LORA")


def test_prompt_tuning_is_refused(cache_dir, tmp_path, capsys):
    base = build_base(cache_dir, "llama")
    adapter = build_adapter(cache_dir, "errors-prompt", base, "llama",
                            PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    run_failing(capsys, ["merge", str(adapter)], tmp_path / "out", errors.UnsupportedAdapterError.exit_code,
                "PROMPT_TUNING", "cannot be merged")


def test_base_not_found(good, tmp_path, capsys):
    adapter = copy_adapter(good[1], tmp_path)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone-base")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    run_failing(capsys, ["merge", str(adapter)], tmp_path / "out", errors.SourceNotFoundError.exit_code,
                "gone-base", "--base")


def test_no_base_named(good, tmp_path, capsys):
    adapter = copy_adapter(good[1], tmp_path)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    run_failing(capsys, ["merge", str(adapter)], tmp_path / "out", errors.UsageError.exit_code, "pass --base")


def test_adapter_does_not_fit_base(good, cache_dir, tmp_path, capsys):
    other = cache_dir / "base-wider"
    if not other.exists():
        config = BASE_CONFIGS["llama"]()
        config.hidden_size, config.intermediate_size = 48, 64
        torch.manual_seed(0)
        from transformers import LlamaForCausalLM

        LlamaForCausalLM(config).save_pretrained(other)
    message = run_failing(capsys, ["merge", str(good[1]), "--base", str(other)], tmp_path / "out",
                          errors.IncompatibleBaseError.exit_code, "model.layers.0.self_attn.q_proj")
    assert "[32, 48]" in message and "[32, 32]" in message


def test_adapter_weights_missing(good, tmp_path, capsys):
    adapter = copy_adapter(good[1], tmp_path)
    (adapter / "adapter_model.safetensors").unlink()
    run_failing(capsys, ["merge", str(adapter)], tmp_path / "out", errors.AdapterConfigError.exit_code,
                "adapter weights missing")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its content, to prove a refusal changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_output_folder_exists(good, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["merge", str(good[1]), "--out", str(out), "--quiet"]) == errors.OutputError.exit_code
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --overwrite replaces only a previous merge-bot output: this folder is not one.
    assert main(["merge", str(good[1]), "--out", str(out), "--quiet", "--overwrite"]) == errors.OutputError.exit_code
    err = capsys.readouterr().err
    assert "holds 1 file, e.g. keep.txt, not a merge-bot output" in err and len(err.strip().splitlines()) == 1
    assert (out / "keep.txt").read_text() == "precious"


def test_overwrite_replaces_a_previous_merge_only(good, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(good[1]), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    (out / "model.safetensors").write_bytes(b"stale")
    assert main(["merge", str(good[1]), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() != b"stale"
    assert json.loads((out / "merge_report.json").read_text())["fingerprint"] == report["fingerprint"]
    # A merge output with the user's own file in it is not replaced: the file would go with it.
    (out / "notes.md").write_text("mine")
    before = snapshot(out)
    assert main(["merge", str(good[1]), "--out", str(out), "--quiet", "--overwrite"]) == errors.OutputError.exit_code
    assert "notes.md" in capsys.readouterr().err
    assert snapshot(out) == before
    # A report without a fingerprint is not a merge-bot output.
    (out / "notes.md").unlink()
    (out / "merge_report.json").write_text("{}")
    assert main(["merge", str(good[1]), "--out", str(out), "--quiet", "--overwrite"]) == errors.OutputError.exit_code
    assert "not a merge-bot output" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["cwd", "adapter", "base", "parent-of-inputs", "inside-adapter", "link-to-base",
                                   "home"])
def test_overwrite_never_touches_inputs_cwd_or_home(good, tmp_path, capsys, monkeypatch, where):
    """As users hit it: `merge demo-adapter --base demo-base --out . --overwrite` in their project folder."""
    project = tmp_path / "project"
    project.mkdir()
    adapter, base = project / "demo-adapter", project / "demo-base"
    shutil.copytree(good[1], adapter)
    shutil.copytree(good[0], base)
    (project / "script.py").write_text("print('mine')\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(project if where != "parent-of-inputs" else tmp_path / "elsewhere")
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    if where == "link-to-base":
        (tmp_path / "link").symlink_to(base)
    out = {"cwd": ".", "adapter": "demo-adapter", "base": "demo-base", "parent-of-inputs": str(project),
           "inside-adapter": "demo-adapter/merged", "link-to-base": str(tmp_path / "link"),
           "home": str(Path("~").expanduser())}[where]  # home holds no input: only being home stops it
    before = snapshot(tmp_path)
    code = main(["merge", str(adapter), "--base", str(base), "--out", out, "--quiet", "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == errors.OutputError.exit_code, err
    assert len(err) == 1 and err[0].startswith("Error: --out") and "Traceback" not in err[0]
    expected = {"cwd": "the current folder", "home": "home folder", "parent-of-inputs": "contains an input folder",
                "inside-adapter": "lies inside an input folder"}.get(where, "is an input folder")
    assert expected in err[0], err[0]
    assert snapshot(tmp_path) == before  # every file survives, with its content
    assert not list(tmp_path.rglob(".*.partial-*"))


def test_out_inside_a_hub_snapshot_input_is_refused(good, tmp_path, capsys):
    """A base given as a huggingface_hub cache snapshot: its files live in ../../blobs, so the whole cached repo is an input."""
    repo = tmp_path / "hub" / "models--bob--base"
    snap = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in good[0].iterdir():
        (repo / "blobs" / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../..") / "blobs" / f.name)
    before = snapshot(tmp_path / "hub")
    for out in (repo, repo / "blobs" / "merged", snap):
        code = main(["merge", str(good[1]), "--base", str(snap), "--out", str(out), "--quiet", "--overwrite"])
        assert code == errors.OutputError.exit_code
        assert "input" in capsys.readouterr().err
    assert snapshot(tmp_path / "hub") == before


def test_not_enough_disk(good, tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("bot.merge.shutil.disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    run_failing(capsys, ["merge", str(good[1])], tmp_path / "out", errors.OutputError.exit_code,
                "not enough free disk space")


def test_unsupported_dtype(good, tmp_path, capsys):
    run_failing(capsys, ["merge", str(good[1]), "--dtype", "int4"], tmp_path / "out", errors.UsageError.exit_code,
                "unsupported dtype 'int4'")


def test_quantized_base_is_refused_with_a_suggestion(good, tmp_path, capsys):
    base = tmp_path / "tiny-llama-bnb-4bit"
    shutil.copytree(good[0], base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(cfg))
    run_failing(capsys, ["merge", str(good[1]), "--base", str(base)], tmp_path / "out",
                errors.IncompatibleBaseError.exit_code, "bitsandbytes-quantized", "likely tiny-llama")


def test_bad_repo_id(tmp_path, capsys):
    run_failing(capsys, ["merge", "not a repo!!"], tmp_path / "out", errors.UsageError.exit_code, "Hub repo id")


class _Evil:
    """Unpickling this runs code; a weights_only load must refuse it."""

    def __reduce__(self):
        return (print, ("pwned",))


def save_pickle_bomb(path: Path, key: str) -> None:
    torch.save({key: _Evil()}, path)


def test_pickled_bin_adapter_is_refused(good, tmp_path, capsys):
    adapter = copy_adapter(good[1], tmp_path)
    (adapter / "adapter_model.safetensors").unlink()
    save_pickle_bomb(adapter / "adapter_model.bin", "x")
    run_failing(capsys, ["merge", str(adapter)], tmp_path / "out", errors.AdapterConfigError.exit_code,
                "cannot be read safely")


def test_legacy_bin_adapter_merges(good, tmp_path):
    from safetensors.torch import load_file

    adapter = copy_adapter(good[1], tmp_path)
    tensors = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter / "adapter_model.bin")
    assert main(["merge", str(adapter), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    reference = tmp_path / "ref"
    assert main(["merge", str(good[1]), "--out", str(reference), "--quiet"]) == 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_token_is_redacted():
    token = "hf_" + "aB3" * 11 + "x"  # the shape of a user access token: hf_ + 34 letters/digits
    oauth = "hf_oauth_" + "Zy9" * 12
    message = errors.UsageError(f"bad token {token} or {oauth} given for repo hf_dataset_tools").args[0]
    assert token not in message and oauth not in message and "hf_***" in message
    assert "hf_dataset_tools" in message  # repo names that merely start with hf_ stay readable


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_unreachable_hub_is_one_line(tmp_path, env):
    """No Hub access (offline mode, or nothing listening): exit 13, one line, no traceback."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "bot", "merge", "someone/adapter", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env={**os.environ, **env, "PYTHONPATH": str(root)})
    assert proc.returncode == errors.HubUnavailableError.exit_code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: could not reach the Hub")
    assert all(line.startswith("warning: transient Hub error") for line in lines[:-1])  # retries, then the error
    if env.get("HF_HUB_OFFLINE") == "1":
        assert len(lines) == 1  # offline mode is a setting, not a passing failure: no retries
    assert not (tmp_path / "out").exists()


def test_interrupt_mid_shard_is_one_line_and_leaves_nothing(good, tmp_path, capsys, monkeypatch):
    import bot.merge

    real, calls = bot.merge.tensor_blocks, []

    def interrupted_in_third(*args, **kwargs):  # after the third tensor's first block is written
        calls.append(1)
        for k, block in enumerate(real(*args, **kwargs)):
            yield block
            if len(calls) == 3 and k == 0:
                raise KeyboardInterrupt

    monkeypatch.setattr(bot.merge, "tensor_blocks", interrupted_in_third)
    message = run_failing(capsys, ["merge", str(good[1])], tmp_path / "out", 130, "interrupted")
    assert "closed before" not in message


def test_output_folder_has_normal_permissions(good, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(good[1]), "--out", str(out), "--quiet"]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
