"""An action outside Kafka, applied once per command. Kafka's transactions make a service's Kafka writes exactly once
(its outcome, its offsets, its state), but not what it does to the world: a copy fenced after acting, or stopped
between acting and committing, leaves the command to be handled again. So a SQLite file keeps the key of each effect
applied (the command's id; for a person's retry, the first command's: Envelope.effect_key) and what it said, written
in the same SQLite transaction as the effect when the effect lives in that file too (a simulated actuator), and every
copy of the service and its restarts use the same file. A command handled again changes nothing and says what was
done; no effect is applied once the command's deadline has passed (Expired, as the gate says it)."""

import sqlite3
import time
from collections.abc import Callable

from common.gate import refuse_if_expired
from common.messages import Envelope

SCHEMA = "CREATE TABLE IF NOT EXISTS applied (key TEXT PRIMARY KEY, command TEXT, said TEXT, at REAL);"


class Effects:
    """The effects a service applied, by key, in the SQLite file at `path` (`schema`: the service's own tables)."""

    def __init__(self, path: str, schema: str = ""):
        self.path, self.schema = path, SCHEMA + schema

    def once(self, command: Envelope, apply: Callable[[sqlite3.Connection], str]) -> tuple[str, bool]:
        """(what the effect said, whether it was applied now): `apply(db)` runs in one SQLite transaction with the
        record of its key, unless that key was applied before (then: what it said then). Expired if the command's
        deadline has passed first; a busy or broken file is sqlite3's error (the loop waits and tries again)."""
        db = sqlite3.connect(self.path, timeout=1.0, isolation_level=None)
        try:
            db.executescript(self.schema)
            db.execute("BEGIN IMMEDIATE")  # (one copy at a time: the look-up and the effect together)
            try:
                before = db.execute("SELECT said FROM applied WHERE key = ?", (command.effect_key(),)).fetchone()
                if before is not None:
                    return before[0], False
                refuse_if_expired(command)
                said = apply(db)
                db.execute("INSERT INTO applied VALUES (?, ?, ?, ?)", (command.effect_key(), command.id, said,
                                                                       time.time()))
                db.execute("COMMIT")
                return said, True
            finally:
                if db.in_transaction:
                    db.execute("ROLLBACK")
        finally:
            db.close()

    def applied(self, command: Envelope) -> bool:
        """Whether a command's effect was applied already (by this copy or another, before a restart)."""
        db = sqlite3.connect(self.path, timeout=1.0)
        try:
            db.executescript(self.schema)
            return db.execute("SELECT 1 FROM applied WHERE key = ?", (command.effect_key(),)).fetchone() is not None
        finally:
            db.close()
