#!/usr/bin/env python3
"""A reference chat server built on picows, the way its docs show.

One process, the part of docs/protocol.md the load client uses. A benchmark peer
for scalechat.py, not a product:

    python bench/peer_picows.py --port 8092
"""
from __future__ import annotations

import asyncio

from peer_rooms import Chat, Session, error_text, parse_args
from picows import (
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    ws_create_server,
)

chat = Chat()


class ChatListener(WSListener):
    """One client: picows calls it back for every frame; sends never wait."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def on_ws_connected(self, transport: WSTransport) -> None:
        """Welcome and replay what the client missed, then join the room."""
        transport.send(WSMsgType.TEXT, self.session.welcome().encode())
        for text in self.session.catch_up():
            transport.send(WSMsgType.TEXT, text.encode())
        self.session.room.members.add(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Broadcast a chat message to the room; answer a Close."""
        if frame.msg_type == WSMsgType.TEXT:
            try:
                text = self.session.publish(frame.get_payload_as_bytes())
            except ValueError as exc:
                transport.send(WSMsgType.TEXT, error_text(exc).encode())
                return
            data = text.encode()
            for member in self.session.room.members:
                member.send(WSMsgType.TEXT, data)
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        """Leave the room."""
        self.session.room.members.discard(transport)


def route(request: WSUpgradeRequest) -> ChatListener | None:
    """A listener for /ws and /ws/<room>; None answers 404."""
    session = chat.open(request.path.decode())
    return None if session is None else ChatListener(session)


async def main() -> None:
    """Serve until killed."""
    args = parse_args("picows")
    server = await ws_create_server(route, args.host, args.port)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
