"""Pre-flight: pin the adapter and base to commits and find every refusal before any weight moves.

``preflight(spec)`` reads only metadata and small files (model info, adapter_config.json,
the base's config.json) and answers: which exact adapter and base will be merged, whether
the caller's token can read them, whether the tuner is mergeable, whether the base is
quantized (and, for QLoRA adapters, which 16-bit original to use instead), and how many
bytes will be downloaded and written. The CLI, the Space and the bot all call it first.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.adapter import AdapterConfig, read_adapter_config
from bot.checkpoint import local_weight_bytes
from bot.errors import AdapterConfigError, IncompatibleBaseError, MergeBotError, OutputError
from bot.jsonfile import MAX_JSON_BYTES, read_json_object
from bot.plan import base_ref_for, check_not_quantized, check_peft_can_merge, suggest_unquantized
from bot.provenance import Pinned, fingerprint, output_options, pin_local
from bot.sources import canonical_repo_id, files_to_download
from bot.spec import MergeSpec, SourceRef, auto_shard_bytes, parse_source_ref
from bot.transport import hub_client, hub_read_errors, is_bare_name, read_with_retries

if TYPE_CHECKING:
    from huggingface_hub import HfApi

log = logging.getLogger(__name__)

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_DISK_MARGIN = 64 * 1024 * 1024


@dataclass(frozen=True)
class Preflight:
    """What a merge will do, decided from metadata only."""

    adapter: SourceRef  # pinned: local folder, or repo at a commit SHA
    base: SourceRef
    adapter_pin: Pinned
    base_pin: Pinned
    peft_type: str
    task_type: str | None
    base_note: str | None  # set when the base differs from the one adapter_config.json names
    download_bytes: int  # what the Hub will send (0 for local folders; cached files included)
    output_bytes: int  # estimate of the merged weights on disk
    private: tuple[str, ...] = ()  # inputs that are private repos
    gated: tuple[str, ...] = ()  # inputs that are gated repos (the caller has access)
    visibility_unknown: tuple[str, ...] = ()  # inputs whose server did not say whether they are private or gated
    sizes_known: bool = True  # False: some file sizes were not reported, so the byte counts are lower bounds
    asked_names: tuple[str, str] | None = None  # (adapter, base) as typed, when the Hub spells either otherwise

    def pinned_spec(self, spec: MergeSpec) -> MergeSpec:
        return replace(spec, adapter=self.adapter, base=self.base, base_note=self.base_note)

    def fingerprint(self, spec: MergeSpec) -> str:
        return fingerprint(self.adapter_pin, self.base_pin, output_options(spec.dtype, spec.max_shard_bytes))

    def fingerprints(self, spec: MergeSpec) -> tuple[str, ...]:
        """This merge's fingerprint, then the one made from the repo ids as typed when the Hub spells
        them otherwise: merge-bot pinned names as typed before it pinned them as the Hub spells them,
        and merges published then must still be found."""
        fps = [self.fingerprint(spec)]
        if self.asked_names:
            adapter, base = (replace(pin, name=name) for pin, name in zip((self.adapter_pin, self.base_pin),
                                                                            self.asked_names))
            fps.append(fingerprint(adapter, base, output_options(spec.dtype, spec.max_shard_bytes)))
        return tuple(dict.fromkeys(fps))

    def summary(self) -> str:
        from bot.pipeline import human_bytes

        parts = [f"{self.peft_type} adapter {self.adapter_pin.name}@{self.adapter_pin.revision[:12]}",
                 f"base {self.base_pin.name}@{self.base_pin.revision[:12]}",
                 f"download ~{human_bytes(self.download_bytes)}, output ~{human_bytes(self.output_bytes)}"
                 + ("" if self.sizes_known else " (at least: the Hub did not report every file size)")]
        return "; ".join(parts)


@dataclass(frozen=True)
class _RepoFacts:
    ref: SourceRef  # canonical repo id, pinned to the SHA
    asked: str  # the repo id as it was typed (or named in a config or card)
    sizes: dict[str, int | None]  # None: the listing gave no size
    card_data: dict[str, Any]
    private: bool | None  # None: the server did not say
    gated: bool | None


def _repo_facts(api, ref: SourceRef, what: str) -> _RepoFacts:
    with hub_read_errors(what, ref):  # a bare name (likely a mistyped folder) is asked once, never retried
        info = read_with_retries(lambda: api.model_info(ref.name, revision=ref.revision, files_metadata=True),
                                 () if is_bare_name(ref) else None)
    sizes = {s.rfilename: (int(s.size) if isinstance(s.size, int) else None) for s in (info.siblings or [])}
    card = info.card_data.to_dict() if info.card_data is not None else {}
    private = info.private if isinstance(info.private, bool) else None
    gated = None if info.gated is None else info.gated not in (False, "false", "False")  # False, "auto", "manual"
    return _RepoFacts(ref=SourceRef(name=canonical_repo_id(info, ref.name), revision=info.sha), asked=ref.name,
                      sizes=sizes, card_data=card, private=private, gated=gated)


def _known_sizes(api, facts: _RepoFacts, files: list[str]) -> dict[str, int | None]:
    """Sizes of ``files``, asking the Hub (HEAD) for those the listing left out; None where it will not say."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    sizes = {}
    for name in files:
        size = facts.sizes.get(name)
        if size is None:  # and remember it, so a file is asked about once
            url = hf_hub_url(facts.ref.name, name, revision=facts.ref.revision, endpoint=api.endpoint)
            with hub_read_errors("a file of", facts.ref, gated=facts.gated):
                size = read_with_retries(lambda: get_hf_file_metadata(url, token=api.token)).size
            facts.sizes[name] = size if isinstance(size, int) else None
        sizes[name] = facts.sizes[name]
    return sizes


