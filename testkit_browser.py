"""The browser client in Debian's Chromium, driven by Playwright: pages a test or a script opens.

launch_chromium starts Debian's Chromium headless (Playwright never downloads a
browser here); join opens the client in a fresh profile, picks a name and a room
and waits until it is online; a Chat reads the page's state from the DOM hooks
the client keeps for this purpose; a Network cuts and restores a page's
WebSockets. test_browser.py and docs/make_screenshot.py use them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from playwright.sync_api import Browser, Page, Playwright, expect

expect.set_options(timeout=15_000)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


def launch_chromium(playwright: Playwright) -> Browser:
    """Debian's Chromium, headless; Playwright never downloads a browser here."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@dataclass
class Chat:
    """One person's page in a room, with what it logged and the sockets it opened."""
    page: Page
    name: str
    sockets: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def send(self, text: str) -> None:
        """Type text into the composer and press Enter, as a person would."""
        self.page.fill("#text", text)
        self.page.press("#text", "Enter")
        expect(self.page.locator("#text")).to_have_value("")

    def texts(self) -> list[str]:
        """The text of every message shown, in order."""
        return self.page.locator("#messages li[data-seq] .text").all_text_contents()

    def seqs(self) -> list[int]:
        """The seq of every message shown, in order."""
        return [int(s) for s in self.page.eval_on_selector_all(
            "#messages li[data-seq]", "items => items.map(li => li.dataset.seq)")]

    def epochs(self) -> list[str]:
        """The order (epoch) of every message shown, in order."""
        return self.page.eval_on_selector_all(
            "#messages li[data-seq]", "items => items.map(li => li.dataset.epoch)")

    def message(self, text: str):
        """The list item of the room's message with exactly this text (confirmed, with a seq)."""
        return self.page.locator("#messages li[data-seq]").filter(
            has=self.page.locator(".text", has_text=re.compile(f"^{re.escape(text)}$")))

    def expect_state(self, state: str) -> None:
        """Wait until the page shows this connection state."""
        expect(self.page.locator("#status")).to_have_attribute("data-state", state)

    def expect_members(self, count: int) -> None:
        """Wait until the page shows this member count."""
        expect(self.page.locator("#members")).to_have_attribute("data-count", str(count))

    def expect_message_count(self, count: int, timeout: float = 15_000) -> None:
        """Wait until the page shows exactly this many of the room's messages."""
        expect(self.page.locator("#messages li[data-seq]")).to_have_count(count, timeout=timeout)


def is_csp_violation(text: str) -> bool:
    """Whether a console message is Chromium refusing something under the page's CSP."""
    return "Content Security Policy" in text or "Content-Security-Policy" in text


class Network:
    """One person's network for WebSockets, which can be cut and brought back.

    Chromium's offline emulation does not reliably reach WebSockets already open
    (it may hold their frames, or not), so each socket goes through a Playwright
    route instead: passed through to the server while the network is up; closed,
    and new ones refused, while it is cut. ``lose_sent`` loses what the page
    sends, ``lose_received`` what the server sends it: the frames in flight when
    a connection dies. ``rewrite`` (a function of a text frame) changes what the
    page receives, e.g. to play an older server.
    """

    def __init__(self, rewrite=None) -> None:
        self.up = True
        self.lose_sent = self.lose_received = False
        self.open: list = []
        self.rewrite = rewrite or (lambda message: message)

    def route(self, ws) -> None:
        """route_web_socket handler: connect through, or refuse while cut."""
        if not self.up:
            ws.close()
            return
        server = ws.connect_to_server()
        ws.on_message(lambda message: None if self.lose_sent else server.send(message))
        server.on_message(lambda message: None if self.lose_received else ws.send(self.rewrite(message)))
        self.open.append(ws)

    def cut(self) -> None:
        """Close every socket the page has open, and refuse new ones until ``up`` again."""
        self.up = False
        for ws in self.open:
            ws.close()
        self.open.clear()

    def restore(self) -> None:
        """Let sockets through again, losing nothing."""
        self.lose_sent = self.lose_received = False
        self.up = True


def join(browser: Browser, base_url: str, name: str, room: str, network: Network | None = None,
         **context_options) -> Chat:
    """Open the client in a fresh browser profile, pick name and room, wait until online."""
    context = browser.new_context(**context_options)
    if network is not None:
        context.route_web_socket(re.compile(".*"), network.route)
    page = context.new_page()
    chat = Chat(page, name)
    page.on("pageerror", lambda exc: chat.errors.append(f"page error: {exc}"))
    page.on("console", lambda msg: chat.errors.append(f"console: {msg.text}")
            if msg.type == "error" and is_csp_violation(msg.text) else None)
    page.on("websocket", lambda ws: chat.sockets.append(ws.url))
    page.goto(f"{base_url}/#{room}")
    page.fill("#join-name", name)
    page.click("#join-submit")
    chat.expect_state("online")
    return chat
