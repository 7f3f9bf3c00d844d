"""One orchestrator split in two, or split ones joined back into one. Each set of workflows has its own consumer group
(common/workflow.py names them), so only one of two overlapping orchestrators may run at a time; the one that starts
takes over where the others left off: their offsets, where further than its own, and the state entries they wrote
later (workflows in flight, ids handled). Splitting or joining so routes nothing twice and forgets nothing."""

import logging
import time

from kafka import KafkaAdminClient, KafkaProducer
from kafka.errors import AuthorizationError, KafkaError, NoError

from common.changelog import changelog, ensure_changelog, latest_entries
from common.clients import SESSION_TIMEOUT_MS, wait_for_acks
from common.copies import leave, ours
from common.settings import SETTINGS, Settings
from common.workflow import Table, group_for, orchestrator_groups, overlapping

log = logging.getLogger("orchestrator")


def take_over(admin: KafkaAdminClient, stop, table: Table, workflows: set[str], inputs: list[str],
              state_in_kafka: bool, settings: Settings = SETTINGS) -> None:
    """Before an orchestrator of `workflows` starts: refuse to run beside an overlapping one, then start where
    those left off (their state first: the offsets say it is done)."""
    refuse_if_overlapping(admin, table, workflows, stop, settings)
    group = group_for(table, workflows)
    rejoin_if_inputs_changed(admin, group, inputs, settings)
    if stop:
        return
    furthest, others = furthest_offsets(admin, group, tuple(overlapping(table, workflows)), inputs, settings)
    if not furthest:
        return
    if state_in_kafka:
        ensure_changelog(admin, group, settings)
        copied = adopt(group, others, settings)
        log.info("%s: took over %d state entr%s of %s", group, copied, "y" if copied == 1 else "ies", ", ".join(others))
    move_offsets(admin, group, furthest, others, settings)


def refuse_if_overlapping(admin: KafkaAdminClient, table: Table, workflows: set[str], stop,
                          settings: Settings = SETTINGS) -> None:
    """End this orchestrator in one line while another one runs whose workflows overlap its own: both would route
    their events (the split ones and the single one are different consumer groups). A copy stopped just now is
    still a member until its session ends (a static member does not leave on close), so that is waited out first."""
    others, until = overlapping(table, workflows), time.monotonic() + SESSION_TIMEOUT_MS / 1000 + 2
    running = running_groups(admin, others, settings)
    if running:
        log.info("group%s %s ha%s a member; waiting up to %d s in case it was stopped just now",
                 "s" * (len(running) > 1), " and ".join(running), "ve" if len(running) > 1 else "s", until - time.monotonic())
    while running and time.monotonic() < until and not stop.wait(1.0):
        running = running_groups(admin, others, settings)
    if stop:
        return
    if running:
        raise SystemExit(overlap_refusal(workflows, others, running))


def overlap_refusal(workflows: set[str], others: dict[str, set[str]], running: dict) -> str:
    """What an orchestrator of `workflows` says when overlapping groups run: which, and what would start cleanly now
    (the workflows none of them runs, if any)."""
    busy = set().union(*(others[group] for group in running))
    rest, one, copies = sorted(workflows - busy), len(running) == 1, sum(map(len, running.values()))
    names = " and ".join(f"{group} (workflows {','.join(sorted(others[group]))})" for group in running)
    return (f"orchestrator: group{'' if one else 's'} {names} {'is' if one else 'are'} running ({copies} "
            f"cop{'y' if copies == 1 else 'ies'}), and {'both' if one else 'each'} would route "
            f"{','.join(sorted(workflows & busy))}. Stop {'it' if one else 'them'} first (Ctrl-C in "
            f"{'its terminal' if one else 'their terminals'}), then start this one: it starts where "
            f"{'that one' if one else 'they'} left off" + (f"; or run this one with --workflows {','.join(rest)}"
                                                           if rest else ""))


def rejoin_if_inputs_changed(admin: KafkaAdminClient, group: str, inputs: list[str], settings: Settings = SETTINGS):
    """A static member restarted within its session gets its old partitions back, even when it now reads more
    topics (an orchestrator moved to a later stage reads the source of a workflow that stage adds): the new topics' events
    would wait for the next rebalance. So when its last subscription differs, its old place is given up first."""
    try:
        mine = ours(admin, group, settings)
    except KafkaError:  # (the coordinator does not say: the new topics are read after the next rebalance)
        return
    wanted = {settings.topic(name) for name in inputs}
    if mine and set((mine[0].get("member_metadata") or {}).get("topics") or ()) != wanted:
        try:
            leave(admin, group, settings)
        except KafkaError as error:
            log.warning("%s: its inputs changed, but its old place in the group could not be given up (%s): the new "
                        "ones are read after the next rebalance", group, error)
            return
        log.info("%s: its inputs changed since it last ran; it joins its group afresh, so it reads them all at once",
                 group)


