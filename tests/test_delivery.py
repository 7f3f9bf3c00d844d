"""How a batch is delivered and how delivery recovers, without Kafka: a fake producer and consumer fail the way
kafka-python does (a failed commit, a stuck transaction step, fencing, a refusal hidden behind a plain error).
The same recoveries against a real broker: test_reliability.py, test_scale_out.py and test_cluster.py."""

import threading
from types import SimpleNamespace

import pytest
from kafka.errors import (
    FencedInstanceIdError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotCoordinatorError,
    ProducerFencedError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)
from kafka.structs import OffsetAndMetadata, TopicPartition

import common.delivery
import common.workarounds
from common.delivery import Delivery
from common.messages import new_event

pytestmark = pytest.mark.no_broker  # runs in `make check`

PARTITION = TopicPartition("t_message_stream", 0)
OFFSETS = {PARTITION: OffsetAndMetadata(10, "", -1)}


class Done:
    """A send's future, already settled: acknowledged (at `value`: topic, partition, offset), or failed."""
    is_done = True

    def __init__(self, exception: Exception | None = None, value=None):
        self.exception, self.value = exception, value

    def failed(self) -> bool:
        return self.exception is not None

    def succeeded(self) -> bool:
        return self.exception is None

    def get(self, timeout=None):
        if self.exception:
            raise self.exception


class FakeProducer:
    """Records what it is asked; `fail` maps a step name to the error it raises (or "block": never returns)."""

    def __init__(self, fail: dict | None = None):
        self.fail, self.calls, self.sent = dict(fail or {}), [], []
        self.released = threading.Event()
        self._transaction_manager = type("TransactionManager", (), {"last_error": None})()
        self._sender = type("Sender", (), {"force_close": lambda _: self.calls.append("force_close")})()

    def _step(self, name):
        self.calls.append(name)
        outcome = self.fail.pop(name, None)
        if outcome == "block":
            self.released.wait(5)
        elif outcome is not None:
            raise outcome

    def begin_transaction(self):
        self._step("begin")

    def send(self, topic, value=None, key=None, partition=None, headers=None):
        self.sent.append(topic)
        return Done(self.fail.pop("send", None), SimpleNamespace(topic=topic, partition=0, offset=len(self.sent) - 1))

    def send_offsets_to_transaction(self, offsets, group_metadata):
        self._step("send_offsets")

    def commit_transaction(self):
        self._step("commit")

    def abort_transaction(self):
        self._step("abort")

    def flush(self, timeout=None):
        self._step("flush")

    def close(self, timeout=None):
        self._step("close")


class FakeConsumer:
    """Committed offsets kept in a dict; every call records the timeout it was given."""

    def __init__(self, committed: int | None = None, fail_commit: Exception | None = None):
        self.offsets = {PARTITION: committed} if committed is not None else {}
        self.fail_commit, self.timeouts = fail_commit, []

    def group_metadata(self):
        return "group-metadata"

    def commit(self, offsets, timeout_ms=None):
        self.timeouts.append(("commit", timeout_ms))
        if self.fail_commit:
            raise self.fail_commit
        self.offsets.update({tp: meta.offset for tp, meta in offsets.items()})

    def committed(self, partition, timeout_ms=None):
        self.timeouts.append(("committed", timeout_ms))
        return self.offsets.get(partition)


class NeverStopped:
    def __bool__(self):
        return False

    def wait(self, seconds):
        return False


def delivery(*producers: FakeProducer, transactional: bool = True) -> tuple[Delivery, list[FakeProducer]]:
    """A Delivery whose producers are `producers`, in order (one each time it makes a new one)."""
    queue, made = list(producers), []

    def new_producer(**kwargs):
        made.append(queue.pop(0))
        return made[-1]
    return Delivery("svc", NeverStopped(), "svc-1" if transactional else None, new_producer=new_producer), made


def outputs():
    event = new_event("security_detection", {"sensor_id": "s", "zone": "z", "kind": "smoke", "severity": 2}, "t")
    return [("sec_command", event, b"s"), ("notification_command", event, b"s")]


def test_a_batch_commits_its_outputs_and_offsets_in_one_transaction():
    d, made = delivery(FakeProducer())
    assert d.write(FakeConsumer(), outputs(), OFFSETS) is True
    assert made[0].calls == ["begin", "send_offsets", "commit"] and len(made[0].sent) == 2


def test_a_failed_commit_is_aborted_and_the_batch_handled_again_with_the_same_producer():
    d, made = delivery(FakeProducer(fail={"commit": NotCoordinatorError("moved")}))
    consumer = FakeConsumer()
    assert d.write(consumer, outputs(), OFFSETS) is False
    assert made[0].calls[-1] == "abort"
    assert d.write(consumer, outputs(), OFFSETS) is True and len(made) == 1


