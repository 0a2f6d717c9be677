"""The secret-once page in a real browser (headless Chromium over WebDriver BiDi, which
reports leave-page prompts): no way out of it before the tick, and the secret gone from
the page once it is left or hidden, the back/forward cache included."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.remote.webdriver import WebDriver

from tests.console.conftest import Console, chrome


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WebDriver, Path]]:
    """This module's Chromium leaves leave-page prompts open for the test to see."""
    downloads = tmp_path_factory.mktemp("downloads")
    driver = chrome(downloads, prompts=True)
    try:
        yield driver, downloads
    finally:
        driver.quit()


@pytest.fixture
def prompts(console: Console) -> Iterator[list[Any]]:
    """The leave-page prompts the browser opens during the test."""
    seen: list[Any] = []
    contexts = console.browser.browsing_context
    handler = contexts.add_event_handler("user_prompt_opened", seen.append)
    try:
        yield seen
    finally:
        contexts.remove_event_handler("user_prompt_opened", handler)


def _new_key_page(console: Console) -> str:
    """Generate a key in the console; the secret-once page is open. Returns the secret."""
    console.go(f"/console/apps/{console.app_id}/keys/new")
    console.submit("#generate")
    secret: str = console.find("#reveal-secret").text
    assert len(secret) > 30
    return secret


def _still_here(console: Console, url: str, secret: str) -> None:
    assert console.browser.current_url == url
    assert secret in console.browser.page_source


def test_no_way_out_before_the_box_is_ticked(console: Console, prompts: list[Any]) -> None:
    console.sign_in()
    secret = _new_key_page(console)
    url = console.browser.current_url
    for way_out in ("nav a[href$='/devices']", "a.brand", ".signout button"):
        console.find(way_out).click()
        _still_here(console, url, secret)
        assert console.find("#leave-note").is_displayed(), way_out
    assert console.find("#confirm-copied") == console.browser.switch_to.active_element

    # Reloading (or closing) the tab: the browser asks first; staying keeps the secret.
    console.browser.execute_script("setTimeout(() => location.reload(), 0)")
    prompt = console.wait(lambda: prompts[0] if prompts else None)
    assert prompt.type == "beforeunload"
    console.browser.browsing_context.handle_user_prompt(context=prompt.context, accept=False)
    _still_here(console, url, secret)

    console.find("#confirm-copied").click()  # ticked: every way out works, unasked
    assert not console.find("#leave-note").is_displayed()
    console.submit(".signout button")
    assert console.browser.current_url.endswith("/console/signin")
    assert len(prompts) == 1
    console.go(f"/console/apps/{console.app_id}/keys")
    assert console.browser.current_url.endswith("/console/signin")  # signed out for real


def test_back_after_close_does_not_bring_the_secret_back(console: Console) -> None:
    console.sign_in()
    secret = _new_key_page(console)
    console.find("#confirm-copied").click()
    console.submit("#close")
    console.browser.back()  # Chromium restores it from its back/forward cache
    assert secret not in console.browser.page_source
    assert "shown once and cannot be shown again" in console.find("main").text


def test_the_secret_leaves_a_hidden_tab_only_once_the_box_is_ticked(console: Console) -> None:
    console.sign_in()
    secret = _new_key_page(console)
    page = console.browser.current_window_handle

    def hide_and_return() -> None:
        console.browser.switch_to.new_window("tab")  # the console's tab is hidden
        console.browser.close()
        console.browser.switch_to.window(page)

    hide_and_return()  # e.g. to a password manager, to paste it: it must still be there
    assert secret in console.browser.page_source
    console.find("#confirm-copied").click()
    hide_and_return()
    assert secret not in console.browser.page_source
    assert console.find("#secret-gone").is_displayed()
