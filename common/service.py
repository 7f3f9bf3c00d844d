"""A consuming service, declared: what it reads, its handler, what it writes and what it promises (a Service), and
starting it: wait for Kafka, make missing topics, run what must happen before it joins its group, then its loop
(common/loop.py) until it is stopped. run_service is the one line each service script ends with."""

import logging
from collections.abc import Callable
from dataclasses import dataclass

from kafka import KafkaAdminClient
from kafka.errors import AuthorizationError, FencedInstanceIdError, KafkaError

from common import metrics, tracing
from common.changelog import ensure_changelog, refuse_if_state_lost
from common.effects import Effects
from common.clients import refused, wait_for_kafka
from common.handling import Handler
from common.loop import Loop
from common.messages import Output
from common.settings import DEAD_LETTER, REVOKED, SETTINGS, Settings, written_by
from common.state import State, Store
from common.waiting import Stopper

log = logging.getLogger("common")


@dataclass(frozen=True)
class Service:
    """What a consuming service is. Outputs keep their input's key; what a handler rejects, or keeps failing on,
    goes to its dead_letter member."""
    name: str
    inputs: list[str]
    handle: Handler                 # handle(message) -> outputs; handle(message, state) if keeps_state
    writes: tuple[str, ...] = ()    # the topics it writes (a family: its own member)
    exactly_once: bool = False      # outputs, offsets and state in one transaction; else acked, then committed
    dedupe: bool = False            # skip ids any copy handled before (kept in its state)
    keeps_state: bool = False       # the handler is given its partition's state (common/state.py)
    group: str | None = None        # its consumer group (default: its name)
    accepts: dict[str, frozenset] | None = None  # input topic -> the types its writer may send; others: dead letters
    tick: Callable[[], list[Output]] | None = None  # messages of its own, asked for every loop (keyed Outputs)
    timer: Callable[[State, str], list[Output]] | None = None  # timer(state, key) once an entry's due time passes
    before_start: Callable[[KafkaAdminClient, Stopper], None] | None = None  # once Kafka answers; may end the script
    open_count: Callable[[Store], int] | None = None  # how many workflows run (a metric)
    metrics_port: int | None = None
    doing: str = "act on"           # what handling a message is, for its trace span ("act on <type>")
    gated: bool = False             # it acts on commands: none of a cancelled workflow, none past its deadline (gate.py)
    effects: Effects | None = None  # where it keeps the effects it applied, if it acts outside Kafka (effects.py)


def run_service(name: str, inputs: list[str], handle: Handler, *, writes: tuple[str, ...] = (),
                tick: Callable[[], list[Output]] | None = None, exactly_once: bool = False,
                metrics_port: int | None = None, effects: Effects | None = None) -> None:
    """Consume `inputs`, handle each message, produce what the handler returns, then commit. exactly_once: each
    message has its effect once (outputs and offsets in one transaction, repeats skipped); else at least once. A
    command of a cancelled workflow, or read after its deadline, is not handed to `handle` (common/gate.py), but
    one whose effect `effects` says was applied already is (to say what was done)."""
    serve(Service(name, inputs, handle, writes, exactly_once=exactly_once, dedupe=exactly_once, tick=tick,
                  metrics_port=metrics_port, gated=True, effects=effects))


def serve(service: Service, settings: Settings = SETTINGS) -> None:
    """Run a service until SIGINT or SIGTERM: each ends it after its batch is committed."""
    stop, group = Stopper(), service.group or service.name
    tracing.start(service.name)
    metrics.start(service.name, service.metrics_port)
    own = [written_by(topic, service.name) for topic in (*service.writes, DEAD_LETTER)]
    store = Store(group, settings, durable=service.exactly_once, dedupe=service.dedupe, stop=stop) \
        if service.dedupe or service.keeps_state else None
    revoked = [REVOKED] if service.gated else []  # (read before each batch: made now, so it is never looked for)
    if not prepare(stop, service, settings, [*service.inputs, *own, *revoked], store):
        return
    loop = Loop(service, stop, settings, store, writes=[*own, *service.writes])
    fenced = False
    try:
        while not stop:
            loop.once()
    except FencedInstanceIdError:
        fenced = True
        log.error("%s: another process joined group %s as INSTANCE_ID=%s and took over; give each copy its own "
                  "INSTANCE_ID. This one stops (its last batch will be handled again by the other).", service.name,
                  group, settings.instance_id)
        raise SystemExit(1) from None
    finally:
        loop.close(fenced)


def prepare(stop: Stopper, service: Service, settings: Settings, topics: list[str], store: Store | None) -> bool:
    """Wait for Kafka, create missing topics, refuse to start on a state topic that is gone, run
    `before_start(admin, stop)` (it may end the script), make the state topic; False if stopped meanwhile."""
    admin = wait_for_kafka(stop, service.name, settings, topics=topics)
    if admin is None:
        return False
    group, keeps_state = service.group or service.name, store is not None and store.topic is not None
    try:
        if keeps_state:
            retrying(stop, service.name, settings, lambda: refuse_if_state_lost(admin, service.name, group, settings))
        if service.before_start:
            retrying(stop, service.name, settings, lambda: service.before_start(admin, stop))
        if keeps_state and not stop:
            ensure_changelog(admin, group, settings)
    finally:
        admin.close()
    return not stop


def retrying(stop: Stopper, name: str, settings: Settings, step: Callable[[], None]) -> None:
    """Run a start-up step, again while the cluster says it is not ready; a refusal of this user ends the script."""
    while not stop:
        try:
            step()
            return
        except AuthorizationError as error:
            raise refused(name, error, settings) from None
        except KafkaError as error:  # e.g. the group coordinator is still loading on a fresh or failing-over cluster
            if not error.retriable:
                raise
            stop.wait(0.5)
