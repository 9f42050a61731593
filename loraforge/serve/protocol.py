"""The subset of the OpenAI API that `loraforge serve` speaks (requests validated, responses built here).

Requests accept and ignore fields we do not use (clients send many), but reject values we cannot honour
(`n > 1`, `logprobs`, tools, a JSON response format, penalties) instead of silently answering something else.
Numbers and booleans are strict, as in OpenAI's API: `"max_tokens": "10"` or `"stream": "yes"` is a 400, not a
guess.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationInfo,
                      field_validator, model_validator)


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


def _valid_text(v: str) -> str:
    """A JSON string may carry a lone surrogate escape (`\\ud800`), which is no text: refuse it by name."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text holds a lone surrogate escape (like \\ud800), which is not valid Unicode") from None
    return v


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        return _valid_text(v)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Union[str, None] = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any) -> Any:
        return _valid_text(v) if isinstance(v, str) else v

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False


def _unsupported(name: str, what: str) -> ValueError:
    return ValueError(f"{what} loraforge serve cannot honour; leave `{name}` out")


class _Sampling(_Request):
    model: str = Field(min_length=1)
    temperature: Union[StrictFloat, None] = Field(None, ge=0, le=2)
    top_p: Union[StrictFloat, None] = Field(None, gt=0, le=1)
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: Union[StrictInt, None] = Field(None, ge=0, le=2**63 - 1)
    stream: StrictBool = False
    stream_options: Union[StreamOptions, None] = None
    n: StrictInt = Field(1, ge=1, le=1, description="Only one choice per prompt is supported.")
    logprobs: Union[StrictBool, StrictInt, None] = None
    user: Union[StrictStr, None] = None
    # Known OpenAI fields whose non-default values would change the answer in ways we do not implement.
    presence_penalty: Union[StrictFloat, None] = Field(None, ge=-2, le=2)
    frequency_penalty: Union[StrictFloat, None] = Field(None, ge=-2, le=2)
    logit_bias: Union[dict[str, StrictFloat], None] = None
    top_logprobs: Union[StrictInt, None] = Field(None, ge=0, le=20)
    response_format: Union[dict[str, Any], None] = None
    tools: Union[list[Any], None] = None
    functions: Union[list[Any], None] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Union[str, list[str], None]) -> Union[list[str], None]:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop must be at most 4 non-empty strings")
        return [_valid_text(s) for s in stops] if stops is not None else None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v: Union[float, None], info: ValidationInfo) -> None:
        if v:
            raise _unsupported(info.field_name, "a non-zero penalty is something")
        return None

    @field_validator("logit_bias", "tools", "functions")
    @classmethod
    def _empty_only(cls, v: Any, info: ValidationInfo) -> None:
        if v:
            raise _unsupported(info.field_name, f"`{info.field_name}` is something")
        return None


    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v: Union[dict[str, Any], None]) -> None:
        if v is not None and v.get("type") != "text":
            raise _unsupported("response_format", f"response format {v.get('type')!r} (constrained decoding) is "
                               "something")
        return None

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _logprobs(cls, v: Any, info: ValidationInfo) -> None:
        if v:
            raise _unsupported(info.field_name, "log-probabilities are something")
        return None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Union[StrictInt, None] = Field(None, ge=1)
    max_completion_tokens: Union[StrictInt, None] = Field(None, ge=1)

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_limit(cls, v: Union[int, None], info: ValidationInfo) -> Union[int, None]:
        other = info.data.get("max_tokens")
        if v is not None and other is not None and other != v:
            raise ValueError(f"max_completion_tokens ({v}) and max_tokens ({other}) disagree: send one of them")
        return v

    @model_validator(mode="after")
    def _last_turn(self) -> "ChatCompletionRequest":
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message must not be from the assistant (nothing to answer)")
        return self

    def chat_messages(self) -> list[dict[str, str]]:
        # `developer` is the newer name of `system` in the OpenAI API.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def token_limit(self) -> Union[int, None]:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Union[StrictStr, list[StrictStr]]
    max_tokens: Union[StrictInt, None] = Field(16, ge=1)  # OpenAI's default for completions
    echo: StrictBool = False
    best_of: Union[StrictInt, None] = Field(None, ge=1, le=1, description="Only one candidate per prompt.")
    suffix: Union[StrictStr, None] = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: Union[str, None]) -> None:
        if v:
            raise _unsupported("suffix", "insertion (a suffix after the completion) is something")
        return None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Union[str, list[str]]) -> list[str]:
        prompts = [v] if isinstance(v, str) else v
        if not prompts or len(prompts) > 32:
            raise ValueError("prompt must be a string or a list of 1 to 32 strings")
        return [_valid_text(p) for p in prompts]

    @model_validator(mode="after")
    def _no_stream_batch(self) -> "CompletionRequest":
        if self.stream and len(self.prompt) > 1:
            raise ValueError("streaming supports a single prompt")
        return self


class AdapterLoad(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)


class AdapterReplace(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1)


# ----------------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def error_body(message: str, type_: str = "invalid_request_error", *, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(id_: str, model: str, adapter: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    return {"id": id_, "object": "chat.completion", "created": now(), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                         "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens), "loraforge_adapter": adapter}


def chat_chunk(id_: str, model: str, adapter: str, delta: dict[str, Any], finish_reason: str | None = None,
               usage_: dict[str, int] | None = None, *, empty_choices: bool = False) -> dict[str, Any]:
    choices = [] if empty_choices else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    body = {"id": id_, "object": "chat.completion.chunk", "created": now(), "model": model, "choices": choices,
            "loraforge_adapter": adapter}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def text_completion(id_: str, model: str, adapter: str, choices: list[dict[str, Any]], usage_: dict[str, int] | None,
                    obj: str = "text_completion") -> dict[str, Any]:
    body = {"id": id_, "object": obj, "created": now(), "model": model, "choices": choices,
            "loraforge_adapter": adapter}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def model_list(names: list[str]) -> dict[str, Any]:
    created = now()
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "loraforge"}
                                       for n in names]}
