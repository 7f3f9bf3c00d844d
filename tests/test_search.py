"""Finding many workflows without Kafka (views/search.py): each part of a filter, the index kept up to date as the
state changes, pages newest first, and a filter asked wrongly said so."""

import subprocess
import sys

import pytest
from helpers import ROOT

from views.search import BadFilter, Filter, Index, paged
from views.workflows import Located, NotFound, one

pytestmark = pytest.mark.no_broker  # runs in `make check`
TYPES = ["security", "unit"]


def entry(n: int, type_: str = "security", state: str = "running", key: str = "sensor-1", zone: str = "zone-1") -> dict:
    return {"workflow_id": f"w{n:05d}", "type": type_, "state": state, "key": key, "started_at": 1000.0 + n,
            "steps": {"acted": {"state": "pending", "command": {"payload": {"zone": zone, "severity": 3}}}}}


def located(*entries: dict) -> dict:
    return {e["workflow_id"]: Located(0, e, repr(e).encode()) for e in entries}


def test_each_part_of_a_filter_finds_what_it_says_newest_first():
    index = Index()
    index.update(located(entry(1), entry(2, "unit", key="unit-7"), entry(3, state="failed", zone="zone-3"), entry(12)))
    found = lambda **asked: index.find(Filter.of(asked, TYPES))  # noqa: E731
    assert found() == ["w00012", "w00003", "w00002", "w00001"]
    assert found(id="w0001") == ["w00012"] and found(type="unit") == ["w00002"] and found(state="failed") == ["w00003"]
    assert found(entity="unit-7") == ["w00002"] and found(entity="zone-3") == ["w00003"]
    assert found(entity="3") == []  # (a number in a payload is no entity)
    assert found(since="1002", until="1012") == ["w00003", "w00002"]
    assert found(since="1970-01-01T00:16:42Z") == ["w00012", "w00003", "w00002"]  # (1002 s after the epoch)
    assert found(type="security", state="running", entity="sensor-1") == ["w00012", "w00001"]
    assert index.find(Filter(state="stuck"), stuck=lambda w: w == "w00001") == ["w00001"]


def test_the_index_looks_again_only_at_an_entry_that_changed_and_forgets_one_gone():
    index, first = Index(), located(entry(1), entry(2))
    index.update(first)
    kept = index.facts["w00002"]
    changed = located(entry(1, state="completed"))
    index.update({**changed, "w00002": first["w00002"]})
    assert index.facts["w00002"] is kept and index.facts["w00001"][1].state == "completed"
    index.update(changed)
    assert list(index.facts) == ["w00001"]


@pytest.mark.parametrize("asked, said", [({"type": "parcel"}, "type: one of security, unit"),
                                         ({"state": "lost"}, "state: one of running"),
                                         ({"since": "last week"}, "since: 'last week' is not a time"),
                                         ({"entity": "x" * 201}, "entity: at most 200 characters"),
                                         ({"colour": "red"}, "no such filter: colour"),
                                         ({"since": "nan"}, "not a time in epoch seconds"),
                                         ({"until": "inf"}, "not a time in epoch seconds"),
                                         ({"since": "1796700450000"}, r"milliseconds\? divide by 1000"),
                                         ({"since": "2000", "until": "1000"}, "since: after until"),
                                         ({"id": ["a"]}, "id: a text or a number")])
def test_a_filter_asked_wrongly_says_which_part_and_what_it_takes(asked, said):
    with pytest.raises(BadFilter, match=said):
        Filter.of(asked, TYPES)


def test_pages_count_from_one_and_say_how_many_there_are():
    ids = [f"w{n}" for n in range(120)]
    assert paged(ids, 3) == (ids[100:], {"total": 120, "page": 3, "pages": 3, "per_page": 50})
    assert paged([], 1) == ([], {"total": 0, "page": 1, "pages": 1, "per_page": 50})
    with pytest.raises(BadFilter):
        paged(ids, 0)


def test_a_page_that_is_none_and_an_id_too_short_are_said_in_one_line():
    result = subprocess.run([sys.executable, "workflows.py", "list", "--page", "0"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stderr) == (1, "workflows: --page: pages count from 1\n")
    with pytest.raises(NotFound, match="'0e8f' is too short: give the whole id, or 8 characters or more "
                                       r"\(1 workflow begins so\)"):
        one({"0e8f1234-aaaa": None, "ffff0000-bbbb": None}, "0e8f")
