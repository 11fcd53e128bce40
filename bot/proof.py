"""Per-module proof against PEFT's own layers, one tensor at a time: bounded memory at any model size.

The reference is PEFT itself, not merge-bot's math. ``ModuleProof`` builds the model on the
meta device (no weights), lets PEFT inject and load the adapter exactly as
``PeftModel.from_pretrained`` would (so PEFT decides which modules are targeted, with which
scaling, and which tensors ``modules_to_save`` replaces), and then checks every merged tensor
as it is written:

- a module PEFT wrapped (LoRA and its kin): the real base weight is put into PEFT's layer
  for that module alone, in float64 for float32 outputs (float32 otherwise), and the
  *unmerged* layer is run on one-hot probes. A one-hot row picks one input column, so
  ``layer(e_j) - layer(0)`` is column ``j`` of the exact merged weight, and ``layer(0)`` the
  merged bias. Each probed element of the merged tensor must be that value correctly
  rounded to the output dtype: within one unit in the last place (ulp) everywhere, and within
  half an ulp for all but ``HALF_ULP_SLACK`` of them (float32 arithmetic, as PEFT's own bf16
  merge uses, is not always correctly rounded). A random dense probe also compares
  ``layer(x)`` with ``x @ W'.T + b'`` (reported, and bounded loosely).
- a ``modules_to_save`` copy: equal to PEFT's loaded copy, rounded to the output dtype;
- every other tensor: equal to the base's, rounded to the output dtype.

At the end, every module PEFT wrapped and every copy it replaced must have been checked:
a module left out of the merged checkpoint (or left tied to a tensor it no longer equals)
fails. Memory is the adapter plus one layer in float64.
"""
from __future__ import annotations

import hashlib
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from bot.errors import IncompatibleBaseError, VerificationError
from bot.report import ProofSummary
from bot.shards import DTYPE_FROM_CODE, TensorInfo, read_tensor

log = logging.getLogger(__name__)

PROBES = 8  # one-hot probes (input columns or token ids) per module, plus as many random dense ones
HALF_ULP_SLACK = 0.01  # share of probed elements allowed between half an ulp and one ulp
# Loose bound on the random dense probe's relative error (the one-hot check is the strict one).
_DENSE_BOUND = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 1e-4, torch.float64: 1e-8}
_MANTISSA = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}
_CHUNK = 16 * 2**20


