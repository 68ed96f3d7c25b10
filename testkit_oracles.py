"""Oracles for the protocol core: test_hostile.py's properties, which bench/fuzz_protocol.py runs too.

Each takes bytes (or a parser's options) and asserts what the protocol allows:
a stream parses alike however it is cut, only the protocol's own errors come
out, with close codes and statuses the protocol names.
"""
from __future__ import annotations

import scalechat as sc

# Close codes the server's own parser may answer a violation with.
PARSER_CLOSE_CODES = {sc.CLOSE_PROTOCOL_ERROR, sc.CLOSE_UNSUPPORTED_DATA,
                      sc.CLOSE_INVALID_DATA, sc.CLOSE_TOO_BIG}
# The codes a client frame's own content can earn (the rate and the bus aside).
CHAT_ERROR_CODES = set(sc.ErrorCode) - {sc.ErrorCode.RATE_LIMIT, sc.ErrorCode.UNAVAILABLE}
HANDSHAKE_STATUSES = {400, 405, 426}


def feed_chunks(chunks: list, **parser_options) -> tuple[list, int | None]:
    """Feed chunks to a fresh FrameParser: (frames completed, close code of the error or None)."""
    parser = sc.FrameParser(**parser_options)
    frames: list = []
    for chunk in chunks:
        try:
            frames.extend(parser.feed(chunk))
        except sc.ProtocolError as e:
            assert e.code in PARSER_CLOSE_CODES, f"close code {e.code} for {e.reason}"
            assert isinstance(e.reason, str) and len(e.reason.encode()) <= 123
            frames.extend(e.frames)                 # completed in the same call, before the error
            try:
                parser.feed(b"\x81\x80abcd")        # a failed parser stays failed
            except sc.ProtocolError as again:
                assert again.code == e.code
            else:
                raise AssertionError("a failed parser took more data")
            return frames, e.code
    return frames, None


def split_at(data: bytes, cuts: list) -> list:
    """data cut at the given offsets (taken modulo its length, in order)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[i:j] for i, j in zip([0, *points], [*points, len(data)], strict=True)]


def check_any_split(data: bytes, cuts: list, **parser_options) -> tuple[list, int | None]:
    """Assert that a stream parses alike whole, byte by byte and cut at cuts; return the result.

    The result is the frames completed and, when the stream breaks the
    protocol, the close code: both must not depend on how the stream was cut.
    """
    one_by_one = feed_chunks([data[i:i + 1] for i in range(len(data))], **parser_options)
    for chunks in ([data], split_at(data, cuts)):
        assert feed_chunks(chunks, **parser_options) == one_by_one
    for opcode, payload in one_by_one[0]:
        if opcode == sc.OP_TEXT:
            payload.decode()                     # text messages are always valid UTF-8
        if opcode == sc.OP_CLOSE:
            sc.parse_close(payload)
        assert parser_options.get("accept_binary", True) or opcode != sc.OP_BINARY
    return one_by_one


def check_close_payload(payload: bytes) -> None:
    """parse_close either returns a valid (code, reason) or raises ProtocolError 1002/1007."""
    try:
        code, reason = sc.parse_close(payload)
    except sc.ProtocolError as e:
        assert e.code in (sc.CLOSE_PROTOCOL_ERROR, sc.CLOSE_INVALID_DATA)
        return
    assert code == sc.CLOSE_NO_STATUS or code in sc.VALID_CLOSE_CODES or 3000 <= code <= 4999
    assert reason.encode() == payload[2:]


def check_request_head(head: bytes) -> None:
    """A request head either parses and upgrades or raises HandshakeError with a 4xx status."""
    try:
        request = sc.parse_request_head(head)
    except sc.HandshakeError as e:
        assert e.status == 400
        return
    try:
        accept = sc.check_upgrade(request)
    except sc.HandshakeError as e:
        assert e.status in HANDSHAKE_STATUSES
        return
    assert accept == sc.accept_key(request.headers["sec-websocket-key"])


def check_chat_payload(payload: bytes, max_message_size: int) -> None:
    """parse_chat_message either returns a valid message or raises ChatError with a known code."""
    try:
        message_id, text, sent_at, resend = sc.parse_chat_message(payload, max_message_size)
    except sc.ChatError as e:
        assert e.code in CHAT_ERROR_CODES
        return
    assert type(resend) is bool
    assert message_id is None or type(message_id) is int
    assert type(text) is str and 0 < len(text.encode()) <= max_message_size
    assert sent_at is None or type(sent_at) is str
