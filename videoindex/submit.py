"""Submit an indexing job to a Ray cluster (Ray Jobs API), and the job's own entrypoint.

Client side, ``submit_job``: validate the config here, ship the project and the config, print the
submission id and the output, optionally follow the logs. Job side, ``job_main`` (``jobs/index_job.py``,
or ``python -m videoindex.submit`` where videoindex is installed, not shipped): load the config, reach
the output, ``job.run.run_job``, exit with its code.

How the config travels: a local file's text goes in the job's runtime_env as ``VIDEOINDEX_JOB_CONFIG``
and the entrypoint names it ``env:VIDEOINDEX_JOB_CONFIG``. The job runs exactly the bytes validated at
submission, wherever the file lies (outside the working_dir, git-ignored, edited since) and without a
checkout. A URI (s3://...) is passed as is and read on the cluster. runtime_env shows on the dashboard:
credentials come from the nodes (instance roles, environment), never from configs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

CONFIG_ENV = "VIDEOINDEX_JOB_CONFIG"
ENTRY_SCRIPT = "jobs/index_job.py"
# Paths (gitignore syntax) never shipped with the working_dir; Ray also honours the checkout's .gitignore.
WORKING_DIR_EXCLUDES = [".git", ".venv", "venv", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache",
                        ".ci", "build", "dist", "tests/data", "**/*.parquet", "videoindex-demo", "demo-output"]  # fmt: skip
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXIT_OK, EXIT_VIDEOS_FAILED, EXIT_JOB_FAILED = 0, 1, 2


class SubmitError(RuntimeError):
    """The job could not be submitted or followed; the message says why."""


@dataclass(frozen=True)
class SubmitResult:
    submission_id: str
    address: str
    output_uri: str
    status: str | None = None  # final Ray job status, when followed
    exit_code: int | None = None  # 0 ok, 1 some videos failed, 2 job failed; None when not followed


def find_checkout() -> Path | None:
    """The repository root when videoindex runs from a checkout (it has jobs/index_job.py), else None."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / ENTRY_SCRIPT).is_file() and (root / "pyproject.toml").is_file() else None


def parse_sets(pairs: Sequence[str] | None) -> dict[str, Any]:
    """``section.key=value`` pairs to config overrides; values are YAML scalars (true, 4, null, text)."""
    overrides: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or "." not in key:
            from videoindex.config import ConfigError

            raise ConfigError(f"--set {pair!r}: use SECTION.KEY=VALUE, e.g. execution.batch_size=32")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _runtime_env(config: Any, text: str | None, working_dir: Path | None, options: dict[str, Any]) -> dict:
    env_vars = {str(k): str(v) for k, v in (options.get("extra_env") or {}).items()}
    if text is not None:
        env_vars[CONFIG_ENV] = text
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if working_dir is not None:
        excludes = list(WORKING_DIR_EXCLUDES)
        output = Path(config.output.uri.removeprefix("file://"))
        if not _is_uri(config.output.uri) and output.resolve().is_relative_to(working_dir.resolve()):
            excludes.append("/" + output.resolve().relative_to(working_dir.resolve()).as_posix())
        runtime_env.update(working_dir=str(working_dir), excludes=excludes)
    if options.get("pip"):
        runtime_env["pip"] = list(options["pip"])
    return runtime_env


def _refuse_unsafe(config: Any) -> None:
    """Refuse outputs that would vanish with the job's temporary working_dir; warn of shown secrets."""
    from videoindex.config import redact

    if not _is_uri(config.output.uri) and not Path(config.output.uri.removeprefix("file://")).is_absolute():
        raise SubmitError(f"output.uri {config.output.uri!r} is relative: it would land in the job's temporary "
                          "copy of the working_dir; use an absolute path the cluster shares, or a URI")  # fmt: skip
    if any(redact(o) != dict(o) for o in (config.input.storage_options, config.output.storage_options)):
        print("videoindex submit: warning: the config holds credentials in storage_options; the job's runtime_env "
              "shows them on the dashboard. Prefer instance roles / the nodes' environment.", file=sys.stderr)  # fmt: skip


def _client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, ValueError, RuntimeError: all mean the same to a user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SubmitError(f"cannot reach the Ray dashboard at {address}: {first}") from None


