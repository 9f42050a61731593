"""Server-sent events: a generation streamed as `data: {...}` lines ending with `data: [DONE]`.

A stream holds its admission slot from before generation starts until the response ends (or the client goes
away and the response is closed).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Generator, Iterator

from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from loraforge.errors import LoraforgeError
from loraforge.inference import GenerationSettings, PromptLike, TextStream
from loraforge.serve import protocol as P
from loraforge.serve.state import ServerState, Slot

log = logging.getLogger("loraforge.serve")


def sse(data: dict[str, Any] | str) -> str:
    """One event: a JSON object, or a bare string such as `[DONE]`."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def relay(stream: Any, chunk: Callable[[str], dict[str, Any]]) -> Generator[str, None, bool]:
    """SSE events for each text delta of `stream`; returns False after reporting a failure in-band (the status
    line is already sent, so an error can only be an event) and ending the stream with [DONE]."""
    try:
        for delta in stream:
            yield sse(chunk(delta))
    except Exception as err:
        log.exception("generation failed during a stream")
        message = err.format() if isinstance(err, LoraforgeError) else "internal error during generation"
        yield sse(P.error_body(message, "server_error"))
        yield sse("[DONE]")
        return False
    finally:
        stream.close()
    return True


async def start_stream(state: ServerState, prompt: PromptLike, adapter: str,
                       settings: GenerationSettings) -> tuple[Slot, TextStream]:
    """Take a slot, then start the generation (which validates the adapter and settings before any event).

    Raises:
        ApiError: 429 when busy; LoraforgeError / ModelError: a bad adapter or settings (the slot is released).
    """
    slot = state.admit()
    try:
        stream = await run_in_threadpool(state.model.stream, prompt, adapter, settings)
    except BaseException:
        slot.release()
        raise
    return slot, stream


class _StreamingEvents(StreamingResponse):
    """A StreamingResponse that stops its generation when the response ends for any reason: a client that went
    away (starlette then cancels the sending task without closing the event iterator, whose worker would
    otherwise generate to the end) or a shutdown that cancels it."""

    def __init__(self, *args: Any, on_end: Callable[[], None], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._on_end = on_end

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_end()


def streaming_response(events: Iterator[str], slot: Slot, headers: dict[str, str], *, state: ServerState,
                       stream: TextStream) -> StreamingResponse:
    """The SSE response; the slot is released when the events end and again (a no-op then) after the response,
    which also covers a client that leaves before the first event. A response that ends before the generation
    does (the client went away) cancels it at its next token."""

    def guarded() -> Iterator[str]:
        try:
            yield from events
        finally:
            slot.release()

    def on_end() -> None:
        if stream.result is None:
            stream.cancel()
            with state.count_lock:
                state.cancelled += 1
            log.info("client went away: stopped the generation after %d tokens", stream.tokens)
        slot.release()

    return _StreamingEvents(guarded(), media_type="text/event-stream", background=BackgroundTask(slot.release),
                            headers={**headers, "cache-control": "no-cache"}, on_end=on_end)
