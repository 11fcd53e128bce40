"""python -m bot merge|push|run|batch ...: the terminal face of merge-bot.

Only this module prints. Known failures (``MergeBotError``) become one ``Error: ...``
line on stderr and their exit code; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from bot import __version__
from bot.errors import MergeBotError, OutputError, UsageError, redact
from bot.spec import DEVICES, DTYPES, MergeSpec, parse_shard_size, parse_source_ref

VERIFY_HELP = ("prove every merged tensor against PEFT's own layers (bounded memory), and compare the whole model "
               "end to end when it fits in memory (default: on; --no-verify skips it)")
SHARD_HELP = ("largest output shard, like 2GB or 500MB (default auto: an eighth of the model, between 128 MiB "
              "and 2 GiB)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bot", description="Merge PEFT adapters into their base models.")
    parser.add_argument("--version", action="version", version=f"merge-bot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="merge an adapter into its base and write a transformers model folder")
    merge.add_argument("adapter", help="adapter folder, or Hub repo id with optional @revision")
    merge.add_argument("--base", help="base model folder or Hub id (default: the one named in adapter_config.json)")
    merge.add_argument("--out", required=True, type=Path,
                       help="output folder, new or empty (see --overwrite); never an input folder, inside one or "
                            "around one, nor the current folder or home")
    merge.add_argument("--dtype", default="auto", help=f"output dtype: {', '.join(DTYPES)} (auto keeps the base's)")
    merge.add_argument("--device", default="auto", help=f"where to do the arithmetic: {', '.join(DEVICES)}")
    merge.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True, help=VERIFY_HELP)
    merge.add_argument("--overwrite", action="store_true",
                       help="replace --out when it holds a previous merge-bot output (a merge_report.json with a "
                            "fingerprint, and only files a merge writes): the whole folder is removed once the new "
                            "merge is complete; any other non-empty folder is refused")
    merge.add_argument("--max-shard-size", default="auto", help=SHARD_HELP)
    merge.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")

    push = sub.add_parser("push", help="publish a merged folder to the Hub (new repo or pull request, one commit)")
    push.add_argument("folder", type=Path, help="folder written by `python -m bot merge`")
    _add_target_args(push)

    run = sub.add_parser("run", help="resolve, merge and publish in one go")
    run.add_argument("adapter", help="adapter folder, or Hub repo id with optional @revision")
    _add_target_args(run)
    run.add_argument("--base", help="base model folder or Hub id (default: the one named in adapter_config.json)")
    run.add_argument("--dtype", default="auto", help=f"output dtype: {', '.join(DTYPES)} (auto keeps the base's)")
    run.add_argument("--device", default="auto", help=f"where to do the arithmetic: {', '.join(DEVICES)}")
    run.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True, help=VERIFY_HELP)
    run.add_argument("--max-shard-size", default="auto", help=SHARD_HELP)
    run.add_argument("--work-dir", type=Path, default=None, help="where to build the merged folder (default: temp)")
    run.add_argument("--requested-by", default=None, help=argparse.SUPPRESS)  # the bot's Jobs: credit who asked

    batch = sub.add_parser("batch", help="run the publish jobs listed in a YAML file")
    batch.add_argument("file", type=Path, help="YAML file: jobs: [{adapter, repo, pr, private, base, dtype}, ...]")
    batch.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    batch.add_argument("--work-dir", type=Path, default=None, help="where to build merged folders (default: temp)")
    batch.add_argument("--executor", choices=("local", "jobs"), default="local",
                       help="local: merge here, one after another; jobs: one Hugging Face Job per entry, on your "
                            "account (settings MERGEBOT_JOBS_IMAGE, _FLAVOR, _MAX_CONCURRENT, _TIMEOUT, _NAMESPACE)")

    serve = sub.add_parser("serve", help="run the self-service webhook endpoint and worker (settings from env)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    return parser


def _add_target_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", required=True, help="target Hub repo, OWNER/NAME")
    parser.add_argument("--pr", action="store_true", help="open a pull request on an existing repo")
    parser.add_argument("--private", action="store_true", help="create the new repo as private")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")


class _Progress:
    """A tqdm bar over tensors, created on the first callback."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar: Any = None  # a tqdm bar, made on the first update

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
    from bot.jobs import run_merge_plan
    from bot.merge import check_output_dir
    from bot.plan import resolve_plan
    from bot.preflight import preflight

    spec = MergeSpec(
        adapter=parse_source_ref(args.adapter, what="adapter"),
        base=parse_source_ref(args.base, what="base") if args.base else None,
        out=args.out,
        dtype=args.dtype,
        device=args.device,
        verify=args.verify,
        overwrite=args.overwrite,
        max_shard_bytes=parse_shard_size(args.max_shard_size),
        token=args.token or os.environ.get("HF_TOKEN") or None,
    )
    local_inputs = [Path(ref.name) for ref in (spec.adapter, spec.base) if ref is not None and ref.local]
    check_output_dir(Path(spec.out), overwrite=spec.overwrite, inputs=local_inputs)  # fail before any download
    checked = preflight(spec)
    if checked.base_note:
        print(f"note: {checked.base_note}", file=sys.stderr)
    plan = resolve_plan(checked.pinned_spec(spec))
    for notice in plan.notices:
        print(f"warning: {notice}", file=sys.stderr)
    progress = _Progress(enabled=not args.quiet and sys.stderr.isatty())
    try:
        result = run_merge_plan(plan, spec.verify, progress)
    finally:
        progress.close()
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    modules = ", ".join(f"{n} {k}" for k, n in result.module_counts.items() if k != "merged_modules") or "none"
    print(f"merged {plan.adapter.label} into {plan.base.label} -> {result.out_dir}")
    print(f"  modules: {modules}; tensors written: {result.tensors_written}; "
          f"time: {result.seconds:.1f}s; peak memory: {result.peak_rss_bytes / 2**20:.0f} MiB")
    if result.verification:
        from bot.verify import describe

        print(f"  verification {describe(result.verification)}")
    return 0


