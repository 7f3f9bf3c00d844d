"""Console: the workflows in a web page, and a person's actions on them.

Reads:    every project topic (as monitor.py does) and the orchestrators' state (as workflows.py does); joins no group
Produces: message_stream.operator (cancel, retry: workflows.py's requests) and a dead letter's source topic (replay)
Run:      python console.py                         # then open http://127.0.0.1:8080
          python console.py --port 8090 --host 0.0.0.0 --users users.json   # off loopback: a login (or CONSOLE_TOKEN)
The page shows the flow (each topic's messages per second, each group's lag), the workflows (newest first, by
state), one workflow (its messages in the order Kafka got them, its state entry, its trace) with buttons to cancel or
retry it, and the dead letters with a button to replay one. It updates itself (server-sent events). On a secured
cluster it reads as KAFKA_SASL_USERNAME (the monitor) and acts as KAFKA_OPERATOR_USERNAME/_PASSWORD; without those
its buttons are off and say why. Off loopback it asks for a login and acts as the signed-in name (docs/observability.md).
Its files: web/.
"""

import argparse
import asyncio
import base64
import contextlib
import hmac
import ipaddress
import json
import os
import logging
import socket
import sys
import threading
import time
from pathlib import Path

import common  # noqa: F401 -- (first: outside the virtual environment it says so in one line, not a traceback)
import uvicorn
from kafka import KafkaAdminClient
from kafka.errors import KafkaError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from common import (ANSWERS, DEAD_LETTER, FINISHED, MESSAGE_STREAM, OPERATOR, REQUESTS, SETTINGS, Settings, Stopper,
                    read_all, setup_logging, tracing, wait_for_kafka, written_by)
from orchestrator import WORKFLOWS
from views import flow, letters, requests, search, workflows
from views.search import PER_PAGE, Filter
from views.workflows import Following

log = logging.getLogger("console")
WEB = Path(__file__).resolve().parent / "web"
EVERY_S = 1.0  # how often the page is told what changed
LAG_EVERY_S = 2.0




