"""A scripted OpenAI-compatible /v1/chat/completions server on 127.0.0.1 for the llm judge tests.

`FakeOpenAI(reply)` calls `reply(body, nth)` per request (`nth` counts requests with the same
caption "case"): it returns (status, text); status 200 text becomes the assistant message.
"""

from __future__ import annotations

import http.server
import json
import re
import threading
import time

from machine import scaled


class FakeOpenAI:
    def __init__(self, reply, delay_s: float = 0.0):
        self.reply, self.delay_s = reply, delay_s
        self.requests: list[dict] = []
        self.auth_headers: list[str] = []
        self.per_case: dict[str, int] = {}
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server.lock:
                    server.requests.append(body)
                    server.auth_headers.append(self.headers.get("Authorization", ""))
                    case = case_of(body)
                    nth = server.per_case.get(case, 0)
                    server.per_case[case] = nth + 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay_s)
                    if self.path != "/v1/chat/completions":
                        status, text = 404, "no such route"
                    else:
                        status, text = server.reply(body, nth, self.headers.get("Authorization", ""))
                finally:
                    with server.lock:
                        server.in_flight -= 1
                if status == 200:
                    payload = {"id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion",
                               "created": 0, "model": body.get("model", ""),
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": text}}],
                               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                else:
                    payload = {"error": {"message": text, "type": "server_error", "code": status}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=scaled(5))


def case_of(body: dict) -> str:
    """The "CASE x" tag of the caption: in the first user message (a retry may add follow-ups)."""
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    match = re.search(r"CASE (\w+)", user)
    return match.group(1) if match else ""


def is_count_prompt(body: dict) -> bool:
    return '"missed": <int>' in body["messages"][0]["content"]
