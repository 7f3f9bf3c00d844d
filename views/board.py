"""The flow drawn for a terminal (rich): the workflows' counts and latencies, each group's lag, the newest workflows
with their steps. The monitor and the demo show it."""

import time

from rich.console import Console, Group
from rich.table import Table

from views.flow import SKEW_S, Flow


def render(flow: Flow, lag: dict[str, int] | str | None, rows: int = 15, figures_first: bool = False) -> Group:
    """The view: a row per recent workflow, then traffic, consumer lag (if given), dead letters and totals (those
    first, for the live view: a terminal too short for the table still shows them)."""
    now = time.time()
    workflows = sorted(flow.kind, key=lambda w: flow.step_times(w)[0][1] or 0, reverse=True)[:rows]
    table = Table(title=f"Workflows (newest {len(workflows)} of {len(flow.kind)}; SLA {flow.sla:g} s)", expand=False)
    for column in ("workflow", "type", "steps (s after start)", "latency", "state"):
        table.add_column(column)
    for workflow in workflows:
        steps = flow.step_times(workflow)
        start = steps[0][1]
        path = " → ".join(f"{name} {at - start:.2f}" if at is not None else f"[dim]{name} …[/]"
                          for name, at, _, needed in steps if needed or at is not None)
        latency = flow.latency(workflow)
        state = flow.state(workflow, now)
        colour = {"completed": "green", "running": "yellow", "failed": "red", "cancelled": "blue"}.get(state, "bold red")
        timeouts = f" ({flow.timeouts[workflow]} timed out)" if workflow in flow.timeouts else ""
        timeouts += f" (then {flow.followed[workflow]} more)" if workflow in flow.followed else ""
        timeouts += " (clock skew)" if workflow in flow.skewed else ""
        table.add_row(workflow[:8], flow.kind[workflow], path, f"{latency:.2f} s" if latency is not None else "",
                      f"[{colour}]{state}[/]{timeouts}")
    traffic = "  ".join(f"{name} {rate:.1f}/s" for name, rate in flow.rates().items())
    if isinstance(lag, str):
        lags = lag
    else:
        lags = "  ".join(f"{group} {n}" for group, n in (lag or {}).items()) or "(no groups yet)"
    last = flow.last_reason
    figures = flow.figures()
    counts = ", ".join(f"{n} {state}" for state, n in figures["workflows"].items())
    if flow.unknown_fate:
        counts += f" ({flow.unknown_fate} left the monitor's window of {flow.window} before they finished)"
    lines = [f"messages per second (last 10 s): {traffic}"] + ([f"consumer lag: {lags}"] if lag is not None else [])
    if flow.skew:
        lines.append(f"clock skew: {flow.skew} message{'s' * (flow.skew != 1)} with a created_at over {SKEW_S:.0f} s "
                     f"from its record time "
                     f"(their writers' clocks are off: their workflows are left out of the latency percentiles)")
    lines += [f"dead letters: {flow.dead_letters} (last: {last})", f"workflows: {counts}",
              f"duplicate effects {flow.duplicates}; commands re-sent {flow.resent} (same id: a service that acted "
              f"ignores it); steps timed out {flow.timeouts_total}; steps that followed a step {flow.followed_total}"]
    return Group(*lines, table) if figures_first else Group(table, *lines)


def fitting(console: Console, rows: int) -> int:
    """The workflows the live view can show in this terminal without cutting the table (a narrow one wraps each row
    onto about four lines), at most `rows`."""
    per_row = 1 if console.width >= 170 else 2 if console.width >= 120 else 4
    return max(1, min(rows, (console.height - 16) // per_row))