def running_groups(admin: KafkaAdminClient, groups: dict[str, set[str]], settings: Settings = SETTINGS) -> dict:
    """Those of these groups that have members now: group -> its members."""
    try:
        described = admin.describe_groups([settings.group(group) for group in groups])
    except AuthorizationError:  # a user who may not see those groups may not run in them either
        return {}
    return {group: members for group in groups if (members := described.get(settings.group(group), {}).get("members"))}


def replaced(admin: KafkaAdminClient, table: Table, settings: Settings = SETTINGS) -> set[str]:
    """Orchestrator groups with no member while one of other but overlapping workflows runs: split off, or joined
    back. Their lag means nothing: should they run again, they start where the running one left off."""
    every = orchestrator_groups(table)
    running = running_groups(admin, every, settings)
    return {group for group, theirs in every.items() if group not in running and any(theirs & every[r] for r in running)}


def furthest_offsets(admin: KafkaAdminClient, group: str, others: tuple[str, ...], inputs: list[str],
                     settings: Settings = SETTINGS) -> tuple[dict, tuple[str, ...]]:
    """Where any of `others` committed further than `group` on its `inputs`, partition by partition: the offsets
    that let it start where they left off instead of routing again what they routed; and those of `others` that
    ran at all (committed any offset there: the ones to take over from). Only ever forward: where it is ahead, it
    keeps its own. Nothing while a copy of the group runs already (it took over when it started)."""
    if not others or has_members(admin, group, settings):
        return {}, ()
    names, reads = [settings.group(name) for name in (group, *others)], {settings.topic(name) for name in inputs}
    offsets = committed_offsets(admin, names)
    own, furthest, ran = offsets.get(names[0]) or {}, {}, []
    for other, name in zip(others, names[1:], strict=True):
        # (another split one's topics are never read here, so never moved on)
        theirs = {tp: meta for tp, meta in (offsets.get(name) or {}).items() if tp.topic in reads}
        ran += [other] * bool(theirs)
        furthest |= {tp: meta for tp, meta in theirs.items() if further(meta, furthest.get(tp, own.get(tp)))}
    return furthest, tuple(ran)


def has_members(admin: KafkaAdminClient, group: str, settings: Settings) -> bool:
    return bool(admin.describe_groups([settings.group(group)]).get(settings.group(group), {}).get("members"))


def further(meta, than) -> bool:
    """Whether a committed offset is further than another (or than none)."""
    return than is None or meta.offset > than.offset


def committed_offsets(admin: KafkaAdminClient, names: list[str]) -> dict:
    """The committed offsets of these groups (real names, its own first); only its own if it may not see the others'."""
    try:
        return admin.list_group_offsets({name: None for name in names})
    except AuthorizationError:  # a user who may not see the others' groups: it cannot take over from them
        log.warning("%s: may not see groups %s, so it cannot start where they left off (if they ran, it routes "
                    "again what they routed; the commands have the same ids)", names[0], ", ".join(names[1:]))
        return admin.list_group_offsets({names[0]: None})


def move_offsets(admin: KafkaAdminClient, group: str, offsets: dict, others: tuple[str, ...],
                 settings: Settings = SETTINGS) -> None:
    """Commit `offsets` for `group` (it has no member now): it starts there."""
    failed = {tp: error for tp, error in admin.alter_group_offsets(settings.group(group), offsets).items()
              if error is not NoError}
    if failed:
        log.warning("could not start group %s where %s left off (%s): it routes again what they routed; the commands "
                    "have the same ids, so services ignore them", group, ", ".join(others), failed)
    else:
        log.info("group %s starts where %s left off (%d partition%s moved forward)", group, " and ".join(others),
                 len(offsets), "" if len(offsets) == 1 else "s")


def adopt(group: str, others: tuple[str, ...], settings: Settings = SETTINGS) -> int:
    """Copy into a group's state topic every entry that one of `others` wrote later than it did, to the same
    partition: the group takes over what they knew too. Returns how many entries were copied."""
    newer = [(slot, entry) for slot, (_, writer, entry, _) in  # (its own last: on a tie its own stands, so copying
             latest_entries((*others, group), settings).items() if writer != group]  # twice copies nothing)
    if newer:
        producer = KafkaProducer(**settings.kafka_config(), acks="all", linger_ms=20, batch_size=256 * 1024)
        try:
            futures = [producer.send(settings.topic(changelog(group)), key=key, value=value, partition=partition)
                       for (partition, key), value in newer]
            wait_for_acks(producer, futures, f"copying state into {changelog(group)}")
        finally:
            producer.close(timeout=10)
    return len(newer)