class Watch:
    """The monitor's model of the topics, kept up to date by a thread of its own (the only one that uses its Kafka
    clients), and the orchestrators' state, read again at most once a second; requests read both under a lock."""

    def __init__(self, settings: Settings, sla: float):
        self.settings, self.sla, self.flow = settings, sla, flow.Flow(sla, settings)
        self.index, self.checked, self.unread, self.answered_at = search.Index(), {}, 1, time.time()
        self.tail, self.admin = flow.Tail(self.flow), KafkaAdminClient(**settings.kafka_config())
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.read, self.lag, self.problem = 0, {}, None
        self.state_lock, self.states, self.states_at, self.states_read = threading.Lock(), {}, 0.0, -1
        self.following = Following(settings)

    def run(self) -> None:
        lagged = 0.0
        while not self.stop.is_set():
            try:
                batches = self.tail.fetch(200)
                with self.lock:
                    self.tail.feed(batches)
                    self.read += sum(map(len, batches.values()))
                if time.monotonic() - lagged > LAG_EVERY_S:
                    lagged, lag, unread = time.monotonic(), self.tail.lag(self.admin), self.tail.unread()
                    with self.lock:
                        self.lag, self.unread = lag, self.unread if unread is None else unread
                        self.problem = self.stale() if unread is None else None
                        self.answered_at = self.answered_at if unread is None else time.time()
            except (KafkaError, SystemExit) as error:  # (the broker away, a right taken: said on the page)
                self.problem = f"reading the topics: {error}"
                self.stop.wait(1)
            except Exception as error:  # noqa: BLE001 -- a bug: said on the page and in the log, not a frozen page
                log.exception("console: reading the topics failed")
                self.problem = f"reading the topics failed: {type(error).__name__}: {error}"
                self.stop.wait(1)

    def stale(self) -> str:
        at = time.strftime("%H:%M:%S", time.localtime(self.answered_at))
        return f"Kafka does not answer: the figures are as of {at}, when it last did"

    def snapshot(self) -> dict:
        """What the page's live parts show: the flow, the totals, and a count that changes when anything was read;
        whether the topics are still being read to their end; a problem (Kafka away: since when the figures are)."""
        with self.lock:
            return {"read": self.read, "figures": self.flow.figures(), "lag": self.lag, "problem": self.problem,
                    "reading": self.unread, "answered_at": self.answered_at,
                    "rates": {name: round(rate, 1) for name, rate in self.flow.rates().items()}}

    def located(self) -> dict[str, workflows.Located]:
        """The workflows in the orchestrators' state (read again if the topics said something new, or a second old)."""
        with self.state_lock:
            if time.monotonic() - self.states_at > EVERY_S or self.states_read != self.read:
                self.states_read = self.read
                self.states = workflows.located(self.settings, quiet=True, entries=self.following.entries(),
                                                checked=self.checked)
                self.states_at = time.monotonic()
            return self.states

    def listed(self, wanted: Filter, page: int, per_page: int = PER_PAGE) -> dict:
        """One page of the workflows the filter finds, newest first, as workflows.py list --json prints them (each
        with why it is stuck, as data, or None); and the total. A workflow the orchestrator has state of is as that
        state says; one whose first event the topics show but no orchestrator has routed is "waiting" (or
        "dead_lettered": its event is a dead letter). While the topics are still being read to their end, a waiting
        one is not called stuck."""
        found, now = self.located(), time.time()
        with self.state_lock:
            self.index.update(found)
            routed = [(self.index.facts[w][1].started_at, w) for w in
                      self.index.find(wanted, lambda w: workflows.stuck_of(found[w].workflow, self.sla, now) is not None)]
        with self.lock:
            before = {w: self.before(w, kind, now) for w, kind in self.flow.kind.items() if w not in found}
        unrouted = [(row["started"], w) for w, row in before.items()
                    if wanted.holds(search.Facts(row["started"], w, row["type"], row["state"], frozenset()),
                                    row["stuck"] is not None)]
        ids, pages = search.paged([w for _, w in sorted(routed + unrouted, reverse=True)], page, per_page)
        rows = [workflows.summary(found[w].workflow) | {"stuck": workflows.stuck_of(found[w].workflow, self.sla, now)}
                if w in found else waiting_row(w, before[w]) for w in ids]
        return pages | {"rows": rows, "reading": self.unread > 0}

    def before(self, workflow_id: str, kind: str, now: float) -> dict:
        """What the topics say of a workflow no orchestrator has state of (under the lock)."""
        state, stuck = self.flow.status(workflow_id, now)
        started = self.flow.times[workflow_id].get(WORKFLOWS[kind].starts_with, now)
        if stuck is not None and (self.unread > 0 or state != "waiting"):
            stuck = None  # (still reading: it may have been routed; or routed, and its state not read yet)
        elif stuck is not None:
            stuck |= {"since": workflows.stamp(started), "why": "no orchestrator has routed it (its event waits in Kafka)"}
        return {"state": state if state in ("waiting", "dead_lettered") else "waiting", "type": kind, "started": started,
                "stuck": stuck}

    def many(self, wanted: Filter) -> list[str]:
        """Every workflow the filter finds that the orchestrator has state of (a request can be made about it)."""
        found, now = self.located(), time.time()
        with self.state_lock:
            self.index.update(found)
            return self.index.find(wanted, lambda w: workflows.stuck_of(found[w].workflow, self.sla, now) is not None)

    def shown(self, wanted: str) -> dict:
        """workflows.py show --json's object, with its state entry, its messages in Kafka's order and its trace."""
        found, now = self.located(), time.time()
        with self.lock:
            waiting = {w: waiting_row(w, self.before(w, kind, now)) for w, kind in self.flow.kind.items()
                       if w not in found}
        workflow_id = workflows.one({**waiting, **found}, wanted)  # (one the orchestrator has not routed yet, too)
        _, rows = flow.messages_of(workflow_id, self.settings)
        shown = workflows.summary(found[workflow_id].workflow) | {"stuck": workflows.stuck_of(
            found[workflow_id].workflow, self.sla, now)} if workflow_id in found else waiting[workflow_id]
        return shown | {
            "entry": found[workflow_id].workflow if workflow_id in found else None,
            "trace": tracing.zipkin_trace(workflows.trace_of(found[workflow_id].raw)) if workflow_id in found else None,
            "messages": [{"at": at, "topic": topic, "type": m.type, "source": m.source, "id": m.id, "repeat": repeat,
                          "note": note(m)} for at, topic, m, repeat in rows]}


