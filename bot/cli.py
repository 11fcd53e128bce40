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
from bot.report import Verification
from bot.spec import DEVICES, DTYPES, MergeSpec, parse_shard_size, parse_source_ref
from bot.transport import hub_client

VERIFY_HELP = ("prove every merged tensor against PEFT's own layers (bounded memory), and compare the whole model "
               "end to end when it fits in memory (default: on; --no-verify skips it)")
SHARD_HELP = ("largest output shard, with a unit: 2GB, 500MB, 64KiB (at least 1KB); default: auto, a sixteenth of the "
              "model between 128 MiB and 2 GiB")
DTYPE_HELP = f"output dtype: {', '.join(DTYPES)}; default: auto, the base's stored dtype"
DEVICE_HELP = f"where the arithmetic runs: {', '.join(DEVICES)}; default: auto, CUDA when present, else the CPU"
TOKEN_HELP = "Hub token; default: HF_TOKEN, else the stored `hf auth login` token (never printed)"
QUIET_HELP = "no progress bars or progress lines (merge-bot's, huggingface_hub's and transformers'); warnings stay"
ADAPTER_HELP = ("adapter folder, or Hub repo: owner/name, owner/name@revision, or a pasted "
                "https://huggingface.co/owner/name[/tree/REV] address")
BASE_HELP = ("base model folder or Hub repo (same forms as ADAPTER); default: the base_model_name_or_path (and "
             "revision) in adapter_config.json")
EXIT_CODES = """exit codes:
  0 success                  5 bad adapter files            10 verification failed
  1 other known failure      6 adapter cannot be merged     11 no usable token
  2 bad usage                7 adapter does not fit base    12 target repo conflict
  3 source not found         8 output problem               13 Hub unavailable (retry later)
  4 access denied            9 publish failed              14 a Hugging Face Job failed
                                                           130 interrupted
  (the README's "Exit codes" table gives an example of each)"""
# Every key a batch job accepts (bot.jobs._BATCH_FIELDS; a test keeps the two in step).
BATCH_KEYS = """job keys (adapter and repo required):
  adapter         adapter folder or Hub repo (owner/name[@revision], or a huggingface.co URL)
  repo            target Hub repo, owner/name
  pr              true: open a pull request on an existing repo (default false)
  private         true: create the new repo as private (default false)
  base            base model folder or Hub repo (default: the one adapter_config.json names)
  dtype           auto | bfloat16 | float16 | float32 (default auto: the base's dtype)
  device          auto | cpu | cuda (default auto)
  verify          false: skip the proof against PEFT before publishing (default true)
  max_shard_size  like 2GB or 500MB (default auto)"""
# What `serve` reads from the environment (bot/service/config.py; a test keeps the two in step).
SERVE_ENV = """environment (required):
  HF_TOKEN                      the bot account's token (write access)
  MERGEBOT_WEBHOOK_SECRET       the secret set on the Hub webhook
  MERGEBOT_REQUESTS_REPO        repo whose discussions carry /merge requests: owner/name, or
                                spaces/owner/name, datasets/owner/name
environment (optional):
  MERGEBOT_NAMESPACE            where new repos go (default: the bot account)
  MERGEBOT_DB                   job queue database (default: /data/merge-bot/jobs.sqlite on a Space with
                                storage, else ~/.cache/merge-bot/jobs.sqlite)
  MERGEBOT_MAX_QUEUE            jobs waiting at most (default 50)
  MERGEBOT_MAX_QUEUED_PER_USER  jobs one user may have waiting (default 3)
  MERGEBOT_MAX_OUTPUT_GB        largest merged model accepted, in GB (default 150: a 70B model in bf16)
  MERGEBOT_VERIFY_MEMORY_GB     memory for the end-to-end check (default: 40% of available memory)
  MERGEBOT_EXECUTOR             local (default): merge in this process; jobs: one Hugging Face Job per merge
  MERGEBOT_JOBS_IMAGE           the Jobs' image, pinned (default: this Space's, hf.co/spaces/$SPACE_ID)
  MERGEBOT_JOBS_FLAVOR          Job hardware (default: chosen from the model's size)
  MERGEBOT_JOBS_MAX_CONCURRENT  Jobs running at once (default 4)
  MERGEBOT_JOBS_TIMEOUT         a Job's time limit, like 90m or 6h (default 6h)
  MERGEBOT_JOBS_NAMESPACE       account or org the Jobs run and are billed under (default: the bot account)
  MERGEBOT_JOBS_VERIFY          0: Jobs skip verification (default 1)
  MERGEBOT_JOBS_POLL_S          seconds between Job state polls (default 15)
  HF_ENDPOINT                   another Hub (default https://huggingface.co)"""