def _fetch(api, facts: _RepoFacts, filename: str, what: str) -> Path:
    """Download one small file at the pinned SHA, after checking this caller may read it."""
    error = AdapterConfigError if what == "adapter" else IncompatibleBaseError
    if filename not in facts.sizes:
        raise error(f"{what} repo {facts.ref.name} has no {filename}; "
                    + ("is it a PEFT adapter?" if what == "adapter" else "is it a transformers model?"))
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    with hub_read_errors(what, facts.ref, gated=facts.gated):
        # Always ask the Hub: a cached copy (a Space's cache is shared by its users) must not
        # stand in for this caller's access to a gated or private repo.
        url = hf_hub_url(facts.ref.name, filename, revision=facts.ref.revision, endpoint=api.endpoint)
        metadata = read_with_retries(lambda: get_hf_file_metadata(url, token=api.token))
        if facts.sizes[filename] is None and isinstance(metadata.size, int):
            facts.sizes[filename] = metadata.size  # the listing left it out; later size counts reuse it
        size = facts.sizes[filename] or 0  # still unknown: capped when read (read_json_object)
        if size > MAX_JSON_BYTES:  # refused before the download
            raise error(f"{what} repo {facts.ref.name}: {filename} is {size / 2**20:.0f} MiB, too large for a "
                        f"JSON file; check the repo")
        return Path(read_with_retries(lambda: api.hf_hub_download(facts.ref.name, filename,
                                                                  revision=facts.ref.revision)))


def _read_json(path: Path, what: str) -> dict[str, Any]:
    return read_json_object(path, error=IncompatibleBaseError, what=f"{what} {path.name}",
                            fix="check the repo, or pass another --base")


def original_of_quantized(card_data: dict[str, Any]) -> str | None:
    """The 16-bit repo a quantized re-upload names in its card (``base_model``, relation quantized)."""
    relation = card_data.get("base_model_relation")
    base = card_data.get("base_model")
    if isinstance(base, list):
        base = base[0] if len(base) == 1 else None
    if not (isinstance(base, str) and base and relation in (None, "quantized")):
        return None
    try:
        return parse_source_ref(base, what="base_model in the quantized repo's card", allow_local=False).name
    except MergeBotError:  # a URL or junk in someone's card: treat as "no original named"
        return None