def submit_job(
    address: str,
    config_path: str,
    *,
    follow: bool = False,
    working_dir: str | None = None,
    pip: list[str] | None = None,
    extra_env: dict | None = None,
    job_args: Sequence[str] = (),
) -> SubmitResult:
    """Submit ``config_path`` to the Ray cluster at ``address`` (the dashboard, http://HEAD:8265).

    Ships ``working_dir`` (default: this checkout; none when ``pip`` packages are given, e.g. an
    installed wheel). ``job_args`` go to the entrypoint (``--resume``, ``--retry-failed``,
    ``--set k=v``). With ``follow``, streams the logs and waits for the final status.
    """
    from videoindex.config import load_config

    entry_args, unknown = _job_parser().parse_known_args([config_path, *job_args])
    if unknown:  # here, not minutes later on the cluster
        raise SubmitError(f"unknown job arguments {unknown}: use --resume, --retry-failed, --set K=V")
    config = load_config(config_path, parse_sets(entry_args.set))
    _refuse_unsafe(config)
    text = None if _is_uri(config_path) else Path(config_path.removeprefix("file://")).read_text()
    root = Path(working_dir) if working_dir else (None if pip else find_checkout())
    in_checkout = root is not None and (root / ENTRY_SCRIPT).is_file()
    command = ["python", ENTRY_SCRIPT] if in_checkout else ["python", "-m", "videoindex.submit"]
    entrypoint = shlex.join([*command, f"env:{CONFIG_ENV}" if text is not None else config_path, *job_args])
    runtime_env = _runtime_env(config, text, root, {"pip": pip, "extra_env": extra_env})
    client = _client(address)
    metadata = {"videoindex_config": str(config_path), "output": config.output.uri}
    try:
        submission_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata)
    except Exception as exc:
        raise SubmitError(f"the cluster at {address} refused the job: {exc}") from None
    print(f"submitted {submission_id} to {address}")
    print(f"  config  {config_path}\n  output  {config.output.uri}")
    print(f"  logs    ray job logs --address {address} --follow {submission_id}")
    if not follow:
        return SubmitResult(submission_id, address, config.output.uri)
    status, code = wait_job(client, submission_id, stream_logs=True)
    return SubmitResult(submission_id, address, config.output.uri, status, code)


async def _tail(client: Any, submission_id: str) -> None:
    async for lines in client.tail_job_logs(submission_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def wait_job(client: Any, submission_id: str, *, stream_logs: bool, poll_s: float = 1.0) -> tuple[str, int]:
    """Wait for a job's final status (streaming its logs, or printing status changes).

    Returns the status and the videoindex exit code: 0 SUCCEEDED; 1 when the job's driver exited 1
    (some videos failed); 2 otherwise (job failed, stopped, or its driver never ran).
    """
    if stream_logs:
        try:
            asyncio.run(_tail(client, submission_id))
        except Exception as exc:  # the log stream is a convenience; the status below is the truth
            log.warning("log stream of %s ended early (%s); polling its status", submission_id, exc)
    last = None
    while True:
        info = client.get_job_info(submission_id)
        status = str(getattr(info.status, "value", info.status))
        if status != last and not stream_logs:
            print(f"{submission_id}: {status}")
        last = status
        if status in TERMINAL:
            break
        time.sleep(poll_s)
    if status == "SUCCEEDED":
        code = EXIT_OK
    else:
        code = EXIT_VIDEOS_FAILED if info.driver_exit_code == EXIT_VIDEOS_FAILED else EXIT_JOB_FAILED
    reason = (info.message or "").strip().splitlines()[:1] if code else []
    print(f"job {submission_id} {status}" + "".join(f": {line}" for line in reason))
    return status, code


def job_status(address: str, submission_id: str) -> dict[str, Any]:
    """A submitted job's status, from the Ray dashboard (``videoindex status ID --address ...``)."""
    client = _client(address)
    try:
        info = client.get_job_info(submission_id)
    except Exception as exc:
        raise SubmitError(f"no job {submission_id} at {address}: {exc}") from None
    metadata = info.metadata or {}
    return {
        "submission_id": submission_id,
        "status": str(getattr(info.status, "value", info.status)),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "driver_exit_code": info.driver_exit_code,
        "start_time": _iso(info.start_time),
        "end_time": _iso(info.end_time),
        "config": metadata.get("videoindex_config"),
        "output": metadata.get("output"),
        "logs": f"ray job logs --address {address} {submission_id}",
    }


def _iso(ms: int | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000)) if ms else None


def register_submit_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("submit", help="submit a job config to a Ray cluster (Ray Jobs API)")
    p.add_argument(
        "config", help="YAML job config: a local file (sent with the job) or a URI the cluster reads"
    )
    p.add_argument(
        "--address", help="Ray dashboard, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS)"
    )
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    p.add_argument("--no-wait", action="store_true", help="return right after submission")
    p.add_argument("--working-dir", help="directory shipped to the cluster (default: this checkout)")
    p.add_argument("--pip", action="append", metavar="REQ", help="pip packages for the job (repeatable)")
    p.add_argument("--env", action="append", metavar="KEY=VALUE", help="environment of the job (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the job already in the config's output")
    p.add_argument(
        "--retry-failed", action="store_true", help="also re-index failed videos of retryable types"
    )
    p.add_argument(
        "--update", action="store_true", help="index only what changed in the input (input.update=true)"
    )
    p.add_argument(
        "--allow-mass-delete", action="store_true", help="with --update: allow deleting over half the index"
    )
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="config override (repeatable)")  # fmt: skip


