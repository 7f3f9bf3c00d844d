"""Dead letters: list what could not be handled and why; replay chosen ones to their source topic once fixed.

Consumes: dead_letter (reads it from the beginning; joins no group)   Produces: the dead letters' source topics
Run:      python dead_letters.py list                          # one line per dead letter: offset, service, reason
          python dead_letters.py replay --reason "no route"    # re-send those whose reason contains the text
          python dead_letters.py replay --offset 3 --offset 7  # re-send chosen ones by their dead_letter offset
          python dead_letters.py replay --all                  # re-send every dead letter
A replayed message keeps its id, so handling it twice has no second effect downstream. Several letters holding the
same original (it failed again after an earlier replay) replay it once; --every-copy replays each letter.
"""

import argparse
import base64
import logging
import sys

from pydantic import ValidationError

from common import DEAD_LETTER, Envelope, Stopper, discard, make_producer, read_all, setup_logging, wait_for_acks, wait_for_kafka
from common.messages import DeadLetterPayload

log = logging.getLogger("dead_letters")


def load(records) -> tuple[list[tuple[int, DeadLetterPayload]], list[int]]:
    """(offset in dead_letter, what the letter says) for each readable dead letter, and the offsets of the records
    that are not dead letters at all (junk written to the topic): those are shown, never fatal."""
    letters, unreadable = [], []
    for record in records:
        try:
            letters.append((record.offset, DeadLetterPayload.model_validate(Envelope.model_validate_json(record.value).payload)))
        except ValidationError:  # (invalid JSON is a ValidationError too)
            unreadable.append(record.offset)
    return letters, unreadable


def chosen(letters, reason: str | None, service: str | None, offsets: list[int] | None):
    return [(offset, letter) for offset, letter in letters
            if (reason is None or reason in letter.reason)
            and (service is None or service == letter.service)
            and (not offsets or offset in offsets)]


def originals(letters, every_copy: bool = False) -> list[tuple[int, DeadLetterPayload]]:
    """The letters to replay: those whose original is kept whole, each original once (unless every_copy)."""
    kept, seen = [], set()
    for offset, letter in letters:
        if letter.original_truncated or letter.key_truncated or letter.topic is None:
            log.warning("dead letter %d cannot be replayed (its original was not kept whole)", offset)
            continue
        if letter.original_null and not letter.key_b64:  # kafka-python sends no record with neither key nor value
            log.warning("dead letter %d cannot be replayed (a null value without a key)", offset)
            continue
        original = (letter.topic, letter.key_b64, letter.original_b64, letter.original_null)
        if every_copy or original not in seen:
            kept.append((offset, letter))
        seen.add(original)
    return kept


def replay(letters) -> int:
    """Send each letter's original bytes (null as null), with its key, back to the topic it came from."""
    producer = make_producer()
    try:
        futures = [producer.send(letter.topic, key=base64.b64decode(letter.key_b64) if letter.key_b64 else None,
                                 value=None if letter.original_null else base64.b64decode(letter.original_b64))
                   for _, letter in letters]
        wait_for_acks(producer, futures, "dead_letters")
    finally:
        discard(producer, timeout=10)
    return len(futures)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["list", "replay"])
    parser.add_argument("--reason", help="only letters whose reason contains this text")
    parser.add_argument("--service", help="only letters from this service")
    parser.add_argument("--offset", type=int, action="append", help="only this dead_letter offset (repeatable)")
    parser.add_argument("--all", action="store_true", help="with replay and no other filter: every dead letter")
    parser.add_argument("--every-copy", action="store_true", help="with replay: also letters whose original another "
                                                                  "chosen letter holds")
    args = parser.parse_args()
    if args.command == "replay" and not (args.all or args.reason or args.service or args.offset):
        parser.error("replay needs --reason, --service, --offset or --all")
    setup_logging()
    wait_for_kafka(Stopper(), "dead_letters", wait=False).close()
    letters, unreadable = load(read_all(DEAD_LETTER))
    letters = chosen(letters, args.reason, args.service, args.offset)
    if args.command == "list":
        print(f"{'offset':>6}  {'service':<20} {'from topic:partition:offset':<36} reason")
        for offset, letter in letters:
            print(f"{offset:>6}  {letter.service:<20} {f'{letter.topic}:{letter.partition}:{letter.offset}':<36} "
                  f"{letter.reason}")
        print(f"{len(letters)} dead letters")
    else:
        todo = originals(letters, args.every_copy)
        if not todo:
            print("no dead letters match; nothing replayed", file=sys.stderr)
            return 1
        skipped = len(letters) - len(todo)
        print(f"replayed {replay(todo)} of {len(letters)} dead letters"
              + (f" ({skipped} held an original replayed once already, or not kept whole)" if skipped else ""))
    if unreadable:
        print(f"{len(unreadable)} records on dead_letter are not dead letters (offsets "
              f"{', '.join(map(str, unreadable[:10]))}{' ...' if len(unreadable) > 10 else ''}); skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
