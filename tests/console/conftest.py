"""A real daemon with its console, and headless Chromium (Debian's chromium and
chromium-driver) driven by selenium through /usr/bin/chromedriver: nothing is
downloaded. Without Chromium the tests are skipped with a plain message (failed in CI)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement

from tests.support.harness import RunningBroker
from tests.support.services import require_binary
from tests.support.waiting import wait_until

INSTALL = "apt-get install chromium chromium-driver"


def chrome(downloads: Path, width: int = 1440, height: int = 1000,
           prompts: bool = False) -> WebDriver:
    """Headless Chromium. ``prompts``: over WebDriver BiDi, with leave-page prompts left
    open for the test (``watch_prompts``) instead of accepted by the driver."""
    driver_path = require_binary("chromedriver", f"the console tests ({INSTALL})")
    browser = require_binary(("chromium", "chromium-browser"), f"the console tests ({INSTALL})")
    options = webdriver.ChromeOptions()
    options.binary_location = str(browser)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 f"--window-size={width},{height}",
                 f"--user-data-dir={downloads.parent / ('profile-' + str(width))}"):
        options.add_argument(flag)
    if prompts:
        options.enable_bidi = True
        options.set_capability("unhandledPromptBehavior",
                               {"beforeUnload": "ignore", "default": "dismiss and notify"})
    options.add_experimental_option("prefs", {
        "download.default_directory": str(downloads),
        "download.prompt_for_download": False,
    })
    driver = webdriver.Chrome(service=Service(str(driver_path)), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                           {"behavior": "allow", "downloadPath": str(downloads)})
    driver.implicitly_wait(0)
    return driver


@dataclass
class Console:
    daemon: RunningBroker
    url: str  # http://127.0.0.1:PORT
    token: str
    browser: WebDriver
    downloads: Path

    @property
    def app_id(self) -> str:
        return str(self.daemon.ks("app").id)

    def go(self, path: str) -> None:
        self.browser.get(self.url + path)

    def find(self, css: str) -> WebElement:
        return self.browser.find_element(By.CSS_SELECTOR, css)

    def all(self, css: str) -> list[WebElement]:
        return self.browser.find_elements(By.CSS_SELECTOR, css)

    def fill(self, fields: dict[str, str]) -> None:
        for css, value in fields.items():
            element = self.find(css)
            element.clear()
            element.send_keys(value)

    def submit(self, css: str) -> None:
        """Click a button that loads a new page, and wait until it has loaded."""
        old = self.find("html")
        self.find(css).click()

        def replaced() -> bool:
            try:
                old.tag_name  # noqa: B018 - raises once the old page is gone
            except StaleElementReferenceException:
                return self.browser.execute_script("return document.readyState") == "complete"
            except WebDriverException as exc:
                # Chromium answers for a node detached mid-navigation with an inspector
                # error instead of a stale reference: the old page is going all the same.
                if "does not belong to the document" not in str(exc):
                    raise
                return False
            return False

        self.wait(replaced)

    def sign_in(self, token: str | None = None) -> None:
        self.go("/console/signin")
        self.fill({"#token": token or self.token})
        self.submit("form button[type=submit]")

    def wait(self, condition: Callable[[], Any], timeout: float = 5.0) -> Any:
        return wait_until(condition, timeout, poll=0.05)

    def downloaded(self) -> dict[str, Any]:
        """The downloaded JSON file, once Chromium has written all of it (it may create
        the file empty and fill it a moment later)."""

        def complete() -> tuple[Path, dict[str, Any]] | None:
            for path in self.downloads.iterdir():
                if path.suffix == ".json":
                    try:
                        return path, json.loads(path.read_text())
                    except (json.JSONDecodeError, OSError):
                        return None
            return None

        path, content = self.wait(complete)
        return {"name": path.name, **content}


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WebDriver, Path]]:
    """One Chromium per test module (starting one takes a second or two)."""
    downloads = tmp_path_factory.mktemp("downloads")
    driver = chrome(downloads)
    try:
        yield driver, downloads
    finally:
        driver.quit()


@pytest.fixture
def console(browser: tuple[WebDriver, Path], broker: RunningBroker) -> Console:
    driver, downloads = browser
    driver.execute_cdp_cmd("Network.clearBrowserCookies", {})
    for leftover in downloads.iterdir():
        leftover.unlink()
    _row, token = broker.ks("create_token", "operator")
    api = broker.server.api
    assert api is not None
    return Console(broker, api.url, token, driver, downloads)
