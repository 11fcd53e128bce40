"""python -m bot merge ...: the terminal face of merge-bot.

Only this module prints. Known failures (``MergeBotError``) become one ``Error: ...``
line on stderr and their exit code; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from bot import __version__
from bot.errors import MergeBotError, OutputError, redact
from bot.spec import DEVICES, DTYPES, MergeSpec, parse_size, parse_source_ref


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bot", description="Merge PEFT adapters into their base models.")
    parser.add_argument("--version", action="version", version=f"merge-bot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="merge an adapter into its base and write a transformers model folder")
    merge.add_argument("adapter", help="adapter folder, or Hub repo id with optional @revision")
    merge.add_argument("--base", help="base model folder or Hub id (default: the one named in adapter_config.json)")
    merge.add_argument("--out", required=True, type=Path, help="output folder (must not exist, or be empty)")
    merge.add_argument("--dtype", default="auto", help=f"output dtype: {', '.join(DTYPES)} (auto keeps the base's)")
    merge.add_argument("--device", default="auto", help=f"where to do the arithmetic: {', '.join(DEVICES)}")
    merge.add_argument("--verify", action="store_true", help="compare merged logits with PEFT's unmerged model")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    merge.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    merge.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


class _Progress:
    """A tqdm bar over tensors, created on the first callback."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def __call__(self, done: int, total: int, what: str) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="tensor", desc="merging", file=sys.stderr, leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_merge(args: argparse.Namespace) -> int:
    from bot.merge import check_output_dir, execute_plan
    from bot.plan import resolve_plan

    spec = MergeSpec(
        adapter=parse_source_ref(args.adapter, what="adapter"),
        base=parse_source_ref(args.base, what="base") if args.base else None,
        out=args.out,
        dtype=args.dtype,
        device=args.device,
        verify=args.verify,
        overwrite=args.overwrite,
        max_shard_bytes=parse_size(args.max_shard_size),
        token=args.token or os.environ.get("HF_TOKEN") or None,
    )
    check_output_dir(Path(spec.out), overwrite=spec.overwrite)  # fail before any download
    plan = resolve_plan(spec)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if plan.fallback_reason:
        print(f"warning: {plan.fallback_reason}; using PEFT's in-memory merge (memory = whole model)", file=sys.stderr)
    verify = None
    if spec.verify:
        from bot.verify import verify_merge

        verify = verify_merge
    progress = _Progress(enabled=not args.quiet and sys.stderr.isatty())
    try:
        result = execute_plan(plan, on_progress=progress, verify=verify)
    finally:
        progress.close()
    modules = ", ".join(f"{n} {k}" for k, n in result.module_counts.items() if k != "merged_modules") or "none"
    print(f"merged {plan.adapter.label} into {plan.base.label} -> {result.out_dir}")
    print(f"  modules: {modules}; tensors written: {result.tensors_written}; "
          f"time: {result.seconds:.1f}s; peak memory: {result.peak_rss_bytes / 2**20:.0f} MiB")
    if result.verification:
        v = result.verification
        print(f"  verify: max |delta logits| = {v['max_abs_logit_delta']:.3g} (max |logit| {v['max_abs_logit']:.3g})")
    return 0


COMMANDS = {"merge": run_merge}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    token = getattr(args, "token", None) or os.environ.get("HF_TOKEN")
    try:
        return COMMANDS[args.command](args)
    except MergeBotError as e:
        print(f"Error: {redact(str(e), token)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("Error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permissions: the user's environment, not our bug
        where = f" ({e.filename})" if e.filename else ""
        print(f"Error: {redact(f'{e.strerror or e}{where}', token)}", file=sys.stderr)
        return OutputError.exit_code
