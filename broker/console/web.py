"""The console's plumbing: templates, the sign-in session of each request, CSRF, scopes.

Every page runs through ``Console.page``: no valid session cookie → the sign-in page;
a session whose admin token was revoked or expired → signed out; a POST without the
session's CSRF token → 403; a token whose scopes (keystore.scopes, as in the API) or
application do not allow the page → 403. Keystore refusals become a message on the page,
never a traceback. Every response is ``Cache-Control: no-store`` with a Content-Security-
Policy that allows only the console's own script and style files.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from broker.api.callers import admin_refusal
from broker.api.context import SOURCE, Api
from broker.api.errors import ApiError, within_body_timeout
from broker.console.sessions import Session, Sessions, flash
from keystore.errors import KeybrokerError, NotFoundError
from keystore.models import ApiToken, Application

COOKIE = "kb_console"
SIGNIN_COOKIE = "kb_console_signin"  # double-submit CSRF for the sign-in form
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
STATIC = Path(__file__).parent / "static"


@dataclass(slots=True)
class Page:
    """One signed-in request: its session, its token and (on application pages) the
    application."""

    console: Console
    request: web.Request
    session: Session
    token: ApiToken
    app: Application | None
    # What the audit line of a change names besides the path's ids (e.g. a new key).
    targets: dict[str, str] = field(default_factory=dict)

    @property
    def form_csrf(self) -> str:
        return self.session.csrf

    def allowed(self, resource: str, action: str) -> bool:
        """May this page's token do that (what the pages offer follows it)?"""
        app_id = self.app.id if self.app is not None else None
        return admin_refusal(self.token, resource, action, app_id) is None

    def render(self, template: str, status: int = 200, **context: Any) -> web.Response:
        flash, self.session.flash = self.session.flash, []
        return self.console.render(template, status, page=self, flash=flash, **context)

    def confirm(self, title: str, question: str, action: str, cancel: str,
                items: list[tuple[str, str]] | None = None) -> web.Response:
        """The confirmation page of a destructive form (nothing changed yet): yes posts
        ``items`` and confirm=yes to ``action``."""
        self.targets["changed"] = "no"
        return self.render("confirm.html", title=title, question=question, action=action,
                           items=items or [], cancel=cancel)

    def back(self, location: str, message: str | None = None) -> web.Response:
        """303 to ``location``, with a message shown on the next page."""
        if message:
            flash(self.session, message)
        return redirect(location)

    @property
    def app_id(self) -> str:
        assert self.app is not None
        return self.app.id

    def app_url(self, suffix: str = "") -> str:
        return f"/console/apps/{self.app_id}{suffix}"


Handler = Callable[[Page], Awaitable[web.StreamResponse]]


def redirect(location: str) -> web.Response:
    """A 303 as a plain response (cookies can be set on it; HTTP exceptions are kept for
    errors)."""
    return web.Response(status=303, headers={"Location": location})