def prog_name() -> str:
    """``merge-bot`` when run as the installed command, else ``python -m bot``."""
    return "merge-bot" if Path(sys.argv[0]).name.startswith("merge-bot") else "python -m bot"


def _epilog(examples: list[str], *extra: str) -> str:
    return "\n\n".join(["examples:\n" + "\n".join(f"  {line}" for line in examples), *extra, EXIT_CODES])


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    prog = prog or prog_name()
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=formatter,
        description="Merge PEFT adapters into their base models, and publish the result on the Hugging Face Hub.",
        epilog=_epilog([f"{prog} merge someone/my-lora --out ./merged --verify",
                        f"{prog} run someone/my-lora --repo me/my-lora-merged",
                        f"{prog} merge --help    (each command has its own help)"]))
    parser.add_argument("--version", action="version", version=f"merge-bot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{merge,run,push,batch,serve}")
    merge = sub.add_parser(
        "merge", help="merge an adapter into its base and write a transformers model folder", formatter_class=formatter,
        description="Merge an adapter into its base model and write a plain transformers model folder.",
        epilog=_epilog([f"{prog} merge someone/llama-3-8b-lora@main --out ./merged --verify",
                        f"{prog} merge ./my-adapter --base ./my-base --out ./merged --dtype bfloat16"]))
    merge.add_argument("adapter", help=ADAPTER_HELP)
    merge.add_argument("--base", help=BASE_HELP)
    merge.add_argument("--out", required=True, type=Path,
                       help="output folder, new or empty (see --overwrite); never an input folder, inside one or "
                            "around one, nor the current folder or home")
    merge.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    merge.add_argument("--device", default="auto", help=DEVICE_HELP)
    merge.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True, help=VERIFY_HELP)
    merge.add_argument("--overwrite", action="store_true",
                       help="replace --out when it holds a previous merge-bot output (a merge_report.json with a "
                            "fingerprint, and only files a merge writes): the whole folder is removed once the new "
                            "merge is complete; any other non-empty folder is refused")
    merge.add_argument("--max-shard-size", default="auto", help=SHARD_HELP)
    merge.add_argument("--token", default=None, help=TOKEN_HELP)
    merge.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    run = sub.add_parser(
        "run", help="resolve, merge and publish in one go", formatter_class=formatter,
        description="Merge an adapter into its base and publish the result to a Hub repo in one commit (a new repo, "
                    "or a pull request with --pr). The merge streams Hub to Hub with a few shards of scratch disk, "
                    "and every shard is proved against PEFT before it is uploaded (--no-verify skips that).",
        epilog=_epilog([f"{prog} run someone/my-lora --repo me/my-lora-merged",
                        f"{prog} run https://huggingface.co/someone/my-lora/tree/v2 --repo someone/my-model --pr"]))
    run.add_argument("adapter", help=ADAPTER_HELP)
    _add_target_args(run)
    run.add_argument("--base", help=BASE_HELP)
    run.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    run.add_argument("--device", default="auto", help=DEVICE_HELP)
    run.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True, help=VERIFY_HELP)
    run.add_argument("--max-shard-size", default="auto", help=SHARD_HELP)
    run.add_argument("--work-dir", type=Path, default=None,
                     help="where to build the merged folder; default: the system temp folder")
    run.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    run.add_argument("--requested-by", default=None, help=argparse.SUPPRESS)  # the bot's Jobs: credit who asked

    push = sub.add_parser(
        "push", help="publish a merged folder to the Hub (new repo or pull request, one commit)",
        formatter_class=formatter,
        description="Publish a folder written by `merge` to a Hub repo, in one commit.",
        epilog=_epilog([f"{prog} push ./merged --repo me/my-lora-merged --private",
                        f"{prog} push ./merged --repo someone/their-model --pr"]))
    push.add_argument("folder", type=Path, help=f"folder written by `{prog} merge`")
    _add_target_args(push)
    push.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    batch = sub.add_parser(
        "batch", help="run the publish jobs listed in a YAML file", formatter_class=formatter,
        description="Run the publish jobs listed in a YAML file, in order. Every job is checked before the first one "
                    "starts; a failing job is reported and the others still run.",
        epilog=_epilog([f"{prog} batch jobs.yaml",
                        "jobs.yaml:  jobs:",
                        "              - {adapter: someone/lora-a, repo: me/lora-a-merged}",
                        "              - {adapter: someone/lora-b, repo: someone/model-b, pr: true, dtype: bfloat16}"],
                       BATCH_KEYS))
    batch.add_argument("file", type=Path, help="YAML file: jobs: [{adapter, repo, ...}, ...] (keys below)")
    batch.add_argument("--token", default=None, help=TOKEN_HELP)
    batch.add_argument("--work-dir", type=Path, default=None,
                       help="where to build merged folders; default: the system temp folder")
    batch.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    batch.add_argument("--executor", choices=("local", "jobs"), default="local",
                       help="local: merge here, one after another; jobs: one Hugging Face Job per entry, on your "
                            "account (settings MERGEBOT_JOBS_IMAGE, _FLAVOR, _MAX_CONCURRENT, _TIMEOUT, _NAMESPACE)")

    serve = sub.add_parser(
        "serve", help="run the self-service webhook endpoint and worker (settings from env)", formatter_class=formatter,
        description="Run the self-service bot: a webhook endpoint that answers `/merge owner/adapter` requests in "
                    "the discussions of a requests repo, and the worker that runs them.",
        epilog=_epilog([f"HF_TOKEN=hf_... MERGEBOT_WEBHOOK_SECRET=s3cret MERGEBOT_REQUESTS_REPO=me/merge-requests "
                        f"{prog} serve --port 8000"], SERVE_ENV))
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on; default: 127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="port; default: 8000")
    return parser


