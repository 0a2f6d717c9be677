"""The console refuses what it must: forged forms (CSRF), script in data (XSS), framing,
guessed tokens; its cookies and headers are the safe kind."""

from __future__ import annotations

import re

import requests

from tests.console.conftest import Console
from tests.support.harness import RunningBroker


def _signed_in(daemon: RunningBroker, name: str = "ops") -> tuple[requests.Session, str]:
    """An HTTP client signed in to the console, and its CSRF token."""
    _row, token = daemon.ks("create_token", name)
    return _signed_in_with(daemon, token)


def _signed_in_with(daemon: RunningBroker, token: str) -> tuple[requests.Session, str]:
    http = requests.Session()
    form = http.get(daemon.api_url() + "/console/signin", timeout=5)
    nonce = re.search(r'name="nonce" value="([^"]+)"', form.text)
    assert nonce is not None
    done = http.post(daemon.api_url() + "/console/signin", timeout=5,
                     data={"nonce": nonce.group(1), "token": token})
    assert done.url.endswith("/console/apps"), done.url
    page = http.get(daemon.api_url() + "/console/apps", timeout=5)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    return http, csrf.group(1)


def test_state_changes_without_the_csrf_token_are_refused(broker: RunningBroker) -> None:
    key, _ = broker.ks("create_key", name="target")
    http, csrf = _signed_in(broker)
    app = broker.ks("app").id
    status_url = f"{broker.api_url()}/console/apps/{app}/keys/{key.id}/status"
    for data in ({}, {"csrf": "forged"}, {"csrf": csrf[:-1]}):
        refused = http.post(status_url, data=data, timeout=5, allow_redirects=False)
        assert refused.status_code == 403 and "CSRF" in refused.text
    assert broker.ks("get_key", key.key).status.value == "active"
    deactivate = {"csrf": csrf, "status": "inactive", "confirm": "yes"}
    accepted = http.post(status_url, data=deactivate, timeout=5, allow_redirects=False)
    assert accepted.status_code == 303
    assert broker.ks("get_key", key.key).status.value == "inactive"
    # Another signed-in operator's token does not work in this session either.
    _other, other_csrf = _signed_in(broker, "ops-2")
    assert http.post(status_url, data={**deactivate, "csrf": other_csrf}, timeout=5,
                     allow_redirects=False).status_code == 403


def test_sign_out_without_the_csrf_token_changes_nothing(broker: RunningBroker) -> None:
    http, csrf = _signed_in(broker)
    apps_url, signout_url = (broker.api_url() + path
                             for path in ("/console/apps", "/console/signout"))
    for data in ({}, {"csrf": "forged"}):
        refused = http.post(signout_url, data=data, timeout=5, allow_redirects=False)
        assert refused.status_code == 403 and "CSRF" in refused.text
        assert "kb_console" not in refused.headers.get("Set-Cookie", "")  # cookie kept
        assert http.get(apps_url, timeout=5, allow_redirects=False).status_code == 200
    stolen = http.cookies.get("kb_console")
    assert stolen
    done = http.post(signout_url, data={"csrf": csrf}, timeout=5, allow_redirects=False)
    assert done.status_code == 303 and done.headers["Location"] == "/console/signin"
    replay = requests.get(apps_url, cookies={"kb_console": stolen}, timeout=5,
                          allow_redirects=False)
    assert replay.status_code == 303 and replay.headers["Location"] == "/console/signin"


def test_sign_in_needs_the_forms_own_nonce(broker: RunningBroker) -> None:
    _row, token = broker.ks("create_token", "ops")
    forged = requests.post(broker.api_url() + "/console/signin", timeout=5,
                           data={"nonce": "x", "token": token}, allow_redirects=False)
    assert forged.status_code == 403 and "kb_console=" not in forged.headers.get(
        "Set-Cookie", "")


def test_cookies_and_headers(broker: RunningBroker) -> None:
    _row, token = broker.ks("create_token", "ops")
    http = requests.Session()
    form = http.get(broker.api_url() + "/console/signin", timeout=5)
    assert form.headers["X-Frame-Options"] == "DENY"
    csp = form.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert form.headers["Cache-Control"] == "no-store"
    assert "<script>" not in form.text.replace('<script src="/console/static/console.js"'
                                               ' defer></script>', "")  # no inline script
    nonce = re.search(r'name="nonce" value="([^"]+)"', form.text)
    assert nonce is not None
    done = http.post(broker.api_url() + "/console/signin", timeout=5, allow_redirects=False,
                     data={"nonce": nonce.group(1), "token": token})
    cookie = done.headers["Set-Cookie"]
    assert "kb_console=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Path=/console" in cookie
    assert token not in cookie  # the session id is the server's own, not the token


