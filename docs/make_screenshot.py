"""Draw docs/img/browser-client.png: the browser client in a short conversation,
served by a real scalechat.py on loopback and rendered by Debian's Chromium.

Run from anywhere: python docs/make_screenshot.py [--out PATH]
"""
from __future__ import annotations

import argparse
import os
import sys

from playwright.sync_api import sync_playwright

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)    # the repository's test kit

from testkit import start_server
from testkit_browser import join, launch_chromium

ROOM = "launch"
PEOPLE = ("alice", "bob", "carol")     # the picture is alice's page
CONVERSATION = [
    ("alice", "Morning! Is the new build on staging yet?"),
    ("bob", "Deployed ten minutes ago."),
    ("bob", "The load test with 5,000 clients is running now."),
    ("carol", "p99 latency is holding at 38 ms so far."),
    ("alice", "And nothing was lost when we restarted a node?"),
    ("bob", "Not one message. Every client came back with since=<seq> and caught up."),
    ("carol", "Plots are in results/, I'll put them in SCALING.md."),
    ("alice", "Great work, both of you.\nLet's ship it."),
]
VIEW = {"viewport": {"width": 960, "height": 660}, "device_scale_factor": 2,
        "locale": "en-GB", "timezone_id": "Europe/Berlin", "color_scheme": "light"}


def make_screenshot(out: str) -> None:
    """Start a server, hold the conversation in three browsers, save what the first one sees."""
    server = start_server()
    try:
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            chats = {name: join(browser, server.http, name, ROOM, **VIEW) for name in PEOPLE}
            for count, (name, text) in enumerate(CONVERSATION, 1):
                chats[name].send(text)
                for chat in chats.values():       # in order, as people would take turns
                    chat.expect_message_count(count)
            viewer = chats[PEOPLE[0]]
            viewer.expect_members(len(PEOPLE))
            viewer.page.screenshot(path=out)
            browser.close()
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "img", "browser-client.png"),
                        help="PNG file to write (default: %(default)s)")
    args = parser.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    make_screenshot(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
