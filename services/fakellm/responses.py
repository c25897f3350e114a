"""ASGI responses that can stop sending on purpose (hang faults) without blocking the server.

A hung response waits for the client to disconnect, or for the server to shut down, on the
event loop: other requests keep being answered meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from starlette.responses import Response
from starlette.types import Receive, Scope, Send


async def wait_until_gone(receive: Receive, shutdown: asyncio.Event) -> bool:
    """Wait for the client to disconnect (True) or the server to shut down (False)."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    gone = asyncio.ensure_future(disconnected())
    stopping = asyncio.ensure_future(shutdown.wait())
    try:
        await asyncio.wait({gone, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        stopping.cancel()
    return not shutdown.is_set()


class ChunkedResponse(Response):
    """Sends `chunks` one by one; with `hang_after`, goes silent after that many chunks."""

    def __init__(
        self,
        chunks: Sequence[bytes],
        *,
        media_type: str,
        shutdown: asyncio.Event,
        headers: Mapping[str, str] | None = None,
        hang_after: int | None = None,
    ) -> None:
        self.chunks = chunks
        self.hang_after = hang_after
        self.shutdown = shutdown
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        for index, chunk in enumerate(self.chunks):
            if index == self.hang_after:
                await wait_until_gone(receive, self.shutdown)
                return  # the connection is dropped with the response unfinished
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class HangResponse(Response):
    """Never answers; at server shutdown, answers with `on_shutdown` (a 503 error body)."""

    def __init__(self, on_shutdown: bytes, *, shutdown: asyncio.Event) -> None:
        self.on_shutdown = on_shutdown
        self.shutdown = shutdown
        self.status_code = 503
        self.media_type = "application/json"
        self.background = None
        self.body = on_shutdown
        self.init_headers(None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if await wait_until_gone(receive, self.shutdown):
            return
        await send({"type": "http.response.start", "status": 503, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.on_shutdown})