def test_a_stuck_commit_gives_up_the_producer_and_a_new_one_finds_the_batch_committed(monkeypatch):
    # Given a commit step that never returns (kafka-python 3.0.12 when the coordinator's broker dies), bounded at 0.2 s
    monkeypatch.setattr(common.workarounds, "TRANSACTION_STEP_TIMEOUT_S", 0.2)
    stuck, fresh = FakeProducer(fail={"commit": "block"}), FakeProducer()
    d, made = delivery(stuck, fresh)
    # When the batch is delivered, and the group's committed offsets show the commit went through after all
    result = d.write(FakeConsumer(committed=10), outputs(), OFFSETS)
    stuck.released.set()
    # Then the stuck producer is closed, a new one is made, and the batch counts as delivered (not handled twice)
    assert result is True and made == [stuck, fresh] and "close" in stuck.calls and "abort" not in stuck.calls


def test_a_stuck_commit_that_did_not_go_through_is_handled_again(monkeypatch):
    monkeypatch.setattr(common.workarounds, "TRANSACTION_STEP_TIMEOUT_S", 0.2)
    stuck = FakeProducer(fail={"send_offsets": "block"})
    d, made = delivery(stuck, FakeProducer())
    consumer = FakeConsumer(committed=4)
    assert d.write(consumer, outputs(), OFFSETS) is False
    stuck.released.set()
    assert len(made) == 2 and ("committed", 6000) in consumer.timeouts  # the look-up is bounded too


@pytest.mark.parametrize("committed", [True, False])
def test_a_stuck_commit_of_a_batch_that_consumed_nothing_is_found_out_by_reading_an_output_back(monkeypatch, committed):
    # Given a tick's events (no record consumed: no committed offset can tell), whose commit step never returns
    monkeypatch.setattr(common.workarounds, "TRANSACTION_STEP_TIMEOUT_S", 0.2)
    asked = []
    monkeypatch.setattr(common.delivery, "read_back", lambda settings, written, stop: asked.append(written) or committed)
    stuck = FakeProducer(fail={"commit": "block"})
    d, made = delivery(stuck, FakeProducer())
    # When they are delivered
    result = d.write(FakeConsumer(committed=10), outputs(), {}, {})
    stuck.released.set()
    # Then whether they committed is read back from the first of them, once a new producer settled the transaction:
    # written again only if they did not (a tick's events were written twice after an unclear commit)
    assert result is committed and len(made) == 2 and [(w.topic, w.offset) for w in asked] == [("sec_command", 0)]


def test_a_batch_of_timers_alone_is_not_taken_for_committed_by_its_fencing_offsets(monkeypatch):
    # Given timers' messages whose offsets only fence them (the group's position, committed before), a stuck commit
    monkeypatch.setattr(common.workarounds, "TRANSACTION_STEP_TIMEOUT_S", 0.2)
    monkeypatch.setattr(common.delivery, "read_back", lambda settings, written, stop: False)
    stuck = FakeProducer(fail={"commit": "block"})
    d, _ = delivery(stuck, FakeProducer())
    # When they are delivered: the committed offsets cover those offsets, as they did before the batch
    result = d.write(FakeConsumer(committed=10), outputs(), OFFSETS, {})
    stuck.released.set()
    # Then that is no sign the batch committed: its output read back says it did not, so it is written again
    assert result is False


def test_fenced_once_takes_a_new_producer_and_fenced_again_soon_means_another_copy_runs():
    # Given producers that another process fences (a fenced producer cannot abort either)
    def fenced_producer():
        return FakeProducer(fail={"commit": ProducerFencedError("fenced"), "abort": ProducerFencedError("fenced")})
    d, made = delivery(fenced_producer(), fenced_producer())
    # When a batch meets fencing once: a new producer, and the batch is handled again
    assert d.write(FakeConsumer(), outputs(), OFFSETS) is False and len(made) == 2
    # Then fencing again within 30 s stops the service (FencedInstanceIdError), instead of a fencing war
    with pytest.raises(FencedInstanceIdError):
        d.write(FakeConsumer(), outputs(), OFFSETS)


def test_a_refusal_hidden_behind_a_plain_error_ends_the_script():
    # kafka-python 3.0.12 reports a refused write inside a transaction as a plain KafkaError
    producer = FakeProducer(fail={"commit": KafkaError("... error state: TopicAuthorizationFailedError")})
    producer._transaction_manager.last_error = TopicAuthorizationFailedError("sec_command")
    d, _ = delivery(producer)
    with pytest.raises(SystemExit) as stopped:
        d.write(FakeConsumer(), outputs(), OFFSETS)
    assert stopped.value.code == 3


