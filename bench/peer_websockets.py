#!/usr/bin/env python3
"""A reference chat server built on websockets (asyncio), the way its docs show.

One process, the part of docs/protocol.md the load client uses. A benchmark peer
for scalechat.py, not a product:

    python bench/peer_websockets.py --port 8090
"""
from __future__ import annotations

import asyncio
from http import HTTPStatus

from peer_rooms import Chat, error_text, join, parse_args, room_of
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.http11 import Request, Response

chat = Chat()


def check_path(connection: ServerConnection, request: Request) -> Response | None:
    """Refuse anything but /ws and /ws/<room> before the upgrade."""
    if room_of(request.path) is None:
        return connection.respond(HTTPStatus.NOT_FOUND, "no such room\n")
    return None


async def handler(ws: ServerConnection) -> None:
    """Welcome, replay what the client missed, then broadcast every message it sends."""
    session = chat.open(ws.request.path)
    members = await join(session, ws, ws.send)
    try:
        async for data in ws:
            try:
                text = session.publish(data)
            except ValueError as exc:
                await ws.send(error_text(exc))
                continue
            broadcast(members, text)
    finally:
        members.discard(ws)


async def main() -> None:
    """Serve until killed."""
    args = parse_args("websockets")
    async with serve(handler, args.host, args.port, process_request=check_path) as server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
