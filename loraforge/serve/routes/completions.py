"""POST /v1/chat/completions and POST /v1/completions, as one JSON body or an SSE stream.

The request's `model` picks the adapter (an A/B route draws one); the adapter that answered is named in the
`x-loraforge-adapter` header and in every body.
"""

from __future__ import annotations

from typing import Any, Iterator

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from loraforge.inference import TextStream
from loraforge.serve import protocol as P
from loraforge.serve.sse import relay, sse, start_stream, streaming_response
from loraforge.serve.state import State, require_key

ADAPTER_HEADER = "x-loraforge-adapter"
router = APIRouter(dependencies=[Depends(require_key)])


@router.post("/v1/chat/completions")
async def chat_completions(req: P.ChatCompletionRequest, state: State) -> Any:
    adapter = state.pick_adapter(req.model)
    settings = state.settings(req, req.token_limit())
    messages = req.chat_messages()
    await run_in_threadpool(state.check_prompt_length, [messages], adapter, settings.max_new_tokens)
    headers = {ADAPTER_HEADER: adapter}
    rid = P.new_id("chatcmpl")
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        slot, stream = await start_stream(state, messages, adapter, settings)
        return streaming_response(_chat_events(rid, req.model, adapter, stream, include_usage), slot, headers,
                                  state=state, stream=stream)
    with state.admit():
        result = (await state.pool.generate([messages], adapter, settings))[0]
    body = P.chat_completion(rid, req.model, adapter, result.text, result.finish_reason,
                             result.prompt_tokens, result.completion_tokens)
    return JSONResponse(body, headers=headers)


def _chat_events(rid: str, model: str, adapter: str, stream: TextStream, include_usage: bool) -> Iterator[str]:
    """The chat stream: the assistant role, the content deltas, the finish reason, usage if asked, [DONE]."""
    yield sse(P.chat_chunk(rid, model, adapter, {"role": "assistant", "content": ""}))
    if not (yield from relay(stream, lambda d: P.chat_chunk(rid, model, adapter, {"content": d}))):
        return
    result = stream.result
    yield sse(P.chat_chunk(rid, model, adapter, {}, result.finish_reason if result else "stop"))
    if include_usage and result:
        yield sse(P.chat_chunk(rid, model, adapter, {}, None, P.usage(result.prompt_tokens, result.completion_tokens),
                               empty_choices=True))
    yield sse("[DONE]")


@router.post("/v1/completions")
async def completions(req: P.CompletionRequest, state: State) -> Any:
    adapter = state.pick_adapter(req.model)
    settings = state.settings(req, req.max_tokens)
    prompts: list[str] = list(req.prompt)
    await run_in_threadpool(state.check_prompt_length, prompts, adapter, settings.max_new_tokens)
    headers = {ADAPTER_HEADER: adapter}
    rid = P.new_id("cmpl")
    if req.stream:
        slot, stream = await start_stream(state, prompts[0], adapter, settings)
        echo = prompts[0] if req.echo else None
        return streaming_response(_completion_events(rid, req.model, adapter, stream, echo), slot, headers,
                                  state=state, stream=stream)
    with state.admit():
        results = await state.pool.generate(prompts, adapter, settings)
    choices = [{"index": i, "text": (prompts[i] if req.echo else "") + r.text, "finish_reason": r.finish_reason,
                "logprobs": None} for i, r in enumerate(results)]
    body = P.text_completion(rid, req.model, adapter, choices,
                             P.usage(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)))
    return JSONResponse(body, headers=headers)


def _completion_events(rid: str, model: str, adapter: str, stream: TextStream, echo: str | None) -> Iterator[str]:
    """The text-completion stream: the echoed prompt if asked, the text deltas, the finish reason, [DONE]."""

    def choice(text: str, finish_reason: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]

    if echo is not None:
        yield sse(P.text_completion(rid, model, adapter, choice(echo), None))
    if not (yield from relay(stream, lambda d: P.text_completion(rid, model, adapter, choice(d), None))):
        return
    reason = stream.result.finish_reason if stream.result else "stop"
    yield sse(P.text_completion(rid, model, adapter, choice("", reason), None))
    yield sse("[DONE]")
