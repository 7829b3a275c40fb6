"""A transport that records what a protocol writes, for driving HTTP protocols without
sockets."""

from __future__ import annotations


class FakeTransport:
    """A connection from 127.0.0.1 that keeps what is written; flow control does nothing."""

    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass
