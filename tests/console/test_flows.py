"""The console in a real browser (headless Chromium) against a real daemon: the
access-key flows operators rely on, and the secret shown exactly once."""

from __future__ import annotations

from selenium.webdriver.common.by import By

from tests.console.conftest import Console
from tests.support.harness import Client, revocation_bound


def _generate(console: Console, fields: dict[str, str], devices: str | None = None,
              address_mode: str = "all", topic_mode: str = "none") -> None:
    console.go(f"/console/apps/{console.app_id}/keys/new")
    console.fill(fields)
    if devices is not None:
        console.find("input[name=devices_mode][value=only]").click()
        console.fill({"#devices": devices})
    console.find(f"input[name=address_mode][value={address_mode}]").click()
    console.find(f"input[name=topic_mode][value={topic_mode}]").click()
    console.submit("#generate")


def test_sign_in_needs_a_valid_token_and_sign_out_ends_the_session(console: Console) -> None:
    console.go(f"/console/apps/{console.app_id}/keys")
    assert console.browser.current_url.endswith("/console/signin")  # not signed in
    console.sign_in("kba.000000000000000000000000.wrong")
    assert "That token is not valid." in console.find("[role=alert]").text
    console.sign_in()
    assert console.browser.current_url.endswith("/console/apps")
    assert "default" in console.find("table").text
    console.submit(".signout button")
    console.go(f"/console/apps/{console.app_id}/keys")
    assert console.browser.current_url.endswith("/console/signin")


def test_a_revoked_token_ends_its_console_sessions(console: Console) -> None:
    console.sign_in()
    console.daemon.ks("revoke_tokens", ["operator"])
    console.go("/console/apps")
    assert console.browser.current_url.endswith("/console/signin")


def test_generate_a_restricted_key_and_see_its_secret_exactly_once(console: Console) -> None:
    console.daemon.ks("add_device", "gw-1", tags=["type=thermostat"])
    console.sign_in()
    _generate(console, {"#name": "gateway", "#description": "floor 2",
                        "#addresses": "127.0.0.0/8", "#pub": "alerts/#"},
              devices="gw-1", address_mode="only", topic_mode="only")
    key = console.find("#reveal-key").text
    secret = console.find("#reveal-secret").text
    assert len(key) == 32 and len(secret) > 30
    assert secret not in console.browser.current_url  # never in a URL
    close = console.find("#close")
    assert not close.is_enabled()
    console.find("#download").click()
    downloaded = console.downloaded()
    assert downloaded == {"name": f"access-key-{key}.json", "key": key, "secret": secret}
    assert not close.is_enabled()
    console.find("#confirm-copied").click()
    assert close.is_enabled()

    stored = console.daemon.ks("get_key", key)
    assert stored.name == "gateway" and stored.device_ids == ("gw-1",)
    assert stored.addresses == ("127.0.0.0/8",) and stored.pub_topics == ("alerts/#",)
    console.browser.refresh()  # reload: the secret is gone
    assert secret not in console.browser.page_source
    assert "shown once and cannot be shown again" in console.browser.page_source
    console.browser.back()
    assert secret not in console.browser.page_source
    close_url = f"/console/apps/{console.app_id}/keys/{stored.id}"
    console.go(close_url)
    assert secret not in console.browser.page_source

    with Client(console.daemon.port(), "gw-1", key, secret) as device:
        assert device.connect() == 0  # the new key authenticates a real client
        console.go(f"/console/apps/{console.app_id}/keys")
        switch = console.find(f"tr[data-key='{key}'] button[role=switch]")
        assert switch.get_attribute("aria-checked") == "true"
        console.submit(f"tr[data-key='{key}'] button[role=switch]")
        assert "This ends 1 live connection now." in console.find("main").text
        assert console.daemon.ks("get_key", key).status.value == "active"  # not yet
        assert not device.disconnected.is_set()
        console.submit("#confirm")
        assert device.disconnected.wait(revocation_bound(console.daemon.settings)), \
            "deactivated key's session still connected"
    switch = console.find(f"tr[data-key='{key}'] button[role=switch]")
    assert switch.get_attribute("aria-checked") == "false"
    console.submit(f"tr[data-key='{key}'] button[role=switch]")  # activating: one click
    assert console.daemon.ks("get_key", key).status.value == "active"
    switch = console.find(f"tr[data-key='{key}'] button[role=switch]")
    assert switch.get_attribute("aria-checked") == "true"


