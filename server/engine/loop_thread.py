"""An asyncio event loop running in a background thread.

vLLM's ``AsyncLLM`` is bound to the event loop it is first used on, and its
start-up takes tens of seconds. Tests (and any synchronous code) that want one
engine shared across many event loops run a single loop here, create the
engine on it, and submit coroutines to it from any thread::

    loop_thread = EngineThread()
    loop_thread.start()
    engine = VllmChatEngine(settings)
    loop_thread.run(engine.start())            # from synchronous code
    await loop_thread.run_async(engine.abort("r1"))  # from another event loop
    loop_thread.stop()

Servers (uvicorn) that must share the engine can run on ``loop_thread.loop``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed (vLLM depends on it), as uvicorn picks for
    `tuneloop serve`: tests and benchmarks run on the loop production runs on."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class EngineThread:
    """Owns one event loop that runs forever in a daemon thread until :meth:`stop`."""

    def __init__(self, name: str = "tuneloop-engine-loop") -> None:
        self.loop = _new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> EngineThread:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and self.loop.is_running()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; returns a thread-safe future."""
        if self.loop.is_closed():
            coro.close()
            raise RuntimeError("the engine loop thread was stopped")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (from a thread that is
        not the loop's own; raises ``TimeoutError`` after ``timeout`` seconds and
        cancels the coroutine)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("EngineThread.run() called from the loop's own thread")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    async def run_async(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` from another event loop while it runs on this one."""
        return await asyncio.wrap_future(self.submit(coro))

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel what still runs on the loop, stop it and join the thread."""
        if self.loop.is_closed():
            return
        if self._thread.is_alive():

            async def _cancel_pending() -> None:
                current = asyncio.current_task()
                pending = [t for t in asyncio.all_tasks() if t is not current]
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)

            with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
                self.submit(_cancel_pending()).result(timeout)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()
