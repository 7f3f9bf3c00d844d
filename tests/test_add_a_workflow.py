"""A workflow of one's own, added as docs/architecture.md tells, in top-level files only: in a copy of the project a
maintenance workflow (its topic and schemas in contracts.py; its branches, command builders and one WORKFLOWS entry
whose steps follow each other in orchestrator.py; a small service and an event source beside them, tests/added/)
passes the copy's `make check`, and runs end to end against the broker, as the monitor and workflows.py show it."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import NO_RESENDS, ROOT, Scripts, TopicReader

ADDED = Path(__file__).resolve().parent / "added"  # the two new scripts, as a user writes them

CONTRACTS = '''

MAINTENANCE_COMMAND = "maintenance_command"    # orchestrator -> maintenance_crew


class MaintenanceDue(Schema):  # maintenance_planner -> message_stream: starts the maintenance workflow
    asset: str = Field(min_length=1, max_length=64)


class MaintenanceTask(Schema):  # orchestrator -> maintenance_command, and maintenance_crew -> message_stream
    asset: str = Field(min_length=1, max_length=64)
    task: Literal["inspect", "repair"]


MESSAGES |= contract({"maintenance_due": MaintenanceDue, "maintenance_command": MaintenanceTask,
                      "maintenance_done": MaintenanceTask})
'''
ROUTE = '''    elif event.type == "maintenance_due":  # a workflow of one's own: inspect, then repair
        return [(MAINTENANCE_COMMAND, maintain(event, "inspect")), (NOTIFICATION_COMMAND, desk(event))]
    elif event.type == "maintenance_done" and event.payload["task"] == "inspect":
        return [(MAINTENANCE_COMMAND, maintain(event, "repair"))]
'''
BUILDERS = '''

def maintain(event: Envelope, task: str) -> Envelope:
    return caused_by(event, task, "maintenance_command", {"asset": event.payload["asset"], "task": task}, SOURCE)


def desk(event: Envelope) -> Envelope:
    return caused_by(event, "desk", "notification_command", {
        "channel": "email", "recipient": "maintenance-desk", "text": f"{event.payload['asset']} is due"}, SOURCE)
'''
ENTRY = '''    "maintenance": Workflow("maintenance_due", "maintenance_planner", steps=(
        Step("inspected", "maintenance_command", MAINTENANCE_COMMAND, "maintenance_crew", time_limit=5.0,
             done=("maintenance_done",)),
        Step("announced", "notification_command", NOTIFICATION_COMMAND, "notification_service"),
        Step("repaired", "maintenance_command", MAINTENANCE_COMMAND, "maintenance_crew", after="inspected",
             time_limit=5.0, done=("maintenance_done",)),
        Step("escalated", "notification_command", NOTIFICATION_COMMAND, "notification_service",
             after=("inspected", "repaired"), when="failed"))),
'''


def inserted(text: str, before: str, added: str) -> str:
    """`text` with `added` put in front of `before`, which must be there once."""
    assert text.count(before) == 1, f"the copy's file no longer has {before!r} once: docs/architecture.md is out of date"
    return text.replace(before, added + before)


def added_to_a_copy(into: Path) -> Path:
    """A copy of the project (the files git would commit) with the maintenance workflow added."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, into / name)
    for script in ADDED.glob("*.py"):  # 1. the new scripts, beside the others
        shutil.copy2(script, into / script.name)
    contracts = into / "contracts.py"  # 2. the topic and the schemas, in the contracts
    contracts.write_text(contracts.read_text() + CONTRACTS)
    orchestrator = into / "orchestrator.py"  # 3. the branches, the builders and the entry, in the table
    text = inserted(orchestrator.read_text(), "from contracts import ", "from contracts import MAINTENANCE_COMMAND\n")
    text = inserted(text, '    elif event.type == "step_timed_out" and', ROUTE)
    text = inserted(text, "\n\n# Each workflow once", BUILDERS)
    orchestrator.write_text(inserted(text, "}\n\n\ndef main()", ENTRY))
    return into


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return added_to_a_copy(tmp_path_factory.mktemp("project"))


