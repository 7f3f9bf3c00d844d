"""Reporting service: stores every report in SQLite and prints a periodic summary. Joins in Example 2.

Consumes: report_data           Produces: a SQLite file (REPORT_DB or --db, default reports.db); dead_letter.reporting_service
Run:      python reporting_service.py --example 2      # security reports only (the unit section is off)
          python reporting_service.py --example 3      # plus the unit section
          python reporting_service.py --summary --json # print the stored counts as one JSON object and exit
The message id is the primary key, so a redelivered report is stored once.
"""

import argparse
import json
import logging
import os
import sqlite3
import time

from common import DeadLetter, Envelope, Output, Unavailable, expect, run_service, setup_logging, metrics
from contracts import REPORT_DATA

log = logging.getLogger("reporting_service")
SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (id TEXT PRIMARY KEY, workflow_id TEXT, workflow TEXT, category TEXT,
                                    entity TEXT, zone TEXT, created_at TEXT);
CREATE TABLE IF NOT EXISTS units (unit_id TEXT PRIMARY KEY, last_status TEXT, events INTEGER, updated_at TEXT);
"""


def open_store(path: str, create: bool = True) -> sqlite3.Connection:
    # A locked store fails fast (1 s): the loop then waits for it and tries again.
    db = sqlite3.connect(path if create else f"file:{path}?mode=ro", uri=not create, timeout=1.0)
    if create:
        db.executescript(SCHEMA)
    return db


class Store:
    """The report store, (re)opened on use: a file removed or replaced meanwhile is opened anew. A store that cannot
    be used now (locked, read-only, disk error) is Unavailable: the loop waits and tries again, nothing is
    dead-lettered for it. Only a report that the store refuses as such is a dead letter."""

    def __init__(self, path: str):
        self.path, self.db, self.file = path, None, None

    def use(self, work):
        """work(connection), inside the store's own transaction for writes."""
        try:
            if self.db is None or self.file != self._file():
                self.close()
                self.db = open_store(self.path)
                self.file = self._file()
            return work(self.db)
        except (sqlite3.IntegrityError, sqlite3.DataError) as error:
            raise DeadLetter(f"the report store refuses this report: {error}") from None
        except (sqlite3.Error, OSError) as error:  # locked, read-only, deleted, disk I/O error ...
            self.close()  # opened anew on the next try
            raise Unavailable(f"the report store {self.path} cannot be used ({error})") from None

    def _file(self) -> tuple[int, int] | None:
        """Which file is at the path now (device, inode), or None if there is none."""
        try:
            info = os.stat(self.path)
            return info.st_dev, info.st_ino
        except FileNotFoundError:
            return None

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
        self.db = None


def store(db: sqlite3.Connection, message: Envelope, example: int) -> list[Output]:
    """Save one report (once, however often it is delivered)."""
    expect(message, "report_data")
    report = message.payload
    if report["workflow"] == "security":
        with db:
            save_report(db, message)
    elif report["workflow"] == "unit" and example >= 3:  # EXAMPLE 3: the walkthrough's "uncomment the Unit Event section".
        with db:  # the report and its unit's new status are stored together or not at all
            if save_report(db, message):
                db.execute("INSERT INTO units VALUES (?, ?, 1, ?) ON CONFLICT(unit_id) DO UPDATE SET "
                           "last_status = excluded.last_status, events = events + 1, updated_at = excluded.updated_at",
                           (report["entity"], report["category"], message.created_at.isoformat()))
    else:
        raise DeadLetter(f"no report section for {report['workflow']!r} reports at example {example}")
    return []


def save_report(db: sqlite3.Connection, message: Envelope) -> bool:
    """Insert the report (inside the caller's transaction); False if this message id was stored before."""
    r = message.payload
    row = (message.workflow_id, r["workflow"], r["category"], r["entity"], r["zone"])
    inserted = db.execute("INSERT OR IGNORE INTO reports VALUES (?, ?, ?, ?, ?, ?, ?)",
                          (message.id, *row, message.created_at.isoformat())).rowcount
    if not inserted:
        stored = db.execute("SELECT workflow_id, workflow, category, entity, zone FROM reports WHERE id = ?",
                            (message.id,)).fetchone()
        if stored != row:
            raise DeadLetter(f"report id {message.id!r} was stored before with different content; not stored again")
        log.info("report %s already stored; ignoring the redelivery", message.id[:8])
    return bool(inserted)


def summary(db: sqlite3.Connection) -> dict:
    """Report counts per workflow and per category, plus the units whose last status needs attention."""
    counts = {"reports": 0, "workflows": {}, "categories": {}}
    for workflow, category, n in db.execute("SELECT workflow, category, COUNT(*) FROM reports GROUP BY 1, 2"):
        counts["reports"] += n
        counts["workflows"][workflow] = counts["workflows"].get(workflow, 0) + n
        counts["categories"].setdefault(workflow, {})[category] = n
    counts["units_needing_attention"] = [unit for (unit,) in db.execute(
        "SELECT unit_id FROM units WHERE last_status != 'heartbeat' ORDER BY unit_id")]
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--example", type=int, choices=[2, 3], default=3, help="walkthrough stage (default 3)")
    parser.add_argument("--db", default=os.environ.get("REPORT_DB", "reports.db"), help="SQLite file")
    parser.add_argument("--summary", action="store_true", help="print the stored counts and exit")
    parser.add_argument("--json", action="store_true", help="with --summary: one JSON object")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between printed summaries (default 10)")
    metrics.flag(parser)
    args = parser.parse_args()
    if args.every <= 0:
        parser.error("--every must be above 0")
    setup_logging()
    if args.summary:
        try:
            counts = summary(open_store(args.db, create=False))
        except sqlite3.Error as error:
            raise SystemExit(f"reporting_service: cannot open the report store {args.db!r}: {error}") from None
        print(json.dumps(counts, sort_keys=True) if args.json else json.dumps(counts, indent=2, sort_keys=True))
        return
    reports, next_summary = Store(args.db), time.monotonic() + args.every

    def print_summary_when_due() -> list:
        nonlocal next_summary
        if time.monotonic() >= next_summary:
            next_summary = time.monotonic() + args.every
            try:
                log.info("summary: %s", json.dumps(reports.use(summary), sort_keys=True))
            except (Unavailable, DeadLetter) as why:  # the store's trouble is reported by the loop as it waits
                log.warning("no summary now: %s", why)
        return []

    log.info("storing reports in %s (unit section %s)", args.db, "on" if args.example >= 3 else "off")
    run_service("reporting_service", [REPORT_DATA], lambda message: reports.use(lambda db: store(db, message, args.example)),
                tick=print_summary_when_due, metrics_port=args.metrics_port)


if __name__ == "__main__":
    main()
