"""The supervisor-worker channel: length-prefixed JSON messages over a Unix socketpair.

One socketpair per worker, made by the supervisor; the worker gets its end as an
inherited file descriptor.  A message is a 4-byte big-endian length, then that many
bytes of UTF-8 JSON: one object with a ``type``.  Both ends use asyncio streams, so a
write never blocks the event loop (the kernel buffer, then the stream's, take it) and
order is kept: a ``states`` message sent after a ``config`` one is applied after it.

Why not ``multiprocessing``: its pipes and queues are blocking (a feeder thread, pickles),
it would have to fork a process that runs uvloop, or spawn through its own bootstrap;
a socketpair and ``asyncio.open_unix_connection`` are all this needs, and a closed
channel (the supervisor died, even by ``kill -9``) is a plain end-of-file for the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from typing import Any

Message = dict[str, Any]

MAX_MESSAGE = 64 << 20  # bytes; a config file and its states fit many times over
_LENGTH = struct.Struct(">I")


class ChannelClosed(Exception):
    """The other end went away (or sent something that is not a message)."""


class ChannelGarbage(ChannelClosed):
    """The other end sent something that is not a message (too long, not JSON, no type)."""


class Channel:
    """Send and receive messages on one end of a socketpair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_MESSAGE)
        return cls(reader, writer)

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()

    @property
    def buffered(self) -> int:
        """Bytes sent and not yet taken by the other end's kernel buffer."""
        transport = self.writer.transport
        return 0 if transport.is_closing() else transport.get_write_buffer_size()

    def send(self, message: Message) -> None:
        """Queue ``message``; silently nothing once the channel is closed (the reader
        side sees the end and acts on it)."""
        if self.writer.is_closing():
            return
        data = json.dumps(message, separators=(",", ":")).encode()
        self.writer.write(_LENGTH.pack(len(data)) + data)

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.writer.drain()

    async def receive(self) -> Message:
        """The next message; ChannelClosed at the end of the stream or on garbage."""
        try:
            head = await self.reader.readexactly(_LENGTH.size)
            (size,) = _LENGTH.unpack(head)
            if size > MAX_MESSAGE:
                raise ChannelGarbage(f"message of {size} bytes (at most {MAX_MESSAGE})")
            data = await self.reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise ChannelClosed("the other end closed the channel") from exc
        try:
            message = json.loads(data)
        except ValueError as exc:
            raise ChannelGarbage(f"not a JSON message: {exc}") from exc
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise ChannelGarbage("a message without a type")
        return message

    def close(self) -> None:
        self.writer.close()
