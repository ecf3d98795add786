"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for planner tests.

Each POST to /v1/chat/completions receives the next prepared reply: a list of tool calls
(name, JSON argument string) or a plain text reply. The requests are kept so tests can check
what the model was sent, such as the error text of a rejected tool call.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


def tool_calls(*calls: tuple[str, str | dict]) -> dict[str, Any]:
    """One scripted reply that calls tools; dict arguments are sent as JSON."""
    return {"tool_calls": [(name, args if isinstance(args, str) else json.dumps(args))
                           for name, args in calls]}


def text(content: str) -> dict[str, Any]:
    return {"content": content}


class ScriptedLLM:
    """Serves `replies` in order; a request after the last one gets HTTP 500."""

    def __init__(self, replies: list[dict[str, Any]]):
        self.replies = list(replies)
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def tool_results(self) -> list[dict[str, Any]]:
        """Tool messages of the last request: what the dispatcher returned to the model."""
        return [m for m in self.requests[-1]["messages"] if m["role"] == "tool"]

    def _next_reply(self, request: dict[str, Any]) -> dict[str, Any] | None:
        with self._lock:
            self.requests.append(request)
            number = len(self.requests)
            if not self.replies:
                return None
            reply = self.replies.pop(0)
        message: dict[str, Any] = {"role": "assistant", "content": reply.get("content")}
        finish = "stop"
        if "tool_calls" in reply:
            finish = "tool_calls"
            message["tool_calls"] = [
                {"id": f"call_{number}_{i}", "type": "function",
                 "function": {"name": name, "arguments": arguments}}
                for i, (name, arguments) in enumerate(reply["tool_calls"])]
        return {"id": f"chatcmpl-{number}", "object": "chat.completion", "created": 0,
                "model": request.get("model", "scripted"),
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}

    def _handler(self):
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length))
                reply = scripted._next_reply(request)
                status, body = (200, reply) if reply is not None else (
                    500, {"error": {"message": "script exhausted", "type": "server_error"}})
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                return

        return Handler
