"""The HTTP API's application: ``create_app`` wires the domains' routers under ``/v1``."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jifen import __version__
from jifen.api import problems
from jifen.api.access_log import hide_query_values
from jifen.api.deps import annotate_permissions, refuse_unusable_request
from jifen.api.limits import BodyLimit, Limiter
from jifen.approvals import api as approvals_api
from jifen.audit import api as audit_api
from jifen.auth import api as auth_api
from jifen.db import migrate
from jifen.db.uow import Database
from jifen.events import api as events_api
from jifen.expiry import api as expiry_api
from jifen.members import api as members_api
from jifen.notify import api as notify_api
from jifen.notify.sms import OutboxSmsProvider, SmsProvider
from jifen.points import api as points_api
from jifen.programs import api as programs_api
from jifen.rewards import api as rewards_api
from jifen.rules import api as rules_api
from jifen.settings import Settings, get_settings
from jifen.tiers import api as tiers_api

DOMAINS = (
    points_api, events_api, rewards_api, members_api, auth_api, programs_api, approvals_api,
    audit_api, tiers_api, rules_api, notify_api, expiry_api,
)  # fmt: skip
"""The domains whose routers serve ``/v1``. A request is matched against the routes one by
one, in this order, so the busiest come first; no two routes match the same path (a test
checks it), so the order changes nothing but the time a match takes. The health checks
come before them all."""

DESCRIPTION = """
jifen (积分) keeps every member's points on an exact double-entry ledger.

* **Authentication**: staff sign in with a password and a TOTP code
  (`POST /v1/auth/staff/sign-in`), members with a password or a one-time SMS code, and
  merchants' systems send an API key. Send the token as `Authorization: Bearer <token>`.
* **Writes** need an `Idempotency-Key` header: repeat it with the same body to get the first
  answer again (safe retries); another body with the same key is refused.
* **Errors** are `application/problem+json` with a stable `code`; `Accept-Language: zh`
  gives Chinese messages. What an operation does not read (an unknown field or query
  parameter, a single-valued parameter given twice, a body where none is read) is refused.
* **Permissions**: each operation's `x-permission` names the permission it needs.
"""


def create_app(
    db: Database | None = None,
    settings: Settings | None = None,
    *,
    sms: SmsProvider | None = None,
) -> FastAPI:
    """The API over ``db`` (default: the configured database), texting through ``sms``
    (default: the built-in outbox provider)."""
    settings = settings or get_settings()
    hide_query_values()  # in the server's access log, however the app is served

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await app.state.limiter.close()

    app = FastAPI(
        lifespan=lifespan,
        title="jifen",
        version=__version__,
        description=DESCRIPTION,
        openapi_url="/openapi.json",
        docs_url=None,  # served below from jifen's own copy of Swagger UI, not a CDN
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
        responses=problems.ERROR_RESPONSES,
        dependencies=[Depends(refuse_unusable_request)],
    )
    app.state.db = db or Database(settings.resolved_database_url())
    app.state.settings = settings
    app.state.limiter = Limiter(settings)
    app.state.principal_cache = {}
    app.state.program_cache = {}
    app.state.route_reads = {}
    app.state.sms = sms or OutboxSmsProvider()
    problems.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(HeadAsGet)
    _serve_docs(app)
    _whole_bounds_in_openapi(app)

    @app.get("/healthz", tags=["health"], responses={503: {"model": problems.Problem}})
    async def healthz() -> dict[str, str]:
        """The process is up (answered on the event loop: no worker thread, no database)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"model": problems.Problem}})
    async def readyz(request: Request) -> Any:
        """The database answers and its schema is current; the rate-limit store answers."""
        database: Database = request.app.state.db
        try:
            current = await run_in_threadpool(migrate.is_current, database.engine)
        except Exception as exc:  # any failure to reach the database means "not ready"
            return problems.problem(503, "not_ready", f"database unreachable: {type(exc).__name__}")
        if not current:
            return problems.problem(503, "not_ready", "schema not current: run `jifen db upgrade`")
        try:
            limiter_ok = await request.app.state.limiter.check_storage()
        except Exception:  # a Redis outage is a readiness failure, not a crash
            limiter_ok = False
        if not limiter_ok:
            return problems.problem(503, "not_ready", "rate-limit store (Redis) unreachable")
        return JSONResponse({"status": "ready"})

    for module in DOMAINS:
        # Before including: the permission each route needs goes into its OpenAPI entry.
        annotate_permissions(module.router)
        app.include_router(module.router, prefix="/v1")

    return app


_BOUNDS = ("maximum", "minimum", "exclusiveMaximum", "exclusiveMinimum", "multipleOf")
_INT64 = (-(2**63), 2**63 - 1)


def _whole_bounds_in_openapi(app: FastAPI) -> None:
    """FastAPI's OpenAPI models hold every bound as a float, so an integer's ``maximum``
    of 2^63 - 1 (the largest id) came out as 9.223372036854776e+18, beyond what a 64-bit
    client can hold: an integer's bounds are given back as integers (the float nearest
    2^63 - 1 rounds to 2^63, and is put back within 64 bits)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _whole_bounds(generate())
        return app.openapi_schema  # type: ignore[return-value]  # made just above

    app.openapi = openapi  # type: ignore[method-assign]


def _whole_bounds(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for name in _BOUNDS:
                value = node.get(name)
                if isinstance(value, float) and value.is_integer():
                    node[name] = min(max(int(value), _INT64[0]), _INT64[1])
        for child in node.values():
            _whole_bounds(child)
    elif isinstance(node, list):
        for child in node:
            _whole_bounds(child)


class HeadAsGet:
    """ASGI middleware: answer ``HEAD`` as the ``GET`` of the same address would be answered
    (status and headers, Content-Length included), without the body (RFC 9110 §9.3.2):
    load balancers and ``curl -I`` check addresses such as ``/healthz`` with HEAD, which
    FastAPI's routes, declared for GET, would refuse with 405."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return  # the rest of the body follows: nothing of it is sent
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


def _serve_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI from the copy the ``fastapi-swagger`` package ships, so that
    the page works without reaching any CDN."""
    assets = resources.files("fastapi_swagger") / "resources"
    app.mount("/docs/assets", StaticFiles(directory=str(assets)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="jifen API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon-32x32.png",
            swagger_ui_parameters={"persistAuthorization": True, "filter": True},
        )


def app_from_settings() -> FastAPI:
    """The application ``jifen serve`` runs in each worker, configured from the environment.

    What the worker has built by then (some 200,000 objects: the app, its schemas, the
    libraries) lives as long as the worker, so it is moved out of the garbage collector's
    sight (``gc.freeze``): a full collection would otherwise walk all of it, about 100 ms
    during which the worker answers nobody."""
    app = create_app()
    app.openapi()  # built now, not on the first request for it
    gc.collect()
    gc.freeze()
    return app
