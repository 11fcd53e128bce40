"""Hub-to-Hub pipeline benchmark: `python -m bot run` against the in-repo Hub-compatible server on a paced link.

For each size it builds a random bf16 Llama-shaped base (in ~250 MB shards) and an r=16 LoRA on
every linear layer, seeds them into a standalone test server (``python -m tests.hub_server``)
whose link is paced to ``--bandwidth`` bytes/s each way (shared by all connections), and
measures, in one run and on the same link:

- ``download``: a plain ``snapshot_download`` of the base's weights (the reference);
- ``upload``: a plain ``create_commit`` of random files with the same sizes as the merged shards;
- ``run``: ``python -m bot run --no-verify`` (streamed, bounded disk), wall time, peak RSS of the
  process tree and peak bytes under its ``--work-dir``, both sampled from outside every 20 ms;
- ``run_verified``: the same with the default per-module proof;
- ``resume``: a run killed (SIGKILL) once half the output has been uploaded, then started again:
  the bytes the server received during the rerun.

Transfers use LFS: the server paces HTTP bodies, and hf_xet's local CAS would bypass the link.

    python bench/bench_pipeline.py --sizes 1.1b 2.8b --bandwidth 2e8 --out bench/results-pipeline
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_benchTOKEN000000000000000000000000001"
SHAPES = {  # Llama-shaped: (hidden, intermediate, layers, heads, kv heads, vocab)
    "1.1b": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B
    "2.8b": (2560, 6912, 32, 32, 32, 32000),
    "tiny": (256, 688, 4, 8, 4, 32000),  # a smoke test of the script itself
}
SHARD_BYTES = 250 * 10**6


def build_base(folder: Path, size: str) -> int:
    import torch
    from safetensors.torch import save_file

    hidden, inter, layers, heads, kv, vocab = SHAPES[size]
    folder.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    names = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,)),
                  (p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (kv * head_dim, hidden)),
                  (p + "self_attn.v_proj.weight", (kv * head_dim, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                  (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                  (p + "mlp.down_proj.weight", (hidden, inter))]
    names += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    gen = torch.Generator().manual_seed(0)
    shards, current, size_now = [], [], 0
    for name, shape in names:
        n = 2
        for d in shape:
            n *= d
        if current and size_now + n > SHARD_BYTES:
            shards.append(current)
            current, size_now = [], 0
        current.append((name, shape))
        size_now += n
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16) for name, shape in shard}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = file
            total += t.numel() * 2
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "dtype": "bfloat16", "hidden_act": "silu", "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    return total


def build_adapter(folder: Path, size: str, base_id: str) -> None:
    import torch
    from safetensors.torch import save_file

    hidden, inter, layers, heads, kv, _ = SHAPES[size]
    kv_dim = kv * hidden // heads
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv_dim, hidden),
              "self_attn.v_proj": (kv_dim, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(layers):
        for module, (out_f, in_f) in shapes.items():
            key = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(16, in_f, generator=gen) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, 16, generator=gen) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 16, "lora_alpha": 32, "base_model_name_or_path": base_id,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}))


class Sampler:
    """Peak RSS of a process tree and peak bytes under a folder, sampled from outside."""

    def __init__(self, pid: int, folder: Path | None):
        import psutil

        self.proc, self.folder = psutil.Process(pid), folder
        self.peak_rss = self.peak_disk = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak_rss = max(self.peak_rss, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            if self.folder is not None:
                total = 0
                for root, _, files in os.walk(self.folder):
                    for name in files:
                        try:
                            total += os.stat(os.path.join(root, name)).st_blocks * 512
                        except OSError:
                            pass
                self.peak_disk = max(self.peak_disk, total)
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def received(url: str) -> int:
    with urllib.request.urlopen(f"{url}/_test/stats") as response:
        return json.load(response)["lfs_bytes_received"]


def timed_run(url: str, argv: list[str], work: Path, *, kill_after_bytes: int | None = None,
              verify_memory_gb: float = 0) -> dict:
    env = {**os.environ, "HF_ENDPOINT": url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HOME": str(work / "hf-home"),
           "MERGEBOT_VERIFY_MEMORY_GB": str(verify_memory_gb)}  # 0: the proof alone, streamed
    scratch = work / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    start_bytes = received(url)
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "bot", *argv, "--work-dir", str(scratch)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(child.pid, scratch)
    killed = False
    if kill_after_bytes is not None:
        while child.poll() is None and received(url) - start_bytes < kill_after_bytes:
            time.sleep(0.05)
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            killed = True
    out, err = child.communicate()
    wall = time.perf_counter() - started
    sampler.stop()
    shutil.rmtree(work / "hf-home", ignore_errors=True)
    if child.returncode != 0 and not killed:
        raise SystemExit(f"run failed ({child.returncode}): {err[-2000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(sampler.peak_rss / 2**20), "killed": killed,
            "peak_scratch_mib": round(sampler.peak_disk / 2**20), "uploaded_bytes": received(url) - start_bytes,
            "stdout_tail": out.strip().splitlines()[-1:] if out else []}


def plain_download(url: str, repo: str, work: Path) -> float:
    from huggingface_hub import snapshot_download

    target = work / "plain-download"
    started = time.perf_counter()
    snapshot_download(repo, local_dir=target, allow_patterns=["*.safetensors"], endpoint=url, token=TOKEN,
                      max_workers=8)
    wall = time.perf_counter() - started
    shutil.rmtree(target)
    return wall


def plain_upload(url: str, repo: str, sizes: list[int], work: Path) -> float:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=url, token=TOKEN)
    api.create_repo(repo)
    folder = work / "plain-upload"
    folder.mkdir(exist_ok=True)
    for i, size in enumerate(sizes):
        path = folder / f"blob-{i}.safetensors"
        with open(path, "wb") as fh:  # random, so nothing dedupes
            left = size
            while left:
                chunk = os.urandom(min(left, 64 * 2**20))
                fh.write(chunk)
                left -= len(chunk)
    started = time.perf_counter()  # as a user's upload does it: hash the files, upload them, commit
    ops = [CommitOperationAdd(path.name, str(path)) for path in sorted(folder.iterdir())]
    api.create_commit(repo, ops, commit_message="plain upload")
    wall = time.perf_counter() - started
    shutil.rmtree(folder)
    return wall


def snapshot(url: str, repo: str, work: Path) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, "merge_report.json", endpoint=url, token=TOKEN, cache_dir=work / "reports")


def bench_size(size: str, bandwidth: float, work: Path, end_to_end: bool) -> dict:
    import torch

    from bot.spec import auto_shard_bytes

    base_dir, adapter_dir = work / f"base-{size}", work / f"adapter-{size}"
    if not (base_dir / "config.json").exists():
        build_base(base_dir, size)
    build_adapter(adapter_dir, size, f"bench/base-{size}")
    weights = sum(p.stat().st_size for p in base_dir.glob("*.safetensors"))
    data = work / "server"
    shutil.rmtree(data, ignore_errors=True)
    server = subprocess.Popen([sys.executable, "-m", "tests.hub_server", "--data", str(data), "--bandwidth",
                               str(bandwidth), "--user", f"bench:{TOKEN}", "--seed", f"bench/base-{size}={base_dir}",
                               "--seed", f"bench/lora-{size}={adapter_dir}"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        url = json.loads(server.stdout.readline())["url"]
        shard = auto_shard_bytes(weights)
        sizes = [shard] * (weights // shard) + ([weights % shard] if weights % shard else [])
        record = {"size": size, "weights_bytes": weights, "shards_in": len(list(base_dir.glob("*.safetensors"))),
                  "shards_out": len(sizes), "bandwidth_bytes_per_s": bandwidth,
                  "torch_threads": torch.get_num_threads()}
        record["download_s"] = round(plain_download(url, f"bench/base-{size}", work), 2)
        record["upload_s"] = round(plain_upload(url, f"bench/plain-upload-{size}", sizes, work), 2)
        argv = ["run", f"bench/lora-{size}", "--repo", f"bench/merged-{size}", "--no-verify"]
        record["run"] = timed_run(url, argv, work)
        record["run_verified"] = timed_run(url, ["run", f"bench/lora-{size}", "--repo", f"bench/verified-{size}"],
                                           work)
        if end_to_end:  # the folder whole, both float32 models in memory: the end-to-end check and latency
            record["run_verified_end_to_end"] = timed_run(
                url, ["run", f"bench/lora-{size}", "--repo", f"bench/verified-e2e-{size}"], work, verify_memory_gb=1000)
            report = json.loads(Path(snapshot(url, f"bench/verified-e2e-{size}", work)).read_text())
            record["end_to_end"] = report["verification"]["end_to_end"]
        proof = json.loads(Path(snapshot(url, f"bench/verified-{size}", work)).read_text())["verification"]["proof"]
        record["proof"] = {k: proof[k] for k in ("modules_proved", "unchanged_tensors", "max_error_ulp",
                                                 "max_share_beyond_half_ulp", "max_dense_relative_delta")}
        argv = ["run", f"bench/lora-{size}", "--repo", f"bench/resumed-{size}", "--no-verify"]
        record["killed"] = timed_run(url, argv, work, kill_after_bytes=weights // 2)
        record["resumed"] = timed_run(url, argv, work)
        slower = max(record["download_s"], record["upload_s"])
        record["run_over_max_transfer"] = round(record["run"]["wall_s"] / slower, 3)
        record["run_over_sum_transfer"] = round(record["run"]["wall_s"] / (record["download_s"] + record["upload_s"]),
                                                3)
        record["scratch_over_weights"] = round(record["run"]["peak_scratch_mib"] * 2**20 / weights, 3)
        # bytes sent twice: what the killed run and its rerun uploaded together, beyond one whole upload
        record["reuploaded_bytes"] = (record["killed"]["uploaded_bytes"] + record["resumed"]["uploaded_bytes"]
                                      - record["run"]["uploaded_bytes"])
        record["reuploaded_over_shard"] = round(record["reuploaded_bytes"] / shard, 3)
        return record
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1.1b", "2.8b"], choices=sorted(SHAPES))
    parser.add_argument("--bandwidth", type=float, default=2e8, help="bytes/s each way (default 2e8)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.log")
    parser.add_argument("--end-to-end", nargs="*", default=["1.1b", "tiny"],
                        help="sizes that also get a verified run with the end-to-end check (both float32 models "
                             "in memory; default 1.1b)")
    args = parser.parse_args()
    os.environ.update(HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_PROGRESS_BARS="1")  # before huggingface_hub loads
    sys.path.insert(0, str(ROOT))
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    results = []
    for size in args.sizes:
        record = bench_size(size, args.bandwidth, work, end_to_end=size in args.end_to_end)
        results.append(record)
        line = (f"{size}: weights {record['weights_bytes'] / 1e9:.2f} GB in {record['shards_in']} shards -> "
                f"{record['shards_out']}; download {record['download_s']} s, upload {record['upload_s']} s; run "
                f"{record['run']['wall_s']} s = {record['run_over_max_transfer']}x max(download, upload) "
                f"({record['run_over_sum_transfer']}x their sum); peak RSS {record['run']['peak_rss_mib']} MiB, "
                f"peak scratch {record['run']['peak_scratch_mib']} MiB ({record['scratch_over_weights']}x the "
                f"weights); verified run (per-module proof, streamed) {record['run_verified']['wall_s']} s, peak RSS "
                f"{record['run_verified']['peak_rss_mib']} MiB"
                + (f"; with the end-to-end check {record['run_verified_end_to_end']['wall_s']} s, peak RSS "
                   f"{record['run_verified_end_to_end']['peak_rss_mib']} MiB, latency "
                   f"{record['end_to_end'].get('latency')}" if "end_to_end" in record else "")
                + f"; killed at half and rerun: {record['reuploaded_bytes']} bytes sent twice "
                f"({record['reuploaded_over_shard']} shards)")
        print(line, flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
            with open(args.out.with_suffix(".log"), "a") as log:
                log.write(line + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