def test_the_status_switch_asks_before_deactivating(console: Console) -> None:
    key, _ = console.daemon.ks("create_key", name="idle")
    console.sign_in()
    console.go(f"/console/apps/{console.app_id}/keys?filter=idl")
    console.submit(f"tr[data-key='{key.key}'] button[role=switch]")
    assert "Deactivate key idle? No device is connected with it now." in \
        console.find("main").text
    console.find("form a").click()  # Cancel: back to the list as it was
    console.wait(lambda: "/keys?filter=idl" in console.browser.current_url)
    assert console.daemon.ks("get_key", key.key).status.value == "active"


def test_the_key_filter_finds_a_key_by_name_key_or_id(console: Console) -> None:
    wanted, _ = console.daemon.ks("create_key", name="lyon-gw")
    console.daemon.ks("create_key", name="paris-gw")
    console.sign_in()
    for text in ("lyon", wanted.key[:10].upper(), wanted.id, wanted.id.upper()):
        console.go(f"/console/apps/{console.app_id}/keys")
        console.fill({"#filter": text})
        console.submit(".filters button")
        rows = [row.get_attribute("data-key") for row in console.all("tr[data-key]")]
        assert rows == [wanted.key], text


def test_invalid_input_is_shown_next_to_its_field_with_the_values_kept(
        console: Console) -> None:
    console.sign_in()
    _generate(console, {"#name": "bad", "#addresses": "10.0.0.0/33", "#pub": "$SYS/#"},
              address_mode="only", topic_mode="only")
    assert "10.0.0.0/33" in console.find("#addresses-error").text
    assert "$SYS/#" in console.find("#pub-error").text
    assert console.find("#name").get_attribute("value") == "bad"
    assert console.find("#addresses").get_attribute("value") == "10.0.0.0/33"
    assert console.find("input[name=address_mode][value=only]").is_selected()
    _generate(console, {"#name": "ghost"}, devices="nope")
    assert "nope" in console.find("#devices-error").text
    assert console.daemon.ks("count_keys") == 0


def test_bulk_delete_after_a_confirmation(console: Console) -> None:
    keys = [console.daemon.ks("create_key", name=f"k{i}")[0] for i in range(3)]
    console.sign_in()
    console.go(f"/console/apps/{console.app_id}/keys")
    for key in keys[:2]:
        console.find(f"tr[data-key='{key.key}'] input[type=checkbox]").click()
    console.find("#bulk-action option[value=delete]").click()
    console.submit("#bulk button[type=submit]")
    assert "Delete these 2 keys?" in console.browser.page_source
    assert console.daemon.ks("count_keys") == 3  # nothing yet
    console.submit("#confirm")
    assert [k.name for k in console.daemon.ks("list_keys")] == ["k2"]
    assert "Deleted 2 keys." in console.find(".flash").text


def test_a_key_made_on_a_device_page_is_scoped_to_that_device(console: Console) -> None:
    for device in ("pump-1", "pump-2"):
        console.daemon.ks("add_device", device, tags=["kind=pump"])
    console.sign_in()
    console.go(f"/console/apps/{console.app_id}/devices/pump-1")
    console.submit("#device-key")
    key, secret = console.find("#reveal-key").text, console.find("#reveal-secret").text
    stored = console.daemon.ks("get_key", key)
    assert stored.device_ids == ("pump-1",) and not stored.all_devices
    with Client(console.daemon.port(), "pump-2", key, secret) as other:
        assert other.connect() == 5
    with Client(console.daemon.port(), "pump-1", key, secret) as own:
        assert own.connect() == 0


def test_device_tags_kick_and_remove(console: Console) -> None:
    console.daemon.ks("add_device", "d1", tags=["a=1"])
    key, secret = console.daemon.ks("create_key", device_ids=["d1"])
    console.sign_in()
    with Client(console.daemon.port(), "d1", key.key, secret) as device:
        assert device.connect() == 0
        console.go(f"/console/apps/{console.app_id}/devices/d1")
        assert "yes" in console.find(".fields").text  # connected
        console.fill({"#tags": "a=2, site=lyon"})
        console.submit("#save-tags")
        assert console.daemon.ks("get_device", "d1").tags == (("a", "2"), ("site", "lyon"))
        console.submit("#kick")
        assert device.disconnected.wait(3)
    console.submit("#remove")
    console.submit("#confirm")
    assert console.daemon.ks("count_devices") == 0


