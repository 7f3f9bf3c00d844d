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

from common import (ANSWERS, DEAD_LETTER, FINISHED, MESSAGE_STREAM, OPERATOR, REQUESTS, SETTINGS, STATES, Settings, Stopper,
                    read_all, setup_logging, tracing, wait_for_kafka, written_by)
from orchestrator import WORKFLOWS
from views import flow, letters, requests, workflows
from views.workflows import Following

log = logging.getLogger("console")
WEB = Path(__file__).resolve().parent / "web"
EVERY_S = 1.0  # how often the page is told what changed
LAG_EVERY_S = 2.0




class Watch:
    """The monitor's model of the topics, kept up to date by a thread of its own (the only one that uses its Kafka
    clients), and the orchestrators' state, read again at most once a second; requests read both under a lock."""

    def __init__(self, settings: Settings, sla: float):
        self.settings, self.flow = settings, flow.Flow(sla, settings)
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
                    lagged, lag = time.monotonic(), self.tail.lag(self.admin)
                    with self.lock:
                        self.lag, self.problem = lag, None
            except (KafkaError, SystemExit) as error:  # (the broker away, a right taken: said on the page)
                self.problem = f"reading the topics: {error}"
                self.stop.wait(1)
            except Exception as error:  # noqa: BLE001 -- a bug: said on the page and in the log, not a frozen page
                log.exception("console: reading the topics failed")
                self.problem = f"reading the topics failed: {type(error).__name__}: {error}"
                self.stop.wait(1)

    def snapshot(self) -> dict:
        """What the page's live parts show: the flow, the totals, and a count that changes when anything was read."""
        with self.lock:
            return {"read": self.read, "figures": self.flow.figures(), "lag": self.lag, "problem": self.problem,
                    "rates": {name: round(rate, 1) for name, rate in self.flow.rates().items()}}

    def located(self) -> dict[str, workflows.Located]:
        """The workflows in the orchestrators' state (read again if the topics said something new, or a second old)."""
        with self.state_lock:
            if time.monotonic() - self.states_at > EVERY_S or self.states_read != self.read:
                self.states_read = self.read
                self.states = workflows.located(self.settings, quiet=True, entries=self.following.entries())
                self.states_at = time.monotonic()
            return self.states

    def listed(self, state: str | None, limit: int) -> list[dict]:
        """workflows.py list --json's objects, newest first, each with what the monitor says of it (stuck, say); and
        the workflows the topics show but the orchestrator has no state of yet (its events wait in Kafka: state
        "waiting")."""
        found, now, rows = self.located(), time.time(), []
        with self.lock:
            waiting = {w: (self.flow.times[w].get(WORKFLOWS[kind].starts_with, now), kind)
                       for w, kind in self.flow.kind.items() if w not in found}
        starts = sorted([(found_.workflow["started_at"], w) for w, found_ in found.items()] +
                        [(at, w) for w, (at, _) in waiting.items()], reverse=True)
        for started, w in starts:
            with self.lock:
                seen = self.flow.state(w, now) if w in self.flow.kind else "not seen on the topics"
            row = workflows.summary(found[w].workflow) if w in found else waiting_row(w, waiting[w][1], started)
            row |= {"monitor": seen, "stuck": seen.startswith("STUCK")}
            if state in (None, row["state"]) or (state == "stuck" and row["stuck"]):
                rows.append(row)
            if len(rows) == limit:
                break
        return rows

    def shown(self, wanted: str) -> dict:
        """workflows.py show --json's object, with its state entry, its messages in Kafka's order and its trace."""
        found = self.located()
        with self.lock:
            waiting = {w: waiting_row(w, kind) for w, kind in self.flow.kind.items() if w not in found}
        workflow_id = workflows.one({**waiting, **found}, wanted)  # (one the orchestrator has not routed yet, too)
        _, rows = flow.messages_of(workflow_id, self.settings)
        shown = workflows.summary(found[workflow_id].workflow) if workflow_id in found else waiting[workflow_id]
        return shown | {
            "entry": found[workflow_id].workflow if workflow_id in found else None,
            "trace": tracing.zipkin_trace(workflows.trace_of(found[workflow_id].raw)) if workflow_id in found else None,
            "messages": [{"at": at, "topic": topic, "type": m.type, "source": m.source, "id": m.id, "repeat": repeat,
                          "note": note(m)} for at, topic, m, repeat in rows]}


def waiting_row(workflow_id: str, kind: str, started: float | None = None) -> dict:
    """A workflow the topics show but no orchestrator has routed yet, in workflows.py list --json's shape."""
    return {"workflow_id": workflow_id, "type": kind, "state": "waiting", "retries": 0, "stage": None,
            "started_at": None if started is None else workflows.stamp(started), "finished_at": None, "steps": [],
            "retry_refused": None}


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
        state, limit = request.query_params.get("state") or None, request.query_params.get("limit", "500")
        if state not in (None, *STATES, "waiting", "stuck") or not (limit.isascii() and limit.isdecimal()):
            return JSONResponse({"error": f"state is one of {', '.join((*STATES, 'waiting', 'stuck'))}; limit a "
                                          "number"}, status_code=400)
        return await answered(watch.listed, state, int(limit))

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
        Route("/api/dead-letters", dead), Route("/api/dead-letters/replay", replay, methods=["POST"]),
        Route("/api/events", events), Mount("/web", StaticFiles(directory=WEB))])


async def answered(function, *args) -> JSONResponse:
    """A blocking question, asked off the event loop; a one-line error as a 404 (no such workflow), a 400 (a request
    that cannot be sent as asked), a 403 (a right Kafka refused: said in the console's log) or a 503 (Kafka away)."""
    try:
        return JSONResponse(await run_in_threadpool(function, *args))
    except workflows.NotFound as error:
        return JSONResponse({"error": str(error)}, status_code=404)
    except requests.BadRequest as error:
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


def answers_to(host: str, allowed: list[str]) -> list[str]:
    """The names the console answers to (a Host header of another is refused): this machine's loopback names; off
    loopback the address it serves on, or for every address (0.0.0.0, ::) the machine's names; and those allowed."""
    names = ["127.0.0.1", "localhost", "[::1]"]
    if not loopback(host):
        wildcard = host in ("0.0.0.0", "::", "[::]")
        names += [socket.gethostname(), socket.getfqdn()] if wildcard else [f"[{host}]" if ":" in host else host]
    return list(dict.fromkeys(names + allowed))


if __name__ == "__main__":
    sys.exit(main())
