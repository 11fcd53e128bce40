"""Benchmark: `python -m bot merge` against the plain PEFT recipe, same machine, same session.

    python bench/bench_merge.py --sizes 1.1b,2.8b --runs 3 --work /tmp/merge-bench

For each size it writes a Llama-shaped bf16 base with seeded random weights (sharded
safetensors, ~1 GB per shard) and an r=16 LoRA on every linear layer, then alternates
runs of merge-bot and of PEFT's recipe (from_pretrained -> PeftModel.from_pretrained ->
merge_and_unload -> save_pretrained), each in its own process. It reports the median
wall time and peak RSS (from wait4) of each, their ratios, and whether the two outputs
are bit-identical tensor by tensor.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    # TinyLlama-1.1B's shape
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000),
    # ~2.8B parameters, same family
    "2.8b": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=32000),
    # a few seconds, for trying the script
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=32000),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PEFT_RECIPE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter)
model = model.merge_and_unload()
model.save_pretrained(out)
"""


def make_base(folder: Path, shape: dict, shard_bytes: int = 1_000_000_000) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (folder / "config.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**shape, tie_word_embeddings=False, architectures=["LlamaForCausalLM"], dtype="bfloat16")
    h, i, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_key_value_heads"]
    head = h // shape["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (shape["vocab_size"], h)}
    for n in range(shape["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv * head, h),
            p + "self_attn.v_proj.weight": (kv * head, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (shape["vocab_size"], h)
    gen = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for name, s in shapes.items():
        t = (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16)
        if current and size + t.numel() * 2 > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.numel() * 2
    shards.append(current)
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / fname, metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)


def make_adapter(folder: Path, base: Path, shape: dict, r: int = 16) -> None:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    if (folder / "adapter_config.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, task_type="CAUSAL_LM",
               base_model_name_or_path=str(base)).save_pretrained(folder)
    h, i, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_key_value_heads"]
    kvd = kv * (h // shape["num_attention_heads"])
    dims = {"q_proj": (h, h), "k_proj": (h, kvd), "v_proj": (h, kvd), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for n in range(shape["num_hidden_layers"]):
        for mod, (fan_in, fan_out) in dims.items():
            part = "self_attn" if mod.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{n}.{part}.{mod}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=gen) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=gen) * 0.01
    save_file(tensors, folder / "adapter_model.safetensors")


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode()
    if status != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{err[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def bit_identical(ours: Path, theirs: Path) -> tuple[bool, int]:
    from safetensors import safe_open
    import torch

    def tensors(folder: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    a, b = tensors(ours), tensors(theirs)
    if set(a) != set(b):
        return False, 0
    for name in a:
        with safe_open(a[name], "pt") as fa, safe_open(b[name], "pt") as fb:
            if not torch.equal(fa.get_tensor(name), fb.get_tensor(name)):
                return False, len(a)
    return True, len(a)


def child(*args: str) -> str:
    """Run this script's helper modes in a child, so the timing parent never grows (ru_maxrss is
    inherited across fork, which would inflate every later child's peak RSS)."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return proc.stdout


def run_size(label: str, work: Path, runs: int) -> dict:
    base, adapter = work / f"base-{label}", work / f"adapter-{label}"
    child("--make", label, "--work", str(work))
    ours_out, peft_out = work / f"out-ours-{label}", work / f"out-peft-{label}"
    script = work / "peft_recipe.py"
    script.write_text(PEFT_RECIPE)
    results = {"ours": [], "peft": []}
    for k in range(runs):
        order = ["ours", "peft"] if k % 2 == 0 else ["peft", "ours"]
        for who in order:
            out = ours_out if who == "ours" else peft_out
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # start each run with no dirty pages left by the previous one
            # --no-verify: the merge against PEFT's recipe, which verifies nothing (verification is timed by
            # bench_pipeline.py); both outputs are compared bit for bit below
            cmd = ([sys.executable, "-m", "bot", "merge", str(adapter), "--out", str(out), "--quiet", "--no-verify"]
                   if who == "ours"
                   else [sys.executable, str(script), str(base), str(adapter), str(out)])
            results[who].append(timed(cmd))
            print(f"  {label} run {k + 1} {who}: {results[who][-1][0]:.2f}s, {results[who][-1][1] / 2**20:.0f} MiB",
                  flush=True)
    same, n = json.loads(child("--compare", str(ours_out), str(peft_out)))
    summary = {
        "size": label,
        "base_bytes": sum(p.stat().st_size for p in base.glob("*.safetensors")),
        "runs": runs,
        "ours_median_s": statistics.median(w for w, _ in results["ours"]),
        "peft_median_s": statistics.median(w for w, _ in results["peft"]),
        "ours_peak_rss_mib": statistics.median(m for _, m in results["ours"]) / 2**20,
        "peft_peak_rss_mib": statistics.median(m for _, m in results["peft"]) / 2**20,
        "bit_identical": same,
        "tensors_compared": n,
        "ours_runs": [{"seconds": round(w, 3), "peak_rss_mib": round(m / 2**20, 1)} for w, m in results["ours"]],
        "peft_runs": [{"seconds": round(w, 3), "peak_rss_mib": round(m / 2**20, 1)} for w, m in results["peft"]],
    }
    summary["speedup"] = summary["peft_median_s"] / summary["ours_median_s"]
    summary["rss_ratio"] = summary["ours_peak_rss_mib"] / summary["peft_peak_rss_mib"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1.1b,2.8b")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/merge-bench"))
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--make", help=argparse.SUPPRESS)
    parser.add_argument("--compare", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        shape = SIZES[args.make]
        base, adapter = args.work / f"base-{args.make}", args.work / f"adapter-{args.make}"
        make_base(base, shape)
        make_adapter(adapter, base, shape)
        return
    if args.compare:
        print(json.dumps(bit_identical(*args.compare)))
        return
    summaries = []
    for label in args.sizes.split(","):
        print(f"size {label}:", flush=True)
        summaries.append(run_size(label.strip(), args.work, args.runs))
    print("\n| size | merge-bot median | PEFT median | speed-up | merge-bot peak RSS | PEFT peak RSS | RSS ratio "
          "| bit-identical |")
    print("|---|---|---|---|---|---|---|---|")
    for s in summaries:
        print(f"| {s['size']} ({s['base_bytes'] / 1e9:.1f} GB bf16) | {s['ours_median_s']:.2f} s | {s['peft_median_s']:.2f} s | "
              f"{s['speedup']:.1f}x | {s['ours_peak_rss_mib']:.0f} MiB | {s['peft_peak_rss_mib']:.0f} MiB | "
              f"{s['rss_ratio']:.2f} | {'yes' if s['bit_identical'] else 'NO'} ({s['tensors_compared']} tensors) |")
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=2))


if __name__ == "__main__":
    main()