def waiting_row(workflow_id: str, before: dict) -> dict:
    """A workflow the topics show but no orchestrator has routed, in workflows.py list --json's shape."""
    return {"workflow_id": workflow_id, "type": before["type"], "state": before["state"], "retries": 0, "stage": None,
            "started_at": workflows.stamp(before["started"]), "finished_at": None, "steps": [], "retry_refused": None,
            "stuck": before["stuck"]}


def note(message) -> str:
    """What a person's request and its answer say (who, why, what was done), for the workflow's history."""
    said = message.payload
    if message.type in REQUESTS:
        return f"{said.get('by')}: {said.get('reason')}"
    return str(said.get("detail", "")) if message.type in ANSWERS + FINISHED else ""


def letter_rows(settings: Settings) -> list[dict]:
    """dead_letters.py list's letters, newest first: where each came from, why, and whether and when it was replayed."""
    found, _ = letters.load(read_all(DEAD_LETTER, settings=settings))
    replayed = letters.replays(found)
    return [{"letter": which, "at": made.timestamp(), "service": which.split(":")[0],
             "workflow": letters.workflow_of(letter), "reason": letter.reason,
             "from": f"{letter.topic}:{letter.partition}:{letter.offset}",
             "replayed": sorted(replayed.get(letters.original_of(letter), []))}
            for which, letter, made in sorted(found, key=lambda row: row[2], reverse=True)]


def replayed(which: str, settings: Settings) -> int:
    found, _ = letters.load(read_all(DEAD_LETTER, settings=settings))
    todo = letters.originals(letters.chosen(found, None, None, [which]))
    return letters.replay(todo) if todo else 0


def actions_off(settings: Settings) -> str | None:
    """Why the page's buttons are off (a secured cluster, and no operator credentials given), or None."""
    if settings.sign_in.get("sasl_plain_username") and requests.operator_settings(settings) is settings:
        return (f"read only: acting needs the operator's credentials (KAFKA_OPERATOR_USERNAME and "
                f"KAFKA_OPERATOR_PASSWORD), which may write {written_by(MESSAGE_STREAM, OPERATOR)}")
    return None


BULK_LIMIT = 10_000  # workflows a bulk cancel or retry asks about at once
BODY_LIMIT = 16 * 1024  # bytes: an action's body is a reason and a name; a longer one is refused before it is read


class Login:
    """Who may use the console where a login is set up: the users of a JSON file ({"name": "password", ...}, as
    `acls.py --users FILE` writes it), or anyone with the one token (CONSOLE_TOKEN) under the name they give. The
    browser asks for it (HTTP Basic)."""

    def __init__(self, users: dict[str, str] | None = None, token: str | None = None):
        self.users, self.token = users or {}, token

    @classmethod
    def from_file(cls, path: str, token: str | None = None) -> "Login":
        try:
            with open(path, encoding="utf-8") as file:
                users = json.load(file)
        except (OSError, ValueError) as error:
            raise SystemExit(f"console: cannot read the users of {path}: {error}") from None
        if not isinstance(users, dict) or not users or \
                not all(isinstance(v, str) and v and isinstance(k, str) and k for k, v in users.items()):
            raise SystemExit(f"console: {path} is not a JSON object of user names and their passwords")
        return cls(users, token)

    def who(self, authorization: str | None) -> str | None:
        """The signed-in name an Authorization header proves, or None."""
        scheme, _, encoded = (authorization or "").partition(" ")
        try:
            name, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        if scheme.lower() != "basic" or not name.strip() or len(name) > 64:
            return None
        known = self.users.get(name)
        if known is not None and hmac.compare_digest(known.encode(), password.encode()):
            return name
        if self.token and hmac.compare_digest(self.token.encode(), password.encode()):
            return name
        return None


