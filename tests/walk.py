"""What the tests that range over the table share: messages made from the contracts (each value of a closed set, the
bounds of the others, every field at its longest), and every path a workflow can take at a stage, walked through the
real engine (common's Orchestration, without Kafka): each awaited step answered done, answered failed, or not at all
until its attempts run out. So a workflow added to WORKFLOWS is tested with the others, and nothing here names one."""

import copy
from dataclasses import dataclass

from common import SCHEMAS, WORKFLOW, DeadLetter, Envelope, Limits, Orchestration, caused_by, new_event
from orchestrator import WORKFLOWS, route

T0 = 1_000_000.0
LIMITS = Limits(step_timeout=1.0, attempts=2)
DEEPEST = 12  # answers on one path at most (a table whose steps follow each other in a ring would go on for ever)


def edges(prop: dict) -> list:
    """The values a JSON-schema property takes at its edges: each of a closed set, its bounds, its shortest and
    longest text."""
    if "anyOf" in prop:
        return [value for option in prop["anyOf"] for value in edges(option)]
    if "enum" in prop or "const" in prop:
        return list(prop.get("enum", [prop.get("const")]))
    kind = prop.get("type")
    if kind in ("integer", "number"):
        low = prop.get("minimum", prop.get("exclusiveMinimum", -1) + 1)
        return [low, prop.get("maximum", prop.get("exclusiveMaximum", low + 101) - 1)]
    if kind == "string":
        return ["x" * max(1, prop.get("minLength", 1)), "x" * prop.get("maxLength", 200)]
    return {"boolean": [False, True], "null": [None], "array": [[]], "object": [{}]}.get(kind, [None])


def weight(value) -> float:
    return len(value) if isinstance(value, str) else value if isinstance(value, int | float) else 0


def payloads(type_: str) -> list[dict]:
    """Valid payloads of a message type, made from its contract: each field at its first edge, then each field at
    each of its other edges, then every field at its longest (whose commands must still be valid)."""
    assert type_ in SCHEMAS, f"message type {type_!r} has no schema: add one to contracts.py (MESSAGES)"
    schema = SCHEMAS[type_]
    options = {name: edges(prop) for name, prop in schema.model_json_schema().get("properties", {}).items()}
    first = {name: values[0] for name, values in options.items()}
    made = [first] + [{**first, name: value} for name, values in options.items() for value in values[1:]]
    made.append({name: max(values, key=weight) for name, values in options.items()})
    valid = []
    for payload in made:
        try:
            valid.append(schema.model_validate(payload).model_dump())
        except ValueError:  # (a combination the schema refuses: left out)
            continue
    assert valid, f"no payload of {type_!r} could be made from its contract"
    return valid


def example(type_: str) -> dict:
    return payloads(type_)[0]


def reply(command: Envelope, type_: str, source: str = "test") -> Envelope:
    """An answer of type `type_` to a command, as its service would send it: each field the command has of the same
    name copied (the zone an action was in, say), the others made from the contract."""
    schema, payload = SCHEMAS[type_], dict(example(type_))
    for name in payload:
        if name in command.payload:
            try:
                schema.model_validate({**payload, name: command.payload[name]})
                payload[name] = command.payload[name]
            except ValueError:  # (the answer's field holds less than the command's: made from the contract)
                continue
    return caused_by(command, "done", type_, payload, source)


class Memory:
    """One partition's state as the orchestration asks for it, in a dict: a walk branches by copying it."""

    def __init__(self):
        self.entries, self.key = {}, b"walk"

    def get(self, key: str):
        return copy.deepcopy(self.entries.get(key))

    def put(self, key: str, value, due: float | None = None) -> None:
        self.entries[key] = copy.deepcopy(value)


@dataclass
class Path:
    """One way a workflow went: what happened in order, and its entry at the end."""
    history: list[str]
    entry: dict

    @property
    def sent(self) -> set[str]:
        return set(self.entry["steps"])

    def __str__(self) -> str:
        return " -> ".join(self.history) + f" => {self.entry['state']}: " + ", ".join(
            f"{name} {step['state']}" for name, step in self.entry["steps"].items())


def walk(name: str, stage: int) -> list[Path]:
    """Every path the workflow `name` takes at a stage, from each payload of its starting event that the contracts
    make. A command route() sends that the table has no step for raises the engine's DeadLetter, as it would live."""
    engine, paths = Orchestration(WORKFLOWS, route, stage, LIMITS), []
    for payload in payloads(WORKFLOWS[name].starts_with):
        start, memory = new_event(WORKFLOWS[name].starts_with, payload, "test"), Memory()
        said([f"{start.type} {payload}"], engine.decide, start, memory, T0)
        paths += explore(engine, memory, WORKFLOW + start.workflow_id, T0, [f"{start.type} {payload}"])
    return paths


def explore(engine: Orchestration, memory: Memory, key: str, now: float, history: list[str]) -> list[Path]:
    """The paths from here: the first step awaited answered each way it can be, or not at all."""
    entry = memory.get(key)
    waiting = [(name, step) for name, step in entry["steps"].items() if step["state"] == "pending"]
    if not waiting or len(history) > DEEPEST:
        return [Path(history, entry)]
    name, step = waiting[0]
    definition, command = engine.defined[entry["type"]][name], Envelope.model_validate(step["command"])
    paths = []
    for type_ in (*definition.done, *definition.failed):
        branch = copy.deepcopy(memory)
        said(history + [f"{name} answered {type_}"], engine.decide, reply(command, type_), branch, now + 0.1)
        paths += explore(engine, branch, key, now + 0.1, history + [f"{name} answered {type_}"])
    branch, at = copy.deepcopy(memory), now
    while (step := branch.get(key)["steps"][name])["state"] == "pending":  # (every attempt's limit passes)
        at = max(at, step["deadline"]) + 0.01
        said(history + [f"{name} not answered"], engine.time_out, branch, branch.get(key), name, step, at)
    return paths + explore(engine, branch, key, at, history + [f"{name} not answered"])


def said(history: list[str], decide, *args) -> None:
    """decide(*args); a dead letter the engine makes of it (a command the table has no step for) fails the test with
    the path that led there."""
    try:
        decide(*args)
    except DeadLetter as why:
        raise AssertionError(f"{' -> '.join(history)}: {why}") from None
