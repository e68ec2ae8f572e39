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
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit

import anyio.to_thread
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.middleware.trustedhost import TrustedHostMiddleware

from analysis.report import focus_html
from controller.runs.queue import request_stop
from controller.runstore.review import DECISIONS, ReviewError
from controller.station.live import Station
from controller.station.runs import NoSuchRun

__all__ = ["LOOPBACK", "create_app"]

LOOPBACK = ("127.0.0.1", "localhost", "::1")
COOKIE = "ctcscan_token"
#: how often the journal of a watched run is read
POLL_S = 0.25


def _name(v: str) -> str:
    v = " ".join(v.split())
    if not v or not v.isprintable():
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
        return " ".join(v.split())


class SignOffIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reviewer: Annotated[str, Field(min_length=1, max_length=64)]
    _reviewer = field_validator("reviewer")(_name)


def _run_url(name: str) -> str:
    return quote(name, safe="")


def create_app(
    root: str | Path, *, token: str | None = None, host: str = ""
) -> FastAPI:
    """The station over the run folders under `root`."""
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
        if token is not None:
            given = request.cookies.get(COOKIE, "")
            auth = request.headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            query = request.query_params.get("token")
            if query is not None and secrets.compare_digest(query, token):
                # opening a link with the token: keep it in a cookie, drop it
                # from the address bar
                resp: Response = RedirectResponse(request.url.path, status_code=303)
                resp.set_cookie(
                    COOKIE, token, httponly=True, samesite="strict", path="/"
                )
                return resp
            if not secrets.compare_digest(given.encode(), token.encode()):
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
        resp = await call_next(request)
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self' "
            "'unsafe-inline'; script-src 'self'; object-src 'none'"
        )
        return resp

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
        version, quiet = -1, 0
        while True:
            records = await off(view.records_since, seq)
            for seq, r in records:
                yield ServerSentEvent(
                    event="record", id=str(seq), data=json.loads(r.model_dump_json())
                )
            if view.version != version:
                version = view.version
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
        run: str, reviewer: Annotated[str | None, Query(max_length=64)] = None
    ) -> dict[str, Any]:
        return await off(station.candidates, run, reviewer)

    @app.get("/api/runs/{run:path}/review")
    async def api_review(run: str) -> dict[str, Any]:
        return await off(station.review_summary, run)

    @app.post("/api/runs/{run:path}/decisions", status_code=201)
    async def api_decide(run: str, body: DecisionIn) -> dict[str, Any]:
        line = await off(
            station.decide,
            run,
            body.reviewer,
            body.object_id,
            body.decision,
            body.comment,
        )
        return line.model_dump()

    @app.post("/api/runs/{run:path}/signoff", status_code=201)
    async def api_signoff(run: str, body: SignOffIn) -> dict[str, Any]:
        line = await off(station.sign, run, body.reviewer)
        return line.model_dump()

    @app.post("/api/runs/{run:path}/stop", status_code=202)
    async def api_stop(run: str) -> dict[str, Any]:
        view = station.catalog.view(run)
        if view.kind != "queue":
            raise HTTPException(409, "only a queue stops after its cartridge")
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
