"""notification_service against a real broker: delivers, publishes to third_party, ignores repeats."""

from helpers import detection

from contracts import NOTIFICATION_COMMAND, THIRD_PARTY
from orchestrator import route


def notification_command(severity=5):
    return route(detection(severity), stage=1)[1][1]


def test_a_notification_is_delivered_and_published_to_third_party(scripts, topics, producer):
    # Given the notification service is running
    service = scripts.start("notification_service.py")
    command = notification_command(severity=5)
    # When a command arrives
    producer(NOTIFICATION_COMMAND, command)
    # Then the outbound feed gets the delivered record with the workflow id
    [delivered] = topics(THIRD_PARTY).read_count(1)
    assert delivered.type == "notification_delivered" and delivered.workflow_id == command.workflow_id
    assert delivered.payload == command.payload
    assert "NOTIFY pager on-duty-zone-1" in scripts.output(service)


def test_a_redelivered_notification_is_sent_once(scripts, topics, producer):
    scripts.start("notification_service.py")
    repeated, last = notification_command(), notification_command()
    for command in (repeated, repeated, last):
        producer(NOTIFICATION_COMMAND, command)
    delivered = topics(THIRD_PARTY).read_until(lambda ms: any(m.workflow_id == last.workflow_id for m in ms))
    assert [m.workflow_id for m in delivered] == [repeated.workflow_id, last.workflow_id]
