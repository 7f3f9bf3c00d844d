"""Waiting, the project's way: a stop signal that is honoured at once, a poll that outlives a broker outage, and a
pause that says what it waits for (and, past the group's session, that the group makes no progress)."""

import logging
import os
import signal
import threading
import time

from kafka import KafkaConsumer
from kafka.errors import AuthorizationError, FencedInstanceIdError, KafkaError

from common.clients import SESSION_TIMEOUT_MS, refused
from common.settings import Settings
from common.workarounds import STOPPING, LastWords, heartbeat_silence_s

log = logging.getLogger("common")


class Stopper:
    """SIGINT and SIGTERM take the same clean path: finish the batch, commit, close. A second signal exits at once."""

    def __init__(self):
        self.event = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.event.is_set():
            os.write(2, b"second stop signal: exiting at once, without finishing the batch (it is handled again)\n")
            os._exit(128 + signum)
        STOPPING.set()  # (kafka-python's lines while its clients close are hidden from now on)
        self.event.set()  # (no logging here: a log call inside a signal handler can collide with one in progress)

    def __bool__(self):
        return self.event.is_set()

    def wait(self, seconds: float) -> bool:
        return self.event.wait(seconds)


class Poller:
    """consumer.poll that outlives a broker outage: while the broker or the group coordinator is away it returns
    None, and it notices a coordinator that answers no heartbeat (`unheard`); `trouble` keeps what the broker
    answered. A user who may not read an input or use the group is told so, and the script ends."""

    def __init__(self, consumer: KafkaConsumer, name: str, stop: "Stopper", settings: Settings):
        self.consumer, self.name, self.stop, self.settings, self.trouble = consumer, name, stop, settings, ""
        self.client, self.unheard = LastWords(), False

    def gathered(self, timeout_ms: int, window_s: float, most: int = 500) -> dict | None:
        """poll(), then, once records came, more polls for up to `window_s` (the commit window) or until `most`
        records, gathered into one batch, so that at moderate rates a transaction carries more than one record. A
        partition read again from an earlier offset meanwhile (a rebalance sets it back to its committed offset)
        keeps only what was read since; one taken away is left out, for its new owner. (What is handled twice so is
        a repeat, skipped by the state.) None while the broker is away."""
        batch = self.poll(timeout_ms)
        if not batch or window_s <= 0:
            return batch
        until = time.monotonic() + window_s
        while (left := until - time.monotonic()) > 0 and not self.stop and sum(map(len, batch.values())) < most:
            more = self.poll(max(1, int(left * 1000)))
            if more is None:
                break
            for tp, records in more.items():
                if tp in batch and records[0].offset <= batch[tp][-1].offset:  # (read again from before)
                    batch[tp] = list(records)
                else:
                    batch.setdefault(tp, []).extend(records)
        self.unheard = False  # (records came, and are handled; a silent coordinator shows at the next empty poll)
        assigned = self.consumer.assignment()
        return {tp: records for tp, records in batch.items() if tp in assigned}

    def poll(self, timeout_ms: int) -> dict | None:
        """The batch ({} if none), or None while the broker is away. `unheard`: the group coordinator has answered
        no heartbeat for longer than the session (a rejoin needs polls, so the caller goes on polling)."""
        try:
            batch = self.consumer.poll(timeout_ms=timeout_ms)
            if self.client.fenced:
                raise FencedInstanceIdError("the group coordinator fenced this member: another process joined as it")
            silence = heartbeat_silence_s(self.consumer)
            self.unheard = not batch and silence > SESSION_TIMEOUT_MS / 1000
            if self.unheard:
                self.trouble = (f"its group coordinator has answered no heartbeat for {silence:.0f} s (the client's "
                                f"last words: {self.client.text or 'none'})")
            return batch
        except AuthorizationError as error:
            raise refused(self.name, error, self.settings) from None
        except KafkaError as error:
            if not error.retriable:
                raise
            self.trouble = f"Kafka unavailable ({type(error).__name__}: {error})"
            return None


class Pause:
    """Waits out a trouble (the broker away, a delivery that failed, a handler's store that cannot be used) in short
    steps, so a stop is honoured at once. Says what it waits for (then every 30 s); past the group's session it says
    so as an error naming the group, since by then the group is making no progress; says when it is over."""

    def __init__(self, name: str, group: str, stop: "Stopper", session_s: float = SESSION_TIMEOUT_MS / 1000):
        self.name, self.group, self.stop, self.session_s = name, group, stop, session_s
        self.since, self.said, self.step = None, float("-inf"), 0.5

    def until_better(self, trouble: str, wait: bool = True) -> None:
        """Say so (see above) and, unless wait=False (the caller's own poll paces it), wait a growing step."""
        if self.stop:
            return
        now = time.monotonic()
        self.since = self.since or now
        if now - self.said >= 30 or (self.said < self.since + self.session_s <= now):
            if now - self.since > self.session_s:
                log.error("%s: group %s has made no progress for %.0f s: %s; it goes on trying (is the broker "
                          "healthy? `python -m local_kafka status` checks it)", self.name, self.group,
                          now - self.since, trouble)
            else:
                log.warning("%s: %s; waiting, then trying again", self.name, trouble)
            self.said = now
        if wait:
            self.stop.wait(self.step)
            self.step = min(self.step * 2, 5.0)

    def over(self) -> None:
        if self.since is not None and self.said >= self.since:
            log.info("%s: going on after %.0f s", self.name, time.monotonic() - self.since)
        self.since, self.step = None, 0.5
