"""The console's API and what guards it, without a browser or a broker (Starlette's TestClient; tests/test_console.py
drives the page in a real browser against a real broker): the names it answers to, the login it asks for off
loopback and the name it acts as, an action only as short JSON from its own page, and its errors as HTTP statuses."""

import asyncio
import base64
import subprocess
import sys

import pytest
from helpers import ROOT
from starlette.testclient import TestClient

import console
from common import Settings
from views import requests, workflows

pytestmark = pytest.mark.no_broker  # runs in `make check`
HOSTS = console.answers_to("127.0.0.1", [])


class Watch:
    """What the console's API reads (console.Watch follows Kafka for it): one running workflow."""

    workflow_id = "c0ffee00-0000-4000-8000-000000000001"

    def __init__(self):
        self.settings = Settings()
        self.found = {self.workflow_id: workflows.Located(0, {"workflow_id": self.workflow_id, "type": "security",
                                                              "state": "running", "steps": {}}, b"{}")}

    def located(self):
        return self.found

    def listed(self, wanted, page, per_page):
        rows = [{"workflow_id": self.workflow_id, "state": "running"}] if wanted.state in (None, "running") else []
        return {"rows": rows[(page - 1) * per_page: page * per_page], "total": len(rows)}

    def many(self, wanted):
        return self.found, [self.workflow_id, "c0ffee00-0000-4000-8000-000000000002"] if wanted.type == "security" \
            else [], 0.0

    def snapshot(self):
        return {"read": 0}


def client(login=None, hosts=HOSTS, base="http://127.0.0.1") -> TestClient:
    return TestClient(console.app(Watch(), hosts, login), base_url=base)


def basic(name: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()}


def test_on_loopback_it_answers_as_today_and_refuses_a_name_it_does_not_serve():
    assert client().get("/api/workflows").json()["rows"] == [{"workflow_id": Watch.workflow_id, "state": "running"}]
    assert client(base="http://evil.example").get("/api/workflows").status_code == 400  # (DNS rebinding)


def test_off_loopback_it_answers_only_to_the_machines_names_and_those_allowed():
    names = console.answers_to("0.0.0.0", ["ops.example"])
    assert "*" not in names and {"localhost", "ops.example"} <= set(names)
    assert client(hosts=names, base="http://ops.example", login=console.Login(token="t")).get(
        "/api/workflows", headers=basic("ann", "t")).status_code == 200
    assert client(hosts=names, base="http://evil.example").get("/api/workflows").status_code == 400


def test_with_a_login_every_request_asks_for_it_and_a_wrong_one_is_refused():
    login = console.Login({"ann": "s3cret"})
    refused = client(login).get("/")
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
    assert client(login).get("/api/workflows", headers=basic("ann", "wrong")).status_code == 401
    assert client(login).get("/api/workflows", headers=basic("bob", "s3cret")).status_code == 401
    assert client(login).get("/api/workflows", headers={"Authorization": "Basic !!"}).status_code == 401
    assert client(login).get("/api/config", headers=basic("ann", "s3cret")).json()["signed_in"] == "ann"
    assert client().get("/api/config").json()["signed_in"] is None  # (loopback: the page asks for a name)


def test_a_request_sent_from_a_signed_in_console_is_made_by_the_signed_in_name(monkeypatch):
    sent = []
    monkeypatch.setattr(requests, "request", lambda kind, wanted, reason, by, *_: sent.append((kind, by)) or
                        (True, "done"))
    watch_id = Watch.workflow_id
    answer = client(console.Login({"ann": "s3cret"})).post(f"/api/workflows/{watch_id}/cancel", headers=basic(
        "ann", "s3cret"), json={"reason": "drill", "by": "mallory"})
    assert answer.json() == {"granted": True, "answer": "done"} and sent == [("cancel", "ann")]
    client().post(f"/api/workflows/{watch_id}/cancel", json={"reason": "drill", "by": "bob"})  # (loopback: its word)
    assert sent[-1] == ("cancel", "bob")


def test_an_action_comes_only_as_json_from_the_consoles_own_page():
    watch_id = Watch.workflow_id
    assert client().post(f"/api/workflows/{watch_id}/cancel", json={"reason": "x"},
                         headers={"Origin": "http://evil.example"}).status_code == 403
    assert client().post(f"/api/workflows/{watch_id}/cancel", content=b"reason=x",
                         headers={"Content-Type": "application/x-www-form-urlencoded"}).status_code == 403
    assert client().post(f"/api/workflows/{watch_id}/cancel", content=b"[1]",
                         headers={"Content-Type": "application/json"}).json() == {"error": "the body is a JSON object"}


