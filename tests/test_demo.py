"""`make demo`'s walkthrough runs to its final line with nothing lost, against the real broker."""

import re
import subprocess
import sys

from helpers import ROOT


def test_the_demo_walks_examples_1_to_3_and_loses_nothing(env):
    # When the demo runs its short version
    result = subprocess.run([sys.executable, "demo.py", "--quick"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=240)
    # Then it ends with the summary line: every workflow completed, none lost, none doubled
    last = result.stdout.strip().splitlines()[-1]
    found = re.fullmatch(r"demo: workflows=(\d+) completed=(\d+) lost=(\d+) duplicates=(\d+) reports=(\d+) "
                         r"restart_gap_s=(\d+\.\d)", last)
    assert found, f"unexpected last line {last!r}\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}"
    workflows, completed, lost, duplicates = map(int, found.groups()[:4])
    assert workflows > 20 and completed == workflows and lost == 0 and duplicates == 0
    assert "Example 3" in result.stdout and "replayed" in result.stdout
    assert result.returncode == 0
