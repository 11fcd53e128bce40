"""Hand-computed literals for each pure merge function (torchtune style)."""
import torch

from bot.tuners.ia3 import ia3_scale_bias, ia3_scale_weight
from bot.tuners.loha import loha_delta
from bot.tuners.lokr import lokr_delta, lokr_factor
from bot.tuners.lora import dora_merge, lora_delta, lora_scaling


def test_lora_scaling_plain_and_rslora():
    assert lora_scaling(16, 4) == 4.0
    assert lora_scaling(16, 4, use_rslora=True) == 8.0


def test_lora_delta_literal():
    a = torch.tensor([[1.0, 2.0, 3.0]])  # (r=1, in=3)
    b = torch.tensor([[1.0], [2.0]])  # (out=2, r=1)
    w = torch.full((2, 3), 3.0)
    merged = w + lora_delta(a, b, 2.0)
    assert torch.equal(merged, torch.tensor([[5.0, 7.0, 9.0], [7.0, 11.0, 15.0]]))
    # Conv1D / embedding layout: stored (in, out)
    assert torch.equal(lora_delta(a, b, 2.0, transpose=True), torch.tensor([[2.0, 4.0], [4.0, 8.0], [6.0, 12.0]]))


def test_dora_literal_row_norms():
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    delta = torch.zeros(2, 2)
    magnitude = torch.tensor([10.0, 1.0])  # row norms are 5 and 2
    assert torch.allclose(dora_merge(w, delta, magnitude), torch.tensor([[6.0, 8.0], [0.0, 1.0]]))
    # transposed storage: the norm is over each output column
    assert torch.allclose(dora_merge(w.T, delta, magnitude, transpose=True), torch.tensor([[6.0, 0.0], [8.0, 1.0]]))


def test_ia3_literal():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(ia3_scale_weight(w, torch.tensor([[2.0], [3.0]])), torch.tensor([[2.0, 4.0], [9.0, 12.0]]))
    assert torch.equal(ia3_scale_weight(w, torch.tensor([[2.0, 3.0]])), torch.tensor([[2.0, 6.0], [6.0, 12.0]]))
    assert torch.equal(ia3_scale_bias(torch.tensor([1.0, 1.0]), torch.tensor([[2.0], [3.0]])), torch.tensor([2.0, 3.0]))


def test_loha_literal():
    delta = loha_delta(torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0, 1.0]]),
                       torch.tensor([[1.0], [1.0]]), torch.tensor([[2.0, 3.0]]), 0.5, shape=(2, 2))
    assert torch.equal(delta, torch.tensor([[1.0, 1.5], [2.0, 3.0]]))


def test_lokr_literal():
    w1 = lokr_factor(None, torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0]]))  # (2, 1)
    w2 = torch.tensor([[1.0, 10.0]])
    assert torch.equal(lokr_delta(w1, w2, 2.0, shape=(2, 2)), torch.tensor([[2.0, 20.0], [4.0, 40.0]]))
