"""Minimal aiohttp reverse proxy: the baseline ringproxy is compared against.

Usage: python loadtests/minimal_aiohttp_proxy.py LISTEN_PORT UPSTREAM_URL
Single process, uvloop, low-level ``web.Server``, one keep-alive ``ClientSession``.
"""

import asyncio
import sys
from collections.abc import Mapping

import uvloop
from aiohttp import ClientSession, DummyCookieJar, TCPConnector, web
from multidict import CIMultiDict
from yarl import URL

HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"}
HOP |= {"transfer-encoding", "proxy-authenticate", "proxy-authorization"}


def strip_hop(headers: Mapping[str, str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP)


async def main(port: int, upstream: str) -> None:
    session = ClientSession(
        connector=TCPConnector(limit=0, keepalive_timeout=60),
        cookie_jar=DummyCookieJar(),
        auto_decompress=False,
    )

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        async with session.request(
            request.method,
            URL(upstream + request.raw_path, encoded=True),
            headers=strip_hop(request.headers),
            allow_redirects=False,
            data=request.content if request.body_exists else None,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        ) as up:
            resp = web.StreamResponse(
                status=up.status, reason=up.reason, headers=strip_hop(up.headers)
            )
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    server = await asyncio.get_running_loop().create_server(
        web.Server(handler, access_log=None), "127.0.0.1", port
    )
    try:
        await asyncio.Event().wait()
    finally:
        server.close()
        await session.close()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), sys.argv[2].rstrip("/")))
