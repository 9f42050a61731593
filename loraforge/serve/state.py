"""What the endpoints share — the model, the generation pool, the A/B routes, the admission counter — and the
FastAPI dependencies that hand it to them (`State`) and check the API key (`require_key`).

The state lives on `app.state.loraforge`, set by `create_app`; endpoints never close over it.
"""

from __future__ import annotations

import hmac
import random
import threading
from typing import Annotated, Any

from fastapi import Depends, Request

from loraforge.errors import suggestion
from loraforge.inference import GenerationSettings, InferenceModel
from loraforge.serve import protocol as P
from loraforge.serve.config import RouteTarget, ServerConfig
from loraforge.serve.errors import ApiError
from loraforge.serve.pool import GenerationPool


class ServerState:
    """What the endpoints share: the model, the generation pool, the A/B routes and the admission counter."""

    def __init__(self, config: ServerConfig, model: InferenceModel):
        self.config = config
        self.model = model
        self.pool = GenerationPool(model, scheduling=config.scheduling, max_batch_size=config.max_batch_size,
                                   batch_window_ms=config.batch_window_ms)
        self.routes: dict[str, list[RouteTarget]] = dict(config.routes)
        self.rng = random.Random(config.route_seed)
        self.count_lock = threading.Lock()  # streams release their slot from a worker thread
        self.in_flight = 0
        self.cancelled = 0  # streams stopped early because their client went away
        self.shutdown = threading.Event()  # set on shutdown: every running generation stops at its next token

    def model_names(self) -> list[str]:
        return self.model.adapter_names + list(self.routes)

    def pick_adapter(self, name: str) -> str:
        """The adapter that serves public model `name` (a weighted draw for an A/B route).

        Raises:
            ApiError: 404 with the list of models when the name is unknown.
        """
        if name in self.routes:
            targets = self.routes[name]
            return self.rng.choices([t.adapter for t in targets], weights=[t.weight for t in targets])[0]
        if name in self.model.adapter_names:
            return name
        names = self.model_names()
        hint = suggestion(name, names)
        raise ApiError(404, f"The model `{name}` does not exist. Available models: {', '.join(names)}."
                       + (f" {hint[0].upper()}{hint[1:]}" if hint else ""), param="model", code="model_not_found")

    def settings(self, req: P._Sampling, max_tokens: int | None) -> GenerationSettings:
        """The request's sampling settings, with the server's defaults and limits.

        Raises:
            ApiError: 400 when max_tokens exceeds the server's limit.
        """
        limit = max_tokens or self.config.default_max_tokens
        if limit > self.config.max_tokens_limit:
            raise ApiError(400, f"max_tokens must be at most {self.config.max_tokens_limit} on this server "
                           f"(got {limit})", param="max_tokens", code="invalid_value")
        temperature = self.config.default_temperature if req.temperature is None else req.temperature
        return GenerationSettings(max_new_tokens=limit, temperature=temperature,
                                  top_p=1.0 if req.top_p is None else req.top_p, stop=list(req.stop or []),
                                  seed=req.seed, max_time=self.config.request_timeout_s,
                                  cancel=self.shutdown)

    def check_prompt_length(self, prompts: list, adapter: str, max_new_tokens: int) -> None:
        """Raises:
            ApiError: 400 when a prompt and max_tokens do not fit the model's context (both numbers named)."""
        context = _context_length(self.model.model)
        if context is None:
            return
        for prompt in prompts:
            text = prompt if isinstance(prompt, str) else "".join(m["content"] for m in prompt)
            # No tokenizer makes fewer than one token per 32 characters: a huge prompt is refused unread.
            n = len(text) // 32 if len(text) // 32 > context else len(self.model.prompt_ids(prompt, adapter))
            if n + max_new_tokens > context:
                allowed = context - max_new_tokens
                raise ApiError(400, f"the prompt is {'at least ' if len(text) // 32 > context else ''}{n} tokens but "
                               f"this model's context is {context} tokens and max_tokens is {max_new_tokens}: the prompt "
                               f"may be at most {max(allowed, 0)} tokens", param="messages" if not isinstance(prompt, str)
                               else "prompt", code="context_length_exceeded")

    def admit(self) -> "Slot":
        """One of `max_concurrency` request slots.

        Raises:
            ApiError: 429 when every slot is taken.
        """
        return Slot(self)


class Slot:
    """One of `max_concurrency` slots; a stream keeps its slot until the stream is closed. Release is idempotent
    (a stream releases from its generator and again from the response's background task)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        with state.count_lock:
            if state.in_flight >= state.config.max_concurrency:
                raise ApiError(429, f"server busy: {state.config.max_concurrency} requests in flight; retry shortly",
                               "rate_limit_error", code="too_many_requests")
            state.in_flight += 1
            self.held = True

    def release(self) -> None:
        with self.state.count_lock:
            if self.held:
                self.held = False
                self.state.in_flight -= 1

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def get_state(request: Request) -> ServerState:
    """The app's shared state (a FastAPI dependency)."""
    return request.app.state.loraforge


State = Annotated[ServerState, Depends(get_state)]


async def require_key(request: Request, state: State) -> None:
    """Raises:
        ApiError: 401 when the server has an api_key and the request's bearer token is not it.
    """
    key = state.config.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "Invalid or missing API key: send `Authorization: Bearer <key>`.", code="invalid_api_key")


def _context_length(model) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
