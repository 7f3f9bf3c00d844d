"""The producer loop of the event sources (a script that only makes events): make messages at a rate and send each to the
topic the script writes for it, saying so while the broker is away."""

import logging
import time
from collections.abc import Callable

from kafka.errors import AuthorizationError, KafkaError

from common import metrics, tracing
from common.clients import make_producer, refused, send, wait_for_acks, wait_for_kafka
from common.messages import Envelope, UnknownType
from common.settings import MESSAGE_STREAM, SETTINGS, Settings, written_by
from common.waiting import Stopper
from common.workarounds import discard

log = logging.getLogger("common")


def run_producer(name: str, make: Callable[[], tuple[str, Envelope, str]], count: int | None, rate: float,
                 writes: tuple[str, ...] = (MESSAGE_STREAM,), settings: Settings = SETTINGS,
                 metrics_port: int | None = None) -> int:
    """Produce make()'s messages at `rate` per second until `count` are sent (None: until stopped), each to the
    topic this script writes for it (its own member of a family). `metrics_port`: serve Prometheus metrics there."""
    stop = Stopper()
    admin = wait_for_kafka(stop, name, settings, topics=[written_by(topic, name) for topic in writes])
    if admin is None:
        return 0
    admin.close()
    tracing.start(name)
    metrics.start(name, metrics_port)
    producer = make_producer(settings=settings)
    pacer, delivered = Pacer(rate, count), 0
    log.info("%s: producing %s at %s/s to %s", name, "forever" if count is None else count, rate,
             settings.bootstrap_servers)
    try:
        while not stop and not pacer.finished:
            futures = [sent(producer, written_by(topic, name), message, key, settings)
                       for topic, message, key in made(name, make, pacer.due())]
            try:
                wait_for_acks(producer, futures, name)
                delivered += len(futures)
                metrics.count("produced", len(futures), service=name)
            except AuthorizationError as error:  # this user may not write there: nothing was written
                raise refused(name, error, settings) from None
            except KafkaError as error:  # delivery_timeout_ms (5 min) passed: these messages are not in Kafka
                log.error("%s: %d messages could not be delivered: %s", name, len(futures), error)
            stop.wait(pacer.pause())
    finally:
        discard(producer, timeout=10)
        log.info("%s: produced %d message%s", name, delivered, "" if delivered == 1 else "s")
    return delivered


def made(name: str, make: Callable[[], tuple[str, Envelope, str]], count: int) -> list[tuple[str, Envelope, str]]:
    """`count` of make()'s messages; one of a type no contract has a schema for ends the script in one line."""
    try:
        return [make() for _ in range(count)]
    except UnknownType as error:
        raise SystemExit(f"{name}: {error}") from None


def sent(producer, topic: str, message: Envelope, key: str, settings: Settings):
    """Send one event; with tracing on, it starts its workflow's trace (the context goes in the record's headers)."""
    span = tracing.produced(settings.topic(topic), message)
    try:
        return send(producer, topic, message, key, settings, headers=tracing.headers(span))
    finally:
        tracing.ended(span)


class Pacer:
    """How many messages are due now to keep `rate` per second, up to `count` in all."""

    def __init__(self, rate: float, count: int | None):
        self.rate, self.count, self.sent, self.began = rate, count, 0, time.monotonic()

    @property
    def finished(self) -> bool:
        return self.count is not None and self.sent >= self.count

    def due(self) -> int:
        behind = (time.monotonic() - self.began) * self.rate - self.sent
        if behind > self.rate:  # stalled (Kafka was down): carry on at the rate instead of bursting to catch up
            self.began += (behind - self.rate) / self.rate
        target = int((time.monotonic() - self.began) * self.rate) + 1
        if self.count is not None:
            target = min(target, self.count)
        due, self.sent = max(0, target - self.sent), max(self.sent, target)
        return due

    def pause(self) -> float:
        """Seconds until the next message is due (at most 0.1, so a stop is prompt)."""
        return 0.0 if self.finished else min(0.1, max(0.0, (self.sent / self.rate) - (time.monotonic() - self.began)))
