"""`/admin/ui` in a real headless Chromium, end to end.

A gateway with the embedded tower serves its proxy and ops listeners on
loopback; Selenium drives the page as an operator would (token, list, create,
filter, revoke, rotate, extend), and every key made in the page is tried
against the proxy listener. The browser's console must stay free of errors.
Selenium blocks, so the scenario runs in a thread while the test's event loop
serves the gateway.

`UPDATE_SCREENSHOT=1` writes the final screenshot to docs/admin-ui.png (the
README's picture); otherwise it goes to the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from gateway.ops.keys_api import local_store
from gateway.tower.store import KeyStore
from tests.conftest import ADMIN_TOKEN, GatewayFactory

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "admin-ui.png"
XSS = "<img src=x onerror=alert(1)>"
WAIT = 15.0

pytestmark = pytest.mark.timeout(300)


class Operator:
    """One operator at the page: small verbs over Selenium, and the proxy to try keys on."""

    def __init__(self, driver: webdriver.Chrome, page: str, proxy: str, store: KeyStore) -> None:
        self.d = driver
        self.page = page
        self.proxy = proxy
        self.store = store

    # ------------------------------------------------------------------ verbs

    def until(self, condition: Callable[[], Any], what: str) -> Any:
        # The page redraws its tables after each change: an element read mid-redraw is gone.
        ignored = (StaleElementReferenceException, NoSuchElementException)
        wait = WebDriverWait(self.d, WAIT, ignored_exceptions=ignored)
        return wait.until(lambda _d: condition(), message=what)

    def el(self, css: str) -> WebElement:
        return self.d.find_element(By.CSS_SELECTOR, css)

    def type(self, css: str, text: str) -> None:
        field = self.el(css)
        field.clear()
        field.send_keys(text)

    def visible(self, css: str) -> bool:
        return bool(self.el(css).is_displayed())

    def message(self) -> str:
        text: str = self.el("#message").text
        return text

    def wait_message(self, fragment: str) -> None:
        self.until(lambda: fragment in self.message(), f"a message with {fragment!r}")

    def rows(self) -> list[WebElement]:
        return self.d.find_elements(By.CSS_SELECTOR, "#keys-body tr")

    def row(self, key_id: str) -> WebElement:
        return self.el(f'#keys-body tr[data-key-id="{key_id}"]')

    def cell(self, key_id: str, column: int) -> str:
        text: str = self.row(key_id).find_elements(By.CSS_SELECTOR, "td")[column].text
        return text

    def status_of(self, key_id: str) -> str:
        return self.cell(key_id, 4).splitlines()[0]

    def action(self, key_id: str, label: str) -> WebElement:
        return self.row(key_id).find_element(By.XPATH, f".//button[text()='{label}']")

    def dialog_open(self, dialog_id: str) -> bool:
        return bool(self.d.execute_script(f"return document.getElementById('{dialog_id}').open"))

    def proxied(self, key: str) -> int:
        return httpx.get(self.proxy + "data", headers={"X-API-Key": key}, timeout=10).status_code

    def errors(self) -> list[dict[str, Any]]:
        """The browser log's errors since the last call (reading it empties it)."""
        return [e for e in self.d.get_log("browser") if e["level"] == "SEVERE"]

    def create(self, user: str, role: str, scopes: str = "", team: str = "") -> tuple[str, str]:
        """Create a key in the page; returns (raw key, key_id) and hides the key again."""
        self.type("#c-user", user)
        self.type("#c-role", role)
        self.type("#c-scopes", scopes)
        self.type("#c-team", team)
        self.el("#create-form button[type=submit]").click()
        self.until(lambda: self.visible("#new-key"), "the new key panel")
        raw: str = self.el("#new-key-value").get_property("value")
        about = self.el("#new-key-about").text
        key_id = re.search(r"key_[0-9a-f]{16}", about)
        assert key_id is not None, about
        self.until(lambda: self.d.find_elements(
            By.CSS_SELECTOR, f'#keys-body tr[data-key-id="{key_id.group(0)}"]'
        ), "the new key listed")  # fmt: skip
        return raw, key_id.group(0)

    def dismiss_key(self) -> None:
        self.el("#dismiss-key").click()
        self.until(lambda: not self.visible("#new-key"), "the new key hidden")
        assert self.el("#new-key-value").get_property("value") == ""

    # ------------------------------------------------------------------ the scenario

    def run(self, screenshot: Path) -> None:
        d = self.d
        d.get(self.page)
        self.until(lambda: self.visible("#token"), "the sign-in form")
        assert not self.visible("#app")
        assert d.switch_to.active_element == self.el("#token")  # ready to type

        # A wrong token is refused and nothing is shown.
        self.type("#token", "not-the-admin-token")
        self.el("#token").send_keys(Keys.ENTER)
        self.wait_message("refused")
        assert not self.visible("#app")
        refused = self.errors()
        assert refused and all(" 401 " in e["message"] for e in refused), refused

        self.type("#token", ADMIN_TOKEN)
        self.el("#login-form button").click()
        self.until(lambda: self.visible("#app"), "the key list")
        self.until(lambda: self.el("#keys-count").text == "No keys match.", "an empty list")
        # The token stays in the tab's session: never in the URL, a cookie or localStorage.
        assert ADMIN_TOKEN not in d.current_url and d.get_cookies() == []
        assert d.execute_script("return window.localStorage.length") == 0
        assert d.execute_script(f"return sessionStorage.getItem('{_TOKEN_KEY}')") == ADMIN_TOKEN
        assert self.el("#token").get_property("value") == ""

        # Create a key, shown once, that works on the proxy listener.
        alice, alice_id = self.create("alice", "operator", "tools:execute", "blue")
        assert "you will not see it again" in self.el("#new-key").text.lower()
        assert self.proxied(alice) == 200
        self.el("#copy-key").click()
        self.until(lambda: "Cop" in self.message(), "the copy outcome")
        self.dismiss_key()
        assert alice not in d.page_source and alice[12:] not in d.page_source

        # A user id that looks like markup is shown as text, never run.
        xss, xss_id = self.create(XSS, "operator")
        self.dismiss_key()
        assert self.cell(xss_id, 1) == XSS
        assert d.find_elements(By.CSS_SELECTOR, "#keys-body img") == []
        with pytest.raises(NoAlertPresentException):
            _ = d.switch_to.alert.text

        # The list shows the use of alice's key after a refresh.
        self.el("#refresh").click()
        self.until(lambda: self.cell(alice_id, 7) == "1", "alice's request counted")
        assert "blue" in self.cell(alice_id, 1) and self.status_of(alice_id) == "active"

        # Filters: by user, by status.
        self.type("#f-user", "alice")
        self.el("#f-user").send_keys(Keys.ENTER)
        self.until(lambda: len(self.rows()) == 1, "only alice's key")
        self.el("#clear-filters").click()
        self.until(lambda: len(self.rows()) == 2, "both keys again")

        # Revoke, with a confirmation that can be declined.
        self.action(alice_id, "Revoke").click()
        self.until(lambda: self.dialog_open("confirm-revoke"), "the revoke dialog")
        assert alice_id in self.el("#revoke-text").text
        self.el("#confirm-revoke [data-close]").click()
        assert not self.dialog_open("confirm-revoke")
        assert self.status_of(alice_id) == "active" and self.proxied(alice) == 200
        self.action(alice_id, "Revoke").click()
        self.type("#revoke-reason", "left the team")
        self.el("#confirm-revoke button[type=submit]").click()
        self.until(lambda: self.status_of(alice_id) == "revoked", "alice's key revoked")
        assert self.proxied(alice) == 401  # at once, though the gateway had cached it
        assert self.action_labels(alice_id) == []

        # Rotate without grace: the old key is refused at once, the new one works.
        assert self.proxied(xss) == 200
        self.action(xss_id, "Rotate").click()
        self.until(lambda: self.dialog_open("confirm-rotate"), "the rotate dialog")
        self.type("#rotate-grace", "0")
        self.el("#confirm-rotate button[type=submit]").click()
        self.until(lambda: self.visible("#new-key"), "the rotated key")
        rotated: str = self.el("#new-key-value").get_property("value")
        rotated_id = self.store.get(xss_id).rotated_to
        assert rotated_id is not None and rotated != xss
        self.dismiss_key()
        assert self.proxied(xss) == 401 and self.proxied(rotated) == 200
        self.until(lambda: self.status_of(xss_id) == "expired", "the old key expired")

        # Extend: the new key expires in 10 days.
        self.action(rotated_id, "Extend").click()
        self.until(lambda: self.dialog_open("confirm-extend"), "the extend dialog")
        self.type("#extend-days", "10")
        self.el("#extend-days").send_keys(Keys.ENTER)
        self.wait_message("now expires")
        expires_at = self.store.get(rotated_id).expires_at
        assert expires_at is not None and abs(expires_at - (time.time() + 10 * 86400)) < 120
        day = time.strftime("%Y-%m-%d", time.gmtime(expires_at))
        self.until(lambda: day in self.cell(rotated_id, 5), "the new expiry listed")

        # Keyboard: a dialog opens with Enter, closes with Escape, and focus returns.
        button = self.action(rotated_id, "Revoke")
        d.execute_script("arguments[0].focus()", button)
        d.switch_to.active_element.send_keys(Keys.ENTER)
        self.until(lambda: self.dialog_open("confirm-revoke"), "the dialog from the keyboard")
        d.switch_to.active_element.send_keys(Keys.ESCAPE)
        self.until(lambda: not self.dialog_open("confirm-revoke"), "the dialog closed")
        assert d.switch_to.active_element == self.action(rotated_id, "Revoke")
        assert self.status_of(rotated_id) == "active"
        unlabelled = d.execute_script(
            "return [...document.querySelectorAll('input, select')]"
            ".filter(e => e.labels.length === 0).map(e => e.id)"
        )
        assert unlabelled == []

        # The cache hit ratio and the audit trail.
        self.el("#refresh").click()
        self.until(lambda: re.fullmatch(r"\d+\.\d %", self.el("#cache-ratio").text), "the ratio")
        audit = self.el("#audit-body").text
        for action in ("key_revoke", "key_rotate", "key_update", "key_create"):
            assert action in audit, audit

        # Rotate with the default grace: the old key keeps working meanwhile. (The picture
        # then shows every status.)
        ci, ci_id = self.create("ci-pipeline", "api_client", "tools:execute", "platform")
        self.dismiss_key()
        self.action(ci_id, "Rotate").click()
        self.until(lambda: self.dialog_open("confirm-rotate"), "the rotate dialog")
        assert self.el("#rotate-grace").get_property("value") == "24"
        self.el("#confirm-rotate button[type=submit]").click()
        self.until(lambda: self.visible("#new-key"), "the rotated key")
        ci_new: str = self.el("#new-key-value").get_property("value")
        self.dismiss_key()
        self.until(lambda: self.status_of(ci_id) == "rotating", "the old key in its grace")
        assert self.proxied(ci) == 200 and self.proxied(ci_new) == 200
        self.el("#refresh").click()
        self.until(lambda: len(self.rows()) == 5, "five keys")
        self.until(lambda: "key_rotate" in self.el("#audit-body").text, "the audit refreshed")
        assert self.errors() == []  # the console stayed clean after the refused token
        height = d.execute_script("return document.documentElement.scrollHeight")
        d.set_window_size(1440, max(900, int(height) + 160))
        d.execute_script("window.scrollTo(0, 0)")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        assert d.save_screenshot(str(screenshot))

        # Signing out forgets the token and every value shown.
        self.el("#sign-out").click()
        self.until(lambda: self.visible("#token"), "the sign-in form again")
        assert d.execute_script(f"return sessionStorage.getItem('{_TOKEN_KEY}')") is None
        assert "ci-pipeline" not in d.page_source
        assert self.errors() == []

    def action_labels(self, key_id: str) -> list[str]:
        return [b.text for b in self.row(key_id).find_elements(By.CSS_SELECTOR, "button")]


_TOKEN_KEY = "tower-gateway.admin-token"


async def test_an_operator_manages_keys_in_the_browser(
    make_gateway: GatewayFactory, chrome: webdriver.Chrome, tmp_path: Path
) -> None:
    harness = await make_gateway(tower={"local": {"db": str(tmp_path / "keys.db")}})
    store = local_store(harness.gateway.tower)
    assert store is not None
    operator = Operator(
        chrome,
        page=str(harness.ops.make_url("/admin/ui")),
        proxy=str(harness.client.make_url("/")),
        store=store,
    )
    screenshot = SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") else tmp_path / "admin-ui.png"
    await asyncio.to_thread(operator.run, screenshot)
    assert screenshot.read_bytes().startswith(b"\x89PNG")
