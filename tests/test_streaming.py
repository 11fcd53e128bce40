"""The row-block streaming path: same bits as the whole-tensor path, as PEFT's own merge (bf16/fp16
outputs) and as the float64 merge rounded once (float32 outputs).

The tiny test models fit one block, so these tests shrink the block to a few rows to make
every weight cross block boundaries, including a short last block.
"""
from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel
from safetensors.torch import load_file

import bot.merge
from bot.cli import main
from factory import build_adapter, build_base, model_class, peft_merged_state

# (base, base dtype, adapter config, output --dtype)
CASES = {
    "lora-bf16": ("llama", torch.bfloat16, lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), None),
    "rslora-fp32": ("llama_untied", torch.float32,
                    lambda: LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"]),
                    None),
    "lora-fan-in-fan-out": ("gpt2", torch.float32,
                            lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                               fan_in_fan_out=True), None),
    "ia3": ("llama_untied", torch.float32,
            lambda: IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), None),
    "lora-to-fp16": ("llama", torch.bfloat16, lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"]),
                     "float16"),
    # float32 outputs are merged in float64: every rank streams (no _MAX_BLOCK_RANK), bf16 bases too
    "rank-pattern-large-alpha-fp32": ("llama_untied", torch.float32,
                                      lambda: LoraConfig(r=300, lora_alpha=30000, target_modules=["q_proj", "up_proj"],
                                                         rank_pattern={"up_proj": 8}), None),
    "lora-bf16-to-fp32": ("llama", torch.bfloat16,
                          lambda: LoraConfig(r=64, lora_alpha=6400, target_modules=["q_proj", "down_proj"]), "float32"),
}


def _merge(adapter, out, dtype, block_bytes, monkeypatch) -> dict[str, torch.Tensor]:
    monkeypatch.setattr(bot.merge, "_BLOCK_BYTES", block_bytes)
    args = ["merge", str(adapter), "--out", str(out), "--quiet"] + (["--dtype", dtype] if dtype else [])
    assert main(args) == 0
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("case", sorted(CASES))
def test_small_blocks_give_the_same_bits(case, cache_dir, tmp_path, monkeypatch):
    base_name, base_dtype, peft_config, out_dtype = CASES[case]
    base = build_base(cache_dir, base_name, dtype=base_dtype)
    adapter = build_adapter(cache_dir, f"stream-{case}", base, base_name, peft_config(), dtype=base_dtype)
    calls = []
    real = bot.merge.merge_rows_blockwise

    def counting(job, adapter_tensors):
        blocks = list(b.clone() for b in real(job, adapter_tensors))
        calls.append(len(blocks))
        yield from blocks

    monkeypatch.setattr(bot.merge, "merge_rows_blockwise", counting)
    small = _merge(adapter, tmp_path / "small", out_dtype, 4 * 32 * 5, monkeypatch)  # 5 rows of 32 float32 columns
    assert calls and max(calls) > 2, "the small-block run should split weights into several blocks"
    calls.clear()
    whole = _merge(adapter, tmp_path / "whole", out_dtype, 1 << 40, monkeypatch)
    assert calls and max(calls) == 1
    assert small.keys() == whole.keys()
    for name in small:
        assert torch.equal(small[name], whole[name]), name

    if (out_dtype or str(base_dtype).split(".")[-1]) == "float32":
        # the float64 merge (PEFT's, on the base loaded in float64) rounded once to float32
        reference = peft_merged_state(base, adapter, base_name, dtype=torch.float64)
        for name, tensor in small.items():
            assert torch.equal(tensor, reference[name].float()), name
    elif out_dtype is None:  # PEFT's own CPU merge of the same adapter, bit for bit
        reference = peft_merged_state(base, adapter, base_name, dtype=base_dtype)
        for name, tensor in small.items():
            assert torch.equal(tensor, reference[name]), name


