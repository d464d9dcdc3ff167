"""A real Chromium proves the demo: two tabs on two instances as one user, a third as another."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page, async_playwright, expect

from .conftest import Cluster
from .harness import ROOT, api, unique

pytestmark = [pytest.mark.browser, pytest.mark.cluster]

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = ROOT / "artifacts" / "screenshots"
WAIT_MS = 10_000
# What Chromium itself prints while an instance is down on purpose; our page's own errors still fail.
OUTAGE_NOISE = re.compile(r"ERR_CONNECTION_REFUSED|WebSocket connection to .* failed|ERR_CONNECTION_RESET")


class Tab:
    """One browser tab on the demo page, with every console error it logs."""

    def __init__(self, name: str, page: Page, errors: list[str]) -> None:
        self.name = name
        self.page = page
        self.errors = errors

    @classmethod
    async def open(cls, name: str, context: BrowserContext, url: str, errors: list[str]) -> Tab:
        page = await context.new_page()

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                errors.append(f"{name}: {message.text}")

        page.on("console", on_console)
        page.on("pageerror", lambda exc: errors.append(f"{name}: uncaught {exc}"))
        await page.goto(url)
        return cls(name, page, errors)

    async def login(self, username: str) -> None:
        await self.page.get_by_label("Name").fill(username)
        await self.page.get_by_role("button", name="Log in").click()
        await expect(self.page.get_by_test_id("user")).to_have_text(username)

    async def connected_to(self, instance: str) -> None:
        await expect(self.page.get_by_test_id("badge")).to_have_text("connected", timeout=WAIT_MS)
        await expect(self.page.get_by_test_id("server-instance")).to_have_text(instance, timeout=WAIT_MS)

    def entries(self, event: str):  # type: ignore[no-untyped-def]
        return self.page.locator(f'#log li[data-event="{event}"]')

    async def shows(self, event: str, text: str, count: int = 1) -> None:
        """The log shows `count` entries of `event` containing `text` (waits for them)."""
        await expect(self.entries(event).filter(has_text=text)).to_have_count(count, timeout=WAIT_MS)

    async def shot(self, path: Path) -> None:
        await self.page.screenshot(path=str(path), full_page=True)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium is missing at {CHROMIUM}: scripts/test.sh installs it (apt-get install chromium)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield launched
        await launched.close()


async def fence(cluster: Cluster, tabs: list[Tab]) -> None:
    """Broadcast a marker and wait until every tab shows it: whatever came before has arrived."""
    marker = unique("fence")
    assert (await api(cluster.a.url, "/api/emit/all", {"event": "fence", "data": marker}))[0] == 202
    for tab in tabs:
        await tab.shows("fence", marker)


async def test_two_tabs_two_instances_one_user(cluster: Cluster, browser: Browser) -> None:
    errors: list[str] = []
    alice, bob = unique("alice"), unique("bob")
    alice_context = await browser.new_context(viewport={"width": 1000, "height": 800})
    bob_context = await browser.new_context(viewport={"width": 1000, "height": 800})
    anon_context = await browser.new_context(viewport={"width": 390, "height": 800})  # phone width
    try:
        tab1 = await Tab.open("tab1", alice_context, cluster.a.url, errors)
        await tab1.login(alice)
        await tab1.connected_to("A")
        # same browser, other port: the session cookie is shared, so tab 2 is alice on instance B
        tab2 = await Tab.open("tab2", alice_context, cluster.b.url, errors)
        await tab2.connected_to("B")
        tab3 = await Tab.open("tab3", bob_context, cluster.b.url, errors)
        await tab3.login(bob)
        await tab3.connected_to("B")
        tab4 = await Tab.open("anonymous", anon_context, cluster.a.url, errors)
        await tab4.connected_to("A")
        tabs = [tab1, tab2, tab3, tab4]

        # tab 1 sends through the gateway: tab 1 and tab 2 show it once, bob and anonymous never
        await tab1.page.get_by_label("Message").fill("hello from tab 1")
        await tab1.page.get_by_label("Message").press("Enter")
        await tab1.shows("events", "hello from tab 1")
        await tab2.shows("events", "hello from tab 1")
        await fence(cluster, tabs)
        for tab in (tab1, tab2):
            await expect(tab.entries("events")).to_have_count(1)
        for tab in (tab3, tab4):
            await expect(tab.entries("events")).to_have_count(0)

        # REST: to all, to bob, to authenticated
        assert (await api(cluster.b.url, "/api/emit/all", {"event": "news", "data": {"headline": "to all"}}))[0] == 202
        assert (await api(cluster.a.url, f"/api/emit/users/{bob}", {"event": "dm", "data": "for bob"}))[0] == 202
        assert (await api(cluster.a.url, "/api/emit/authenticated", {"event": "members", "data": "signed in"}))[0] == 202
        for tab in tabs:
            await tab.shows("news", "to all")
        await tab3.shows("dm", "for bob")
        for tab in (tab1, tab2, tab3):
            await tab.shows("members", "signed in")
        await fence(cluster, tabs)
        for tab in (tab1, tab2, tab4):
            await expect(tab.entries("dm")).to_have_count(0)
        await expect(tab4.entries("members")).to_have_count(0)

        # data is pretty-printed, newest first
        first = tab3.page.locator("#log li").first
        await expect(first).to_have_attribute("data-event", "fence")
        pretty = await tab1.entries("news").locator("pre").text_content()
        assert pretty == json.dumps({"headline": "to all"}, indent=2)

        assert errors == [], errors
        SHOTS.mkdir(parents=True, exist_ok=True)
        for tab in (tab1, tab2, tab3, tab4):
            await tab.shot(SHOTS / f"{tab.name}.png")
        if os.environ.get("UPDATE_README_SCREENSHOT"):
            shutil.copy(SHOTS / "tab2.png", ROOT / "docs" / "demo.png")

        # instance B restarts under tab 2: it shows reconnecting, then reconnects by itself
        cluster.b.stop()
        await expect(tab2.page.get_by_test_id("badge")).to_contain_text("reconnecting", timeout=WAIT_MS)
        await expect(tab3.page.get_by_test_id("badge")).to_contain_text("reconnecting", timeout=WAIT_MS)
        cluster.b.start().wait_serving()
        await tab2.connected_to("B")
        await tab3.connected_to("B")
        assert (await api(cluster.a.url, f"/api/emit/users/{alice}", {"event": "dm", "data": "after restart"}))[0] == 202
        await tab2.shows("dm", "after restart")
        await tab1.shows("dm", "after restart")
        page_errors = [e for e in errors if not OUTAGE_NOISE.search(e)]
        assert page_errors == [], page_errors
        errors.clear()

        # logout closes the page's socket: nothing for alice reaches that tab any more
        await tab2.page.get_by_role("button", name="Log out").click()
        await expect(tab2.page.get_by_label("Name")).to_be_visible()
        await tab2.connected_to("B")  # as an anonymous socket now
        assert (await api(cluster.a.url, f"/api/emit/users/{alice}", {"event": "dm", "data": "after logout"}))[0] == 202
        await tab1.shows("dm", "after logout")
        await fence(cluster, [tab1, tab2])
        await expect(tab2.entries("dm")).to_have_count(0)
        assert errors == [], errors
    finally:
        for context in (alice_context, bob_context, anon_context):
            await context.close()


async def test_event_log_is_capped_under_a_flood(cluster: Cluster, browser: Browser) -> None:
    errors: list[str] = []
    context = await browser.new_context()
    try:
        tab = await Tab.open("flood", context, cluster.a.url, errors)
        await tab.connected_to("A")
        flood = 260
        for n in range(flood):
            assert (await api(cluster.b.url, "/api/emit/all", {"event": "flood", "data": n}))[0] == 202
        await expect(tab.page.locator("#log-count")).to_have_text(f"({flood})", timeout=WAIT_MS)
        await expect(tab.page.locator("#log li")).to_have_count(200)
        # newest first: the last event sent is on top, the oldest ones were dropped
        await expect(tab.page.locator("#log li pre").first).to_have_text(str(flood - 1))
        await expect(tab.page.locator("#log li pre").last).to_have_text(str(flood - 200))
        assert errors == [], errors
    finally:
        await context.close()
