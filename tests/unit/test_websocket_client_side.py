"""websocket.ClientSide against a fake transport: the flow control and close ordering that
loopback sockets (whose kernel buffers autotune to tens of MiB) would hide."""

from __future__ import annotations

import asyncio

import pytest
from websockets.frames import Close, Frame, Opcode

from aoai_auth_proxy.websocket import QUEUE_HIGH_BYTES, QUEUE_LOW_BYTES, ClientSide

KIB = 1024


class FakeTransport:
    """What ClientSide uses of an asyncio transport, recorded."""

    def __init__(self) -> None:
        self.reading = True
        self.pauses = 0
        self.written: list[bytes] = []
        self.eof = False
        self.closed = False

    def is_reading(self) -> bool:  # (a method: mypy does not narrow a call's result)
        return self.reading

    def pause_reading(self) -> None:
        self.reading = False
        self.pauses += 1

    def resume_reading(self) -> None:
        self.reading = True

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def write_eof(self) -> None:
        self.eof = True

    def can_write_eof(self) -> bool:
        return True

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def client_frame(opcode: Opcode, data: bytes) -> bytes:
    return Frame(opcode, data).serialize(mask=True, extensions=[])  # clients mask (RFC 6455)


def attached() -> tuple[ClientSide, FakeTransport]:
    side = ClientSide(send_timeout=5)
    transport = FakeTransport()
    side.connection_made(transport)  # type: ignore[arg-type]
    return side, transport


async def test_reading_pauses_past_the_high_mark_and_resumes_below_the_low_one() -> None:
    side, transport = attached()
    piece = bytes(32 * KIB)
    count = QUEUE_HIGH_BYTES // len(piece) + 1
    for _ in range(count):
        side.data_received(client_frame(Opcode.BINARY, piece))
    assert not transport.is_reading()
    assert transport.pauses == 1
    taken = 0
    while taken * len(piece) < (count * len(piece) - QUEUE_LOW_BYTES) - len(piece):
        assert await side.receive() == piece
        taken += 1
        assert not transport.is_reading()  # still above the low mark
    resumed_after = None
    for extra in range(1, 4):
        assert await side.receive() == piece
        if transport.is_reading():
            resumed_after = extra
            break
    assert resumed_after is not None  # within a message of the low mark
    assert transport.pauses == 1


async def test_frames_sent_with_the_handshake_keep_reading_paused() -> None:
    side, transport = attached()
    transport.pause_reading()  # as http1 hands the socket over
    early = client_frame(Opcode.BINARY, bytes(QUEUE_HIGH_BYTES + KIB))
    side.data_received(early)
    side.start_reading()
    assert not transport.is_reading()  # the queue is full: the upstream must take some first
    assert await side.receive() == bytes(QUEUE_HIGH_BYTES + KIB)
    assert transport.is_reading()


async def test_small_frames_with_the_handshake_let_reading_start() -> None:
    side, transport = attached()
    transport.pause_reading()
    side.data_received(b"".join(client_frame(Opcode.TEXT, b"e%d" % i) for i in range(40)))
    side.start_reading()
    assert transport.is_reading()
    assert [await side.receive() for _ in range(40)] == [f"e{i}" for i in range(40)]


async def test_a_close_from_the_client_is_answered_only_when_close_is_called() -> None:
    side, transport = attached()
    side.data_received(
        client_frame(Opcode.TEXT, b"last")
        + client_frame(Opcode.CLOSE, Close(4001, "bye").serialize())
    )
    assert await side.receive() == "last"
    assert await side.receive() is None  # the client is done
    assert side.ended
    assert (side.close_code, side.close_reason) == (4001, "bye")
    assert transport.written == []  # held until the upstream has closed
    side.connection_lost(None)  # (close() waits for the client to end the connection)
    await side.close(4001, "bye")
    answer = b"".join(transport.written)
    assert answer == Frame(Opcode.CLOSE, Close(4001, "bye").serialize()).serialize(
        mask=False, extensions=[]
    )


async def test_pings_are_answered_at_once() -> None:
    side, transport = attached()
    side.data_received(client_frame(Opcode.PING, b"p"))
    assert b"".join(transport.written) == Frame(Opcode.PONG, b"p").serialize(
        mask=False, extensions=[]
    )


async def test_a_failed_session_passes_on_nothing_after_the_failure() -> None:
    side, transport = attached()
    side.data_received(
        client_frame(Opcode.TEXT, b"ok")
        + client_frame(Opcode.TEXT, b"\xff")
        + client_frame(Opcode.TEXT, b"after")
    )
    assert await side.receive() == "ok"
    assert await side.receive() is None
    assert side.failed_with == 1007
    assert Close.parse(b"".join(transport.written)[2:]).code == 1007  # sent at once


async def test_messages_are_dropped_once_the_relay_closes_the_client() -> None:
    side, transport = attached()
    closing = asyncio.create_task(side.close(1014, ""))
    await asyncio.sleep(0)
    side.data_received(client_frame(Opcode.BINARY, bytes(QUEUE_HIGH_BYTES * 2)))
    assert transport.is_reading()  # read on, so that the client's close answer is read
    assert await side.receive() is None  # the message was dropped, not queued
    side.data_received(client_frame(Opcode.CLOSE, Close(1014, "").serialize()))
    side.connection_lost(None)
    await asyncio.wait_for(closing, 1)


@pytest.mark.parametrize("kind", [Opcode.TEXT, Opcode.BINARY])
async def test_fragments_make_one_message(kind: Opcode) -> None:
    side, _ = attached()
    parts = [b"fr", b"ag", b"ment"]
    frames = [Frame(kind, parts[0], fin=False)]
    frames += [Frame(Opcode.CONT, p, fin=False) for p in parts[1:-1]]
    frames += [Frame(Opcode.CONT, parts[-1], fin=True)]
    side.data_received(b"".join(f.serialize(mask=True, extensions=[]) for f in frames))
    expected = "fragment" if kind is Opcode.TEXT else b"fragment"
    assert await side.receive() == expected
