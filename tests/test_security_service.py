"""security_service against a real broker: acts on commands, reports outcomes, ignores repeats, dead-letters junk."""

from helpers import detection

from common import MESSAGE_STREAM
from contracts import SEC_COMMAND
from orchestrator import route


def security_command(severity=3):
    return route(detection(severity), stage=1)[0][1]


def test_a_command_is_carried_out_and_reported_with_its_workflow_id(scripts, topics, producer):
    # Given the security service is running
    scripts.start("security_service.py")
    command = security_command(severity=3)
    # When a lock_zone command arrives
    producer(SEC_COMMAND, command, key=b"sensor-1")
    # Then it reports the action completed, for the same workflow
    [outcome] = topics(MESSAGE_STREAM).read_count(1, type_="security_action_completed")
    assert outcome.workflow_id == command.workflow_id
    assert outcome.payload == {"action": "lock_zone", "zone": "zone-1", "detail": "zone locked"}


def test_a_redelivered_command_has_no_second_effect(scripts, topics, producer):
    # Given the service is running
    service = scripts.start("security_service.py")
    repeated, last = security_command(), security_command()
    # When the same command arrives twice, followed by another
    for command in (repeated, repeated, last):
        producer(SEC_COMMAND, command)
    # Then there is one outcome per distinct command, in order
    outcomes = topics(MESSAGE_STREAM).read_until(lambda ms: any(m.workflow_id == last.workflow_id for m in ms))
    assert [m.workflow_id for m in outcomes] == [repeated.workflow_id, last.workflow_id]
    assert "ignoring the redelivery" in scripts.output(service)


def test_junk_and_wrong_types_go_to_dead_letter_and_the_service_goes_on(scripts, topics, producer):
    # Given the service is running
    scripts.start("security_service.py")
    good = security_command()
    # When junk, a message of another type, and then a good command arrive
    producer(SEC_COMMAND, b"{not json")
    producer(SEC_COMMAND, detection())
    producer(SEC_COMMAND, good)
    # Then both bad ones are dead-lettered with reasons and the good one is still carried out
    letters = topics("dead_letter").read_count(2)
    assert letters[0].payload["reason"].startswith("not valid JSON")
    assert letters[1].payload["reason"] == "unexpected type 'security_detection'; this service handles security_command"
    assert [m.payload["offset"] for m in letters] == [0, 1]
    [outcome] = topics(MESSAGE_STREAM).read_count(1)
    assert outcome.workflow_id == good.workflow_id
