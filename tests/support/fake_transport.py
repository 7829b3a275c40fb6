"""A transport that records what a protocol writes, for driving HTTP protocols without
sockets."""

from __future__ import annotations


class FakeTransport:
    """A connection from 127.0.0.1 that keeps what is written and whether reading is paused."""

    def __init__(self) -> None:
        self.written = b""
        self.closed = False
        self.aborted = False
        self.paused = False  # reading

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