class Guard:
    """What every request passes before the console answers it: a login where one is set up (the name it proves is
    the one every request the console sends is made by), and for a POST (an action) JSON, from the console's own page
    (a page of another site cannot send one through the operator's browser), with a declared length of at most
    BODY_LIMIT bytes. (The Host check before it, Starlette's TrustedHostMiddleware: a name the console answers to.)"""

    def __init__(self, app, login: Login | None = None):
        self.app, self.login = app, login

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        if self.login is not None:
            if (name := self.login.who(headers.get("authorization"))) is None:
                return await refuse(scope, receive, send, 401, "sign in: the console's login (user and password)",
                                    {"WWW-Authenticate": 'Basic realm="console", charset="UTF-8"'})
            scope.setdefault("state", {})["login"] = name
        if scope["method"] == "POST":
            origin, host, length = headers.get("origin"), headers.get("host", ""), headers.get("content-length", "")
            if not headers.get("content-type", "").startswith("application/json") or \
                    (origin is not None and origin.split("://", 1)[-1] != host):
                return await refuse(scope, receive, send, 403, "an action comes from the console's own page (JSON, "
                                                                "same origin)")
            if not (length.isascii() and length.isdecimal()):
                return await refuse(scope, receive, send, 411, "an action says its length (Content-Length)")
            if int(length) > BODY_LIMIT:
                return await refuse(scope, receive, send, 413, f"an action's body is at most {BODY_LIMIT} bytes")
        return await self.app(scope, receive, send)


async def refuse(scope, receive, send, status: int, why: str, headers: dict | None = None) -> None:
    await JSONResponse({"error": why}, status_code=status, headers=headers)(scope, receive, send)


def app(watch: Watch, hosts: list[str], login: Login | None = None) -> Starlette:
    """The console's web application; `hosts`: the names it answers to (others are refused: DNS rebinding); `login`:
    who may use it (None: anyone who reaches it, as on loopback)."""
    settings = watch.settings

    async def page(_: Request):
        return FileResponse(WEB / "index.html")

    async def config(request: Request):
        return JSONResponse({"actions_off": actions_off(settings), "replay_off": replay_off(settings),
                             "signed_in": request.scope.get("state", {}).get("login"),
                             "workflows": list(WORKFLOWS),
                             "flow": [{"name": name, "source": w.source, "starts_with": w.starts_with,
                                       "steps": [{"name": s.name, "topic": s.topic, "service": s.service,
                                                  "follows": workflows.follows(s)} for s in w.steps]}
                                      for name, w in WORKFLOWS.items()]})

    async def listing(request: Request):
        asked = dict(request.query_params)
        page, per_page = asked.pop("page", "1"), asked.pop("per_page", str(PER_PAGE))
        if not all(n.isascii() and n.isdecimal() and 0 < int(n) <= 10_000 for n in (page, per_page)):
            return JSONResponse({"error": "page and per_page are numbers from 1 (per_page at most 10000)"},
                                status_code=400)
        return await answered(lambda: watch.listed(Filter.of(asked, list(WORKFLOWS)), int(page), int(per_page)))

    async def bulk(request: Request):
        """A cancel or retry of every workflow a filter finds: {"filter": {...}} says how many (and the first); with
        the count the person agreed to and a reason, one request each, and each answer."""
        kind, asked = request.path_params["kind"], await body(request)
        if off := actions_off(settings):
            return JSONResponse({"error": off}, status_code=403)
        if kind not in ("cancel", "retry") or asked is None or not isinstance(asked.get("filter"), dict):
            return JSONResponse({"error": "POST /api/bulk/cancel or /retry with {\"filter\": {...}} (to count), then "
                                          "with \"count\" and \"reason\" (to send)"}, status_code=400)
        by = request.scope.get("state", {}).get("login") or str(asked.get("by") or "console")

        def ask() -> dict:
            ids = watch.many(Filter.of(asked["filter"], list(WORKFLOWS)))
            if "count" not in asked:
                return {"count": len(ids), "first": ids[:5]}
            if asked["count"] != len(ids):
                raise search.BadFilter(f"the filter finds {len(ids)} now, not {asked['count']}: count them again")
            if len(ids) > BULK_LIMIT:
                raise search.BadFilter(f"at most {BULK_LIMIT} at once: narrow the filter")
            if why := refusal(asked, "reason"):
                raise requests.BadRequest(why)
            said = requests.requests(kind, ids, str(asked["reason"]).strip(), by, 10.0, settings, watch.located())
            return {"count": len(ids), "granted": sum(g for _, g, _ in said),
                    "answers": [{"workflow_id": w, "granted": g, "answer": a} for w, g, a in said]}
        return await answered(ask)

    async def showing(request: Request):
        return await answered(watch.shown, request.path_params["id"])

    async def acting(request: Request):
        kind, asked = request.path_params["kind"], await body(request)
        if off := actions_off(settings):
            return JSONResponse({"error": off}, status_code=403)
        if why := refusal(asked, "reason") or (kind not in ("cancel", "retry") and f"no such action: {kind} (cancel or retry)"):
            return JSONResponse({"error": why}, status_code=400)

        by = request.scope.get("state", {}).get("login") or str(asked.get("by") or "console")  # (signed in: that name)

        def ask() -> dict:  # (a reason over 500 characters, a name over 64: views.requests says so)
            granted, said = requests.request(kind, request.path_params["id"], str(asked["reason"]).strip(), by, 5.0,
                                              settings, watch.located())
            return {"granted": granted, "answer": said}
        return await answered(ask)

    async def dead(_: Request):
        return await answered(letter_rows, settings)

    async def replay(request: Request):
        asked = await body(request)
        if off := replay_off(settings):
            return JSONResponse({"error": off}, status_code=403)
        if why := refusal(asked, "letter"):
            return JSONResponse({"error": why}, status_code=400)
        return await answered(lambda: {"replayed": replayed(str(asked["letter"]), settings)})

    async def events(request: Request):
        async def stream():
            while not await request.is_disconnected():
                yield f"data: {json.dumps(watch.snapshot())}\n\n"
                await asyncio.sleep(EVERY_S)
        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return Starlette(middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts),
                                 Middleware(Guard, login=login)], routes=[
        Route("/", page), Route("/api/config", config), Route("/api/workflows", listing),
        Route("/api/workflows/{id}", showing), Route("/api/workflows/{id}/{kind:str}", acting, methods=["POST"]),
        Route("/api/bulk/{kind:str}", bulk, methods=["POST"]),
        Route("/api/dead-letters", dead), Route("/api/dead-letters/replay", replay, methods=["POST"]),
        Route("/api/events", events), Mount("/web", StaticFiles(directory=WEB))])