def run_submit_cli(args: argparse.Namespace) -> int:
    from videoindex.config import ConfigError

    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    job_args = [*(["--resume"] if args.resume else []), *(["--retry-failed"] if args.retry_failed else [])]
    job_args += ["--set", "input.update=true"] if args.update else []
    job_args += ["--set", "input.allow_mass_delete=true"] if args.allow_mass_delete else []
    for pair in args.set or []:
        job_args += ["--set", pair]
    try:
        if not address:
            raise SubmitError("no cluster given: use --address http://HEAD:8265")
        if any("=" not in pair for pair in args.env or []):
            raise SubmitError(f"--env {args.env}: use KEY=VALUE")
        env = dict(pair.split("=", 1) for pair in args.env or [])
        result = submit_job(address, args.config, follow=args.follow and not args.no_wait,
                            working_dir=args.working_dir, pip=args.pip, extra_env=env, job_args=job_args)  # fmt: skip
        if result.exit_code is not None or args.no_wait:
            return result.exit_code or EXIT_OK
        return wait_job(_client(address), result.submission_id, stream_logs=False)[1]
    except (SubmitError, ConfigError, FileNotFoundError) as exc:
        print(f"videoindex submit: {exc}", file=sys.stderr)
        return EXIT_JOB_FAILED


def _load_job_config(ref: str, overrides: dict[str, Any]) -> Any:
    from videoindex.config import load_config

    if not ref.startswith("env:"):
        return load_config(ref, overrides)
    text = os.environ.get(ref[4:])
    if text is None:
        raise FileNotFoundError(f"{ref}: environment variable {ref[4:]} is not set in the job")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="videoindex-job-") as fh:
        fh.write(text)
        fh.flush()
        return load_config(fh.name, overrides)


def _check_output(config: Any) -> None:
    """Reach the output before loading the model, so a wrong bucket or endpoint fails in seconds.

    One try, no retry helper: a job that has not started has nothing to protect by waiting.
    """
    from videoindex import storage

    uri = config.output.uri
    fs, root = storage.filesystem(uri, config.output.storage_options)
    if storage.is_local(fs):
        fs.makedirs(root, exist_ok=True)
        if not os.access(root, os.W_OK):
            raise PermissionError(f"output {uri} is not writable")
        return
    bucket = root.strip("/").split("/")[0]
    try:
        fs.info(bucket)
    except FileNotFoundError:
        raise FileNotFoundError(f"output {uri}: bucket {bucket!r} does not exist (or these credentials cannot see it)") from None  # fmt: skip
    except Exception as exc:
        raise ConnectionError(f"output {uri} is not reachable: {type(exc).__name__}: {exc}") from None


def _expected(exc: Exception) -> bool:
    from videoindex.format.jobrecord import JobMismatchError
    from videoindex.stages.checkpoint import ModelLoadError
    from videoindex.stages.plan import PlanError

    return isinstance(exc, (OSError, ValueError, JobMismatchError, ModelLoadError, PlanError))


def _job_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="index_job", description="Run one videoindex job on this Ray cluster.")
    p.add_argument("config", help="job config: path, URI (s3://...), or env:NAME (YAML text in $NAME)")
    p.add_argument("--resume", action="store_true", help="the output must already hold this job")
    p.add_argument("--retry-failed", action="store_true", help="re-index retryable failed videos")
    p.add_argument("--retry-all-errors", action="store_true", help="re-index failed videos of every type")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="config override")
    return p


def job_main(argv: Sequence[str] | None = None) -> int:
    """The job entrypoint: CONFIG (path, URI, or env:NAME) [--resume] [--retry-failed] [--set k=v]."""
    args = _job_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        config = _load_job_config(args.config, parse_sets(args.set))
        log.info("job config %s: input %s -> output %s", args.config, config.input.uri, config.output.uri)
        _check_output(config)
    except Exception as exc:
        log.error("videoindex job cannot start: %s: %s", type(exc).__name__, exc)
        return EXIT_JOB_FAILED
    from videoindex.job.run import run_job

    try:
        result = run_job(config, resume=args.resume, retry_failed=args.retry_failed,
                         retry_all_errors=args.retry_all_errors, progress=False)  # fmt: skip
    except Exception as exc:  # the reason goes to the job's log; a traceback only for the unexpected
        log.error("videoindex job failed: %s: %s", type(exc).__name__, exc, exc_info=not _expected(exc))
        return EXIT_JOB_FAILED
    log.info("videoindex job finished with exit code %d: %s", result.exit_code, result.summary)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(job_main())
