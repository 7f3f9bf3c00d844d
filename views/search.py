"""Finding many workflows in the orchestrators' state: a filter (a beginning of the id, the workflow's type, its state,
an entity its payloads name — a sensor, a zone, a unit —, a time range of its start), an index over what the views
already follow (a few facts per workflow, made again only for a workflow whose entry changed), and pages of the
matches, newest first. workflows.py list and the console's search ask it; a bulk cancel or retry acts on what it
finds. No Kafka."""

from datetime import datetime, timezone
from typing import NamedTuple

import msgspec

from common import STATES

SHOWN = (*STATES, "stuck")  # a state to filter by: the orchestrator's, or stuck (running past the SLA)
BEFORE = ("waiting", "dead_lettered")  # a workflow no orchestrator has state of: its first event waits in Kafka, or
# is a dead letter (the console shows them, from the topics)
PER_PAGE = 50
LAST = 253402300799.0  # 9999-12-31T23:59:59Z, the last moment a time filter may name


class BadFilter(ValueError):
    """A filter that cannot be asked as given (the text says which part and what it takes)."""


class Facts(NamedTuple):
    """What a search asks of one workflow (kept in the index: its size is its memory per workflow)."""
    started_at: float
    workflow_id: str
    type: str
    state: str
    entities: frozenset[str]


class Filter(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What to find; every part given must hold (None: any)."""
    id: str | None = None           # a beginning of the workflow's id
    type: str | None = None         # a workflow of the table (security, unit, ...)
    state: str | None = None        # one of SHOWN
    entity: str | None = None       # a value its key or a command's payload holds: sensor-3, zone-1, unit-7
    since: float | None = None      # started at or after (epoch seconds)
    until: float | None = None      # started before

    @classmethod
    def of(cls, asked: dict, types: list[str]) -> "Filter":
        """A filter from a query's or a request's words (times as ISO 8601 or epoch seconds); BadFilter if one is
        wrong."""
        unknown = set(asked) - set(cls.__struct_fields__)
        if unknown:
            raise BadFilter(f"no such filter: {', '.join(sorted(unknown))} (id, type, state, entity, since, until)")
        if wrong := [name for name, value in asked.items() if not isinstance(value, str | int | float | None)]:
            raise BadFilter(f"{wrong[0]}: a text or a number")
        given = {name: str(value).strip() for name, value in asked.items() if value not in (None, "")}
        if given.get("type") not in (None, *types):
            raise BadFilter(f"type: one of {', '.join(types)}")
        if given.get("state") not in (None, *SHOWN, *BEFORE):
            raise BadFilter(f"state: one of {', '.join((*SHOWN, *BEFORE))}")
        if long := [name for name, value in given.items() if len(value) > 200]:
            raise BadFilter(f"{long[0]}: at most 200 characters")
        times = {name: moment(name, given[name]) for name in ("since", "until") if name in given}
        if times.get("since", 0) > times.get("until", LAST):
            raise BadFilter("since: after until (nothing starts between them)")
        return cls(**{**given, **times})

    def holds(self, facts: Facts, stuck: bool) -> bool:
        return ((self.id is None or facts.workflow_id.startswith(self.id)) and
                (self.type is None or facts.type == self.type) and
                (self.state is None or (stuck if self.state == "stuck" else facts.state == self.state)) and
                (self.entity is None or self.entity in facts.entities) and
                (self.since is None or facts.started_at >= self.since) and
                (self.until is None or facts.started_at < self.until))


def moment(name: str, said: str) -> float:
    """Epoch seconds from ISO 8601 (a time without a zone is UTC) or from epoch seconds."""
    try:
        seconds = float(said)
    except ValueError:
        try:
            at = datetime.fromisoformat(said)
        except ValueError:
            raise BadFilter(f"{name}: {said!r} is not a time (ISO 8601, as 2026-12-08T10:00:00Z, or epoch "
                            "seconds)") from None
        return (at if at.tzinfo else at.replace(tzinfo=timezone.utc)).timestamp()
    if not 0 <= seconds <= LAST:  # (nan and inf too)
        raise BadFilter(f"{name}: {said!r} is not a time in epoch seconds" +
                        (" (milliseconds? divide by 1000)" if LAST < seconds < LAST * 1000 else ""))
    return seconds


def facts_of(workflow_id: str, workflow: dict) -> Facts:
    """A workflow's facts: the entities are its key and every short text its steps' commands' payloads hold."""
    entities = {workflow.get("key") or ""}
    for step in workflow["steps"].values():
        for value in step.get("command", {}).get("payload", {}).values():
            if isinstance(value, str) and len(value) <= 64:
                entities.add(value)
    entities.discard("")
    return Facts(workflow["started_at"], workflow_id, workflow["type"], workflow["state"], frozenset(entities))


class Index:
    """The facts of every workflow in the state the views follow, kept up to date: update() with what the state
    holds now (only an entry that changed is looked at again), then find()."""

    def __init__(self):
        self.facts: dict[str, tuple[bytes, Facts]] = {}

    def update(self, found: dict) -> None:
        """`found`: views.workflows.located()'s answer (id -> Located)."""
        for gone in self.facts.keys() - found.keys():
            del self.facts[gone]
        for workflow_id, located in found.items():
            kept = self.facts.get(workflow_id)
            if kept is None or kept[0] is not located.raw:
                self.facts[workflow_id] = (located.raw, facts_of(workflow_id, located.workflow))

    def find(self, wanted: Filter, stuck=lambda workflow_id: False) -> list[str]:
        """The ids of the workflows the filter holds for, newest first (`stuck(id)`: whether one is stuck now)."""
        matches = [facts for _, facts in self.facts.values()
                   if wanted.holds(facts, wanted.state == "stuck" and facts.state == "running" and
                                   stuck(facts.workflow_id))]
        return [facts.workflow_id for facts in sorted(matches, reverse=True)]


def paged(ids: list, page: int, per_page: int = PER_PAGE) -> tuple[list, dict]:
    """One page of the matches (pages count from 1), and what a reader needs to turn it: the total, the pages."""
    if page < 1 or per_page < 1:
        raise BadFilter("page: pages count from 1")
    pages = max(1, -(-len(ids) // per_page))
    return ids[(page - 1) * per_page: page * per_page], {"total": len(ids), "page": page, "pages": pages,
                                                         "per_page": per_page}
