"""Many streams at once must not exhaust the database pool: a request's
session is closed when its handler returns, not when its stream ends."""

from __future__ import annotations

import concurrent.futures

import httpx

from server.engine.fake import FakeChatEngine
from server.engine.loop_thread import EngineThread
from tests.conftest import make_settings
from tests.support.live import start_live_server


def test_forty_concurrent_streams_all_finish(tmp_path):
    loop = EngineThread().start()
    engine = FakeChatEngine(delay=0.05)
    loop.run(engine.start())
    server = start_live_server(make_settings(tmp_path), engine, loop)
    key = server.api_key()

    def stream(i: int) -> int:
        body = {"messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 40, "stream": True}
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as response:
            lines = [line for line in response.iter_lines() if line]
        return response.status_code if lines[-1] == "data: [DONE]" else -1

    try:
        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            statuses = list(pool.map(stream, range(40)))
    finally:
        server.stop()
        loop.stop()
    assert statuses == [200] * 40
