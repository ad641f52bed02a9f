"""One receive buffer shared by the connections of a listener or of a pool (asyncio's
BufferedProtocol), instead of a new bytes object per read."""

from __future__ import annotations

# What one read may bring. The kernel hands a loopback or LAN socket's data over in up to
# 64 KiB, and llhttp passes body spans on as copies of at most this size.
READ_BYTES = 64 * 1024


class ReadBuffer:
    """Where a connection's reads land: uvloop calls get_buffer() for the memory and
    buffer_updated() once the read filled it (asyncio.BufferedProtocol).

    Why: without it uvloop copies each read into a new bytes object of up to 256 KiB (and its
    TLS transport asks for 256 KiB per SSLObject.read). Bodies of a few MB then pass through
    glibc's heap in 128-256 KiB blocks, which it keeps once freed: under `make soak`'s load
    the proxy's RSS swung between 82 and 107 MiB with no trend; 70 to 88 MiB with this
    buffer, whose reads also cost the relay less (README "Performance").

    A connection parses what it read before it returns to the loop (llhttp hands on copies of
    the spans it calls back with), so the buffer is free again by the next read, whichever
    connection that is. A read that arrived while another was still being parsed would get a
    buffer of its own; neither uvloop nor asyncio reads a socket from within another's
    callback, so this is a safeguard."""

    def __init__(self, size: int = READ_BYTES) -> None:
        self._shared = memoryview(bytearray(size))
        self.parsing = False  # a connection is parsing what the shared buffer holds

    def lend(self) -> memoryview:
        if self.parsing:
            return memoryview(bytearray(len(self._shared)))
        return self._shared


class ReadsIntoBuffer:
    """asyncio.BufferedProtocol's two methods over a ReadBuffer, for a protocol whose
    data_received parses what it is given before it returns. uvloop calls these (it finds
    get_buffer); asyncio's own loop, which only recognises subclasses of
    asyncio.BufferedProtocol, calls data_received with bytes."""

    def __init__(self, reads: ReadBuffer) -> None:
        self._reads = reads
        self._read_view = memoryview(b"")

    def get_buffer(self, sizehint: int) -> memoryview:
        view = self._read_view = self._reads.lend()
        return view

    def buffer_updated(self, nbytes: int) -> None:
        reads = self._reads
        parsing, reads.parsing = reads.parsing, True
        try:
            self.data_received(self._read_view[:nbytes])
        finally:
            reads.parsing = parsing

    def data_received(self, data: bytes | memoryview) -> None:
        raise NotImplementedError
