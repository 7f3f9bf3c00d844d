"""Dead letters: list what could not be handled and why; replay chosen ones to their source topic once fixed.

Consumes: dead_letter.* (reads them from the beginning; joins no group)   Produces: the dead letters' source topics
Run:      python dead_letters.py list                          # one line per dead letter: which, where from,
                                                               # whether it was replayed, reason
          python dead_letters.py replay --reason "no route"    # re-send those whose reason contains the text
          python dead_letters.py replay --letter orchestrator:0:3   # re-send chosen ones (as `list` names them)
          python dead_letters.py replay --all                  # re-send every dead letter
Each service writes its own dead_letter.<service>, and a letter is replayed only to a topic that service consumes:
a service cannot have another's commands re-sent in its name. A replayed message keeps its id, so handling it
twice has no second effect downstream. Several letters holding the same original (it failed again after an earlier
replay) replay it once; --every-copy replays each letter.
"""

import argparse
import logging
import sys
from datetime import datetime

import common  # noqa: F401 -- (first: outside the virtual environment it says so in one line, not a traceback)

from common import DEAD_LETTER, Stopper, read_all, setup_logging, wait_for_kafka
from views.letters import chosen, load, original_of, originals, replay, replays, workflow_of

log = logging.getLogger("dead_letters")






def listing(letters, replays: dict | None = None) -> list[str]:
    """`list`'s lines: when each letter was written, by which service, the original's workflow, where the original
    is, whether and when it was replayed (`replays`: original -> the times it was sent again), and why."""
    lines = [f"{'time':<12} {'letter':<34} {'workflow':<9} {'from topic:partition:offset':<44} {'replayed':<17} reason"]
    for which, letter, made in letters:
        when = made.astimezone().strftime("%H:%M:%S.%f")[:12]
        times = (replays or {}).get(original_of(letter), [])
        again = f"{len(times)}x, last {clock(max(times))}" if times else "-"
        lines.append(f"{when:<12} {which:<34} {workflow_of(letter):<9} "
                     f"{f'{letter.topic}:{letter.partition}:{letter.offset}':<44} {again:<17} {letter.reason}")
    return lines


def clock(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).strftime("%H:%M:%S")




















def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("command", choices=["list", "replay"])
    parser.add_argument("--reason", help="only letters whose reason contains this text")
    parser.add_argument("--service", help="only letters from this service")
    parser.add_argument("--letter", action="append", help="only this letter, SERVICE:PARTITION:OFFSET as listed (repeatable)")
    parser.add_argument("--all", action="store_true", help="with replay and no other filter: every dead letter")
    parser.add_argument("--every-copy", action="store_true", help="with replay: also letters whose original another "
                                                                  "chosen letter holds")
    args = parser.parse_args()
    if args.command == "replay" and not (args.all or args.reason or args.service or args.letter):
        parser.error("replay needs --reason, --service, --letter or --all")
    setup_logging()
    wait_for_kafka(Stopper(), "dead_letters", wait=False).close()
    letters, unreadable = load(read_all(DEAD_LETTER))
    letters = chosen(letters, args.reason, args.service, args.letter)
    if args.command == "list":
        print("\n".join(listing(letters, replays(letters))))
        print(f"{len(letters)} dead letters (a letter is SERVICE:PARTITION:OFFSET, the service that wrote it first)")
    else:
        todo = originals(letters, args.every_copy)
        if not todo:
            print("no dead letters match; nothing replayed", file=sys.stderr)
            return 1
        skipped = len(letters) - len(todo)
        print(f"replayed {replay(todo)} of {len(letters)} dead letters"
              + (f" ({skipped} not: an original replayed once already, or one that cannot be, as logged above)"
                 if skipped else ""))
    if unreadable:
        print(f"{len(unreadable)} records on dead_letter are not dead letters ("
              f"{', '.join(unreadable[:10])}{' ...' if len(unreadable) > 10 else ''}); skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
