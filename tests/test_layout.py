"""The shape the project keeps, without Kafka: the orchestrator opens with its routing table, scripts reach the engine
only through `from common import ...`, and the engine stays in modules and functions a reader can hold in mind."""

import ast
import inspect
import re
from pathlib import Path

import pytest
from radon.complexity import cc_visit

import common
from common.service import run_service

pytestmark = pytest.mark.no_broker  # runs in `make check`
HERE = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in HERE.glob("*.py"))
ENGINE = sorted((HERE / "common").glob("*.py"))
VIEWS = sorted((HERE / "views").glob("*.py"))
TABLE = {"orchestrator", "contracts"}  # the application's table and contracts: what every script may import


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of each `from X import ...` and `import X` at any depth of a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.append((node.module or "", [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return found


def test_the_orchestrator_opens_with_its_routing_table_and_stays_short():
    source = (HERE / "orchestrator.py").read_text().splitlines()
    route_line = next(n for n, line in enumerate(source, 1) if line.startswith("def route("))
    assert route_line <= 60 and len(source) <= 200, (route_line, len(source))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_script_reaches_the_engine_only_through_its_face(script):
    inside = [module for module, _ in imports(script) if module.startswith("common.")]
    assert inside == [], f"{script.name} imports {inside}: add what it needs to common/__init__.py"


def test_the_engine_never_imports_a_script():
    scripts = {p.stem for p in SCRIPTS}
    for module in ENGINE:
        assert not {name.split(".")[0] for name, _ in imports(module)} & (scripts | {"views"}), module.name


@pytest.mark.parametrize("script", [p for p in SCRIPTS if p.name != "bench.py"] + VIEWS, ids=lambda p: p.name)
def test_a_tool_reads_the_views_and_imports_no_other_tool(script):
    # (the read model is views/, once: monitor.py, workflows.py, dead_letters.py, console.py and demo.py share it;
    # bench.py, like the tests, runs the others, acls.py's set-up included)
    others = {p.stem for p in SCRIPTS} - TABLE - {script.stem}
    assert not {name.split(".")[0] for name, _ in imports(script)} & others, script.name


@pytest.mark.parametrize("module", ENGINE, ids=lambda p: p.name)
def test_each_engine_module_says_its_concern_and_is_of_a_readable_size(module):
    text = module.read_text()
    assert ast.get_docstring(ast.parse(text)), f"{module.name} has no docstring"
    assert len(text.splitlines()) <= 300, f"{module.name} is {len(text.splitlines())} lines"


@pytest.mark.parametrize("module", ENGINE, ids=lambda p: p.name)
def test_each_engine_function_fits_on_a_screen_and_stays_simple(module):
    for block in cc_visit(module.read_text()):
        for function in [block, *getattr(block, "methods", [])]:
            if type(function).__name__ == "Class":
                continue
            lines = function.endline - function.lineno + 1
            assert lines <= 40 and function.complexity <= 12, (module.name, function.name, lines, function.complexity)


def test_a_service_is_declared_in_at_most_eight_parameters():
    assert len(inspect.signature(run_service).parameters) <= 8


def test_the_face_hands_on_every_name_it_lists():
    assert all(hasattr(common, name) for name in common.__all__)


def test_the_engine_names_no_type_topic_script_or_workflow_of_the_demo():
    # (read from the application's contracts and table, and the words of the demo's domain: a new workflow's names
    # go beside the table too)
    import contracts
    from orchestrator import WORKFLOWS
    names = {*contracts.MESSAGES, *WORKFLOWS, "zone", "zones", "sensor", "sensors", "detection", "detections",
             "detector", "units"}
    names |= {value for name, value in vars(contracts).items() if name.isupper() and isinstance(value, str)}
    names |= {script for workflow in WORKFLOWS.values() for script in (workflow.source, *(s.service for s in workflow.steps))}
    names -= set(common.FAMILIES)  # (message_stream and dead_letter are the engine's)
    word = re.compile(r"(?<!\w)(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r")(?!\w)", re.I)
    found = [f"common/{module.name}:{number}: {hit.group(0)}" for module in ENGINE
             for number, line in enumerate(module.read_text().splitlines(), 1) for hit in word.finditer(line)]
    assert found == [], "common/ names the demo; its names belong in contracts.py or orchestrator.py: " + ", ".join(found)
