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

from bench.cluster import subscribers

from .conftest import Cluster
from .harness import ROOT, api, caught_up, unique, wait_until

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
OUTAGE_NOISE = re.compile(
    r"ERR_CONNECTION_REFUSED|WebSocket connection to .* failed|ERR_CONNECTION_RESET|ERR_INTERNET_DISCONNECTED"
)


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

    async def log(self) -> list[tuple[str, str]]:
        """Every (event, data as shown) in the log, oldest first."""
        shown = await self.page.locator("#log li").evaluate_all(
            "items => items.map(li => [li.dataset.event, li.querySelector('pre').textContent])"
        )
        return [(event, data) for event, data in reversed(shown)]

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
    """Broadcast a marker and wait until every tab shows it: whatever came before has arrived.
    On a Redis Cluster the instances first consume every partition past now (harness.fence)."""
    await caught_up([instance.url for instance in cluster.instances], via=cluster.a.url)
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


def shown(data: object) -> str:
    """How the page shows an event's data."""
    return json.dumps(data, indent=2)


async def test_a_blink_is_recovered_without_loss_or_duplicates(cluster: Cluster, browser: Browser) -> None:
    """Offline for a while, the page misses events; back online, it gets each exactly once, in order."""
    errors: list[str] = []
    user = unique("carol")
    channel = f"{cluster.prefix}:user:{user}"
    context = await browser.new_context()

    def held_by_an_instance() -> bool:  # an instance holds the user's channel while it holds a socket of hers
        # On a cluster: the shard channel, counted over every node (SHARDNUMSUB).
        return subscribers(cluster.redis_url, channel, sharded_prefix=cluster.prefix) > 0

    async def blink(during_the_blink: list[str]) -> None:
        """Offline until the server has dropped the socket, the REST emits, then online and connected."""
        sid = await tab.page.get_by_test_id("sid").text_content()
        assert held_by_an_instance()  # counted where it is held: the wait below waits for something
        # Chromium's offline emulation closes open WebSockets too (checked: the server sees the
        # disconnect at once), so this is a real blink on both sides, not only in the page.
        await context.set_offline(True)
        await expect(tab.page.get_by_test_id("badge")).to_contain_text("reconnecting", timeout=WAIT_MS)
        await wait_until(lambda: not held_by_an_instance(), f"instance A to drop {user}'s socket")
        for n, text in enumerate(during_the_blink):  # from both instances: the whole fleet's history
            base = (cluster.a, cluster.b)[n % 2].url
            assert (await api(base, f"/api/emit/users/{user}", {"event": "dm", "data": text}))[0] == 202
        await context.set_offline(False)
        await tab.connected_to("A")
        await expect(tab.page.get_by_test_id("sid")).not_to_have_text(sid or "", timeout=WAIT_MS)

    try:
        tab = await Tab.open("blink", context, cluster.a.url, errors)
        await tab.login(user)
        await tab.connected_to("A")
        notice = tab.page.get_by_test_id("notice")
        await expect(notice).to_be_hidden()
        # seen before the blink: it must not come again
        assert (await api(cluster.a.url, f"/api/emit/users/{user}", {"event": "dm", "data": "before"}))[0] == 202
        await tab.shows("dm", "before")

        missed = [f"missed {n}" for n in range(1, 5)]
        await blink(missed)
        await expect(notice).to_have_text(f"recovered {len(missed)} missed events", timeout=WAIT_MS)
        await expect(notice).to_be_visible()
        assert (await api(cluster.b.url, f"/api/emit/users/{user}", {"event": "dm", "data": "after"}))[0] == 202
        await tab.shows("dm", "after")
        await fence(cluster, [tab])
        log = await tab.log()
        assert log[:-1] == [
            ("dm", shown("before")),
            *(("dm", shown(text)) for text in missed),
            ("recovered", shown({"missed": len(missed)})),
            ("dm", shown("after")),
        ], log
        assert log[-1][0] == "fence"

        # a blink with nothing missed: recovered all the same, with nothing to replay
        await blink([])
        await expect(notice).to_have_text("recovered 0 missed events", timeout=WAIT_MS)
        await fence(cluster, [tab])
        again = await tab.log()
        assert again[: len(log)] == log and [event for event, _ in again[len(log) :]] == ["fence"], again
        SHOTS.mkdir(parents=True, exist_ok=True)
        await tab.shot(SHOTS / "recovered.png")
        page_errors = [e for e in errors if not OUTAGE_NOISE.search(e)]
        assert page_errors == [], page_errors
    finally:
        await context.close()