def test_failed_sign_ins_are_banned_by_the_guard(broker: RunningBroker) -> None:
    http = requests.Session()
    url = broker.api_url() + "/console/signin"
    statuses = []
    for attempt in range(broker.settings.guard.max_failures + 1):
        nonce = re.search(r'name="nonce" value="([^"]+)"', http.get(url, timeout=5).text)
        assert nonce is not None
        statuses.append(http.post(url, timeout=5, data={
            "nonce": nonce.group(1), "token": f"kba.{'0' * 24}.guess{attempt}"}).status_code)
    assert statuses[:-1] == [401] * broker.settings.guard.max_failures
    assert statuses[-1] == 429
    assert any(e["event"] == "ban" for e in broker.audit_events())


def test_script_in_names_renders_as_text(console: Console) -> None:
    payload = '<script>window.__xss = 1</script><img src=x onerror="window.__xss=2">'
    console.daemon.ks("create_key", name=payload, description=payload)
    console.daemon.ks("add_device", "dev-x", name=payload, tags=[("k", payload)])
    console.sign_in()
    for path in ("/keys", "/devices", "/devices/dev-x"):
        console.go(f"/console/apps/{console.app_id}{path}")
        assert console.browser.execute_script("return window.__xss") is None
        assert payload in console.find("main").text  # shown, as text
    key = console.daemon.ks("list_keys")[0]
    console.go(f"/console/apps/{console.app_id}/keys/{key.id}")
    assert console.browser.execute_script("return window.__xss") is None
    assert console.find("#name").get_attribute("value") == payload


def test_a_token_of_one_application_stays_in_it(broker: RunningBroker) -> None:
    other = broker.ks("create_app", "other")
    _row, token = broker.ks("create_token", "bound", app="other")
    http, csrf = _signed_in_with(broker, token)
    made = http.post(broker.api_url() + "/console/apps", timeout=5, allow_redirects=False,
                     data={"csrf": csrf, "name": "sneaky"})
    assert made.status_code == 403
    assert [a.name for a in broker.ks("list_apps")] == ["default", "other"]
    default = broker.ks("app").id
    assert http.get(f"{broker.api_url()}/console/apps/{default}/keys", timeout=5).status_code == 403
    assert http.get(f"{broker.api_url()}/console/apps/{other.id}/keys",
                    timeout=5).status_code == 200
    assert http.get(f"{broker.api_url()}/console/status", timeout=5).status_code == 403


def test_console_changes_are_audited_and_checked_before_writing(broker: RunningBroker) -> None:
    key, _ = broker.ks("create_key", name="k")
    http, csrf = _signed_in(broker)
    app = broker.ks("app").id
    base = f"{broker.api_url()}/console/apps/{app}/keys/{key.id}"
    bad = http.post(base, timeout=5, data={"csrf": csrf, "name": "renamed", "status": "bogus",
                                           "address_mode": "all", "topic_mode": "none"})
    assert bad.status_code == 400 and "bogus" in bad.text
    assert broker.ks("get_key", key.key).name == "k"  # nothing written
    flipped = http.post(base + "/status", timeout=5, allow_redirects=False,
                        data={"csrf": csrf, "status": "inactive", "confirm": "yes",
                              "back": "page=2&evil=1\r\nX-Injected: yes"})
    assert flipped.status_code == 303
    assert flipped.headers["Location"].endswith("/keys?page=2")
    assert "X-Injected" not in flipped.headers
    events = [e for e in broker.audit_events() if e["event"] == "api"]
    assert [(e["action"], e["listener"], e.get("key_id")) for e in events] == [
        ("applicationKey.patch", "console", key.id)]
    assert events[0]["token"] == "ops"


def test_odd_list_parameters_are_not_server_errors(broker: RunningBroker) -> None:
    http, _csrf = _signed_in(broker)
    app = broker.ks("app").id
    for params in ({"page": "²"}, {"page": "9" * 40}, {"query": "[" * 3000 + "]" * 3000}):
        answer = http.get(f"{broker.api_url()}/console/apps/{app}/keys", params=params, timeout=5)
        assert answer.status_code == 200, (params, answer.status_code)
    assert "nested too deeply" in http.get(
        f"{broker.api_url()}/console/apps/{app}/keys", timeout=5,
        params={"query": "[" * 3000 + "]" * 3000}).text