def test_dora_keeps_the_whole_tensor_path(cache_dir, tmp_path, monkeypatch):
    """DoRA's norm spans a whole row of the merged weight but the ops are not row-additive; it must not stream."""
    base = build_base(cache_dir, "llama_untied")
    adapter = build_adapter(cache_dir, "stream-dora", base, "llama_untied",
                            LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"]))
    streamed = []
    real = bot.merge.merge_rows_blockwise

    def recording(job, adapter_tensors):
        streamed.append(job.name)
        return real(job, adapter_tensors)

    monkeypatch.setattr(bot.merge, "merge_rows_blockwise", recording)
    merged = _merge(adapter, tmp_path / "out", None, 4 * 32 * 5, monkeypatch)
    assert not any("q_proj" in name for name in streamed)
    reference = PeftModel.from_pretrained(model_class("llama_untied").from_pretrained(base), adapter)
    state = reference.merge_and_unload().state_dict()
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, state[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows_total,step", [(0, 5), (1, 5), (5, 5), (6, 5), (11, 5), (16, 5), (9, 1), (4096, 128)])
def test_row_blocks_cover_every_row_once_and_never_a_lone_row(rows_total, step):
    blocks = bot.merge.row_blocks(rows_total, step)
    assert [r for b in blocks for r in range(b.start, b.stop)] == list(range(rows_total))
    sizes = [b.stop - b.start for b in blocks]
    assert all(size >= 2 for size in sizes) or rows_total == 1
    assert max(sizes, default=0) <= max(step, 4)


@pytest.mark.parametrize("rank,out_code,streams", [(16, "BF16", True), (1024, "BF16", False), (1024, "F32", True)])
def test_high_rank_lora_is_merged_whole_and_stays_bit_identical(rank, out_code, streams, tmp_path):
    """At high rank a row block's float32 product sums differently from the whole product (BLAS blocking
    over the rank), so for bf16 outputs such weights are merged whole, like PEFT: the bits must equal
    W + (B @ A) * s in float32, rounded once. A float32 output is merged in float64 and streams at any
    rank: its bits must equal the same formula in float64, rounded once to float32."""
    from safetensors.torch import save_file

    from bot.plan import TensorJob
    from bot.shards import read_header
    from bot.tuners import ModuleOp

    gen = torch.Generator().manual_seed(0)
    out_dtype = bot.merge.DTYPE_FROM_CODE[out_code]
    weight = (torch.randn(2048 if out_code == "BF16" else 512, 2048, generator=gen) * 0.02).to(out_dtype)
    save_file({"w": weight}, tmp_path / "base.safetensors")
    info = read_header(tmp_path / "base.safetensors")[0]["w"]
    rows = weight.shape[0]
    adapter = {"a": torch.randn(rank, 2048, generator=gen) * 0.01, "b": torch.randn(rows, rank, generator=gen) * 0.01}
    op = ModuleOp("LORA", "m", {"lora_A": "a", "lora_B": "b"}, scaling=0.5)
    job = TensorJob("w", info, None, ((op, False),), out_code, (rows, 2048))
    assert bot.merge.rows_are_independent(job, adapter) == streams
    blocks = [b.clone() for b in bot.merge.tensor_blocks(job, adapter, torch.device("cpu"))]
    assert (len(blocks) > 1) == streams
    merged = torch.cat(blocks)
    work = bot.merge.compute_dtype(out_dtype)
    assert work == (torch.float64 if out_code == "F32" else torch.float32)
    expected = (weight.to(work) + (adapter["b"].to(work) @ adapter["a"].to(work)) * 0.5).to(out_dtype)  # PEFT's order
    assert torch.equal(merged, expected)


def test_an_ia3_scalar_applies_to_every_row_block():
    """An (1, 1) IA3 vector on a one-column weight scales every row; slicing it by rows would drop it."""
    from bot.tuners import ModuleOp, row_slice_tensors

    op = ModuleOp("IA3", "m", {"ia3_l": "l"})
    adapter = {"l": torch.tensor([[3.0]])}
    assert torch.equal(row_slice_tensors(op, adapter, slice(4, 8))["ia3_l"], adapter["l"])
    per_row = {"l": torch.arange(8.0).reshape(8, 1)}
    assert torch.equal(row_slice_tensors(op, per_row, slice(4, 8))["ia3_l"], per_row["l"][4:8])


def test_a_float32_output_beyond_float32s_range_is_refused(tmp_path):
    """Float64 arithmetic holds 1e39, but rounding it to float32 would write inf: both paths refuse it."""
    from safetensors.torch import save_file

    from bot.errors import AdapterConfigError
    from bot.plan import TensorJob
    from bot.shards import read_header
    from bot.tuners import ModuleOp

    save_file({"w": torch.zeros(8, 8)}, tmp_path / "base.safetensors")
    info = read_header(tmp_path / "base.safetensors")[0]["w"]
    adapter = {"a": torch.full((2, 8), 1e19), "b": torch.full((8, 2), 1e19)}  # finite in float32; B @ A is 2e38
    op = ModuleOp("LORA", "m", {"lora_A": "a", "lora_B": "b"}, scaling=4.0)
    job = TensorJob("w", info, None, ((op, False),), "F32", (8, 8))
    assert bot.merge.rows_are_independent(job, adapter)
    with pytest.raises(AdapterConfigError, match="beyond float32's range"):
        list(bot.merge.tensor_blocks(job, adapter, torch.device("cpu")))
    with pytest.raises(AdapterConfigError, match="beyond float32's range"):
        bot.merge.merge_tensor(job, adapter, torch.device("cpu"))
    half = ModuleOp("LORA", "m", {"lora_A": "a", "lora_B": "b"}, scaling=0.5)  # 1e38 fits
    assert torch.isfinite(bot.merge.merge_tensor(TensorJob("w", info, None, ((half, False),), "F32", (8, 8)),
                                                 adapter, torch.device("cpu"))).all()
