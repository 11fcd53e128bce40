"""The real entry point, in a child process, and the output loaded with PEFT made unimportable."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from peft import LoraConfig

from factory import build_adapter, build_base

ROOT = Path(__file__).resolve().parents[1]


def test_python_m_bot_merge_and_load_without_peft(cache_dir, tmp_path):
    base = build_base(cache_dir, "llama", shard="20KB")  # several shards + index in the base
    adapter = build_adapter(cache_dir, "cli-process", base, "llama",
                            LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"]))
    out = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "bot", "merge", str(adapter), "--out", str(out),
                           "--max-shard-size", "30KB", "--verify"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "modules: 5 LORA" in proc.stdout and "verification passed:" in proc.stdout
    assert "end to end max |delta logits|" in proc.stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert shards[0].startswith("model-00001-of-")
    report = json.loads((out / "merge_report.json").read_text())
    assert report["verification"]["end_to_end"]["max_abs_logit_delta"] < 1e-5
    # Named, never by path: "a local folder" at its content digest.
    assert report["adapter"]["ref"] == "a local folder" and report["adapter"]["revision"].startswith("local-")
    published = (out / "merge_report.json").read_text() + (out / "README.md").read_text()
    assert not [p for p in (str(adapter), str(base), str(tmp_path), str(Path.home())) if p in published]

    check = (
        "import sys; sys.modules['peft'] = None\n"
        "import torch; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        "assert type(m).__name__ == 'LlamaForCausalLM'\n"
        "assert not any('lora' in k for k in m.state_dict())\n"
        "print('loaded', m.config.tie_word_embeddings)\n"
    )
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    assert "loaded False" in loaded.stdout


def test_peft_fallback_tells_one_story(cache_dir, tmp_path):
    """A merge through PEFT's own code: each fact once in merge-bot's words, no library noise, true counts."""
    from safetensors import safe_open

    base = build_base(cache_dir, "llama")
    adapter = build_adapter(cache_dir, "cli-future-field", base, "llama", LoraConfig(r=4, target_modules=["q_proj"]),
                            edit_config=lambda c: c.update(a_field_from_a_future_peft={"on": True}))
    out = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRANSFORMERS_VERBOSITY", None)  # as a user's shell has it
    proc = subprocess.run([sys.executable, "-m", "bot", "merge", str(adapter), "--out", str(out), "--verify"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "warning: adapter_config.json field(s) a_field_from_a_future_peft are unknown to the installed PEFT "
        f"{__import__('peft').__version__} for LORA, which ignores them; upgrade peft if the adapter was saved by "
        "a newer one",
        "warning: LORA with a_field_from_a_future_peft is merged by PEFT itself; using PEFT's in-memory merge "
        "(memory = whole model)",
    ], proc.stderr
    written = 0
    for path in out.glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            written += len(list(f.keys()))
    assert written > 0 and f"tensors written: {written};" in proc.stdout, proc.stdout