def test_at_least_once_commits_with_a_bound_only_after_every_output_is_acknowledged():
    d, made = delivery(FakeProducer(), transactional=False)
    consumer = FakeConsumer()
    assert d.write(consumer, outputs(), OFFSETS) is True
    assert made[0].calls == ["flush"] and consumer.offsets[PARTITION] == 10 and consumer.timeouts == [("commit", 6000)]


def test_at_least_once_a_commit_that_times_out_is_handled_again():
    d, _ = delivery(FakeProducer(), transactional=False)
    assert d.write(FakeConsumer(fail_commit=KafkaTimeoutError("no answer")), outputs(), OFFSETS) is False


def test_a_producer_that_could_not_start_is_made_again_on_the_next_batch():
    def new_producer(**kwargs):
        made.append(kwargs)
        if len(made) == 1:
            raise KafkaTimeoutError("broker away")
        return FakeProducer()
    made: list = []
    d = Delivery("svc", NeverStopped(), None, new_producer=new_producer)
    assert d.write(FakeConsumer(), outputs(), OFFSETS) is False
    assert d.write(FakeConsumer(), outputs(), OFFSETS) is True and len(made) == 2


def test_a_record_refused_before_it_joined_the_transaction_aborts_it_instead_of_committing_without_it():
    # kafka-python fails such a record only in its future; the commit would otherwise succeed without it
    d, made = delivery(FakeProducer(fail={"send": UnknownTopicOrPartitionError("no such topic")}))
    assert d.write(FakeConsumer(), outputs(), OFFSETS) is False
    assert "commit" not in made[0].calls and made[0].calls[-1] == "abort"


def test_a_batch_kafka_refuses_for_good_is_delivered_record_by_record_and_the_refused_one_dead_lettered():
    from common.handling import Handled

    class Record:
        topic, partition, key, value = "t_sec_command", 0, b"k", b"{}"

        def __init__(self, offset):
            self.offset = offset

    class TooLarge(FakeProducer):  # refuses any transaction holding the oversized record
        def send(self, topic, value=None, key=None, partition=None, headers=None):
            self.sent.append(topic)
            return Done(MessageSizeTooLargeError("too large") if value == b"huge" else None)

    d, made = delivery(TooLarge(), TooLarge(), TooLarge())
    handled = [Handled(Record(0), [("t_out", b"a", b"k")]), Handled(Record(1), [("t_out", b"huge", b"k")]),
               Handled(Record(2), [("t_out", b"c", b"k")])]
    done, own = d.deliver(FakeConsumer(), [], handled)
    assert [item.record.offset for item in done] == [0, 1, 2] and own
    assert done[0] is handled[0] and done[2] is handled[2]
    assert [out.topic for out in done[1].outputs] == ["dead_letter.svc"]


def test_a_batchs_own_messages_go_after_its_records_outputs_and_their_state_changes_after_the_records():
    # (a timer fired in the same batch as an event of its workflow builds on the event's change: it must land last,
    # in Kafka and in memory, or the older entry wins and the timer fires again)
    from common.handling import Handled, serialised
    from common.loop import Loop
    d, made = delivery(FakeProducer())
    record = SimpleNamespace(topic="t_message_stream.svc", partition=0, offset=3)
    event = outputs()[0][1]
    handled = [Handled(record, [serialised("from_the_record", event, b"k")], ["record's change"])]
    d.deliver(FakeConsumer(), [serialised("the_timers", event, b"k")], handled, {})
    assert made[0].sent == ["from_the_record", "the_timers"]
    committed = []
    loop = SimpleNamespace(unsent=[], count=0, store=SimpleNamespace(commit=lambda changes, fired: committed.extend(changes)))
    Loop.remember_committed(loop, handled, ["timer's change"], True)
    assert committed == ["record's change", "timer's change"]


def test_a_batch_of_records_and_messages_of_its_own_is_found_out_by_its_own_not_by_the_groups_offsets(monkeypatch):
    # Given a tick's event in the same transaction as a handled record; the transaction aborted (it outlived its
    # time while the copy was frozen), and the copy that took the record over committed the group's offset past it
    asked = []
    monkeypatch.setattr(common.delivery, "read_back", lambda settings, written, stop: asked.append(written) or False)
    d, _ = delivery(FakeProducer(fail={"commit": ProducerFencedError("fenced")}), FakeProducer())
    # When it is delivered
    result = d.write(FakeConsumer(committed=10), outputs(), OFFSETS, OFFSETS, own=1)
    # Then its own event, read back, says it did not commit: it is sent again (the offsets alone would have lost it)
    assert result is False and [written.topic for written in asked] == ["notification_command"]