def _download_files(api, facts: _RepoFacts, what: str) -> list[str]:
    def read_index(name: str) -> dict:
        return _read_json(_fetch(api, facts, name, what), what)

    return files_to_download(list(facts.sizes), what, read_index)


def estimate_output_bytes(weight_bytes: int, base_config: dict[str, Any], dtype: str) -> int:
    stored = str(base_config.get("dtype") or base_config.get("torch_dtype") or "float32")
    if dtype == "auto" or stored not in _ITEMSIZE:
        return weight_bytes
    return weight_bytes * _ITEMSIZE[dtype] // _ITEMSIZE[stored]


def check_free_space(path: Path, needed: int, *, what: str, hint: str) -> None:
    """Refuse early when the file system holding ``path`` cannot take ``needed`` bytes (plus a margin)."""
    if needed <= 0:
        return
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed + _DISK_MARGIN:
        raise OutputError(f"not enough free disk space for {what} at {probe}: needs {needed / 1e9:.2f} GB, "
                          f"{free / 1e9:.2f} GB free; free space or {hint}")


@dataclass(frozen=True)
class _ResolvedAdapter:
    ref: SourceRef  # pinned: a local folder, or the canonical repo id at a commit SHA
    pin: Pinned
    config: AdapterConfig
    download_bytes: int | None  # 0 for a local folder; None: the Hub did not report every size
    facts: _RepoFacts | None  # None for a local folder


@dataclass(frozen=True)
class _ResolvedBase:
    ref: SourceRef  # pinned, and the 16-bit original when a quantized base was swapped
    pin: Pinned
    config: dict[str, Any]
    weight_bytes: int | None  # None: the Hub did not report every weight file's size
    download_bytes: int | None  # 0 for a local folder
    note: str | None  # why the base is not the one named (a quantized base swapped)
    facts: _RepoFacts | None  # None for a local folder


def _resolve_adapter(api_factory, spec: MergeSpec) -> _ResolvedAdapter:
    if spec.adapter.local:
        folder = Path(spec.adapter.name)
        return _ResolvedAdapter(spec.adapter, pin_local(folder), read_adapter_config(folder), 0, None)
    api = api_factory()
    facts = _repo_facts(api, spec.adapter, "adapter")
    acfg = read_adapter_config(_fetch(api, facts, "adapter_config.json", "adapter").parent)
    sizes = _known_sizes(api, facts, _download_files(api, facts, "adapter"))
    size = None if None in sizes.values() else sum(sizes.values())
    return _ResolvedAdapter(facts.ref, Pinned(facts.ref.name, facts.ref.revision, True), acfg, size, facts)


def _resolve_base(api_factory, ref: SourceRef, *, explicit: bool, named_by: str) -> _ResolvedBase:
    """The base pinned, its config and sizes, with QLoRA bases swapped for their 16-bit original."""
    if ref.local:
        folder = Path(ref.name)
        config = _read_json(folder / "config.json", "base") if (folder / "config.json").is_file() else {}
        if not config:
            raise IncompatibleBaseError(f"base {folder} has no config.json; is it a transformers model?")
        return _ResolvedBase(ref, pin_local(folder), config, local_weight_bytes(folder), 0, None, None)
    api = api_factory()
    facts = _repo_facts(api, ref, "base")
    config = _read_json(_fetch(api, facts, "config.json", "base"), "base")
    note = None
    if config.get("quantization_config"):
        original = None if explicit else original_of_quantized(facts.card_data)
        if original is None or original == ref.name:
            from bot.sources import ResolvedSource

            check_not_quantized(config, ResolvedSource(ref=ref, path=Path(ref.name), repo_id=ref.name))
        note = (f"{named_by} names {ref.name}, a quantized model; merged into its 16-bit original {original} "
                f"(named by {ref.name}'s model card) instead. Pass --base to choose another")
        facts = _repo_facts(api, SourceRef(name=original), "base (16-bit original of a quantized base)")
        config = _read_json(_fetch(api, facts, "config.json", "base"), "base")
        if config.get("quantization_config"):
            raise IncompatibleBaseError(
                f"{ref.name}'s card names {original} as its original, but that is quantized too; pass a 16-bit "
                f"base with --base (likely {suggest_unquantized(original) or 'the original release'})")
    sizes = _known_sizes(api, facts, _download_files(api, facts, "base"))
    weight_sizes = [size for f, size in sizes.items() if f.endswith((".safetensors", ".bin"))]
    download = None if None in sizes.values() else sum(sizes.values())
    weights = None if None in weight_sizes else sum(weight_sizes)
    return _ResolvedBase(facts.ref, Pinned(facts.ref.name, facts.ref.revision, True), config, weights, download, note,
                         facts)


