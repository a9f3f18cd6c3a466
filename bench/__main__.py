"""Command line: ``python -m bench run SCENARIO [--quick] [--repeat N] [--real] [--output FILE]``."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from . import scale, scenarios
from .peers import HAPROXY, REPO_ROOT
from .report import ScenarioResult, Target

log = logging.getLogger("bench")

SCENARIOS: dict[str, Callable[[scenarios.Context], Awaitable[ScenarioResult]]] = {
    "overhead": scenarios.overhead,
    "throughput": scenarios.throughput,
    "multiturn": scenarios.multiturn,
    "nosharing": scenarios.nosharing,
    "scale": scale.scale,
    "real": scenarios.real,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark lcha against direct access and HAProxy, all on 127.0.0.1.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one scenario, or all of them")
    run.add_argument("scenario", choices=[*SCENARIOS, "all"], help="scenario to run")
    run.add_argument(
        "--quick",
        action="store_true",
        help="tiny workloads (all scenarios in well under a minute); skips 'real' unless --real",
    )
    run.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="runs per peer; tables show medians (default: 1 with --quick, else 3)",
    )
    run.add_argument(
        "--real",
        action="store_true",
        help="with --quick, also run 'real' if a llama-server binary exists",
    )
    run.add_argument(
        "--output", type=Path, help="also write the report to this reStructuredText file"
    )
    run.add_argument(
        "--keep", action="store_true", help="keep the work directory with configs and process logs"
    )
    run.add_argument(
        "-v", "--verbose", action="store_true", help="log the harness's debug messages"
    )
    args = parser.parse_args(argv)

    if args.repeat is not None and args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    repeat = args.repeat or (1 if args.quick else 3)
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    try:
        return asyncio.run(_run(names, args, repeat))
    except KeyboardInterrupt:
        return 130


async def _run(names: list[str], args: argparse.Namespace, repeat: int) -> int:
    header = _header(repeat)
    print(header, flush=True)
    sections = [header]
    targets: list[Target] = []
    failed: list[str] = []
    work_dir = Path(tempfile.mkdtemp(prefix="lcha-bench-"))
    try:
        async with aiohttp.ClientSession(
            trust_env=False, timeout=aiohttp.ClientTimeout(total=30)
        ) as session:
            ctx = scenarios.Context(
                quick=args.quick, repeat=repeat, work_dir=work_dir, session=session, real=args.real
            )
            for name in names:
                try:
                    result = await SCENARIOS[name](ctx)
                # One failed scenario must not hide the results of the others.
                except Exception:  # noqa: BLE001
                    failed.append(name)
                    text = f"Scenario {name} failed:\n\n::\n\n" + _indent(traceback.format_exc())
                    print(text, file=sys.stderr, flush=True)
                    sections.append(text)
                    continue
                text = result.render()
                print(text, flush=True)
                sections.append(text)
                targets += result.targets
    finally:
        if args.keep:
            print(f"work directory kept: {work_dir}", file=sys.stderr)
        else:
            shutil.rmtree(work_dir, ignore_errors=True)

    summary = _summary(targets, failed)
    print(summary, flush=True)
    sections.append(summary)
    if args.output is not None:
        args.output.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return 1 if failed else 0


def _header(repeat: int) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%a %b %d %H:%M:%S UTC %Y")
    command = "python -m bench " + shlex.join(sys.argv[1:])
    lines = [
        "lcha benchmark",
        "==============",
        "",
        f"- date: {now}",
        f"- machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {_cpu_model()}",
        f"- command: ``{command}`` (medians of {repeat} run(s) per peer)",
        f"- Python {platform.python_version()}, aiohttp {aiohttp.__version__}, {_haproxy_version()}",
        f"- lcha: {_lcha_revision()}",
    ]
    return "\n".join(lines) + "\n"


def _summary(targets: list[Target], failed: list[str]) -> str:
    lines = ["Targets", "=======", ""]
    lines += [target.render() for target in targets] or ["- none measured"]
    if failed:
        lines += ["", f"Failed scenarios: {', '.join(failed)}"]
    return "\n".join(lines) + "\n"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _haproxy_version() -> str:
    try:
        completed = subprocess.run(
            [HAPROXY, "-v"], check=False, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"HAProxy not runnable ({exc})"
    first = completed.stdout.strip().splitlines()[:1]
    return first[0] if first else "HAProxy version unknown"


def _lcha_revision() -> str:
    """Return the checked-out commit and how many files under lcha/ differ from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            check=True,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        # --no-optional-locks stops git status from refreshing the index file,
        # so the harness never writes to the repository.
        changed = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--", "lcha"],
            check=True,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"revision unknown ({exc})"
    return f"commit {commit} with {len(changed)} changed or new files under lcha/"


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


if __name__ == "__main__":
    sys.exit(main())
