"""A real HTTP server that answers like a broken or hostile Datagrid: raw bytes on a real socket.

The fake Datagrid (``tests/support/fake_datagrid.py``) is a well-behaved API with injected faults;
this one
sends whatever a test scripts, framing included: close-delimited bodies cut mid-line, HTML pages,
bodies that never end, compressed bombs, oversized metadata.  It runs on its own event loop in a
thread, listening on 127.0.0.1, and logs every request it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

#: A scripted answer: status line and headers, then body pieces (None closes the connection).
Body = Callable[[], AsyncIterator[bytes]]


@dataclass
class Answer:
    """What the server sends for one path."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Body | bytes = b""
    #: "length" (Content-Length), "chunked", or "close" (the body ends when the connection does).
    framing: str = "length"


def batch_json(batch_id: str, total: int | None = None, status: str = "completed") -> bytes:
    """A terminal ``batch_prediction`` object, with ``request_counts.total`` if given."""
    counts = None if total is None else {"total": total, "processing": 0}
    return json.dumps(
        {
            "object": "batch_prediction",
            "id": batch_id,
            "status": status,
            "created_at": "2026-01-01T00:00:00Z",
            "completed_at": "2026-01-01T00:01:00Z",
            "request_counts": counts,
        }
    ).encode()


class HostileUpstream:
    """``with HostileUpstream() as up: up.answer(path, Answer(...))``; ``base_url`` ends in /v1."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}
        self.requests: list[dict[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        """The API base URL, as FORWARDER_DATAGRID_BASE_URL takes it."""
        return f"http://127.0.0.1:{self.port}/v1"

    def answer(self, path: str, answer: Answer) -> None:
        """Answer ``GET /v1/<path>`` with ``answer`` from now on."""
        self.answers[f"/v1/{path}"] = answer

    def __enter__(self) -> HostileUpstream:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
        )
        self._server = future.result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            # Handlers still sending (endless bodies) are cancelled and their sockets closed, so
            # nothing is left for the garbage collector to warn about in a later test.
            assert self._server is not None
            self._server.close()
            handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            return
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        _method, target, _version = request_line.split(" ", 2)
        path = target.partition("?")[0]
        headers = dict(
            (k.strip().lower(), v.strip())
            for k, _, v in (line.partition(":") for line in header_lines if line)
        )
        self.requests.append({"path": path, "headers": headers})
        answer = self.answers.get(path, Answer(404, {"Content-Type": "text/plain"}, b"no"))
        try:
            await self._send(writer, answer)
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # The server closing mid-answer (the test is over). Ending quietly, not cancelled:
            # Python 3.11's stream callback calls task.exception() on its handler task, which
            # raises for a cancelled one and is logged as an unobserved failure.
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                await writer.wait_closed()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, answer: Answer) -> None:
        headers = dict(answer.headers)
        body = answer.body
        if isinstance(body, bytes) and answer.framing == "length":
            headers["Content-Length"] = str(len(body))
        elif answer.framing == "chunked":
            headers["Transfer-Encoding"] = "chunked"
        headers.setdefault("Connection", "close")
        lines = [f"HTTP/1.1 {answer.status} X"] + [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        pieces: AsyncIterator[bytes] = _once(body) if isinstance(body, bytes) else body()
        async for piece in pieces:
            if answer.framing == "chunked":
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                writer.write(piece)
            await writer.drain()
        if answer.framing == "chunked":
            writer.write(b"0\r\n\r\n")
        await writer.drain()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
