"""The web console in a real headless browser (Debian's chromium, driven by Playwright), against a real broker: a
workflow sent during the test shows, a state change shows without a reload, and a cancel made in the page reaches
the orchestrator. And the console's own one-line refusals."""

import re
import shutil
import socket
import time

import pytest
from helpers import detection, ids_of, unit_event
from playwright.sync_api import expect, sync_playwright

import local_kafka
from common import MESSAGE_STREAM
from contracts import SEC_COMMAND

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def page():
    assert CHROMIUM, "the console's tests need a headless browser: apt-get install chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser.new_page(viewport={"width": 1400, "height": 900})
        browser.close()


def console(scripts) -> str:
    """A console on a free port; its address once it serves."""
    port = local_kafka.free_port()
    process = scripts.start("console.py", "--port", str(port))
    scripts.wait_for_output(process, f"console: http://127.0.0.1:{port}")
    return f"http://127.0.0.1:{port}"


def test_the_page_shows_a_new_workflow_its_state_changes_live_and_a_cancel_reaches_the_orchestrator(
        scripts, topics, producer, page):
    # Given the orchestrator (no security service: a workflow waits for its action) and the console, open in a browser
    orchestrator = scripts.start("orchestrator.py", "--example", "1", "--step-timeout", "300")
    page.goto(console(scripts))
    expect(page.locator("#workflows")).to_be_visible()
    # When two detections are sent
    stream, first, second = topics(MESSAGE_STREAM), detection(), detection()
    sent = time.monotonic()
    producer(MESSAGE_STREAM, first, key=b"sensor-1")
    producer(MESSAGE_STREAM, second, key=b"sensor-2")
    # Then they show in the page without a reload, running
    row = page.locator(f'tr[data-id="{first.workflow_id}"]')
    expect(row.locator(".state")).to_have_text("running", timeout=30_000)
    # And a unit event, which an orchestrator at Example 1 does not read, shows waiting in Kafka (stuck once past the
    # SLA), not routed
    waiting = unit_event()
    producer(MESSAGE_STREAM, waiting, key=b"unit-1")
    expect(page.locator(f'tr[data-id="{waiting.workflow_id}"] .state')).to_have_text(re.compile("waiting|stuck"),
                                                                                       timeout=30_000)
    print(f"console: a new workflow showed {time.monotonic() - sent:.1f} s after its detection was sent")
    # And when the security service starts, their rows turn completed without a reload
    topics(SEC_COMMAND).read_until(lambda ms: {first.workflow_id, second.workflow_id} <= {m.workflow_id for m in ms})
    other = page.locator(f'tr[data-id="{second.workflow_id}"] .state')
    expect(other).to_have_text("running")
    page.evaluate("window.notReloaded = true")
    security = scripts.start("security_service.py")
    stream.read_until(lambda ms: second.workflow_id in ids_of(ms, "workflow_completed"))
    expect(other).to_have_text("completed", timeout=90_000)
    # And when, the security service stopped again, a third detection comes, and a person opens its workflow and
    # cancels it in the page, giving a reason
    scripts.stop(security)
    third = detection()
    producer(MESSAGE_STREAM, third, key=b"sensor-3")
    page.locator(f'tr[data-id="{third.workflow_id}"] a').click(timeout=30_000)
    expect(page.locator("#state")).to_have_text("running")
    page.locator("#cancel").click()
    page.locator("#ask-reason").fill("a drill")
    page.locator("#ask-by").fill("ann")
    page.locator("#ask-go").click()
    # Then the orchestrator answered in the page, the page shows the workflow cancelled, and it was not reloaded
    expect(page.locator("#answer")).to_contain_text("done: cancelled", timeout=90_000)
    expect(page.locator("#state")).to_have_text("cancelled", timeout=90_000)
    assert page.evaluate("window.notReloaded") is True
    stream.read_until(lambda ms: third.workflow_id in ids_of(ms, "workflow_cancelled"))
    assert [m.payload["by"] for m in stream.messages() if m.type == "workflow_cancel_requested"] == ["ann"]
    assert f"workflow_cancel_requested {third.workflow_id[:8]} by ann (a drill)" in scripts.output(orchestrator)
    # And when two more wait for their action, and a person finds the running ones of sensor-4 and cancels them all
    fourth, fifth = detection(), detection()
    for event in (fourth, fifth):
        producer(MESSAGE_STREAM, event.model_copy(update={"payload": {**event.payload, "sensor_id": "sensor-4"}}),
                 key=b"sensor-4")
    page.locator("nav a", has_text="Workflows").click()
    page.locator("a", has_text="running").first.click()
    page.locator('#search input[name="entity"]').fill("sensor-4")
    page.locator("#search button").click()
    expect(page.locator(".pages")).to_contain_text("2 workflows", timeout=30_000)
    page.locator("#bulk-cancel").click()
    expect(page.locator("#ask-title")).to_have_text("Cancel 2 workflows?")
    page.locator("#ask-reason").fill("sensor-4 replaced")
    page.locator("#ask-go").click()
    # Then one request went for each, and the page says both were granted
    expect(page.locator("#answer")).to_contain_text("cancel: 2 of 2 granted", timeout=90_000)
    stream.read_until(lambda ms: {fourth.workflow_id, fifth.workflow_id} <= ids_of(ms, "workflow_cancelled"))


def test_the_console_refuses_a_port_in_use_with_one_line(scripts):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = scripts.run("console.py", "--port", str(taken.getsockname()[1]), check=False)
    assert result.returncode == 1 and result.stderr.strip().startswith("console: cannot serve on 127.0.0.1:")
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.no_broker
def test_the_buttons_are_off_on_a_secured_cluster_without_the_operators_credentials(monkeypatch):
    import console
    from common import Settings
    secured = Settings(sign_in={"sasl_plain_username": "monitor", "sasl_plain_password": "x"})
    monkeypatch.delenv("KAFKA_OPERATOR_USERNAME", raising=False)
    assert console.actions_off(Settings()) is None
    assert "KAFKA_OPERATOR_USERNAME" in console.actions_off(secured)
    monkeypatch.setenv("KAFKA_OPERATOR_USERNAME", "operator")
    assert console.actions_off(secured) is None
