"""Feedback from the event loop to the store's group-commit writer.

A thumb or choice handler builds its write (``store.feedback.Thumb`` /
``Choice``: the shape is checked there, on the loop, for free) and awaits
:meth:`FeedbackIngest.record`: the write is queued for the writer thread
(``store.feedback_writer``), which commits it together with the writes of
every other request that arrived meanwhile and then resolves this request's
future through ``loop.call_soon_threadsafe``. No thread-pool hop, no database
call on the event loop, and the answer goes out only after the commit: a 200
means stored. A write the store refuses raises its own error here (404, 409,
400 through ``server.errors``), a failed batch the database's error (503).
"""

from __future__ import annotations

import asyncio
from typing import cast

from store.feedback import Choice, ChoiceRecorded, Recorded, Thumb, ThumbRecorded, Write
from store.feedback_writer import FeedbackWriter
from store.writer_process import WriterProcess


class FeedbackIngest:
    """``app.state.feedback``: awaitable writes through one ``FeedbackWriter``."""

    def __init__(self, writer: FeedbackWriter | WriterProcess) -> None:
        self.writer = writer

    def start(self) -> None:
        """Start a writer process now (a thread writer starts with its first write)."""
        if isinstance(self.writer, WriterProcess):
            self.writer.start()

    async def record(self, write: Write) -> Recorded:
        """Queue ``write`` and return once it is committed; raise why it was not."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Recorded] = loop.create_future()

        def done(result: Recorded | None, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, future, result, error)

        self.writer.submit(write, done)
        return await future

    async def thumb(self, thumb: Thumb) -> ThumbRecorded:
        return cast(ThumbRecorded, await self.record(thumb))

    async def choice(self, choice: Choice) -> ChoiceRecorded:
        return cast(ChoiceRecorded, await self.record(choice))

    async def close(self) -> None:
        """Take no more feedback; return when everything queued is committed."""
        await asyncio.to_thread(self.writer.close)


def _settle(future: asyncio.Future, result: Recorded | None, error: BaseException | None) -> None:
    if future.done():  # the request went away (cancelled); the write's outcome stands
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
