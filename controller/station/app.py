"""``ctcscan serve``: the bench station's web application (FastAPI).

Pages (Jinja2 templates, one script and one style sheet shipped in the
package, no build step) and the JSON API they use. The application only reads
run folders; it writes nothing but a run's review (``review.jsonl``, its audit
lines, the signed report) and a queue's ``STOP`` file. Live pages follow a
run through server-sent events: the run's journal is polled four times a
second, so a line appended by a scan in another process reaches the page
within a second.

Safety: every folder name is resolved strictly inside the root
(`Catalog.resolve`); with a token, every request must carry it (header
``Authorization: Bearer``, or the cookie set by opening ``/?token=...``); a
POST must have a JSON body and, where the browser says where it comes from,
come from the station's own pages; on a loopback address only loopback host
names are answered (no DNS rebinding). Templates escape everything.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit

import anyio.to_thread
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.middleware.trustedhost import TrustedHostMiddleware

from analysis.report import focus_html
from controller.runs.queue import request_stop
from controller.runstore.review import DECISIONS, ReviewError, ident
from controller.station.live import Station
from controller.station.runs import NoSuchRun

__all__ = ["LOOPBACK", "Tokens", "create_app"]

LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: the largest request body (a decision is a few hundred bytes)
MAX_BODY = 64 * 1024
logger = logging.getLogger("ctcscan.station")
COOKIE = "ctcscan_token"
#: how often the journal of a watched run is read
POLL_S = 0.25
#: how often a live page gets the run's status at most
STATUS_EVERY_S = 1.0


def _name(v: str) -> str:
    v = " ".join(unicodedata.normalize("NFKC", v).split())
    if (
        not v
        or not v.isprintable()
        or any(unicodedata.category(c) in ("Cf", "Cs", "Co") for c in v)
    ):
        raise ValueError("a name of printable characters is needed")
    return v


class DecisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=2000)

    reviewer: Annotated[str, Field(min_length=1, max_length=64)]
    object_id: Annotated[str, Field(min_length=1, max_length=200)]
    decision: Literal["ctc", "not_ctc", "unsure"]
    comment: str = ""

    _reviewer = field_validator("reviewer")(_name)

    @field_validator("comment")
    @classmethod
    def _comment(cls, v: str) -> str:
        v = " ".join(v.split())
        bad = [c for c in v if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co")]
        if bad:
            raise ValueError(
                f"control or format character U+{ord(bad[0]):04X} in the comment"
            )
        return v


class SignOffIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reviewer: Annotated[str, Field(min_length=1, max_length=64)]
    _reviewer = field_validator("reviewer")(_name)


def _run_url(name: str) -> str:
    return quote(name, safe="")


@dataclass(frozen=True)
class Tokens:
    """Who may use the station: a token shared by everyone (reviewer names
    then are what people type), and / or one token per reviewer, whose
    requests then decide, read and sign only as that reviewer."""

    shared: str | None = None
    users: dict[str, str] = field(default_factory=dict)  # token -> name

    def __bool__(self) -> bool:
        return self.shared is not None or bool(self.users)

    def who(self, given: str) -> tuple[bool, str | None]:
        """(known, the reviewer's name if the token is a reviewer's own)."""
        raw = given.encode("utf-8", "surrogatepass")
        known, name = False, None
        for tok, user in self.users.items():  # every comparison, always
            if secrets.compare_digest(raw, tok.encode()):
                known, name = True, user
        if self.shared is not None and secrets.compare_digest(
            raw, self.shared.encode()
        ):
            known = True
        return known, name

    @classmethod
    def from_text(cls, text: str) -> Tokens:
        """A token file: one word (shared), or lines ``NAME TOKEN`` (``#``
        comments). Raises ValueError saying what is wrong."""
        lines = [
            ln.strip()
            for ln in text.splitlines()
            if ln.strip() and not ln.startswith("#")
        ]
        if len(lines) == 1 and len(lines[0].split()) == 1:
            return cls(shared=_token(lines[0], "the token"))
        users: dict[str, str] = {}
        for n, ln in enumerate(lines, start=1):
            parts = ln.rsplit(None, 1)
            if len(parts) != 2:
                raise ValueError(f"line {n}: NAME TOKEN, or one token alone")
            name, tok = _name(parts[0]), _token(parts[1], f"line {n}'s token")
            if tok in users:
                raise ValueError(f"line {n}: the token of {users[tok]} again")
            users[tok] = name
        if not users:
            raise ValueError("no token in it")
        return cls(users=users)


def _token(t: str, what: str) -> str:
    if len(t) < 16 or not t.isascii() or not t.isprintable() or " " in t:
        raise ValueError(f"{what} must be one word of 16 or more printable characters")
    return t


def create_app(
    root: str | Path, *, tokens: Tokens | None = None, host: str = ""
) -> FastAPI:
    """The station over the run folders under `root`."""
    tokens = tokens or Tokens()
    station = Station(Path(root))
    app = FastAPI(title="ctcscan station", docs_url=None, redoc_url=None)
    app.state.station = station
    templates = Jinja2Templates(
        directory=str(files("controller.station") / "templates")
    )
    templates.env.filters["runurl"] = _run_url
    app.mount(
        "/static",
        StaticFiles(directory=str(files("controller.station") / "static")),
        name="static",
    )
    if host in LOOPBACK or not host:
        app.add_middleware(
            TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "[::1]"]
        )

    @app.middleware("http")
    async def guard(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        request.state.user = None
        if tokens:
            given = request.cookies.get(COOKIE, "")
            auth = request.headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            query = request.query_params.get("token")
            if query is not None and tokens.who(query)[0]:
                # opening a link with the token: keep it in a cookie, drop it
                # from the address bar
                here = "/" + request.url.path.lstrip("/")
                resp: Response = RedirectResponse(here, status_code=303)
                resp.set_cookie(
                    COOKIE, query, httponly=True, samesite="strict", path="/"
                )
                return resp
            known, request.state.user = tokens.who(given)
            if not known:
                return JSONResponse(
                    {"detail": "a token is needed: open the link with ?token=..."},
                    status_code=401,
                )
        if request.method == "POST":
            ctype = request.headers.get("content-type", "").split(";")[0].strip()
            if ctype != "application/json":
                return JSONResponse(
                    {
                        "detail": "a JSON body is needed "
                        "(Content-Type: application/json)"
                    },
                    status_code=415,
                )
            origin = request.headers.get("origin")
            if origin and urlsplit(origin).netloc != request.headers.get("host"):
                return JSONResponse(
                    {"detail": "a request from another site is refused"},
                    status_code=403,
                )
            length = request.headers.get("content-length", "")
            if not length.isdigit() or int(length) > MAX_BODY:
                return JSONResponse(
                    {"detail": f"a body of at most {MAX_BODY} bytes, with its length"},
                    status_code=413,
                )
        resp = await call_next(request)
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self' "
            "'unsafe-inline'; script-src 'self'; object-src 'none'"
        )
        return resp

    def as_user(request: Request, reviewer: str | None) -> str | None:
        """A reviewer's own token decides who they are (403 for another)."""
        user = request.state.user
        if user is None or reviewer is None:
            return reviewer
        if ident(reviewer) != ident(user):
            raise HTTPException(403, f"your token is {user}'s, not {reviewer}'s")
        return user

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # the fields and what is wrong with them, never the input echoed back
        detail = [
            {
                "loc": list(err.get("loc", ())),
                "msg": err.get("msg", ""),
                "type": err.get("type", ""),
            }
            for err in exc.errors()
        ]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(Exception)
    async def _broken(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s", request.method, request.url.path)
        return JSONResponse(
            {
                "detail": f"the run's files cannot be read: {type(exc).__name__}: "
                + " ".join(str(exc).split())[:300]
            },
            status_code=500,
        )

    @app.exception_handler(NoSuchRun)
    async def _no_run(request: Request, exc: NoSuchRun) -> JSONResponse:
        return JSONResponse({"detail": "no such run under the root"}, status_code=404)

    @app.exception_handler(ReviewError)
    async def _review(request: Request, exc: ReviewError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    async def off(fn: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args)

    # ------------------------------------------------------------- pages

    def page(request: Request, name: str, **ctx: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, ctx)

    @app.get("/", response_class=HTMLResponse)
    async def overview(request: Request) -> HTMLResponse:
        return page(request, "overview.html", root=str(station.root))

    @app.get("/runs/{run:path}/review", response_class=HTMLResponse)
    async def review_page(request: Request, run: str) -> HTMLResponse:
        view = station.catalog.view(run)
        return page(request, "review.html", run=view.name)

    @app.get("/runs/{run:path}/cartridge", response_class=HTMLResponse)
    async def cartridge_page(request: Request, run: str) -> HTMLResponse:
        view = station.catalog.view(run)
        return page(request, "cartridge.html", run=view.name)

    @app.get("/runs/{run:path}", response_class=HTMLResponse)
    async def run_page(request: Request, run: str) -> HTMLResponse:
        view = station.catalog.view(run)
        name = "queue.html" if view.kind == "queue" else "run.html"
        return page(request, name, run=view.name)

    # --------------------------------------------------------------- API

    @app.get("/api/runs")
    async def api_runs() -> list[dict[str, Any]]:
        return await off(station.overview)

    @app.get("/api/runs/{run:path}/events", response_class=EventSourceResponse)
    async def api_events(run: str) -> AsyncIterator[ServerSentEvent]:
        view = station.catalog.view(run)
        seq = await off(view.cursor)
        version, quiet, sent = -1, 0, 0.0
        loop = asyncio.get_running_loop()
        while True:
            records = await off(view.records_since, seq)
            ended = False
            for seq, r in records:
                ended |= r.kind in ("finished", "stopped")
                yield ServerSentEvent(
                    event="record", id=str(seq), data=json.loads(r.model_dump_json())
                )
            # the status at most once a second (a scan writes three records a
            # field); at once when the run ends
            due = loop.time() - sent >= STATUS_EVERY_S or ended
            if view.version != version and due:
                version, sent = view.version, loop.time()
                status = await off(view.status)
                yield ServerSentEvent(event="status", data=status)
                quiet = 0
            else:
                quiet += 1
                if quiet * POLL_S >= 15:
                    quiet = 0
                    yield ServerSentEvent(comment="keep-alive")
            await asyncio.sleep(POLL_S)

    @app.get("/api/runs/{run:path}/candidates")
    async def api_candidates(
        request: Request,
        run: str,
        reviewer: Annotated[str | None, Query(max_length=64)] = None,
    ) -> dict[str, Any]:
        reviewer = as_user(request, reviewer) or request.state.user
        return await off(station.candidates, run, reviewer)

    @app.get("/api/runs/{run:path}/review")
    async def api_review(run: str) -> dict[str, Any]:
        return await off(station.review_summary, run)

    @app.post("/api/runs/{run:path}/decisions", status_code=201)
    async def api_decide(
        request: Request, run: str, body: DecisionIn
    ) -> dict[str, Any]:
        line = await off(
            station.decide,
            run,
            as_user(request, body.reviewer),
            body.object_id,
            body.decision,
            body.comment,
        )
        return line.model_dump()

    @app.post("/api/runs/{run:path}/signoff", status_code=201)
    async def api_signoff(
        request: Request, run: str, body: SignOffIn
    ) -> dict[str, Any]:
        line = await off(station.sign, run, as_user(request, body.reviewer))
        return line.model_dump()

    @app.post("/api/runs/{run:path}/stop", status_code=202)
    async def api_stop(run: str) -> dict[str, Any]:
        view = station.catalog.view(run)
        if view.kind != "queue":
            raise HTTPException(409, "only a queue stops after its cartridge")
        if not await off(view.running):
            raise HTTPException(409, "the queue is not running")
        path = await off(request_stop, view.folder)
        return {"stop_requested": True, "file": path.name}

    @app.get("/api/runs/{run:path}/pictures/last.png")
    async def api_last(run: str) -> Response:
        data = await off(station.last_field_png, run)
        return Response(
            data, media_type="image/png", headers={"Cache-Control": "no-store"}
        )

    @app.get("/api/runs/{run:path}/pictures/cartridge.png")
    async def api_mosaic_png(run: str) -> Response:
        data = await off(station.mosaic_png, run)
        return Response(
            data, media_type="image/png", headers={"Cache-Control": "no-store"}
        )

    @app.get("/api/runs/{run:path}/cartridge")
    async def api_mosaic(run: str) -> dict[str, Any]:
        return await off(station.mosaic_layout, run)

    @app.get("/api/runs/{run:path}/pictures/focus.svg")
    async def api_focus(run: str) -> Response:
        focus = await off(station.focus, run)
        body = focus_html(focus) if focus else "<p>No focus map yet.</p>"
        return HTMLResponse(body, headers={"Cache-Control": "no-store"})

    @app.get("/api/runs/{run:path}/tiles/{object_id}/{panel}.png")
    async def api_tile(run: str, object_id: str, panel: str) -> Response:
        data = await off(station.tile_png, run, object_id, panel)
        return Response(data, media_type="image/png")

    @app.get("/api/runs/{run:path}")
    async def api_run(run: str) -> dict[str, Any]:
        view = station.catalog.view(run)
        status: dict[str, Any] = await off(view.status)
        if view.kind != "queue":
            status["reviewed_count"] = await off(station.reviewed_count, run)
        return status

    return app


__all__ += ["DECISIONS"]
