#!/usr/bin/env python3
"""A reference chat server built on aiohttp (web + WebSocketResponse), the way its docs show.

One process, the part of docs/protocol.md the load client uses. A benchmark peer
for scalechat.py, not a product:

    python bench/peer_aiohttp.py --port 8091
"""
from __future__ import annotations

from aiohttp import WSMsgType, web
from peer_rooms import Chat, error_text, join, parse_args

chat = Chat()


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """Welcome, replay what the client missed, then broadcast every message it sends."""
    session = chat.open(request.path_qs)
    if session is None:
        raise web.HTTPNotFound(text="no such room\n")
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    members = await join(session, ws, ws.send_str)
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                text = session.publish(msg.data)
            except ValueError as exc:
                await ws.send_str(error_text(exc))
                continue
            for member in list(members):   # a member may leave while we await
                if not member.closed:
                    await member.send_str(text)
    finally:
        members.discard(ws)
    return ws


def main() -> None:
    """Serve until killed."""
    args = parse_args("aiohttp")
    app = web.Application()
    app.router.add_get("/ws", websocket)
    app.router.add_get("/ws/{room}", websocket)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
