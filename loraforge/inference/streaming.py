"""Text deltas from a generation running in a worker thread, as tokens arrive.

`TextStream` knows nothing about adapters or locks: it is given `run(streamer, stopping) -> new token ids`
(which `InferenceModel.stream` builds to hold the model lock and pick the adapter) and `finish(ids) -> result`.
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from loraforge.inference.generation import cut_at_stop, partial_stop_len
from loraforge.inference.settings import GenerationResult

if TYPE_CHECKING:  # pragma: no cover
    import torch


class StopOnEvent:
    """A stopping criterion checked after every token: it ends generation once `event` is set (the stream's
    consumer went away, or the server is shutting down)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: "torch.Tensor", scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _QueueStreamer:
    """transformers' BaseStreamer protocol: `put` gets the prompt first, then each new token; `end` at the end.
    New tokens go to the consumer's queue."""

    def __init__(self, out: queue.Queue):
        self.out = out
        self.first = True

    def put(self, value: Any) -> None:
        if self.first:
            self.first = False
            return
        self.out.put(("tokens", value.reshape(-1).tolist()))

    def end(self) -> None:
        pass


class TextStream:
    """Iterator of text deltas from a generation running in a worker thread (which holds the model lock).

    Text is decoded from all tokens so far and only the stable part is emitted: an incomplete UTF-8
    character (decoded as U+FFFD) or the beginning of a stop string is held back until the next token.
    After the iteration ends, `.result` holds the full `GenerationResult`. Closing the stream early stops
    generation.
    """

    def __init__(self, run: Callable[[Any, Any], list[int]], finish: Callable[[list[int]], GenerationResult], *,
                 tokenizer: Any, end_ids: Sequence[int], stops: Sequence[str]):
        self._generate, self._finish = run, finish
        self._tokenizer, self._end_ids, self._stops = tokenizer, set(end_ids), list(stops)
        self._queue: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self.result: GenerationResult | None = None
        self.tokens = 0  # new tokens received so far
        self._iter = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._iter)

    def close(self) -> None:
        """Stop generating (the worker finishes its current token and releases the lock)."""
        self._cancel.set()
        self._iter.close()

    def cancel(self) -> None:
        """Stop generating at the next token; safe from any thread, also while another is iterating."""
        self._cancel.set()

    def _worker(self) -> None:
        try:
            self._queue.put(("done", self._generate(_QueueStreamer(self._queue), StopOnEvent(self._cancel))))
        except BaseException as err:  # re-raised in the consumer's thread
            self._queue.put(("error", err))

    def _run(self) -> Iterator[str]:
        thread = threading.Thread(target=self._worker, daemon=True, name="loraforge-generate")
        thread.start()
        tokens: list[int] = []
        sent = ""
        try:
            while True:
                kind, payload = self._queue.get()
                if kind == "error":
                    raise payload
                if kind == "done":
                    final = self._finish(payload)
                    if final.text.startswith(sent) and len(final.text) > len(sent):
                        yield final.text[len(sent):]
                    self.result = final
                    return
                self.tokens += len(payload)
                tokens.extend(t for t in payload if t not in self._end_ids)
                stable = self._stable_text(tokens)
                if len(stable) > len(sent) and stable.startswith(sent):
                    delta, sent = stable[len(sent):], stable
                    yield delta
        finally:
            self._cancel.set()
            thread.join(timeout=60)

    def _stable_text(self, tokens: list[int]) -> str:
        """The text of `tokens` that no later token can change; cancels generation once a stop string is in."""
        text = self._tokenizer.decode(tokens, skip_special_tokens=True)
        text, hit = cut_at_stop(text, self._stops)
        if hit:
            self._cancel.set()
        stable = text.rstrip("\ufffd")
        if not hit:
            stable = stable[: len(stable) - partial_stop_len(stable, self._stops)]
        return stable
