"""``threadbudget info`` shows what was detected; ``threadbudget run`` runs a command within it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from ._apply import apply_plan
from ._detect import detect_budget
from ._info import collect_info, format_info
from ._plan import Plan, make_plan
from ._settings import (
    ENV_CONCURRENCY,
    ENV_CPUS,
    ENV_RESERVE,
    ENV_ROUNDING,
    ENV_THREADS,
    ENV_WAIT_POLICY,
    ENV_WORKERS,
    parse_positive_int,
    parse_reserve,
    parse_rounding,
    parse_wait_policy,
)
from ._version import __version__

__all__ = ["main"]


def _typed(parse: Callable[[object, str], object], name: str) -> Callable[[str], object]:
    def convert(text: str) -> object:
        try:
            return parse(text, f"--{name}")
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = name
    return convert


def _add_plan_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "budget and plan (each overrides its THREADBUDGET_* variable)"
    )
    group.add_argument("--cpus", type=_typed(parse_positive_int, "cpus"), help="use N CPUs")
    group.add_argument(
        "--rounding", type=_typed(parse_rounding, "rounding"), help="floor (default), ceil, nearest"
    )
    group.add_argument("--reserve", type=_typed(parse_reserve, "reserve"), help="CPUs held back")
    group.add_argument(
        "-c",
        "--concurrency",
        type=_typed(parse_positive_int, "concurrency"),
        help="in-flight tasks per process (default 1)",
    )
    group.add_argument(
        "-w",
        "--workers",
        type=_typed(parse_positive_int, "workers"),
        help="worker processes sharing the budget (default 1)",
    )
    group.add_argument(
        "--threads",
        type=_typed(parse_positive_int, "threads"),
        help="intra-op threads per task (default: derived)",
    )
    group.add_argument(
        "--wait-policy",
        type=_typed(parse_wait_policy, "wait-policy"),
        help="auto (default), passive, active",
    )


def _plan_from(args: argparse.Namespace) -> Plan:
    budget = detect_budget(cpus=args.cpus, rounding=args.rounding, reserve=args.reserve)
    return make_plan(
        budget,
        concurrency=args.concurrency,
        workers=args.workers,
        threads=args.threads,
        wait_policy=args.wait_policy,
    )


def _info(args: argparse.Namespace) -> int:
    plan = _plan_from(args)
    info = collect_info(plan, imports=args.imports)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True, default=str))
    else:
        print(format_info(info))
    return 0


def _run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print(
            "threadbudget run: no command given (usage: threadbudget run -- CMD ARGS...)",
            file=sys.stderr,
        )
        return 2
    plan = _plan_from(args)
    env = dict(os.environ)
    # Hand the same choices to a child that imports threadbudget itself.
    for name, value in (
        (ENV_CPUS, args.cpus),
        (ENV_ROUNDING, args.rounding),
        (ENV_RESERVE, args.reserve),
        (ENV_CONCURRENCY, args.concurrency),
        (ENV_WORKERS, args.workers),
        (ENV_THREADS, args.threads),
        (ENV_WAIT_POLICY, args.wait_policy),
    ):
        if value is not None:
            env[name] = str(value)
    applied = apply_plan(plan, runtime=False, environ=env)
    if not args.quiet:
        cpu = plan.cpu_budget
        why = f" ({cpu.binding})" if cpu is not None else ""
        kept = f", kept {len(applied.env_kept)} set by you" if applied.env_kept else ""
        print(
            f"threadbudget: budget {plan.budget}{why}; {plan.concurrency} task(s) x "
            f"{plan.threads} thread(s); set {len(applied.env_set)} variable(s){kept}",
            file=sys.stderr,
        )
    try:
        os.execvpe(command[0], command, env)
    except FileNotFoundError:
        print(f"threadbudget run: command not found: {command[0]}", file=sys.stderr)
        return 127
    except PermissionError:
        print(f"threadbudget run: permission denied: {command[0]}", file=sys.stderr)
        return 126
    return 0  # pragma: no cover - execvpe does not return


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="threadbudget",
        description="Detect the CPU budget of this process and keep native thread pools within it.",
    )
    parser.add_argument("--version", action="version", version=f"threadbudget {__version__}")
    commands = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="show the budget, the plan, env vars and loaded pools")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument(
        "-i",
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first so its pools show up (repeatable)",
    )
    _add_plan_options(info)
    info.set_defaults(handler=_info)

    run = commands.add_parser(
        "run",
        help="run a command with every native pool sized by the plan",
        description="Set the native thread variables for the plan, then exec CMD (no shell).",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no summary line on stderr")
    _add_plan_options(run)
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")
    run.set_defaults(handler=_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
