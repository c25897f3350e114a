"""The HTTP app: provider endpoints, the call log, and runtime control of the script."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.fakellm.anthropic_wire import AnthropicWire
from services.fakellm.neutral import BadRequest, LLMRequest, Usage
from services.fakellm.openai_wire import OpenAIWire
from services.fakellm.responses import ChunkedResponse, HangResponse
from services.fakellm.script import Decision, Script, ScriptError, ScriptState, decide, load_script
from services.fakellm.wire import Ids, Wire, dumps, retry_after_value

MAX_CALLS = 10_000  # the call log keeps the most recent calls; `seq` keeps counting
JSON = "application/json"
SSE = "text/event-stream; charset=utf-8"


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(obj), status, headers, media_type=JSON)


class FakeLLM:
    """The state behind the app: script, rule counters, call log, ids, shutdown signal."""

    def __init__(self, script: Script, shutdown: asyncio.Event | None = None) -> None:
        self.script = script
        self.state = ScriptState()
        self.calls: deque[dict[str, Any]] = deque(maxlen=MAX_CALLS)
        self.seq = 0
        self.ids = Ids()
        self.shutdown = shutdown or asyncio.Event()
        self.openai = OpenAIWire()
        self.anthropic = AnthropicWire()

    # -- provider endpoints -------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        return await self._llm_call(request, self.openai)

    async def messages(self, request: Request) -> Response:
        return await self._llm_call(request, self.anthropic)

    async def _llm_call(self, request: Request, wire: Wire) -> Response:
        raw = await request.body()
        self.seq += 1
        entry: dict[str, Any] = {
            "seq": self.seq,
            "endpoint": request.url.path,
            "provider": wire.provider,
            "model": None,
            "stream": False,
            "rule": None,
            "fault": None,
            "status": 200,
            "reply": None,
            "error": None,
            "body": None,
            "ts": time.time(),
        }
        self.calls.append(entry)
        headers = {wire.request_id_header: self.ids.new("req_")}
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            entry["body"] = raw.decode("utf-8", errors="replace")
            bad = BadRequest("We could not parse the JSON body of your request.")
            return self._bad_request(wire, entry, bad, headers)
        entry["body"] = body
        if isinstance(body, dict):
            entry["model"] = body.get("model") if isinstance(body.get("model"), str) else None
            entry["stream"] = body.get("stream") is True
        try:
            call = wire.parse(body)
        except BadRequest as exc:
            return self._bad_request(wire, entry, exc, headers)
        decision = decide(self.script, call, self.state)
        entry["rule"] = decision.rule
        entry["reply"] = {
            "text": decision.reply.text,
            "tool_calls": [
                {"name": c.name, "arguments": c.arguments} for c in decision.reply.tool_calls
            ],
        }
        return await self._answer(wire, call, decision, entry, headers)

    async def _answer(
        self,
        wire: Wire,
        call: LLMRequest,
        decision: Decision,
        entry: dict[str, Any],
        headers: dict[str, str],
    ) -> Response:
        fault = decision.fault
        kind = fault.kind if fault else None
        entry["fault"] = kind
        if fault and fault.latency_ms:
            await asyncio.sleep(fault.latency_ms / 1000)
        if fault and fault.status is not None:
            entry["status"] = fault.status
            if fault.retry_after_s is not None:
                headers["retry-after"] = retry_after_value(fault.retry_after_s)
            return json_response(wire.error(fault.status, fault.message), fault.status, headers)
        if kind == "hang":
            entry["status"] = None  # never answered
            return HangResponse(
                dumps(wire.error(503, "fakellm shutting down")), shutdown=self.shutdown
            )
        if kind == "malformed":
            return Response(
                wire.malformed(call, self.ids), 200, headers, SSE if call.stream else JSON
            )
        usage = Usage.of(call, decision.reply)
        hang = kind == "hang_mid_stream"
        if call.stream:
            stream = wire.stream(call, decision.reply, usage, self.ids)
            return ChunkedResponse(
                stream.frames,
                media_type=SSE,
                shutdown=self.shutdown,
                headers={**headers, "cache-control": "no-cache"},
                hang_after=stream.hang_after if hang else None,
            )
        body = dumps(wire.body(call, decision.reply, usage, self.ids))
        if hang:  # the status line, headers and half the body, then silence
            half = len(body) // 2
            return ChunkedResponse(
                [body[:half], body[half:]],
                media_type=JSON,
                shutdown=self.shutdown,
                headers={**headers, "content-length": str(len(body))},
                hang_after=1,
            )
        return Response(body, 200, headers, media_type=JSON)

    @staticmethod
    def _bad_request(
        wire: Wire, entry: dict[str, Any], exc: BadRequest, headers: dict[str, str]
    ) -> Response:
        entry["status"] = 400
        entry["error"] = str(exc)
        return json_response(wire.error(400, str(exc), exc.param), 400, headers)

    # -- other endpoints ----------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        names = sorted({"fakellm"} | {r.match.model for r in self.script.rules if r.match.model})
        if "anthropic-version" in request.headers:
            data = [
                {"type": "model", "id": n, "display_name": n, "created_at": "2024-01-01T00:00:00Z"}
                for n in names
            ]
            return json_response(
                {"data": data, "has_more": False, "first_id": names[0], "last_id": names[-1]}
            )
        listed = [{"id": n, "object": "model", "created": 0, "owned_by": "fakellm"} for n in names]
        return json_response({"object": "list", "data": listed})

    async def healthz(self, request: Request) -> Response:
        return json_response({"ok": True, "rules": len(self.script.rules), "calls": self.seq})

    async def list_calls(self, request: Request) -> Response:
        try:
            since = int(request.query_params.get("since", "0"))
        except ValueError:
            return json_response({"error": "since: expected an integer"}, 400)
        return json_response([entry for entry in self.calls if entry["seq"] > since])

    async def reset(self, request: Request) -> Response:
        self.calls.clear()
        self.seq = 0
        self.state.reset()
        return json_response({"ok": True})

    async def get_script(self, request: Request) -> Response:
        return json_response(self.script.model_dump(mode="json", by_alias=True, exclude_none=True))

    async def put_script(self, request: Request) -> Response:
        raw = await request.body()
        try:
            script = load_script(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return json_response({"error": "script: not UTF-8 text"}, 400)
        except ScriptError as exc:
            return json_response({"error": str(exc)}, 400)
        self.script = script
        self.state.reset()
        return json_response({"ok": True, "rules": [rule.name for rule in script.rules]})

    async def not_found(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        message = f"fakellm: no route for {request.method} {request.url.path}"
        wire: Wire = self.anthropic if "anthropic-version" in request.headers else self.openai
        return json_response(wire.error(status, message), status)


def create_app(script: Script, *, shutdown: asyncio.Event | None = None) -> Starlette:
    """The fakellm app; `shutdown`, once set, ends hung requests (see `responses`)."""
    fake = FakeLLM(script, shutdown)
    routes = [
        Route("/v1/chat/completions", fake.chat_completions, methods=["POST"]),
        Route("/v1/messages", fake.messages, methods=["POST"]),
        Route("/v1/models", fake.models, methods=["GET"]),
        Route("/healthz", fake.healthz, methods=["GET"]),
        Route("/_fakellm/calls", fake.list_calls, methods=["GET"]),
        Route("/_fakellm/reset", fake.reset, methods=["POST"]),
        Route("/_fakellm/script", fake.get_script, methods=["GET"]),
        Route("/_fakellm/script", fake.put_script, methods=["PUT"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: fake.not_found, 405: fake.not_found})
    app.state.fakellm = fake
    return app