async def answered(function, *args) -> JSONResponse:
    """A blocking question, asked off the event loop; a one-line error as a 404 (no such workflow), a 400 (a request
    that cannot be sent as asked), a 403 (a right Kafka refused: said in the console's log) or a 503 (Kafka away)."""
    try:
        return JSONResponse(await run_in_threadpool(function, *args))
    except workflows.NotFound as error:
        return JSONResponse({"error": str(error)}, status_code=404)
    except (requests.BadRequest, search.BadFilter) as error:
        return JSONResponse({"error": str(error)}, status_code=400)
    except SystemExit as error:  # (common.refused: a right refused, exit code 3; read_from: a read that made no progress)
        if isinstance(error.code, str):
            return JSONResponse({"error": error.code}, status_code=503)
        return JSONResponse({"error": "Kafka refused it: this console's user may not (see the console's log)"},
                            status_code=403)
    except KafkaError as error:
        return JSONResponse({"error": f"{type(error).__name__}: {error}"}, status_code=503)


async def body(request: Request) -> dict | None:
    """A POST's JSON object, or None (not JSON, or not an object)."""
    try:
        asked = await request.json()
    except ValueError:
        return None
    return asked if isinstance(asked, dict) else None


def refusal(asked: dict | None, needed: str) -> str | None:
    """What is wrong with a POST's body, or None."""
    if asked is None:
        return "the body is a JSON object"
    if not str(asked.get(needed) or "").strip():
        return f"{needed} is required"
    return None


