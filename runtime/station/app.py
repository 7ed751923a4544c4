"""The station's HTTP API and pages (FastAPI). Pages are server-rendered Jinja2 with a small vendored script.

Every ``/api`` request that changes something needs a session cookie, the session's ``X-CSRF-Token`` header and a
JSON body (``Content-Type: application/json``: a cross-site HTML form cannot send one) of at most
``ui.max_request_kb``. Refusals: 401 not logged in, 403 wrong CSRF token or role too low, 404 unknown
camera/archive name, 413 body too large, 415 not JSON, 422 bad field, 429 too many failed logins.
``GET /metrics`` (Prometheus) needs no login: bind the page to loopback or firewall the port.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from runtime.station.archive import ArchiveError
from runtime.station.auth import ROLES, AuthError, Session, role_rank
from runtime.station.swap import SwapError
from runtime.station.teach import TeachError
from runtime.station.threshold import write_sidecar

if TYPE_CHECKING:
    from runtime.station.output import Station

HERE = Path(__file__).resolve().parent
COOKIE = "rdedge_session"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
CSP = "default-src 'self'; img-src 'self' data:; object-src 'none'; frame-ancestors 'none'; base-uri 'none'"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginBody(_Body):
    user: str = Field(..., min_length=1, max_length=64)
    password: str = Field(..., min_length=1, max_length=256)


class ResetBody(_Body):
    camera: str | None = Field(None, description="one camera, or all when omitted")
    scope: Literal["shift", "total"] = "shift"


class ReviewBody(_Body):
    label: Literal["false_reject", "confirmed_defect"]


class ThresholdBody(_Body):
    value: float = Field(..., description="new NG threshold, score units")


class SwapBody(_Body):
    name: str = Field(..., min_length=1, max_length=128, description="a folder in ui.bundles_dir")


class TeachBody(_Body):
    camera: str
    n: int = Field(..., ge=1, le=10_000, description="frames to collect")
    name: str = Field(..., min_length=1, max_length=64, description="data set name (a new folder)")
    interval_s: float = Field(0.5, ge=0, le=3600, description="at most one frame per this many seconds")


class UserBody(_Body):
    name: str = Field(..., min_length=1, max_length=64)
    role: Literal["operator", "engineer", "admin"]
    password: str = Field(..., min_length=8, max_length=256)


def create_app(st: Station) -> FastAPI:
    """Build the FastAPI app serving station ``st``."""
    app = FastAPI(title="rdedge station", docs_url=None, redoc_url=None, openapi_url=None)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    max_body = st.ui.max_request_kb * 1024

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.method not in SAFE_METHODS:
            length = request.headers.get("content-length")
            if length is None and request.headers.get("transfer-encoding"):
                return JSONResponse({"detail": "a body needs a Content-Length"}, status_code=411)
            if length is not None and (not length.isdigit() or int(length) > max_body):
                return JSONResponse({"detail": f"request body over {st.ui.max_request_kb} KiB"}, status_code=413)
            if int(length or 0) > 0 and request.headers.get("content-type", "").split(";")[0] != "application/json":
                return JSONResponse({"detail": "bodies must be application/json"}, status_code=415)
        resp = await call_next(request)
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "same-origin"
        return resp

    def session_of(request: Request) -> Session | None:
        s = st.sessions.get(request.cookies.get(COOKIE))
        if s is not None:
            role = st.users.role(s.user)  # deleted or demoted since login: takes effect now
            if role is None:
                st.sessions.drop(request.cookies.get(COOKIE))
                return None
            s.role = role
        return s

    def need(role: str) -> Callable[[Request], Session]:
        def dep(request: Request) -> Session:
            s = session_of(request)
            if s is None:
                raise HTTPException(401, "log in first")
            if request.method not in SAFE_METHODS and not secrets.compare_digest(
                request.headers.get("x-csrf-token", ""), s.csrf
            ):
                raise HTTPException(403, "missing or wrong CSRF token (X-CSRF-Token)")
            if role_rank(s.role) < role_rank(role):
                raise HTTPException(403, f"this needs the {role} role; {s.user} is {s.role}")
            return s

        return dep

    operator, engineer, admin = (Depends(need(r)) for r in ROLES)

    def addr(request: Request) -> str:
        return request.client.host if request.client else ""

    def camera_or_404(name: str) -> str:
        if name not in st.live.cams:
            raise HTTPException(404, f"no camera {name!r}")
        return name

    # -- pages -------------------------------------------------------------------------------------------------------

    def page(name: str, role: str = "operator") -> Callable[[Request], Response]:
        def render(request: Request) -> Response:
            s = session_of(request)
            if s is None:
                return RedirectResponse("/login", status_code=303)
            if role_rank(s.role) < role_rank(role):
                raise HTTPException(403, f"this page needs the {role} role; {s.user} is {s.role}")
            ctx = {"session": s, "page": name, "cameras": list(st.live.cams), "device": st.device}
            return templates.TemplateResponse(request, f"{name}.html", ctx)

        return render

    app.get("/live")(page("live"))
    app.get("/archive")(page("archive"))
    app.get("/threshold")(page("threshold", "engineer"))
    app.get("/audit")(page("audit", "engineer"))
    app.get("/users")(page("users", "admin"))
    app.get("/models")(page("models", "engineer"))
    app.get("/teach")(page("teach", "engineer"))

    @app.get("/")
    def root(request: Request) -> Response:
        return RedirectResponse("/live" if session_of(request) else "/login", status_code=303)

    @app.get("/login")
    def login_page(request: Request) -> Response:
        return templates.TemplateResponse(request, "login.html", {"session": None, "page": "login",
                                                                  "device": st.device})  # fmt: skip

    # -- session -----------------------------------------------------------------------------------------------------

    @app.post("/api/login")
    def login(body: LoginBody, request: Request, response: Response) -> dict[str, str]:
        ip = addr(request)
        wait = st.limiter.retry_after(body.user, ip)
        if wait > 0:
            raise HTTPException(429, f"too many failed logins; retry in {math.ceil(wait)} s",
                                headers={"Retry-After": str(math.ceil(wait))})  # fmt: skip
        role = st.users.verify(body.user, body.password)
        if role is None:
            st.limiter.failed(body.user, ip)
            st.audit.record(body.user, "login_failed", addr=ip)
            raise HTTPException(401, "wrong user name or password")
        st.limiter.succeeded(body.user)
        token, s = st.sessions.create(body.user, role)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=st.ui.tls is not None,
                            max_age=int(st.ui.session_ttl_s), path="/")  # fmt: skip
        st.audit.record(body.user, "login", addr=ip)
        return {"user": s.user, "role": s.role, "csrf": s.csrf}

    @app.post("/api/logout")
    def logout(request: Request, response: Response, s: Session = operator) -> dict[str, bool]:
        st.sessions.drop(request.cookies.get(COOKIE))
        response.delete_cookie(COOKIE, path="/")
        st.audit.record(s.user, "logout", addr=addr(request))
        return {"ok": True}

    # -- live --------------------------------------------------------------------------------------------------------

    @app.get("/api/live")
    def live(s: Session = operator) -> dict[str, Any]:
        return st.live_doc()

    @app.get("/api/live/{camera}.jpg")
    def live_jpeg(camera: str, s: Session = operator) -> Response:
        jpeg = st.live.jpeg(camera_or_404(camera))
        if jpeg is None:
            raise HTTPException(404, f"camera {camera!r}: no frame scored yet")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.post("/api/counters/reset")
    def reset(body: ResetBody, request: Request, s: Session = engineer) -> dict[str, Any]:
        if body.camera is not None:
            camera_or_404(body.camera)
        old = st.live.reset(body.camera, body.scope)
        st.audit.record(s.user, f"reset_{body.scope}_counters", body.camera or "*", old, 0, addr(request))
        return {"reset": old}

    # -- archive -----------------------------------------------------------------------------------------------------

    @app.get("/api/archive")
    def archive_list(
        camera: str | None = None,
        verdict: Literal["OK", "NG"] | None = None,
        review: Literal["none", "false_reject", "confirmed_defect"] | None = None,
        limit: int = 100,
        s: Session = operator,
    ) -> dict[str, Any]:
        items = st.archive.entries(camera, verdict, review, max(1, min(limit, 1000)))
        a = st.archive
        return {"items": items, "bytes": a.bytes, "quota_bytes": a.max_bytes, "dropped": a.dropped,
                "deleted": a.deleted, "written": a.written}  # fmt: skip

    @app.get("/api/archive/{name}/{kind}")
    def archive_file(name: str, kind: str, s: Session = operator) -> Response:
        try:
            path = st.archive.file(name, kind)
        except ArchiveError as exc:
            raise HTTPException(404, str(exc)) from None
        return FileResponse(path, media_type="image/jpeg" if kind == "jpg" else "image/png")

    @app.post("/api/archive/{name}/review")
    def archive_review(name: str, body: ReviewBody, request: Request, s: Session = operator) -> dict[str, Any]:
        try:
            old, new = st.archive.review(name, body.label, s.user)
        except ArchiveError as exc:
            raise HTTPException(404, str(exc)) from None
        st.audit.record(s.user, "review", name, old, new, addr(request))
        return {"name": name, "old": old, "label": new}

    # -- threshold ---------------------------------------------------------------------------------------------------

    @app.get("/api/threshold")
    def threshold(camera: str | None = None, s: Session = operator) -> dict[str, Any]:
        if camera is not None:
            camera_or_404(camera)
        return st.threshold_doc(camera)

    @app.get("/api/threshold/preview")
    def threshold_preview(value: float, camera: str | None = None, s: Session = operator) -> dict[str, Any]:
        if camera is not None:
            camera_or_404(camera)
        return st.preview(value, camera)

    @app.post("/api/threshold")
    def threshold_apply(body: ThresholdBody, request: Request, s: Session = engineer) -> dict[str, Any]:
        if not math.isfinite(body.value) or body.value <= 0:
            raise HTTPException(422, f"value: must be a finite positive score, got {body.value}")
        old = st.threshold
        doc = write_sidecar(st.sidecar_path, body.value, s.user, st.service.model.model_id if st.service and
                            st.service.model else None)  # fmt: skip
        st.audit.record(s.user, "threshold", "*", old, body.value, addr(request))
        return {"old": old, "new": body.value, "sidecar": str(st.sidecar_path), "written": doc}

    # -- model hot swap ----------------------------------------------------------------------------------------------

    @app.get("/api/models")
    def models(s: Session = operator) -> dict[str, Any]:
        assert st.swapper is not None
        return {**st.swapper.status(), "bundles": st.swapper.bundles()}

    @app.post("/api/models/swap")
    def model_swap(body: SwapBody, s: Session = engineer) -> dict[str, Any]:
        assert st.swapper is not None
        try:
            path = st.swapper.resolve(body.name)
            st.swapper.swap(path, s.user)
        except SwapError as exc:
            raise HTTPException(404 if "no bundle" in str(exc) else 409, str(exc)) from None
        return {"swapping_to": body.name, **st.swapper.status()}

    @app.post("/api/models/rollback")
    def model_rollback(s: Session = engineer) -> dict[str, Any]:
        assert st.swapper is not None
        try:
            path = st.swapper.rollback(s.user)
        except SwapError as exc:
            raise HTTPException(409, str(exc)) from None
        return {"swapping_to": str(path), **st.swapper.status()}

    # -- teach mode --------------------------------------------------------------------------------------------------

    @app.get("/api/teach")
    def teach(s: Session = engineer) -> dict[str, Any]:
        return st.teach.status()

    @app.post("/api/teach/collect")
    def teach_collect(body: TeachBody, request: Request, s: Session = engineer) -> dict[str, Any]:
        camera_or_404(body.camera)
        try:
            st.teach.collect(body.camera, body.n, body.name, body.interval_s)
        except TeachError as exc:
            raise HTTPException(409 if "busy" in str(exc) or "exists" in str(exc) else 422, str(exc)) from None
        st.audit.record(s.user, "teach_collect", body.name, None, {"camera": body.camera, "n": body.n},
                        addr(request))  # fmt: skip
        return st.teach.status()

    @app.post("/api/teach/cancel")
    def teach_cancel(request: Request, s: Session = engineer) -> dict[str, Any]:
        old = st.teach.state
        st.teach.cancel()
        st.audit.record(s.user, "teach_cancel", st.teach.name, old, st.teach.state, addr(request))
        return st.teach.status()

    @app.post("/api/teach/train")
    def teach_train(request: Request, s: Session = engineer) -> dict[str, Any]:
        try:
            st.teach.train()
        except TeachError as exc:
            raise HTTPException(409, str(exc)) from None
        st.audit.record(s.user, "teach_train", st.teach.name, None, st.teach.commands(), addr(request))
        return st.teach.status()

    # -- audit and users ---------------------------------------------------------------------------------------------

    @app.get("/api/audit")
    def audit(limit: int = 200, action: str | None = None, s: Session = engineer) -> dict[str, Any]:
        return {"entries": st.audit.entries(max(1, min(limit, 10_000)), action)}

    @app.get("/api/users")
    def users(s: Session = admin) -> dict[str, Any]:
        return {"users": st.users.all()}

    @app.post("/api/users")
    def user_add(body: UserBody, request: Request, s: Session = admin) -> dict[str, Any]:
        old = st.users.role(body.name)
        try:
            st.users.add(body.name, body.role, body.password)
        except AuthError as exc:
            raise HTTPException(422, str(exc)) from None
        st.audit.record(s.user, "user_set", body.name, old, body.role, addr(request))
        return {"name": body.name, "role": body.role}

    @app.delete("/api/users/{name}")
    def user_delete(name: str, request: Request, s: Session = admin) -> dict[str, Any]:
        old = st.users.role(name)
        if old is None:
            raise HTTPException(404, f"no user {name!r}")
        if name == s.user:
            raise HTTPException(422, "you cannot delete yourself")
        st.users.delete(name)
        st.sessions.drop_user(name)
        st.audit.record(s.user, "user_delete", name, old, None, addr(request))
        return {"deleted": name}

    # -- metrics -----------------------------------------------------------------------------------------------------

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