def asgi(app, headers: list[tuple[bytes, bytes]]) -> int:
    """The status the app answers a POST with these headers, its body never given (reading it fails the test)."""
    said = []

    async def receive():
        pytest.fail("the body was read")

    async def send(message):
        said.append(message)

    scope = {"type": "http", "method": "POST", "path": "/api/workflows/x/cancel", "raw_path": b"/api/workflows/x/cancel",
             "query_string": b"", "root_path": "", "scheme": "http", "server": ("127.0.0.1", 8080), "client": ("127.0.0.1", 1),
             "http_version": "1.1", "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), *headers]}
    asyncio.run(app(scope, receive, send))
    return said[0]["status"]


def test_a_large_body_or_one_of_no_declared_length_is_refused_before_it_is_read():
    app = console.app(Watch(), HOSTS)
    assert asgi(app, [(b"content-length", b"200000000")]) == 413
    assert asgi(app, []) == 411
    assert asgi(app, [(b"content-length", b"-1")]) == 411
    assert asgi(app, [(b"content-length", b"10"), (b"transfer-encoding", b"chunked")]) == 411  # (the parser reads chunks)


def test_errors_are_statuses_with_the_line_a_script_prints():
    watch_id = Watch.workflow_id
    overlong = client().post(f"/api/workflows/{watch_id}/cancel", json={"reason": "x" * 501})
    assert overlong.status_code == 400 and overlong.json()["error"] == (
        "reason: String should have at most 500 characters; nothing was sent")
    unknown = client().post("/api/workflows/ffffffffff/retry", json={"reason": "x"})
    assert unknown.status_code == 404 and unknown.json()["error"].startswith("no workflows have an id 'ffffffffff'")
    assert client().post(f"/api/workflows/{watch_id}/pause", json={"reason": "x"}).status_code == 400


@pytest.mark.parametrize("argv, said", [
    (["--host", "0.0.0.0"], "console: serving on 0.0.0.0 opens it to the network, and it has no login: give --users "
                            "FILE or set CONSOLE_TOKEN (or serve on 127.0.0.1)"),
    (["--host", "127.0.0.1", "--users", "/nonexistent/users.json"], "console: cannot read the users of "
                                                                     "/nonexistent/users.json: [Errno 2] No such file "
                                                                     "or directory: '/nonexistent/users.json'")])
def test_off_loopback_without_a_login_it_refuses_to_start_in_one_line(argv, said, monkeypatch):
    monkeypatch.delenv("CONSOLE_TOKEN", raising=False)
    result = subprocess.run([sys.executable, "console.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (1, said + "\n")


def test_a_search_is_checked_as_it_is_asked():
    assert client().get("/api/workflows?state=failed&page=1").json() == {"rows": [], "total": 0}
    for query, said in (("state=lost", "state: one of"), ("since=yesterday", "since: 'yesterday' is not a time"),
                        ("colour=red", "no such filter: colour"), ("page=0", "page and per_page are numbers")):
        answer = client().get(f"/api/workflows?{query}")
        assert answer.status_code == 400 and said in answer.json()["error"], query


def test_a_bulk_action_counts_first_then_sends_one_request_per_workflow_as_the_signed_in_name(monkeypatch):
    sent = []
    monkeypatch.setattr(requests, "requests", lambda kind, ids, reason, by, *_: sent.append((kind, ids, reason, by)) or
                        [(w, i == 0, f"workflow {w}: ...") for i, w in enumerate(ids)])
    console_ = client(console.Login({"ann": "s3cret"}))
    post = lambda body: console_.post("/api/bulk/retry", json=body, headers=basic("ann", "s3cret"))  # noqa: E731
    counted = post({"filter": {"type": "security"}}).json()
    assert (counted["count"], counted["first"]) == (2, [Watch.workflow_id, "c0ffee00-0000-4000-8000-000000000002"])
    assert sent == []  # (counting sends nothing)
    for changed in ({"count": 3, "found": counted["found"]}, {"count": 2, "found": "other ones"}, {"count": "2"}):
        refused = post({"filter": {"type": "security"}, "reason": "fixed", **changed})
        assert refused.status_code == 400 and "count them again" in refused.json()["error"] and sent == []
    assert post({"filter": {}}).json() == {"error": "a bulk action needs a filter (every workflow is not one)"}
    agreed = {"count": 2, "found": counted["found"]}
    assert post({"filter": {"type": "security"}, **agreed}).json() == {"error": "reason is required"}
    done = post({"filter": {"type": "security"}, **agreed, "reason": "fixed", "by": "mallory"}).json()
    assert (done["count"], done["granted"], [a["granted"] for a in done["answers"]]) == (2, 1, [True, False])
    assert sent == [("retry", [Watch.workflow_id, "c0ffee00-0000-4000-8000-000000000002"], "fixed", "ann")]


def test_a_token_does_not_sign_in_as_a_user_of_the_file_and_a_name_is_printable():
    login = console.Login({"alice": "hers"}, token="shared")
    assert client(login).get("/api/config", headers=basic("alice", "shared")).status_code == 401
    assert client(login).get("/api/config", headers=basic("bob", "shared")).json()["signed_in"] == "bob"
    for name in ("bo\nb", " bob", "\x1b[31mbob", "b" * 65):
        assert client(login).get("/api/config", headers=basic(name, "shared")).status_code == 401, name


def test_a_body_too_deep_or_of_the_wrong_kind_is_a_bad_request_not_an_error():
    watch_id = Watch.workflow_id
    deep = client().post(f"/api/workflows/{watch_id}/cancel", content=b"[" * 8000 + b"]" * 8000,
                         headers={"Content-Type": "application/json"})
    assert (deep.status_code, deep.json()) == (400, {"error": "the body is a JSON object"})
    listed = client().post(f"/api/workflows/{watch_id}/cancel", json={"reason": ["x"]})
    assert (listed.status_code, listed.json()) == (400, {"error": "reason is text"})
