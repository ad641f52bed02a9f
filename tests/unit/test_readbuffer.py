"""The shared read buffer: one for every read, a private one for a read during another's parse."""

from __future__ import annotations

from aoai_auth_proxy.readbuffer import READ_BYTES, ReadBuffer


def test_every_read_gets_the_same_memory_while_none_is_being_parsed() -> None:
    reads = ReadBuffer()
    first = reads.lend()
    assert len(first) == READ_BYTES
    assert not first.readonly
    assert reads.lend() is first


def test_a_read_during_another_reads_parse_gets_memory_of_its_own() -> None:
    reads = ReadBuffer(size=16)
    shared = reads.lend()
    shared[:4] = b"abcd"
    reads.parsing = True
    private = reads.lend()
    assert private is not shared
    assert len(private) == 16
    private[:4] = b"wxyz"
    assert bytes(shared[:4]) == b"abcd"  # what is being parsed is left alone
    reads.parsing = False
    assert reads.lend() is shared