def preflight(spec: MergeSpec, *, api: HfApi | None = None, check_disk: bool = True,
              streamed: bool = False) -> Preflight:
    """Pin, check access, mergeability and quantization, and size the job; raises on any refusal.

    ``api``: the job's Hub client (by default one for ``spec.token``, made only if a source is on the Hub).
    ``streamed``: the merge will stream Hub to Hub (``bot.pipeline``), so the disk it needs is a few
    pieces and shards of scratch, not the base plus the output."""
    api_cache: list[Any] = []

    def api_factory():
        if not api_cache:
            api_cache.append(api or hub_client(token=spec.token))
        return api_cache[0]

    adapter = _resolve_adapter(api_factory, spec)
    acfg = adapter.config
    if not acfg.is_native:
        check_peft_can_merge(acfg)
    named_by = "--base" if spec.base is not None else "adapter_config.json"
    base = _resolve_base(api_factory, base_ref_for(spec, acfg), explicit=spec.base is not None, named_by=named_by)
    sizes_known = None not in (adapter.download_bytes, base.download_bytes, base.weight_bytes)
    output = estimate_output_bytes(base.weight_bytes or 0, base.config, spec.dtype)
    download = (adapter.download_bytes or 0) + (base.download_bytes or 0)
    if check_disk:
        from huggingface_hub import constants

        if streamed:
            from bot.pipeline import scratch_bytes

            shard = spec.max_shard_bytes or auto_shard_bytes(output)
            check_free_space(Path(spec.out).resolve().parent, min(download + output, scratch_bytes(shard, 0, output)),
                             what="the streamed merge's scratch files", hint="set --work-dir elsewhere")
        else:
            check_free_space(Path(constants.HF_HUB_CACHE), download, what="the download", hint="set HF_HOME elsewhere")
            check_free_space(Path(spec.out).resolve().parent, output, what="the merged model",
                             hint="choose another --out")
    facts = [f for f in (adapter.facts, base.facts) if f is not None]
    return Preflight(
        adapter=adapter.ref, base=base.ref, adapter_pin=adapter.pin, base_pin=base.pin,
        peft_type=acfg.peft_type, task_type=acfg.task_type, base_note=base.note,
        download_bytes=download, output_bytes=output,
        private=tuple(f.ref.name for f in facts if f.private), gated=tuple(f.ref.name for f in facts if f.gated),
        visibility_unknown=tuple(f.ref.name for f in facts if f.private is None or f.gated is None),
        sizes_known=sizes_known,
        asked_names=_asked_names(adapter, base),
    )


def _asked_names(adapter: _ResolvedAdapter, base: _ResolvedBase) -> tuple[str, str] | None:
    """(adapter, base) as typed, when the Hub spells either otherwise; None when both are as typed."""
    names = tuple(side.facts.asked if side.facts else side.pin.name for side in (adapter, base))
    return None if names == (adapter.pin.name, base.pin.name) else (names[0], names[1])