async def test_a_blink_that_cannot_be_recovered_is_told(cluster: Cluster, browser: Browser) -> None:
    """The session cookie is gone when the page comes back: it reconnects as anonymous, and the
    server refuses to resume the user's session for it: the page says so."""
    errors: list[str] = []
    user = unique("dave")
    context = await browser.new_context()
    try:
        tab = await Tab.open("unrecovered", context, cluster.a.url, errors)
        await tab.login(user)
        await tab.connected_to("A")
        await context.set_offline(True)
        await expect(tab.page.get_by_test_id("badge")).to_contain_text("reconnecting", timeout=WAIT_MS)
        await context.clear_cookies()
        await context.set_offline(False)
        await expect(tab.page.get_by_test_id("notice")).to_have_text(
            "could not recover (unknown_session): events missed meanwhile are lost", timeout=WAIT_MS
        )
        await expect(tab.page.get_by_test_id("badge")).to_have_text(
            "connected · anonymous: session expired?", timeout=WAIT_MS
        )
        await tab.shows("recovery_failed", "unknown_session")
        # the token request without a session is refused (401): Chromium logs that as an error
        page_errors = [e for e in errors if not OUTAGE_NOISE.search(e) and "status of 401" not in e]
        assert page_errors == [], page_errors
    finally:
        await context.close()


async def test_two_users_in_a_room_across_instances_see_each_other_come_and_go(
    cluster: Cluster, browser: Browser
) -> None:
    errors: list[str] = []
    alice, bob, room = unique("alice"), unique("bob"), unique("den")
    alice_context = await browser.new_context()
    bob_context = await browser.new_context()

    def members(tab: Tab):  # type: ignore[no-untyped-def]
        return tab.page.locator(f'#rooms li[data-room="public:{room}"] .room-members')

    async def join(tab: Tab) -> None:
        await tab.page.get_by_label("Room name").fill(room)
        await tab.page.get_by_role("button", name="Join").click()

    try:
        alice_a = await Tab.open("alice-A", alice_context, cluster.a.url, errors)
        await alice_a.login(alice)
        await alice_a.connected_to("A")
        bob_b = await Tab.open("bob-B", bob_context, cluster.b.url, errors)
        await bob_b.login(bob)
        await bob_b.connected_to("B")

        await join(alice_a)
        await expect(members(alice_a)).to_have_text(alice, timeout=WAIT_MS)
        await join(bob_b)
        both = ", ".join(sorted([alice, bob]))
        await expect(members(bob_b)).to_have_text(both, timeout=WAIT_MS)
        await expect(members(alice_a)).to_have_text(both, timeout=WAIT_MS)

        # alice's second tab, on the other instance, joins too: nobody is told twice
        alice_b = await Tab.open("alice-B", alice_context, cluster.b.url, errors)
        await alice_b.connected_to("B")
        await join(alice_b)
        await expect(members(alice_b)).to_have_text(both, timeout=WAIT_MS)
        await bob_b.page.get_by_label("Text for the room").fill("hello room")
        await bob_b.page.get_by_role("button", name="Send to room").click()
        for tab in (alice_a, alice_b, bob_b):
            await tab.shows("room_message", "hello room")
        await alice_b.page.close()  # one of alice's two tabs goes: she is still in the room
        await fence(cluster, [alice_a, bob_b])
        await expect(members(bob_b)).to_have_text(both)
        # bob came after alice's join; her second tab and its closing announced nothing
        await expect(bob_b.entries("presence").filter(has_text=alice)).to_have_count(0)
        await expect(alice_a.entries("presence").filter(has_text=alice)).to_have_count(1)  # her one join

        await alice_a.page.get_by_role("button", name=f"Leave public:{room}").click()
        await expect(members(bob_b)).to_have_text(bob, timeout=WAIT_MS)
        await bob_b.shows("presence", '"leave"')
        await expect(alice_a.page.locator("#rooms li")).to_have_count(0)
        SHOTS.mkdir(parents=True, exist_ok=True)
        await bob_b.shot(SHOTS / "rooms.png")
        assert errors == [], errors
    finally:
        for context in (alice_context, bob_context):
            await context.close()