def replay_off(settings: Settings) -> str | None:
    """Why the replay buttons are off: on a secured cluster a replay needs a user that may write the original's topic
    (admin, as dead_letters.py runs)."""
    user = settings.sign_in.get("sasl_plain_username")
    if user and user != "admin":
        return f"replaying needs the admin user (this console reads as {user}): python dead_letters.py replay, as admin"
    return None


class Serving(uvicorn.Server):
    """uvicorn's server, saying the console's address once it serves (not before: a browser sent there would find
    nobody)."""

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            log.info("console: %s://%s:%d (Ctrl-C stops it)", "https" if self.config.ssl_certfile else "http",
                     self.config.host, self.config.port)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--port", type=int, default=8080, help="the port to serve on (default 8080)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to serve on (default 127.0.0.1: this machine; "
                                                            "another needs a login: --users or CONSOLE_TOKEN)")
    parser.add_argument("--users", metavar="FILE", help='who may sign in: a JSON object {"name": "password", ...} '
                                                        "(as acls.py --users writes it)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="a name the console answers to besides this machine's (repeat for more)")
    parser.add_argument("--certfile", help="serve HTTPS with this certificate (PEM; with --keyfile)")
    parser.add_argument("--keyfile", help="the certificate's private key (PEM)")
    parser.add_argument("--sla", type=float, default=5.0, help="seconds a workflow may take before it is stuck")
    args = parser.parse_args()
    setup_logging()
    token = os.environ.get("CONSOLE_TOKEN") or None
    login = Login.from_file(args.users, token) if args.users else Login(token=token) if token else None
    if login is None and not loopback(args.host):
        raise SystemExit(f"console: serving on {args.host} opens it to the network, and it has no login: give --users "
                         "FILE or set CONSOLE_TOKEN (or serve on 127.0.0.1)")
    if bool(args.certfile) != bool(args.keyfile):
        raise SystemExit("console: --certfile and --keyfile go together")
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:  # (a port in use: one line)
        try:
            probe.bind((args.host, args.port))
        except OSError as error:
            raise SystemExit(f"console: cannot serve on {args.host}:{args.port}: {error.strerror or error} "
                             "(give another with --port)") from None
    hosts = answers_to(args.host, args.allow_host)
    if not loopback(args.host):
        log.info("console: answers to %s (--allow-host adds a name)%s", ", ".join(hosts),
                 "" if args.certfile else "; without --certfile the login travels in clear: serve it on a network "
                                          "that is yours, or behind HTTPS")
    wait_for_kafka(Stopper(), "console", wait=False).close()
    watch = Watch(SETTINGS, args.sla)
    watch.tail.feed(watch.tail.fetch(0))  # (a right it lacks: one line, here)
    threading.Thread(target=watch.run, daemon=True, name="console-watch").start()
    Serving(uvicorn.Config(app(watch, hosts, login), host=args.host, port=args.port, log_level="warning",
                           ssl_certfile=args.certfile, ssl_keyfile=args.keyfile)).run()
    watch.stop.set()
    return 0


def loopback(host: str) -> bool:
    """Whether an address to serve on is this machine only."""
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def machine_names() -> list[str]:
    """This machine's names and the addresses they resolve to (the names a browser on the network may use)."""
    names, found = [socket.gethostname(), socket.getfqdn()], set()
    with contextlib.suppress(OSError):  # (a name that does not resolve: not that one)
        found |= {info[4][0] for name in names for info in socket.getaddrinfo(name, None)}
    for family, somewhere in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((somewhere, 9))  # (no packet is sent: it asks which address reaches the network)
            found.add(probe.getsockname()[0])
    return names + sorted(f"[{a}]" if ":" in a else a for a in found if not ipaddress.ip_address(a).is_loopback)


def answers_to(host: str, allowed: list[str]) -> list[str]:
    """The names the console answers to (a Host header of another is refused): this machine's loopback names; off
    loopback the address it serves on, or for every address (0.0.0.0, ::) the machine's names; and those allowed."""
    names = ["127.0.0.1", "localhost", "[::1]"]
    if not loopback(host):
        wildcard = host in ("0.0.0.0", "::", "[::]")
        names += machine_names() if wildcard else [f"[{host}]" if ":" in host else host]
    return list(dict.fromkeys(names + allowed))


if __name__ == "__main__":
    sys.exit(main())