def _add_target_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", required=True, help="target Hub repo, owner/name")
    parser.add_argument("--pr", action="store_true", help="open a pull request on an existing repo (default: off)")
    parser.add_argument("--private", action="store_true", help="create the new repo as private (default: public)")
    parser.add_argument("--token", default=None, help=TOKEN_HELP)


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


class _PhaseBars:
    """``run``/``batch`` on a terminal: a tqdm bar per phase (download, merge, upload), each in bytes with
    its speed and ETA, fed by the job's progress sink (``bot.progress``). Event lines are written above
    the bars; the per-shard "uploaded ..." lines are left out, since the upload bar says it."""

    def __init__(self) -> None:
        import threading

        self.bars: dict[str, Any] = {}
        self._lock = threading.Lock()  # phases arrive from the fetch, merge and upload threads

    def phase(self, name: str, done: int, total: int) -> None:
        from tqdm import tqdm

        from bot.progress import PHASES

        with self._lock:
            bar = self.bars.get(name)
            if bar is not None and done < bar.n:  # the next job of a batch starts: fresh bars
                self._close()
                bar = None
            if bar is None:
                bar = tqdm(total=total, desc=f"{name:<8}", unit="B", unit_scale=True, unit_divisor=1024,
                           file=sys.stderr, position=PHASES.index(name), leave=False, dynamic_ncols=True)
                self.bars[name] = bar
            if bar.total != total:
                bar.total = total
            bar.update(done - bar.n)

    def event(self, message: str) -> None:
        if message.startswith("uploaded "):
            return
        from tqdm import tqdm

        with self._lock:
            tqdm.write(message, file=sys.stderr)

    def _close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars = {}

    def close(self) -> None:
        with self._lock:
            self._close()


