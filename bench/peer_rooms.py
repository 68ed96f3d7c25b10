"""The chat logic the reference peer servers share: rooms, seq, history, JSON.

The peers (peer_websockets.py, peer_aiohttp.py, peer_picows.py) differ only in
the WebSocket library; what happens per message is the same in all three and is
what an ordinary server does: one ``json.loads`` of the client frame, one
``json.dumps`` of the broadcast, encoded once for every member. Fields go out in
the order of docs/protocol.md, which is also the order the load client reads fastest.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

HISTORY = 1000            # messages kept per room for since=<seq>, as scalechat.py keeps
ROOM_PATH = re.compile(r"^/ws(?:/([A-Za-z0-9_.-]{1,64}))?$")


class Room:
    """A room: its members (whatever the library calls a connection), its order (epoch and seq)
    and recent history. A peer never forgets a room, so a room has one order, named when it is made."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: set = set()
        self.epoch = secrets.token_hex(8)            # 16 lowercase hex digits, as the server's
        self.seq = 0
        self.history: deque = deque(maxlen=HISTORY)   # (seq, text)


class Session:
    """One client in one room: its name and the last seq it was sent."""

    def __init__(self, room: Room, name: str, since: int | None, epoch: str | None = None) -> None:
        self.room, self.name = room, name
        if since is not None and epoch not in (None, room.epoch):
            since = 0                                  # counted in another order: replay this one whole
        self.last_seq = room.seq if since is None else since

    def welcome(self) -> str:
        """The first frame: room, name, the room's order and latest seq, member count."""
        room = self.room
        return json.dumps({"type": "welcome", "room": room.name, "name": self.name,
                           "epoch": room.epoch, "seq": room.seq, "members": len(room.members) + 1})

    def catch_up(self) -> list:
        """Texts of held messages newer than the last one sent to this client (marked as sent)."""
        if self.last_seq >= self.room.seq:
            return []
        newer = [text for seq, text in self.room.history if seq > self.last_seq]
        self.last_seq = self.room.seq
        return newer

    def publish(self, data: str | bytes) -> str:
        """The broadcast text for a client frame, with the room's next seq; ValueError if refused."""
        msg = json.loads(data)
        if not isinstance(msg, dict) or not isinstance(msg.get("text"), str):
            raise ValueError("a message is a JSON object with a text")  # noqa: TRY004 - refused like bad JSON
        room = self.room
        room.seq += 1
        text = json.dumps({"type": "message", "room": room.name, "epoch": room.epoch, "seq": room.seq,
                           "sender": self.name, "message_id": msg.get("message_id"),
                           "text": msg["text"], "sent_at": msg.get("sent_at")})
        room.history.append((room.seq, text))
        return text


async def join(session: Session, member: object, send: Callable[[str], Awaitable]) -> set:
    """Welcome and replay with the library's async send, then add member to the room; its members.

    Replaying until caught up and joining only then, with no await in between,
    leaves no gap and no reordering however long the sends wait.
    """
    await send(session.welcome())
    while backlog := session.catch_up():
        for text in backlog:
            await send(text)
    session.room.members.add(member)
    return session.room.members


def error_text(exc: Exception) -> str:
    """The ``error`` frame for a refused client frame."""
    return json.dumps({"type": "error", "code": "bad_message", "reason": str(exc)})


class Chat:
    """Every room of the process, created on first use."""

    def __init__(self) -> None:
        self.rooms: dict = {}
        self.guests = itertools.count(1)

    def open(self, target: str) -> Session | None:
        """A Session for a request target ``/ws/<room>?name=&since=&epoch=``; None if it names no room."""
        room_name = room_of(target)
        if room_name is None:
            return None
        query = parse_qs(urlsplit(target).query)
        name = query.get("name", [""])[0][:32] or f"guest-{next(self.guests)}"
        since = query.get("since", [""])[0]
        room = self.rooms.get(room_name) or self.rooms.setdefault(room_name, Room(room_name))
        return Session(room, name, int(since) if since.isdigit() else None, query.get("epoch", [None])[0])


def room_of(target: str) -> str | None:
    """The room a request target names (``/ws`` is the lobby), or None."""
    match = ROOM_PATH.match(urlsplit(target).path)
    return None if match is None else match.group(1) or "lobby"


def parse_args(library: str) -> argparse.Namespace:
    """--host and --port of a peer server."""
    parser = argparse.ArgumentParser(description=f"A reference chat server built on {library}.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    return parser.parse_args()
