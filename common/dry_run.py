"""The orchestrator's dry run: the recorded message_stream routed through the table at a stage (and a second one, to
compare), counted per event type and output topic, and the workflows in flight that a restart would meet (each
keeps the routing of the stage it started under). Produces and commits nothing; joins no group."""

import json
from collections import Counter, defaultdict
from datetime import datetime

from common.changelog import latest_entries
from common.clients import read_all
from common.messages import DeadLetter, parse
from common.settings import DEAD_LETTER, MESSAGE_STREAM, SETTINGS, written_by
from common.orchestration import WORKFLOW, is_workflow
from common.workflow import EXPIRED, REQUESTS, SOURCE, Table, active, orchestrator_groups, owns, senders


WAITS = "(waits in Kafka: read from a later example)"


def preview(records, table: Table, route, stage: int, workflows: set[str]) -> dict[str, Counter]:
    """What route() would emit for recorded events: event type -> Counter of output topics (nothing is sent). A
    writer of a workflow that starts at a later stage is not read at this one: its events wait in Kafka."""
    emitted: dict[str, Counter] = defaultdict(Counter)
    accepts = senders(table, workflows)
    read = senders(table, active(table, workflows, stage))
    for record in records:
        member = record.topic.removeprefix(SETTINGS.topic_prefix)
        if member == written_by(MESSAGE_STREAM, SOURCE):  # its own timeouts and finished workflows
            continue
        if member not in accepts:  # a writer of another orchestrator's workflows
            emitted["(another orchestrator)"]["-"] += 1
            continue
        try:
            event = parse(record.value)
        except DeadLetter:
            emitted["(invalid)"][DEAD_LETTER if member in read else WAITS] += 1
            continue
        emitted[event.type].update(outputs(event, route, stage, table, workflows, read.get(member)))
    return emitted


def outputs(event, route, stage: int, table: Table, workflows: set[str], allowed: frozenset | None) -> list[str]:
    """Where one event would go: the topics route() sends to, or why nothing is sent."""
    if allowed is None:
        return [WAITS]
    if event.type not in allowed or not owns(table, event.type, workflows):
        return [DEAD_LETTER if event.type not in allowed else "(another orchestrator)"]
    if event.type in REQUESTS:  # (granted or refused by the workflow's state then: the engine's, not route()'s)
        return ["(a person's request: answered by the orchestrator)"]
    if event.type == EXPIRED:  # (the engine's too: kept beside its step, never routed)
        return ["(a command not acted on in time: kept beside its step)"]
    try:
        return [name for name, *_ in route(event, stage)] or ["(nothing: step done)"]
    except DeadLetter:
        return [DEAD_LETTER]


def in_flight(table: Table, workflows: set[str], settings=SETTINGS) -> Counter:
    """The running workflows of `workflows` in the orchestrators' state: (workflow, the stage it started under) -> how
    many. A restart at another stage meets them, and routes each on at its own stage."""
    running = Counter()
    for (_, key), (_, _, _, value) in latest_entries(orchestrator_groups(table), settings).items():
        if key.startswith(WORKFLOW.encode()) and is_workflow(table, value) and value["state"] == "running" \
                and value["type"] in workflows:
            running[(value["type"], value["stage"])] += 1
    return running


def dry_run(table: Table, route, args, workflows: set[str]) -> None:
    """Route the recorded message_stream through the table (and a second stage, to compare) and print the counts,
    and which workflows in flight a restart would meet."""
    since = datetime.fromisoformat(args.since).timestamp() * 1000 if args.since else 0
    records = [r for r in read_all(MESSAGE_STREAM) if r.timestamp >= since]
    stages = {f"example {args.example}": preview(records, table, route, args.example, workflows)}
    if args.compare:
        stages[f"example {args.compare}"] = preview(records, table, route, args.compare, workflows)
    running = in_flight(table, workflows)
    if args.json:
        print(json.dumps({**{stage: {t: dict(c) for t, c in counts.items()} for stage, counts in stages.items()},
                          "in_flight": [{"workflow": name, "stage": stage, "count": n}
                                        for (name, stage), n in sorted(running.items())]}, sort_keys=True))
    else:
        print_counts(stages, len(records), compared=bool(args.compare))
        print_in_flight(running, args.example)


def print_in_flight(running: Counter, stage: int) -> None:
    """Which workflows in flight a restart at `stage` would meet, and that each keeps its own stage's routing."""
    if not running:
        print("in flight: no workflow is running: a restart changes the path of none")
        return
    print(f"in flight: {sum(running.values())} running workflows, each routed on at the stage it started under "
          f"(a restart at example {stage} changes the path of new workflows only):")
    for (name, started), n in sorted(running.items()):
        print(f"  {name:<28} {n} started under example {started}" + (" (as this one)" if started == stage else ""))


def print_counts(stages: dict[str, dict[str, Counter]], recorded: int, compared: bool) -> None:
    """The counts of each stage, an event type a line, and which change between the two stages compared."""
    print(f"dry run over {recorded} recorded messages on message_stream: nothing is produced or committed")
    for event_type in sorted({t for counts in stages.values() for t in counts}):
        for stage, counts in stages.items():
            outputs = ", ".join(f"{n} {name}" for name, n in sorted(counts[event_type].items())) or "-"
            print(f"  {event_type:<28} {stage}: {outputs}")
        if compared and len({str(sorted(c[event_type].items())) for c in stages.values()}) > 1:
            print(f"  {'':<28} ^ changes between the two stages")