def test_a_workflow_added_in_top_level_files_only_keeps_make_check_green(project):
    # Given the copy with a third workflow, whose steps follow each other
    engine = sorted(path.name for path in (ROOT / "common").glob("*.py"))
    assert [name for name in engine if (project / "common" / name).read_bytes() != (ROOT / "common" / name).read_bytes()] \
        == [] and sorted(path.name for path in (project / "common").glob("*.py")) == engine  # (the engine as it was)
    # When its broker-free tests and lint run, with this environment's packages (no new virtual environment)
    env = Path(sys.prefix)
    checked = subprocess.run(["make", "check", f"VENV={env}", "-o", f"{env}/.installed"], cwd=project,
                             capture_output=True, text=True, timeout=300)
    # Then all pass: no test that is not about the new workflow breaks, and the walk of every path tests it too
    assert checked.returncode == 0, checked.stdout[-4000:] + checked.stderr[-2000:]
    assert "maintenance" in subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "no_broker",
                                            "tests/test_routing_table.py"], cwd=project, capture_output=True,
                                           text=True).stdout


def test_a_workflow_added_runs_end_to_end_and_the_tools_show_it(project, env, tmp_path):
    # Given the copy's orchestrator, its new service and the notification service running
    scripts = Scripts(env, tmp_path, root=project)
    try:
        crew = scripts.start("maintenance_crew.py")
        scripts.start("notification_service.py")
        orchestrator = scripts.start("orchestrator.py", *NO_RESENDS)
        for process, said in ((crew, "maintenance_crew: started"), (orchestrator, "orchestrator: started")):
            scripts.wait_for_output(process, said)
        [started] = [line for line in scripts.output(orchestrator).splitlines() if "routing table:" in line]
        assert {"maintenance", "security", "unit"} <= set(started.split("workflows ", 1)[1].split(", "))
        # When three assets fall due
        began = time.monotonic()
        scripts.run("maintenance_planner.py", "--count", "3")
        # Then each is inspected, then repaired (a step after a step), and each workflow completes once
        stream = TopicReader(env, "message_stream")
        done = stream.read_count(3, timeout=90, type_="workflow_completed")
        print(f"three maintenance workflows completed {time.monotonic() - began:.1f} s after they fell due")
        tasks = [m.payload["task"] for m in stream.messages() if m.type == "maintenance_done"]
        assert sorted(tasks) == ["inspect"] * 3 + ["repair"] * 3
        assert len({m.workflow_id for m in done}) == 3
        stream.close()
        # And workflows.py shows one's steps in the order they were sent, each with what it follows
        shown = json.loads(scripts.run("workflows.py", "show", done[0].workflow_id, "--json").stdout)
        assert (shown["type"], shown["state"]) == ("maintenance", "completed")
        assert [(s["name"], s["state"], s["follows"]) for s in shown["steps"]] == [
            ("inspected", "done", ""), ("announced", "sent", ""), ("repaired", "done", "inspected done")]
        # And the monitor counts them completed, none stuck
        seen = json.loads(scripts.run("monitor.py", "--once", "--json").stdout)
        assert seen["workflows"] == {"started": 3, "completed": 3, "failed": 0, "cancelled": 0, "stuck": 0, "running": 0,
        "dead_lettered": 0}
        assert seen["steps_followed"] == 3 and seen["duplicate_effects"] == 0
        # And an orchestrator of its own (--workflows maintenance) takes over from the one group that ran, only
        scripts.stop(orchestrator)
        split = scripts.start("orchestrator.py", "--workflows", "maintenance", *NO_RESENDS)
        scripts.wait_for_output(split, "orchestrator-maintenance: took over")
        took = next(line for line in scripts.output(split).splitlines() if "took over" in line)
        assert took.endswith(" of orchestrator"), took
    finally:
        scripts.stop_all()
