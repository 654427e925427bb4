"""A bare TCP relay: the floor of what a Python proxy adds on this machine.

    python bench/gateway/relay.py LISTEN_PORT UPSTREAM_PORT

Each client connection gets its own connection to the upstream on 127.0.0.1; bytes are passed both ways
as they arrive, nothing parsed, on uvloop (the event loop the gateway's uvicorn runs). What it adds over
going direct is only the extra hop: two more sockets, and this process woken for every piece each way.
`run.py` measures it as the path "relay", next to the gateway.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


class Side(asyncio.Protocol):
    """One end of a relayed connection: what it receives is written to its peer."""

    def __init__(self):
        self.peer: Side | None = None
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []  # client bytes that came before the upstream connection was made

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class Client(Side):
    def __init__(self, upstream_port: int):
        super().__init__()
        self.upstream_port = upstream_port

    def connection_made(self, transport):
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self.dial())

    async def dial(self) -> None:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(Side, "127.0.0.1", self.upstream_port)
        upstream.peer, self.peer = self, upstream
        for data in self.early:
            upstream.transport.write(data)
        self.early.clear()


async def main(listen: int, upstream: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(upstream), "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