def hub_token(args: argparse.Namespace) -> str | None:
    """--token, else HF_TOKEN, else the stored login (huggingface_hub's own lookup)."""
    if getattr(args, "token", None):
        return args.token
    from huggingface_hub import get_token

    return get_token()


def run_push(args: argparse.Namespace) -> int:
    from bot.hub import PublishTarget, parse_repo_id
    from bot.jobs import publish_merged_folder

    if not args.folder.is_dir():
        raise UsageError(f"{args.folder} is not a folder; give the output folder of `python -m bot merge`")
    target = PublishTarget(parse_repo_id(args.repo), pr=args.pr, private=args.private)
    result = publish_merged_folder(args.folder, target, token=hub_token(args))
    print(result.describe())
    return 0


def _job_from_args(args: argparse.Namespace):
    from bot.jobs import PublishJob

    return PublishJob(adapter=args.adapter, repo=args.repo, pr=args.pr, private=args.private, base=args.base,
                      dtype=args.dtype, verify=args.verify, device=args.device, max_shard_size=args.max_shard_size,
                      requested_by=getattr(args, "requested_by", None))


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def run_run(args: argparse.Namespace) -> int:
    from bot.jobs import run_publish_job

    job = _job_from_args(args)
    result = run_publish_job(job, token=hub_token(args), work_dir=args.work_dir, on_event=_say)
    print(result.describe())
    return 0


def run_batch(args: argparse.Namespace) -> int:
    from bot.batch import load_batch, run_batch_jobs

    jobs = load_batch(args.file)
    if not jobs:
        print(f"{args.file}: no jobs; nothing to do")
        return 0
    if getattr(args, "executor", "local") == "jobs":
        from bot.batch import run_batch_as_jobs
        from bot.executors import JobsSettings

        outcomes = run_batch_as_jobs(jobs, token=hub_token(args), settings=JobsSettings.from_env(dict(os.environ)),
                                     endpoint=os.environ.get("HF_ENDPOINT") or None, on_event=_say)
    else:
        outcomes = run_batch_jobs(jobs, token=hub_token(args), work_dir=args.work_dir, on_event=_say)
    print(format_outcomes(outcomes))
    failed = sum(not o.ok for o in outcomes)
    if failed:
        print(f"Error: {failed} of {len(outcomes)} jobs failed", file=sys.stderr)
    return 1 if failed else 0


def format_outcomes(outcomes) -> str:
    rows = [("#", "adapter", "repo", "result", "detail")]
    rows += [(str(i + 1), o.job.adapter, o.job.repo, o.status, o.detail) for i, o in enumerate(outcomes)]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    return "\n".join("  ".join(r[c].ljust(widths[c]) for c in range(4)) + "  " + r[4] for r in rows)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from bot.service.webhook import WEBHOOK_PATH, create_app
    from bot.service.worker import service_from_env

    service = service_from_env()
    config = service.config
    logging.getLogger("bot").setLevel(logging.INFO)
    service.start()
    print(f"merge-bot serving POST http://{args.host}:{args.port}{WEBHOOK_PATH} as {service.bot_name}; "
          f"requests from {config.requests_repo_type} {config.requests_repo}; queue {config.db_path}", flush=True)
    try:
        uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning")
    finally:
        service.stop()
    return 0


COMMANDS = {"merge": run_merge, "push": run_push, "run": run_run, "batch": run_batch, "serve": run_serve}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    for level in (logging.WARNING, logging.ERROR):  # "warning: ...", as merge-bot's own lines read
        logging.addLevelName(level, logging.getLevelName(level).lower())
    token = getattr(args, "token", None) or os.environ.get("HF_TOKEN")
    try:
        return COMMANDS[args.command](args)
    except MergeBotError as e:
        print(f"Error: {redact(str(e), token)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("Error: interrupted; the step in progress left nothing behind (finished batch jobs stay published)",
              file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permissions: the user's environment, not our bug
        where = f" ({e.filename})" if e.filename else ""
        print(f"Error: {redact(f'{e.strerror or e}{where}', token)}", file=sys.stderr)
        return OutputError.exit_code