def test_a_device_past_the_application_limit_is_refused(console: Console) -> None:
    console.daemon.ks("update_app", "default", max_devices=1)
    console.daemon.ks("add_device", "d1")
    console.sign_in()
    console.go(f"/console/apps/{console.app_id}/devices")
    console.fill({"#device-id": "d2", "#device-tags": "a=1"})
    console.submit("form[action$='/devices'] button")
    assert console.find(".error").text == (
        "device limit of 1 reached in application 'default': it holds 1, cannot add 1 more")
    assert [d.id for d in console.daemon.ks("list_devices")] == ["d1"]


def test_applications_create_switch_and_delete_by_typed_name(console: Console) -> None:
    console.sign_in()
    console.fill({"#app-name": "plant-2", "#app-description": "north"})
    console.submit("form[action='/console/apps'] button")
    assert console.find(".app-name").text == "plant-2"  # switched to it
    other = console.daemon.ks("app", "plant-2")
    console.go("/console/apps")
    console.fill({f"#confirm-{other.id}": "plant"})
    console.submit(f"form[action='/console/apps/{other.id}/delete'] button")
    assert "Not deleted" in console.find(".flash").text
    console.fill({f"#confirm-{other.id}": "plant-2"})
    console.submit(f"form[action='/console/apps/{other.id}/delete'] button")
    assert [a.name for a in console.daemon.ks("list_apps")] == ["default"]


def test_key_detail_edits_what_may_change(console: Console) -> None:
    key, _ = console.daemon.ks("create_key", name="edit-me", device_ids=[])
    console.sign_in()
    console.go(f"/console/apps/{console.app_id}/keys/{key.id}")
    assert "All devices" in console.find(".fields").text
    console.fill({"#name": "edited", "#sub": "cfg/+"})
    console.find("input[name=topic_mode][value=only]").click()
    console.find("input[name=status][value=inactive]").click()
    console.submit("#save")
    changed = console.daemon.ks("get_key", key.key)
    assert changed.name == "edited" and changed.sub_topics == ("cfg/+",)
    assert changed.status.value == "inactive"
    assert "Saved." in console.find(".flash").text


def test_narrow_screens_do_not_scroll_sideways(console: Console) -> None:
    console.daemon.ks("create_key", name="a-rather-long-key-name-for-a-phone-screen")
    console.sign_in()
    console.browser.set_window_size(375, 800)
    try:
        for path in ("/keys", "/keys/new", "/devices"):
            console.go(f"/console/apps/{console.app_id}{path}")
            width = console.browser.execute_script("return document.body.scrollWidth")
            inner = console.browser.execute_script("return window.innerWidth")
            assert width <= inner, (path, width, inner)
    finally:
        console.browser.set_window_size(1440, 1000)
    labels = console.browser.find_elements(By.CSS_SELECTOR, "label[for]")
    assert labels  # fields are labelled


def test_the_status_page_shows_connected_devices_and_refusals(console: Console) -> None:
    console.daemon.ks("add_device", "live")
    key, secret = console.daemon.ks("create_key", device_ids=["live"])
    for _ in range(2):
        with Client(console.daemon.port(), "live", key.key, "wrong") as bad:
            assert bad.connect() == 4
    with Client(console.daemon.port(), "live", key.key, secret) as device:
        assert device.connect() == 0
        console.sign_in()
        console.go("/console/status")
        assert console.find("#connected").text == "1"
        assert console.find("#refused-1").text == "2"


def test_the_device_pages_name_each_connected_devices_protocol(console: Console) -> None:
    for device in ("old", "new", "away"):
        console.daemon.ks("add_device", device)
    key, secret = console.daemon.ks("create_key", device_ids=["old", "new", "away"])
    port = console.daemon.port()
    with Client(port, "old", key.key, secret, protocol=4) as old, \
            Client(port, "new", key.key, secret, protocol=5) as new:
        assert old.connect() == 0 and new.connect() == 0
        console.sign_in()
        console.go(f"/console/apps/{console.app_id}/devices")
        connected = {row.find_element(By.CSS_SELECTOR, "td[data-label='Id']").text:
                     row.find_element(By.CSS_SELECTOR, "td[data-label='Connected']").text
                     for row in console.all("tbody tr")}
        assert connected == {"old": "yes, MQTT 3.1.1", "new": "yes, MQTT 5.0", "away": "no"}
        console.go(f"/console/apps/{console.app_id}/devices/new")
        assert "yes, MQTT 5.0" in console.find(".fields").text
