"""Dead letters: list what could not be handled and why; replay chosen ones to their source topic once fixed.

Consumes: dead_letter (reads it from the beginning; joins no group)   Produces: the dead letters' source topics
Run:      python dead_letters.py list                          # one line per dead letter: offset, service, reason
          python dead_letters.py replay --reason "no route"    # re-send those whose reason contains the text
          python dead_letters.py replay --offset 3 --offset 7  # re-send chosen ones by their dead_letter offset
          python dead_letters.py replay --all                  # re-send every dead letter
A replayed message keeps its id, so handling it twice has no second effect downstream.
"""

import argparse
import base64
import logging
import sys

from common import DEAD_LETTER, Envelope, make_producer, read_all, setup_logging

log = logging.getLogger("dead_letters")


def load() -> list[tuple[int, Envelope]]:
    """(offset in dead_letter, letter) for every dead letter."""
    return [(record.offset, Envelope.model_validate_json(record.value)) for record in read_all(DEAD_LETTER)]


def chosen(letters, reason: str | None, service: str | None, offsets: list[int] | None):
    return [(offset, letter) for offset, letter in letters
            if (reason is None or reason in letter.payload["reason"])
            and (service is None or service == letter.payload["service"])
            and (not offsets or offset in offsets)]


def replay(letters) -> int:
    """Send each letter's original bytes, with its key, back to the topic it came from."""
    producer = make_producer()
    futures = []
    for offset, letter in letters:
        p = letter.payload
        if p["original_truncated"] or p["topic"] is None:
            log.warning("dead letter %d cannot be replayed (original not kept whole)", offset)
            continue
        key = base64.b64decode(p["key_b64"]) if p.get("key_b64") else None
        futures.append(producer.send(p["topic"], value=base64.b64decode(p["original_b64"]), key=key))
    producer.flush()
    for future in futures:
        future.get()
    producer.close()
    return len(futures)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["list", "replay"])
    parser.add_argument("--reason", help="only letters whose reason contains this text")
    parser.add_argument("--service", help="only letters from this service")
    parser.add_argument("--offset", type=int, action="append", help="only this dead_letter offset (repeatable)")
    parser.add_argument("--all", action="store_true", help="with replay and no other filter: every dead letter")
    args = parser.parse_args()
    if args.command == "replay" and not (args.all or args.reason or args.service or args.offset):
        parser.error("replay needs --reason, --service, --offset or --all")
    setup_logging()
    letters = chosen(load(), args.reason, args.service, args.offset)
    if args.command == "list":
        print(f"{'offset':>6}  {'service':<20} {'from topic:partition:offset':<36} reason")
        for offset, letter in letters:
            p = letter.payload
            source = f"{p['topic']}:{p['partition']}:{p['offset']}"
            print(f"{offset:>6}  {p['service']:<20} {source:<36} {p['reason']}")
        print(f"{len(letters)} dead letters")
    else:
        if not letters:
            print("no dead letters match; nothing replayed", file=sys.stderr)
            return 1
        print(f"replayed {replay(letters)} of {len(letters)} dead letters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
