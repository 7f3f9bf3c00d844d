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
import hashlib
import hmac
import ipaddress
import json
import os
import logging
import socket
import sys
import threading
from pathlib import Path

import common  # noqa: F401 -- (first: outside the virtual environment it says so in one line, not a traceback)
import uvicorn
from kafka.errors import KafkaError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from common import (MESSAGE_STREAM, OPERATOR, SETTINGS, Settings, Stopper,
                    setup_logging, wait_for_kafka, written_by)
from orchestrator import WORKFLOWS
from views import letters, requests, search, workflows
from views.live import EVERY_S, Watch
from views.search import PER_PAGE, Filter

log = logging.getLogger("console")
WEB = Path(__file__).resolve().parent / "web"


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
                not all(isinstance(v, str) and v and isinstance(k, str) and fit_name(k) for k, v in users.items()):
            raise SystemExit(f"console: {path} is not a JSON object of user names (printable, at most 64 characters, "
                             "no space at either end) and their passwords")
        return cls(users, token)

    def who(self, authorization: str | None) -> str | None:
        """The signed-in name an Authorization header proves, or None."""
        scheme, _, encoded = (authorization or "").partition(" ")
        try:
            name, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        if scheme.lower() != "basic" or not fit_name(name):
            return None
        known = self.users.get(name)
        if known is not None:  # (a user of the file signs in with that user's password only)
            return name if hmac.compare_digest(known.encode(), password.encode()) else None
        if self.token and hmac.compare_digest(self.token.encode(), password.encode()):
            return name
        return None


def fit_name(name: str) -> bool:
    """Whether a name may be one a request is made by: printable, at most 64 characters, no space at either end."""
    return 0 < len(name) <= 64 and name.isprintable() and name == name.strip()


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
            if "transfer-encoding" in headers or not (length.isascii() and length.isdecimal()):
                return await refuse(scope, receive, send, 411, "an action says its length (Content-Length), and is "
                                                                "not sent in chunks")
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
        by = request.scope.get("state", {}).get("login") or said_by(asked)

        def ask() -> dict:
            wanted = Filter.of(asked["filter"], list(WORKFLOWS))
            if wanted == Filter():
                raise search.BadFilter("a bulk action needs a filter (every workflow is not one)")
            _, ids, _ = watch.many(wanted)
            found = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]  # (which ones, not only how many)
            if "count" not in asked:
                return {"count": len(ids), "first": ids[:5], "found": found}
            if not isinstance(asked["count"], int) or asked["count"] != len(ids) or asked.get("found") != found:
                raise search.BadFilter(f"the filter finds {len(ids)} workflows now, not the {asked['count']} counted "
                                       "(or not the same ones): count them again")
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

        by = request.scope.get("state", {}).get("login") or said_by(asked)  # (signed in: that name)

        def ask() -> dict:  # (a reason over 500 characters, a name over 64: views.requests says so)
            granted, said = requests.request(kind, request.path_params["id"], str(asked["reason"]).strip(), by, 5.0,
                                              settings, watch.located())
            return {"granted": granted, "answer": said}
        return await answered(ask)

    async def dead(_: Request):
        return await answered(letters.rows, settings)

    async def replay(request: Request):
        asked = await body(request)
        if off := replay_off(settings):
            return JSONResponse({"error": off}, status_code=403)
        if why := refusal(asked, "letter"):
            return JSONResponse({"error": why}, status_code=400)
        return await answered(lambda: {"replayed": letters.replay_one(str(asked["letter"]), settings)})

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
    except (workflows.NotFound, letters.NoSuchLetter) as error:
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
    except (ValueError, RecursionError):  # (not JSON; or nested deeper than the parser goes)
        return None
    return asked if isinstance(asked, dict) else None


def said_by(asked: dict) -> str:
    """Who a request from a console without a login says it is made by (its page's name field), or "console"."""
    by = asked.get("by")
    return by if isinstance(by, str) and by.strip() else "console"


def refusal(asked: dict | None, needed: str) -> str | None:
    """What is wrong with a POST's body, or None."""
    if asked is None:
        return "the body is a JSON object"
    if asked.get(needed) is not None and not isinstance(asked[needed], str):
        return f"{needed} is text"
    if not (asked.get(needed) or "").strip():
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
            host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
            log.info("console: %s://%s:%d (Ctrl-C stops it)", "https" if self.config.ssl_certfile else "http", host,
                     self.config.port)


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
    args.host = args.host.removeprefix("[").removesuffix("]")  # ([::1] as an address is written: ::1)
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
