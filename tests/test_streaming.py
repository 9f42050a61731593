"""`TextStream` on its own, with the real SmolLM2 tokenizer and a scripted token sequence standing in for the
model: what a consumer sees before the generation ends (the contract serve's SSE and the chat loop rely on)."""

from __future__ import annotations

import threading
import time

import pytest

from loraforge.inference import GenerationResult, TextStream
from loraforge.inference.generation import cut_at_stop, partial_stop_len


def _scripted(tokenizer, text: str, stops: list[str]):
    """A `run` that feeds `text`'s tokens through the streamer one by one, then waits until the stream cancels
    (or 10 s pass), and a `finish` that decodes and cuts at the stop strings as InferenceModel does."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cancelled = threading.Event()

    def run(streamer, stopping) -> list[int]:
        import torch

        streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt comes first and is not part of the answer
        for t in ids:
            streamer.put(torch.tensor([t]))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if bool(stopping(torch.zeros((1, 1), dtype=torch.long), None)[0]):
                cancelled.set()
                break
            time.sleep(0.01)
        return ids

    def finish(new: list[int]) -> GenerationResult:
        out, hit = cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stops)
        return GenerationResult(out, 3, len(new), "stop" if hit else "length")

    return run, finish, cancelled


def test_partial_characters_and_stop_strings_are_held_back(smollm2_tokenizer):
    run, finish, cancelled = _scripted(smollm2_tokenizer, "北京 is -- done", ["--"])
    stream = TextStream(run, finish, tokenizer=smollm2_tokenizer, end_ids=[2], stops=["--"])
    deltas = list(stream)
    assert "".join(deltas) == "北京 is " == stream.result.text
    assert not any("\ufffd" in d or "-" in d for d in deltas)  # half a character, half a stop string: never sent
    assert stream.result.finish_reason == "stop"
    assert cancelled.is_set()  # the stop string ended generation from the consumer's side


def test_closing_early_cancels_the_generation(smollm2_tokenizer):
    run, finish, cancelled = _scripted(smollm2_tokenizer, "one two three four", [])
    stream = TextStream(run, finish, tokenizer=smollm2_tokenizer, end_ids=[2], stops=[])
    assert next(stream) == "one"
    stream.close()
    assert cancelled.is_set() and stream.result is None


def test_a_failure_in_the_worker_reaches_the_consumer(smollm2_tokenizer):
    def run(streamer, stopping):
        raise RuntimeError("the model broke")

    stream = TextStream(run, lambda new: None, tokenizer=smollm2_tokenizer, end_ids=[2], stops=[])
    with pytest.raises(RuntimeError, match="the model broke"):
        list(stream)


@pytest.mark.parametrize("text, stops, held", [("CARDIO-", ["-7"], 1), ("abc", ["xyz"], 0), ("a<|im", ["<|im_end|>"], 4)])
def test_partial_stop_len(text, stops, held):
    assert partial_stop_len(text, stops) == held
