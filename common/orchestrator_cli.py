"""The orchestrator's command line: its flags, the checks that end it in one line before anything starts, and what it
runs (the dry run, or the service that routes with the table). Handed the table and `route` by orchestrator.py."""

import argparse
import logging
from datetime import datetime

from common import metrics
from common.dry_run import dry_run
from common.orchestration import Orchestration, Route
from common.progress import ATTEMPTS, Limits
from common.service import Service, serve
from common.settings import MESSAGE_STREAM, REVOKED, SETTINGS, setup_logging
from common.takeover import take_over
from common.workflow import Table, active, command_topics, group_for, problems, senders, stages

log = logging.getLogger("orchestrator")


def parse_flags(description: str, table: Table, default_stage: int) -> argparse.Namespace:
    """The orchestrator's flags, checked: a flag that means nothing here, or cannot be read, ends it in one line."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    choices = sorted({*stages(table), default_stage})
    parser.add_argument("--example", type=int, choices=choices,
                        help=f"the stage of the walkthrough the table routes at (default {default_stage})")
    parser.add_argument("--workflows", help=f"comma-separated subset of {','.join(table)} (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="preview routing of the recorded message_stream")
    parser.add_argument("--since", help="with --dry-run: only messages from this ISO time on (e.g. 2026-11-27T18:00)")
    parser.add_argument("--compare", type=int, choices=choices, help="with --dry-run: a second stage to compare")
    parser.add_argument("--json", action="store_true", help="with --dry-run: one JSON object")
    parser.add_argument("--step-timeout", type=float, metavar="SECONDS",
                        help="time limit of every step that reports back (default: each step's own, 5 s)")
    parser.add_argument("--attempts", type=int,
                        help=f"tries of such a step before escalating to a person (default {ATTEMPTS})")
    metrics.flag(parser)
    parser.add_argument("--no-transactions", action="store_true",
                        help="at least once instead of exactly once (for comparison in the benchmark)")
    args = parser.parse_args()
    args.defaulted, args.example = args.example is None, args.example or default_stage
    args.others = [stage for stage in choices if stage != args.example]  # (said when the default is taken)
    args.limits = Limits(args.step_timeout, args.attempts or ATTEMPTS, SETTINGS.state_retention_s)
    args.workflows = check_flags(args, table)
    return args


def check_flags(args: argparse.Namespace, table: Table) -> set[str]:
    """The workflows this orchestrator runs; a flag that means nothing here, or cannot be read, or a table it cannot
    follow, ends it in one line (the flags first: they are the user's at hand)."""
    workflows = set(args.workflows.split(",")) if args.workflows is not None else set(table)
    if not workflows or not workflows <= set(table):
        refuse(f"--workflows takes a comma-separated subset of {','.join(table)}, not {args.workflows!r}")
    refuse_meaningless(args)
    refuse_unreadable(args)
    if wrong := problems(table):
        refuse(wrong[0] + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    if not args.dry_run:
        refuse_short_retention(table, args, SETTINGS.state_retention_s)
    later = {w: table[w].from_stage for w in sorted(workflows - active(table, workflows, args.example))}
    if not args.dry_run and len(later) == len(workflows):
        refuse(f"no workflow of {','.join(sorted(workflows))} runs at example {args.example} ("
               f"{', '.join(f'{w} starts at {n}' for w, n in later.items())}); give --example "
               f"{min(later.values())} or more")
    return workflows


def refuse_meaningless(args: argparse.Namespace) -> None:
    """End the orchestrator in one line if given flags of the other mode (the dry run's, or routing's)."""
    flags = {"--since": args.since, "--compare": args.compare, "--json": args.json} if not args.dry_run else {
        "--step-timeout": args.step_timeout, "--attempts": args.attempts, "--no-transactions": args.no_transactions}
    if meaningless := [flag for flag, value in flags.items() if value]:
        refuse(f"{', '.join(meaningless)} {'is' if len(meaningless) == 1 else 'are'} "
               f"{'not ' if args.dry_run else ''}for --dry-run{'' if args.dry_run else ' only'}; nothing was started")


def refuse_unreadable(args: argparse.Namespace) -> None:
    """End the orchestrator in one line if a value cannot be what its flag means."""
    if (args.attempts is not None and args.attempts < 1) or (args.step_timeout is not None and args.step_timeout <= 0):
        refuse("--attempts must be at least 1 and --step-timeout above 0")
    try:
        datetime.fromisoformat(args.since or "2000-01-01")
    except ValueError:
        refuse(f"--since takes a date and time, e.g. 2026-11-27T18:00 (local time), not {args.since!r}")


def refuse_short_retention(table: Table, args: argparse.Namespace, retention_s: float) -> None:
    """End the orchestrator in one line if its state would expire while a workflow still runs: its steps' time
    limits times their attempts, one after another, plus a minute for the last timer to fire and be committed."""
    limits = args.limits
    longest = max((sum(limits.of(step) or 0 for step in workflow.steps if step.tracked and step.from_stage <= args.example)
                   for workflow in table.values()), default=0) * limits.attempts
    if longest and retention_s < longest + 60:
        refuse(f"STATE_RETENTION_S={retention_s:g} is shorter than a workflow may run here ({longest:g} s: its steps' "
               f"time limits times {limits.attempts} attempts), plus a minute: its state would expire while it runs. "
               f"Give STATE_RETENTION_S={longest + 60:g} or more (the default is a week), or shorter time limits")


def refuse(why: str):
    raise SystemExit(f"orchestrator: {why}")


def run_orchestrator(description: str, table: Table, route: Route, default_stage: int = 1) -> None:
    """Parse the flags, then preview (--dry-run) or route: exactly once, the commands routed from a batch and its
    offsets and workflow state in one Kafka transaction. It reads only the writers of the workflows active at its
    stage (--example), each allowed only its own message types, and fires only their time limits (a later stage's
    events, and a workflow of a later stage still in flight, wait for a stage that runs them). It refuses to start
    beside an orchestrator of other but overlapping workflows. `default_stage`: the stage when --example is not
    given (the stages are those the table's workflows and steps start at)."""
    args = parse_flags(description, table, default_stage)
    setup_logging()
    if args.dry_run:
        return dry_run(table, route, args, args.workflows)
    running = active(table, args.workflows, args.example)
    log.info("routing table: example %d%s, workflows %s", args.example,
             f" (the default; --example {' or '.join(map(str, args.others))} for another)" if args.defaulted and args.others
             else "", ", ".join(sorted(running)))
    orchestration = Orchestration(table, route, args.example, args.limits, running)
    accepts = senders(table, running)  # (a later stage's events wait in Kafka until a stage that routes them)
    exactly_once = not args.no_transactions
    serve(Service("orchestrator", list(accepts), orchestration.handle, (*command_topics(table), MESSAGE_STREAM, REVOKED),
                  exactly_once=exactly_once, keeps_state=True, group=group_for(table, args.workflows), accepts=accepts,
                  timer=orchestration.timer, open_count=orchestration.open_workflows, metrics_port=args.metrics_port,
                  doing="route",
                  before_start=lambda admin, stop: take_over(admin, stop, table, args.workflows, list(accepts),
                                                             exactly_once)))