def ulp(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s values at ``value`` (float64 in, float64 out); subnormal spacing at 0."""
    bits = _MANTISSA[dtype]
    _, exponent = torch.frexp(value.abs().double())
    spacing = torch.ldexp(torch.ones_like(value, dtype=torch.float64), exponent - 1 - bits)
    return spacing.clamp_min(torch.finfo(dtype).tiny * 2.0 ** -bits)


def rounding_error(merged: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype,
                   noise: float = 0.0) -> tuple[float, float]:
    """(largest error in ulps of ``dtype``, share of elements beyond half an ulp) of ``merged`` against ``exact``;
    ``noise``, an absolute error the arithmetic itself is allowed, widens every ulp."""
    if not exact.numel():
        return 0.0, 0.0
    exact = exact.double()
    ratio = (merged.double() - exact).abs() / (ulp(exact, dtype) + noise)
    ratio = torch.where(torch.isnan(ratio), torch.full_like(ratio, math.inf), ratio)
    return float(ratio.max()), float((ratio > 0.5 + 1e-3).double().mean())


class ProofUnavailable(Exception):
    """The per-module proof cannot be built for this adapter (only for merges PEFT does itself)."""


@dataclass
class ProofReport:
    """What the proof checked and the worst numbers it saw."""

    modules: int = 0  # PEFT-wrapped modules proved with probes
    saved_copies: int = 0  # modules_to_save tensors compared exactly
    unchanged: int = 0  # other tensors compared with the base
    probes: int = PROBES
    max_ulp: float = 0.0
    max_half_ulp_share: float = 0.0
    max_dense_relative: float = 0.0
    worst_module: str | None = None
    failures: list[str] = field(default_factory=list)

    def summary(self) -> ProofSummary:
        import peft

        return ProofSummary(
            method="per-module proof: PEFT's own layers (unmerged) on one-hot and random probes, against the "
                   "merged tensors; modules_to_save copies and all other tensors compared exactly",
            peft_version=peft.__version__,
            modules_proved=self.modules, saved_copies=self.saved_copies, unchanged_tensors=self.unchanged,
            probes_per_module=self.probes,
            max_error_ulp=self.max_ulp, threshold_ulp=1.0,
            max_share_beyond_half_ulp=self.max_half_ulp_share, threshold_share=HALF_ULP_SLACK,
            max_dense_relative_delta=self.max_dense_relative,
            worst_module=self.worst_module,
            passed=not self.failures,
        )


BaseLookup = Callable[[str], Any]  # a base tensor's location (TensorInfo or BinTensorInfo) by name; None: not available


class ModuleProof:
    """Checks merged tensors one by one against PEFT's own layers (see the module docstring)."""

    def __init__(self, plan, base_tensor: BaseLookup):
        self.plan = plan
        # PEFT's own merge (the fallback) adds in float32 even for float32 outputs: correct rounding is not
        # claimed there, so float32's own arithmetic error is allowed (measured per module, see _noise).
        self.float32_arithmetic = bool(plan.fallback_reason)
        self.base_tensor = base_tensor  # name (tied aliases included) -> where the base keeps it
        self.report = ProofReport()
        self.model, self.wrapped, self.saved, inner = _reference_model(plan)
        # Plain parameters PEFT loaded from the adapter (biases trained with bias="all", other whole tensors)
        self.loaded = {inner + name.removeprefix("base_model.model."): p for name, p in self.model.named_parameters()
                       if not p.is_meta and inner + name.rpartition(".")[0].removeprefix("base_model.model.") not in
                       self.wrapped and ".modules_to_save." not in name and ".original_module." not in name}
        self.tied = {n: plan.layout.tied_group_of(n) for n in plan.layout.param_names} if plan.layout else {}
        self._checked: set[str] = set()
        self._pending_bias: dict[str, tuple[torch.Tensor, torch.dtype]] = {}  # bias written before its weight
        self._exact_bias: dict[str, torch.Tensor | None] = {}  # weight proved first: its merged bias

    # -- one tensor ---------------------------------------------------------------------------
    def check(self, name: str, merged: TensorInfo) -> None:
        """Check one merged tensor (``merged`` locates it in the output); failures are collected."""
        module, _, leaf = name.rpartition(".")
        out_dtype = DTYPE_FROM_CODE[merged.dtype]
        try:
            if module in self.wrapped and leaf in ("weight", "bias"):
                self._check_wrapped(module, leaf, merged, out_dtype)
            elif module in self.saved:
                self._check_saved(module, leaf, merged, out_dtype)
            else:
                self._check_unchanged(name, merged, out_dtype)
        except VerificationError as e:
            self.report.failures.append(str(e))
        except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as e:
            why = f"{e.__class__.__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            if self.float32_arithmetic:  # a tuner PEFT merges itself whose layer cannot run weightless
                raise ProofUnavailable(f"PEFT's {self.plan.adapter_config.peft_type} layer for {module} cannot "
                                       f"run on its own ({why})") from e
            self.report.failures.append(f"{name}: could not be proved ({why})")
        self._checked.add(name)

    def _fail(self, module: str, what: str) -> VerificationError:
        return VerificationError(f"{module}: {what}")

    def _loaded_over_base(self, name: str) -> torch.Tensor | None:
        """A tensor PEFT loads from the adapter in place of the base's ``name``: a plain parameter, or the
        base layer of a wrapped module tied to it (a resized embedding saved as ``base_layer.weight``)."""
        if name in self.loaded:
            return self.loaded[name]
        for member in self.tied.get(name, (name,)):
            module, _, leaf = member.rpartition(".")
            if module in self.wrapped:
                value = self.wrapped[module].get_base_layer()._parameters.get(leaf)
                if value is not None and not value.is_meta:
                    return value
        return None

    def _check_unchanged(self, name: str, merged: TensorInfo, out_dtype: torch.dtype) -> None:
        loaded = self._loaded_over_base(name)
        if loaded is not None:  # PEFT loads the adapter's own tensor over the base's
            value, copy = read_tensor(merged), loaded.detach()
            if tuple(copy.shape) != merged.shape or not torch.equal(value, copy.to(out_dtype)):
                raise self._fail(name, "is not the tensor PEFT loads from the adapter")
            self.report.saved_copies += 1
            return
        base = self.base_tensor(name)
        if base is None:
            return  # a tensor the base does not have (a new head the adapter saved as a whole is checked above)
        if tuple(base.shape) != merged.shape:
            raise self._fail(name, f"shape {list(merged.shape)} differs from the base's {list(base.shape)} though "
                                   f"PEFT leaves it unchanged")
        diff = _max_difference(merged, base, out_dtype)
        if diff:
            raise self._fail(name, f"changed (max |delta| {diff:.3g}) though PEFT leaves it unchanged")
        self.report.unchanged += 1

    def _check_saved(self, module: str, leaf: str, merged: TensorInfo, out_dtype: torch.dtype) -> None:
        wrapper = self.saved[module]
        copy = getattr(wrapper.modules_to_save["default"], leaf, None)
        if copy is None:
            return
        if tuple(copy.shape) != merged.shape:
            raise self._fail(module, f"{leaf} shape {list(merged.shape)} differs from PEFT's saved copy "
                                     f"{list(copy.shape)} (a resized vocabulary or head not applied?)")
        value = read_tensor(merged)
        if not torch.equal(value, copy.detach().to(out_dtype)):
            diff = float((value.double() - copy.detach().double()).abs().max())
            raise self._fail(module, f"{leaf} is not PEFT's modules_to_save copy (max |delta| {diff:.3g})")
        self.report.saved_copies += 1

    def _check_wrapped(self, module: str, leaf: str, merged: TensorInfo, out_dtype: torch.dtype) -> None:
        layer = self.wrapped[module]
        if leaf == "bias":
            if module in self._exact_bias:  # the weight was proved first
                self._check_bias(module, read_tensor(merged), out_dtype, self._exact_bias.pop(module))
            else:
                self._pending_bias[module] = (read_tensor(merged), out_dtype)
            return
        base_info = self.base_tensor(f"{module}.weight")
        if base_info is None:
            raise self._fail(module, "the base has no weight for this module, so it cannot be proved")
        base_weight = _read(base_info)
        bias_info = self.base_tensor(f"{module}.bias")
        kind = "embedding" if isinstance(layer.get_base_layer(), torch.nn.Embedding) else "linear"
        compute = torch.float64 if out_dtype in (torch.float32, torch.float64) else torch.float32
        merged_weight = read_tensor(merged)
        base_bias = _read(bias_info) if bias_info is not None else None
        with _materialized(layer, base_weight, base_bias, compute):
            exact_cols, exact_bias, dense_in, dense_out, cols = _probe(layer, kind, module, compute)
        noise = 0.0
        if self.float32_arithmetic and compute == torch.float64:
            with _materialized(layer, base_weight, base_bias, torch.float32):
                rough = _probe(layer, kind, module, torch.float32)[0]
            noise = 4 * float((rough.double() - exact_cols).abs().max())
        del base_weight
        if kind == "embedding":
            got = merged_weight[cols].double()
        elif _is_conv1d(layer.get_base_layer()):
            got = merged_weight[cols, :].double()  # (in, out) layout: input columns are rows
        else:
            got = merged_weight[:, cols].T.double()
        if got.shape != exact_cols.shape:
            raise self._fail(module, f"weight shape {list(merged.shape)} does not fit PEFT's layer (a missing "
                                     f"transpose?)")
        worst, share = rounding_error(got, exact_cols, out_dtype, noise)
        self._record(module, worst, 0.0 if noise else share)
        if module in self._pending_bias:
            bias, bias_dtype = self._pending_bias.pop(module)
            self._check_bias(module, bias, bias_dtype, exact_bias)
        else:
            self._exact_bias[module] = exact_bias
        if dense_in is not None:
            mine = dense_in.to(compute) @ (merged_weight.to(compute).T if not _is_conv1d(layer.get_base_layer())
                                           else merged_weight.to(compute))
            if exact_bias is not None:
                mine = mine + exact_bias.to(compute)
            scale = float(dense_out.abs().max()) or 1.0
            relative = float((mine - dense_out).abs().max()) / scale
            self.report.max_dense_relative = max(self.report.max_dense_relative, relative)
            if relative > _DENSE_BOUND[out_dtype]:
                raise self._fail(module, f"outputs differ from PEFT's unmerged layer by {relative:.3g} (relative), "
                                         f"over {_DENSE_BOUND[out_dtype]:.0e}")
        self.report.modules += 1

    def _check_bias(self, module: str, bias: torch.Tensor, dtype: torch.dtype, exact: torch.Tensor | None) -> None:
        if exact is None:
            exact = torch.zeros_like(bias, dtype=torch.float64)
        if bias.shape != exact.shape:
            raise self._fail(module, f"bias shape {list(bias.shape)} does not fit PEFT's layer")
        self._record(module, *rounding_error(bias, exact, dtype))

    def _record(self, module: str, worst: float, share: float) -> None:
        if worst > self.report.max_ulp:
            self.report.max_ulp, self.report.worst_module = worst, module
        self.report.max_half_ulp_share = max(self.report.max_half_ulp_share, share)
        if worst > 1.0 + 1e-3 or share > HALF_ULP_SLACK:
            raise self._fail(module, f"differs from PEFT's unmerged layer by up to {worst:.3g} ulp ({share:.1%} of "
                                     f"probed elements beyond half an ulp; thresholds 1 ulp and "
                                     f"{HALF_ULP_SLACK:.0%}): wrong weight, scale, transpose or rounding")

    # -- the whole -----------------------------------------------------------------------------
    def finish(self, *, tie_word_embeddings: bool | None = None) -> ProofSummary:
        """Every wrapped module and saved copy was checked, and every tensor the merged checkpoint leaves to a
        tie is one PEFT leaves unchanged on both sides; raise ``VerificationError`` on any failure.

        ``tie_word_embeddings``: the merged config's flag (None: as the base's layout says)."""
        adapted = set(self.wrapped) | set(self.saved)
        for name, group in sorted(self.tied.items()):
            if name in self._checked or tie_word_embeddings is False:
                continue
            partners = [m for m in group if m != name and m in self._checked]
            module = name.rpartition(".")[0]
            if partners and (module in adapted or partners[0].rpartition(".")[0] in adapted):
                self.report.failures.append(
                    f"{module}: tied to {partners[0]} in the merged model, but PEFT changes one side only "
                    f"(the embeddings were not untied)")
        for module in sorted(self.wrapped):
            if f"{module}.weight" not in self._checked:
                tied = [m for m in self.tied.get(f"{module}.weight", ()) if m in self._checked]
                why = (f"is tied to {tied[0]} in the merged model, but PEFT changes it on its own (not untied)"
                       if tied else "is adapted by PEFT but the merged checkpoint has no weight for it")
                self.report.failures.append(f"{module}: {why}")
        for module, wrapper in sorted(self.saved.items()):
            for leaf, _ in wrapper.modules_to_save["default"].named_parameters(recurse=False):
                if f"{module}.{leaf}" not in self._checked:
                    self.report.failures.append(f"{module}: PEFT replaces its {leaf} (modules_to_save) but the merged "
                                                f"checkpoint does not carry it")
        for module in self._pending_bias:
            self.report.failures.append(f"{module}: the bias was written but its weight never was")
        summary = self.report.summary()
        if self.report.failures:
            first = self.report.failures[0]
            more = f" (and {len(self.report.failures) - 1} more)" if len(self.report.failures) > 1 else ""
            raise VerificationError(f"verification failed: {first}{more}; nothing was published")
        return summary


def _is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D"


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def _probe(layer, kind: str, module: str, dtype: torch.dtype):
    """PEFT's unmerged layer on one-hot probes: (exact merged columns (k, out), merged bias or None,
    dense input, dense output, the probed indices)."""
    base = layer.get_base_layer()
    gen = torch.Generator().manual_seed(_seed(module))
    with torch.inference_mode():
        if kind == "embedding":
            rows = base.weight.shape[0]
            cols = torch.randperm(rows, generator=gen)[:PROBES]
            return layer(cols).to(dtype), None, None, None, cols
        in_features = base.weight.shape[0] if _is_conv1d(base) else base.weight.shape[1]
        cols = torch.randperm(in_features, generator=gen)[:PROBES]
        onehot = torch.zeros(len(cols), in_features, dtype=dtype)
        onehot[torch.arange(len(cols)), cols] = 1
        zero = layer(torch.zeros(1, in_features, dtype=dtype)).to(dtype)
        has_bias = getattr(base, "bias", None) is not None or bool(zero.abs().max() > 0)
        exact = layer(onehot).to(dtype) - zero
        dense = torch.randn(PROBES, in_features, generator=gen, dtype=torch.float64).to(dtype)
        dense_out = layer(dense).to(dtype)
        return exact, (zero[0] if has_bias else None), dense, dense_out, cols


@contextmanager
def _materialized(layer, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> Iterator[None]:
    """PEFT's ``layer`` with the real base weight (and bias) and its adapter tensors in ``dtype``, for the
    duration; then back to the weightless state."""
    base = layer.get_base_layer()
    saved = {}
    for owner, name, value in _parameters(layer):
        saved[(id(owner), name)] = (owner, name, owner._parameters[name])
        owner._parameters[name] = torch.nn.Parameter(value.detach().to(dtype), requires_grad=False)
    buffers = []  # floating buffers (VeRA's shared projections) follow the same dtype
    for owner in layer.modules():
        if owner is base:
            continue
        for name, value in list(owner._buffers.items()):
            if value is not None and value.is_floating_point() and not value.is_meta:
                buffers.append((owner, name, value))
                owner._buffers[name] = value.to(dtype)
    original_base = {n: base._parameters.get(n) for n in ("weight", "bias")}
    # A tensor PEFT loaded from the adapter (a trained bias with bias="all", a resized embedding) is
    # what PEFT uses; the rest is still weightless and comes from the base checkpoint.
    for name, value in (("weight", weight), ("bias", bias)):
        current = base._parameters.get(name)
        if current is None:
            continue
        if not current.is_meta:
            value = current.detach()
        elif value is None:
            raise VerificationError(f"the base has no {name} for the {type(base).__name__} PEFT's layer wraps")
        base._parameters[name] = torch.nn.Parameter(value.to(dtype), requires_grad=False)
    try:
        yield
    finally:
        for owner, name, value in saved.values():
            owner._parameters[name] = value
        for owner, name, value in buffers:
            owner._buffers[name] = value
        for n, value in original_base.items():
            if value is not None or n in base._parameters:
                base._parameters[n] = value


def _parameters(layer) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
    """The adapter's own parameters in ``layer`` (not the base layer's), as (owner, name, value)."""
    base = layer.get_base_layer()
    base_ids = {id(p) for p in base.parameters()}
    out = []
    for owner in layer.modules():
        if owner is base:
            continue
        for name, value in list(owner._parameters.items()):
            if value is not None and id(value) not in base_ids and value.is_floating_point():
                out.append((owner, name, value))
    return out


def _reference_model(plan):
    """PEFT's model of base + adapter on the meta device, adapter tensors real: (model, wrapped layers by
    module name, modules_to_save wrappers by module name)."""
    import transformers
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    from bot.adapter import read_adapter_weights
    from bot.architecture import describe_model, load_config
    from bot.fallback import _attach_adapter, check_every_tensor_loaded, quiet_libraries, resize_like_adapter
    from bot.peft_config import build_peft_config

    from bot.tuners.lora import PLAIN_LORA_INITS

    init = plan.adapter_config.get("init_lora_weights", True)
    if plan.adapter_config.peft_type == "LORA" and init not in PLAIN_LORA_INITS:
        raise ProofUnavailable(f"init_lora_weights={init!r} makes PEFT rewrite the base weights as it loads the "
                               f"adapter, which needs the whole base")
    config = build_peft_config(plan.adapter_config)
    base_config = load_config(plan.base.path)
    labels = (plan.config_updates or {}).get("id2label")
    if labels:  # a classification head of the size the adapter saved, as users load the base for it
        base_config.id2label = {int(k): v for k, v in labels.items()}
        base_config.label2id = {v: int(k) for k, v in labels.items()}
    try:
        layout = describe_model(base_config, task_type=plan.adapter_config.task_type)
    except IncompatibleBaseError:  # a task the base has no class for: PEFT wraps the base as it is
        layout = describe_model(base_config, task_type=None)
    with quiet_libraries(), _adapter_stays_on_cpu():
        with torch.device("meta"):
            model = getattr(transformers, layout.architecture)(base_config)
        saved_tensors = read_adapter_weights(plan.adapter.path)  # once for both; PEFT then loads its own copy
        resize_like_adapter(model, saved_tensors)
        inner = bare_model_prefix(model, saved_tensors)
        del saved_tensors
        if inner:  # an adapter trained on the bare model (LlamaModel): PEFT wraps that part, as its trainer did
            model = getattr(model, inner[:-1])
        try:
            peft_model, loaded = _attach_adapter(model, config, plan.adapter.path, low_cpu_mem_usage=True)
        except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as e:
            if plan.fallback_reason:  # e.g. PiSSA/OLoRA inits that rewrite the base as PEFT loads them
                raise ProofUnavailable(f"PEFT cannot build {plan.adapter_config.peft_type} on a weightless model "
                                       f"({str(e).splitlines()[0][:120]})") from e
            raise VerificationError(f"PEFT could not attach the adapter to the base for the proof: "
                                    f"{str(e).splitlines()[0]}") from e
    check_every_tensor_loaded(loaded)
    peft_model.eval()
    wrapped, saved = {}, {}
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        short = inner + name.removeprefix(prefix)
        if isinstance(module, ModulesToSaveWrapper):
            saved[short] = module
        elif isinstance(module, BaseTunerLayer) and ".modules_to_save." not in name and \
                ".original_module." not in name:
            wrapped[short] = module
    return peft_model, wrapped, saved, inner


def bare_model_prefix(model, saved_keys: Iterable[str]) -> str:
    """``"model."`` when the adapter's saved keys name the bare model's modules (``layers.0...``) while
    ``model`` keeps them under its base prefix (``model.layers.0...``); else ``""``."""
    from bot.adapter import PEFT_PREFIX

    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix or not hasattr(model, prefix):
        return ""
    keys = [k.removeprefix(PEFT_PREFIX) for k in saved_keys]
    module_names = {n for n, _ in model.named_modules()}
    if keys and not any(k.startswith(prefix + ".") for k in keys) and \
            any(k.split(".")[0] in {n.split(".")[0] for n in module_names if n.startswith(prefix + ".")} or
                f"{prefix}.{k.split('.')[0]}" in module_names for k in keys):
        return prefix + "."
    return ""


@contextmanager
def _adapter_stays_on_cpu() -> Iterator[None]:
    """PEFT moves loaded adapter tensors to the device of their base layer: here the meta device, which
    would drop them. For the weightless reference model they stay where they were loaded."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    name = "_move_adapter_to_device_of_base_layer"
    original = getattr(BaseTunerLayer, name)
    setattr(BaseTunerLayer, name, lambda self, *args, **kwargs: None)
    try:
        yield
    finally:
        setattr(BaseTunerLayer, name, original)


def base_lookup(plan, localize: Callable[[TensorInfo], TensorInfo | None] | None = None) -> BaseLookup:
    """The base's tensors by parameter name, read when asked (``localize`` maps a Hub file's tensor to the
    fetched piece that holds it, None when no piece does)."""
    from bot.checkpoint import index_checkpoint, index_remote_checkpoint

    from bot.plan import base_tensors

    checkpoint = index_remote_checkpoint(plan.base.remote) if plan.base.remote else index_checkpoint(plan.base.path)[0]
    # by the model's names, tied aliases included, as the plan names them (a fallback plan has no layout)
    by_name = base_tensors(checkpoint, plan.layout).by_param if plan.layout else dict(checkpoint)

    def lookup(name: str):
        info = by_name.get(name)
        if info is not None and localize is not None and isinstance(info, TensorInfo):
            info = localize(info)
        return info

    return lookup


def _read(info) -> torch.Tensor:
    from bot.checkpoint import read_base_tensor

    return read_base_tensor(info)


def _max_difference(merged: TensorInfo, base, dtype: torch.dtype) -> float:
    """The largest |merged - base rounded to dtype|, 0.0 when equal, read a block of rows at a time."""
    from bot.shards import read_into

    if not isinstance(base, TensorInfo) or not merged.shape:
        value, reference = read_tensor(merged), _read(base).to(dtype)
        return 0.0 if torch.equal(value, reference) else float((value.double() - reference.double()).abs().max())
    rows = merged.shape[0]
    per_row = max(1, (merged.nbytes + base.nbytes) // max(rows, 1))
    step = max(1, _CHUNK // per_row)
    worst = 0.0
    for start in range(0, rows, step):
        n = min(step, rows - start)
        got = torch.empty((n, *merged.shape[1:]), dtype=merged.torch_dtype)
        want = torch.empty((n, *base.shape[1:]), dtype=base.torch_dtype)
        read_into(merged, start * (merged.nbytes // rows), got)
        read_into(base, start * (base.nbytes // rows), want)
        want = want.to(dtype)
        if not torch.equal(got, want):
            worst = max(worst, float((got.double() - want.double()).abs().nan_to_num(math.inf).max()) or math.inf)
    return worst


def prove_folder(plan, folder) -> ProofSummary:
    """Run the proof over every tensor of a finished merged folder (local merges, PEFT's fallback)."""
    from pathlib import Path

    from bot.shards import read_header

    from bot.jsonfile import read_json_object

    proof = ModuleProof(plan, base_lookup(plan))
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors, _ = read_header(path)
        for name, info in tensors.items():
            proof.check(name, info)
    config = read_json_object(Path(folder) / "config.json", error=VerificationError, what="merged config.json",
                              fix="re-run the merge")
    return proof.finish(tie_word_embeddings=bool(config.get("tie_word_embeddings", True)))
