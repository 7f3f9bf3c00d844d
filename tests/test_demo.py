"""`make demo`'s walkthrough runs to its final line with nothing lost, against the real broker; `make reset` starts
the walkthrough over; `make walkthrough` lays out its terminals."""

import os
import re
import subprocess
import sys

from helpers import NO_RESENDS, ROOT, wait_for_reports
from kafka import KafkaAdminClient


def test_the_demo_walks_examples_1_to_4_and_loses_nothing(env):
    # When the demo runs its short version, under a topic prefix of its own (as for a user who sets none)
    own = {name: value for name, value in env.items() if name != "TOPIC_PREFIX"}
    result = subprocess.run([sys.executable, "demo.py", "--quick"], cwd=ROOT, env=own, capture_output=True, text=True,
                            timeout=240)
    # Then it ends with the summary line: every workflow completed, none lost, none doubled
    last = result.stdout.strip().splitlines()[-1]
    found = re.fullmatch(r"demo: workflows=(\d+) completed=(\d+) lost=(\d+) duplicates=(\d+) reports=(\d+) "
                         r"restart_gap_s=(\d+\.\d) followed=(\d+)", last)
    assert found, f"unexpected last line {last!r}\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}"
    workflows, completed, lost, duplicates = map(int, found.groups()[:4])
    assert workflows > 20 and completed == workflows and lost == 0 and duplicates == 0
    assert "Example 3" in result.stdout and "waited in Kafka were routed" in result.stdout
    # And Example 4's steps that follow steps were sent, and their workflows completed with them
    assert int(found.group(7)) > 0 and "a workflow of steps one after another completed" in result.stdout
    assert re.search(r"Watch it in a browser: http://127\.0\.0\.1:\d+ \(the web console", result.stdout)
    assert result.returncode == 0
    # And it deleted the topics it made under its prefix
    prefix = re.search(r"topics prefixed '(demo\w+_)'", result.stdout).group(1)
    admin = KafkaAdminClient(bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    try:
        assert [t for t in admin.list_topics() if t.startswith(prefix)] == []
    finally:
        admin.close()


# (needs no broker, but opens tmux and five shells: it runs in `make test`, keeping `make check` within seconds)
def test_make_walkthrough_opens_a_tmux_session_with_a_window_per_script(tmp_path):
    env = dict(os.environ, TMUX_TMPDIR=str(tmp_path), KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1")  # (a tmux of its own)
    try:
        opened = subprocess.run([sys.executable, "demo.py", "--tmux"], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=60)
        assert opened.returncode == 0 and "attach with: tmux attach -t walkthrough" in opened.stdout
        assert "the web console: http://127.0.0.1:8080" in opened.stdout
        windows = subprocess.run(["tmux", "list-windows", "-t", "walkthrough", "-F", "#{window_name}"], env=env,
                                 capture_output=True, text=True, check=True).stdout.split()
        assert windows == ["security", "notification", "orchestrator", "detector", "monitor", "console", "reporting",
                           "units"]
        again = subprocess.run([sys.executable, "demo.py", "--tmux"], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=60)
        assert again.stdout == ("tmux session 'walkthrough' is open already, its scripts as you left them (`tmux "
                                "kill-session -t walkthrough` ends it, for a fresh one)\n"
                                "attach with: tmux attach -t walkthrough\n")  # (the open one is kept, not doubled)
    finally:
        subprocess.run(["tmux", "kill-server"], env=env, capture_output=True)


def test_make_reset_deletes_the_walkthroughs_topics_groups_state_and_report_store(scripts, env):
    # Given a walkthrough that ran: a detection routed and reported
    orchestrator = scripts.start("orchestrator.py", "--example", "2", *NO_RESENDS)
    reporting = scripts.start("reporting_service.py")
    scripts.run("security_detector.py", "--count", "1")
    wait_for_reports(scripts, 1)
    # When its scripts are stopped and it is reset
    scripts.stop(orchestrator)
    scripts.stop(reporting)
    result = scripts.run("demo.py", "--reset", env=dict(env, LOG_LEVEL="WARNING"))
    # Then its topics (state ones too), consumer groups and report store are gone
    assert result.stdout.startswith("reset: deleted ")
    admin = KafkaAdminClient(bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    try:
        assert [t for t in admin.list_topics() if t.startswith(env["TOPIC_PREFIX"])] == []
        assert not any(admin.list_group_offsets({env["TOPIC_PREFIX"] + g: None for g in ("orchestrator",
                                                                                       "reporting_service")}).values())
    finally:
        admin.close()
    assert not os.path.exists(env["REPORT_DB"])


# (needs no broker, but waits 10 s for one: it runs in `make test`, keeping `make check` within seconds)
def test_the_demos_clean_up_says_in_one_line_that_the_broker_is_gone(capsys):
    # (found by hand: a broker that vanished during the demo's clean-up ended it in a 40-line traceback)
    import demo
    from common import Settings
    demo.clean_up(Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="demoabc_"))
    [line] = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("demo: could not delete its topics prefixed 'demoabc_': Kafka at 127.0.0.1:1 does not answer")