class Console:
    def __init__(self, api: Api, tls: bool) -> None:
        self.api = api
        self.keystore = api.keystore
        self.tls = tls
        self.sessions = Sessions()
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("broker.console", "templates"),
            autoescape=True, undefined=jinja2.StrictUndefined)

    # --- responses ------------------------------------------------------------------------

    def render(self, template: str, status: int = 200, **context: Any) -> web.Response:
        html = self.env.get_template(template).render(**context)
        return web.Response(text=html, status=status, content_type="text/html",
                            headers={"Content-Security-Policy": CSP})

    def set_cookie(self, request: web.Request, response: web.StreamResponse, name: str,
                   value: str) -> None:
        """Cookies are HttpOnly, SameSite=Strict, and Secure whenever the browser is on
        HTTPS (here, or at a trusted reverse proxy)."""
        response.set_cookie(name, value, httponly=True, samesite="Strict",
                            secure=request[SOURCE].https, path="/console")

    # --- pages ----------------------------------------------------------------------------

    def page(self, resource: str, action: str, handler: Handler,
             ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Wrap a handler: session, token, CSRF, scope and application checks first."""

        async def run(request: web.Request) -> web.StreamResponse:
            session = self.sessions.get(request.cookies.get(COOKIE))
            if session is None:
                return redirect("/console/signin")
            token = await self._token(session)
            if token is None:
                self.sessions.drop(session.id)
                return redirect("/console/signin")
            if request.method == "POST":
                refused = await self._csrf_refusal(request, session)
                if refused is not None:
                    return refused
            page = Page(self, request, session, token, None)
            refusal = admin_refusal(token, resource, action,
                                    request.match_info.get("applicationId"))
            if refusal is not None:
                return page.render("error.html", 403, message=refusal[0].upper() + refusal[1:])
            try:
                page.app = await self._app(page)
                response = await handler(page)
                if request.method == "POST" and response.status < 400 and \
                        page.targets.get("changed") != "no":
                    self._audit(page, f"{resource}.{action}")
                return response
            except (KeybrokerError, ApiError) as exc:
                message = exc.message if isinstance(exc, ApiError) else str(exc)
                status = exc.status if isinstance(exc, ApiError) else \
                    404 if isinstance(exc, NotFoundError) else 400
                return page.render("error.html", status, message=message)

        return run

    async def _csrf_refusal(self, request: web.Request, session: Session,
                            ) -> web.Response | None:
        """403 for a form that does not carry this session's CSRF token (compared in
        constant time), else None."""
        form = await within_body_timeout(request.post())
        sent = form.get("csrf")
        if isinstance(sent, str) and hmac.compare_digest(sent, session.csrf):
            return None
        return self.render("error.html", 403, page=None, flash=[],
                           message="The form was not sent by this console (missing or wrong "
                                   "CSRF token); nothing changed.")

    def _audit(self, page: Page, action: str) -> None:
        """Every change made in the console is an audit line, as over the API."""
        source = page.request[SOURCE]
        ids = {name: page.request.match_info[path] for name, path in (
            ("app", "applicationId"), ("key_id", "applicationKeyId"), ("device_id", "deviceId"))
            if path in page.request.match_info}
        targets = {k: v for k, v in page.targets.items() if k != "changed"}
        self.api.audit.event("api", token=page.token.name, action=targets.pop("action", action),
                             client_ip=source.client_ip, peer_ip=source.peer_ip,
                             listener="console", **{**ids, **targets})

    async def _token(self, session: Session) -> ApiToken | None:
        try:
            token = await self.keystore.get_token(session.token_id)
        except NotFoundError:
            return None
        return token if token.is_usable(datetime.now(UTC)) else None

    async def _app(self, page: Page) -> Application | None:
        app_id = page.request.match_info.get("applicationId")
        if app_id is None:
            return None
        app = await self.keystore.app(app_id)  # the token's binding is checked already
        if app.id != app_id:
            raise NotFoundError(f"no application {app_id!r}")
        return app

    async def visible_apps(self, token: ApiToken) -> list[Application]:
        apps = await self.keystore.list_apps()
        return [a for a in apps if token.app_id in (None, a.id)]

    # --- signing in -------------------------------------------------------------------------

    async def signin_form(self, request: web.Request, message: str | None = None,
                          status: int = 200) -> web.Response:
        nonce = secrets.token_urlsafe(24)
        response = self.render("signin.html", status, page=None, flash=[], nonce=nonce,
                               message=message)
        self.set_cookie(request, response, SIGNIN_COOKIE, nonce)
        return response

    async def signin(self, request: web.Request) -> web.StreamResponse:
        source = request[SOURCE]
        callers = self.api.callers
        form = await within_body_timeout(request.post())
        nonce = request.cookies.get(SIGNIN_COOKIE, "")
        sent = form.get("nonce")
        if not nonce or not isinstance(sent, str) or not hmac.compare_digest(sent, nonce):
            return await self.signin_form(request, "The sign-in form expired; try again.", 403)
        try:
            callers.check_not_banned(source)
        except ApiError as exc:
            return await self.signin_form(request, exc.message, 429)
        text = form.get("token")
        token = await self.keystore.check_token(text.strip(), datetime.now(UTC)) \
            if isinstance(text, str) else None
        if token is None:
            callers.failed(source, "console_refused", "invalid, revoked or expired token")
            return await self.signin_form(request, "That token is not valid.", 401)
        session = self.sessions.create(token.id)
        self.api.audit.event("console_signin", token=token.name, client_ip=source.client_ip,
                             peer_ip=source.peer_ip, listener="api")
        response = redirect("/console/apps")
        self.set_cookie(request, response, COOKIE, session.id)
        response.del_cookie(SIGNIN_COOKIE, path="/console")
        return response

    async def signout(self, request: web.Request) -> web.StreamResponse:
        """End the session. Like every other form, sign-out needs the session's CSRF
        token: without it nothing changes, in the browser or here (the cookie is kept, so
        the two never disagree), because the console's own Sign out always sends it and
        a page of another port on this host (the same site for SameSite cookies) must not
        sign an operator out."""
        session = self.sessions.get(request.cookies.get(COOKIE))
        if session is not None:
            refused = await self._csrf_refusal(request, session)
            if refused is not None:
                return refused
            self.sessions.drop(session.id)
        response = redirect("/console/signin")
        response.del_cookie(COOKIE, path="/console")
        return response