def _phase_bars(args: argparse.Namespace) -> _PhaseBars | None:
    """Bars for a person at a terminal; none with --quiet or when stderr is a file or pipe (logs keep their
    one line per event)."""
    return None if getattr(args, "quiet", False) or not sys.stderr.isatty() else _PhaseBars()


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
    api = hub_client(token=spec.token)  # the merge's one Hub client, for pre-flight and the downloads
    checked = preflight(spec, api=api)
    if checked.base_note:
        print(f"note: {checked.base_note}", file=sys.stderr)
    plan = resolve_plan(checked.pinned_spec(spec), api=api)
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
    for line in verification_lines(result.verification):
        print(line)
    return 0


def verification_lines(verification: Verification | None) -> list[str]:
    """The numbers ``--verify`` measured, as ``merge`` and ``run`` both print them."""
    if not verification:
        return []
    from bot.verify import describe

    return [f"  verification {describe(verification)}"]


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
    result = publish_merged_folder(args.folder, target, api=hub_client(token=hub_token(args)))
    print(result.describe())
    return 0


def _job_from_args(args: argparse.Namespace):
    from bot.jobs import PublishJob

    return PublishJob(adapter=args.adapter, repo=args.repo, pr=args.pr, private=args.private, base=args.base,
                      dtype=args.dtype, verify=args.verify, device=args.device, max_shard_size=args.max_shard_size,
                      requested_by=getattr(args, "requested_by", None))


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _say_quietly(message: str) -> None:
    """--quiet: only what needs reading (warnings, notes, failures), no progress lines."""
    if message.startswith(("warning:", "note:")) or "failed" in message.split(":")[0]:
        _say(message)


def _events(args: argparse.Namespace):
    return _say_quietly if getattr(args, "quiet", False) else _say


def run_run(args: argparse.Namespace) -> int:
    from bot.jobs import run_publish_job

    job = _job_from_args(args)
    bars = _phase_bars(args)
    try:
        result = run_publish_job(job, api=hub_client(token=hub_token(args)), work_dir=args.work_dir,
                                 on_event=bars.event if bars else _events(args), progress=bars)
    finally:
        if bars is not None:
            bars.close()
    print(result.describe())
    for line in verification_lines(result.report.verification if result.report else None):
        print(line)
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
                                     endpoint=os.environ.get("HF_ENDPOINT") or None, on_event=_events(args))
    else:
        bars = _phase_bars(args)
        try:
            outcomes = run_batch_jobs(jobs, token=hub_token(args), work_dir=args.work_dir,
                                      on_event=bars.event if bars else _events(args), progress=bars)
        finally:
            if bars is not None:
                bars.close()
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


def interrupted_message(args: argparse.Namespace) -> str:
    """What Ctrl-C left behind, in the words of the command that was interrupted."""
    if args.command == "merge":
        return f"interrupted; {args.out} was left as it was (the unfinished merge beside it was removed)"
    if args.command in ("run", "push"):
        return f"interrupted; a publish is one final commit, so {args.repo} has all of it or none of it"
    if args.command == "batch":
        return "interrupted; finished jobs stay published, the job in progress committed nothing, the rest did not run"
    return "interrupted; the service stopped"


def silence_progress_bars() -> None:
    """--quiet: huggingface_hub's bars ("Fetching N files") and transformers' ("Loading weights") too.

    transformers reads huggingface_hub's switch when it is imported, and ``bot.fallback`` /
    ``bot.verify`` switch its bars off again explicitly; child processes inherit the variable."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        silence_progress_bars()
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
        print(f"Error: {redact(interrupted_message(args), token)}", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permissions: the user's environment, not our bug
        where = f" ({e.filename})" if e.filename else ""
        print(f"Error: {redact(f'{e.strerror or e}{where}', token)}", file=sys.stderr)
        return OutputError.exit_code
