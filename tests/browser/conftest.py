"""A headless Chromium driven by Selenium, from Debian's `chromium` and `chromium-driver`.

Selenium is pointed at the system binaries and never downloads anything
(Selenium Manager is not consulted: both paths are given, and SE_OFFLINE is
set). Without them the browser tests are skipped, or fail when CI=true, as the
Redis tests do. Tests that use the `chrome` fixture get the `browser` marker.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = os.environ.get("TOWER_GATEWAY_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TOWER_GATEWAY_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1440,1000",
    "--lang=en-US",
)


def _binaries() -> tuple[str, str]:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        message = (
            f"{' and '.join(missing)} not found (apt-get install chromium chromium-driver)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM, CHROMEDRIVER


@pytest.fixture
def chrome(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[webdriver.Chrome]:
    """A fresh headless Chromium with its own profile; its console log is kept (`get_log`)."""
    chromium, chromedriver = _binaries()
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not reach the network
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=chromedriver, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "chrome" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)
