"""`InferenceModel`: one base causal LM and its named adapters (an `AdapterPool`), with generation.

Every model call holds one lock: generation, loading and unloading never interleave, so a request never sees
another request's adapter, and `replace_adapter` is atomic from a request's point of view (it resolves the
public name to an internal, versioned PEFT name when it takes the lock).
"""

from __future__ import annotations

import dataclasses
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from loraforge.errors import LoraforgeError, ModelError, Problem
from loraforge.inference.adapter_files import check_adapter_name, read_run_config
from loraforge.inference.adapters import AdapterInfo, AdapterPool
from loraforge.inference.generation import cut_after_end, cut_at_stop, generation_config, left_pad
from loraforge.inference.prompts import check_text, end_token_ids, render_prompt_ids
from loraforge.inference.settings import BASE, PEFT_BASE, GenerationResult, GenerationSettings, PromptLike
from loraforge.inference.streaming import StopOnEvent, TextStream


class InferenceModel:
    """A base causal LM plus named adapters. Thread-safe: every model call holds `self.lock`.

    Build it with `InferenceModel.load(...)`.
    """

    def __init__(self, model: Any, tokenizer: Any, *, base_path: Path, adapter_roots: Sequence[Path] | None = None,
                 template: str = "auto"):
        self.model = model  # the transformers model; LoRA layers are injected into it in place
        self.tokenizer = tokenizer
        self.base_path = base_path
        self.template = template
        self.base_system_prompt: str | None = None  # from a full/freeze run's config.yaml
        self.lock = threading.RLock()
        self.adapters = AdapterPool(model, base_path, adapter_roots)
        self.device = next(model.parameters()).device
        self._end_ids = end_token_ids(tokenizer, model.generation_config, template)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self._end_ids[0]

    @classmethod
    def load(cls, base: str | Path, adapters: dict[str, str | Path] | None = None, *, dtype: str = "auto",
             trust_remote_code: bool = False, adapter_roots: Sequence[str | Path] | None = None) -> "InferenceModel":
        """Load the base model (built-in name, HF dir or .gguf) and the named adapters.

        Args:
            base: the base model; a full/freeze run dir works here too.
            adapters: public name -> adapter dir (a LoRA/prefix/prompt run's output_dir or checkpoint).
            dtype: `auto` (float32 on CPU, bfloat16 on CUDA), `float32`, `bfloat16` or `float16`.
            trust_remote_code: run the model's own Python code (ChatGLM, Baichuan, ...).
            adapter_roots: when given, adapter paths must lie inside one of these folders.

        Raises:
            ModelError: a bad base or adapter (named, with the fix).
        """
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from loraforge.models.gguf import resolve_model_path

        _refuse_adapter_as_base(str(base))
        base_path = resolve_model_path(str(base))
        run_cfg = read_run_config(base_path)  # a full/freeze run dir carries its template
        torch_dtype = _torch_dtype(dtype)
        tokenizer = AutoTokenizer.from_pretrained(base_path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        self = cls(model, tokenizer, base_path=base_path,
                   adapter_roots=[Path(r) for r in adapter_roots] if adapter_roots else None,
                   template=str(run_cfg.get("template") or "auto"))
        self.base_system_prompt = run_cfg.get("system_prompt") or None
        problems: list[Problem] = []
        for name, path in (adapters or {}).items():
            try:
                self.load_adapter(name, path)
            except LoraforgeError as err:
                problems.extend(err.problems)
        if problems:
            raise ModelError(problems)
        return self

    # --- adapters -----------------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        """`base` followed by the loaded adapters' public names, in load order."""
        return self.adapters.names

    @property
    def adapter_roots(self) -> list[Path] | None:
        """The folders adapter paths must lie in (None: anywhere)."""
        return self.adapters.roots

    def adapter_info(self, name: str) -> AdapterInfo | None:
        return self.adapters.infos.get(name)

    def check_adapter(self, name: str) -> None:
        """Raises:
            ModelError: `name` is neither `base` nor a loaded adapter (the loaded ones listed).
        """
        if name != BASE:
            self.adapters.require(name)

    def load_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        """Load a new adapter under `name`.

        Raises:
            ModelError: the name is taken or invalid, or the path is refused (see `resolve_adapter_path`).
        """
        check_adapter_name(name)
        with self.lock:
            if name in self.adapters.infos:
                raise ModelError([Problem("adapter", "an adapter with this name is already loaded", value=name,
                                          fix="unload it first, or replace it")])
            info = self.adapters.load(name, path, self.template)
            self.adapters.infos[name] = info
            return info

    def unload_adapter(self, name: str) -> AdapterInfo:
        """Remove an adapter; requests that name it afterwards get an unknown-adapter error.

        Raises:
            ModelError: no such adapter.
        """
        with self.lock:
            info = self.adapters.require(name)
            del self.adapters.infos[name]
            self.adapters.drop(info)
            return info

    def replace_adapter(self, name: str, path: str | Path) -> tuple[AdapterInfo, AdapterInfo]:
        """Swap the weights behind `name` for the adapter at `path`; returns (old, new).

        The new version is fully loaded before the name points at it, and both happen under the model lock,
        so a request runs entirely on the old or entirely on the new version. If loading fails, the old
        version stays. Rolling back is replacing with the previous path again.

        Raises:
            ModelError: no such adapter, or the new path is refused.
        """
        with self.lock:
            old = self.adapters.require(name)
            new = self.adapters.load(name, path, self.template)
            self.adapters.infos[name] = new
            self.adapters.drop(old)
            return old, new

    # --- prompts ------------------------------------------------------------------------------------

    def prompt_settings(self, adapter: str = BASE) -> tuple[str, str | None]:
        """(template, system prompt) that prompts for `adapter` are rendered with: those of its training run."""
        info = self.adapters.infos.get(adapter)
        if info is None:
            return self.template, self.base_system_prompt
        return info.template, info.system_prompt

    def prompt_ids(self, messages_or_prompt: PromptLike, adapter: str = BASE) -> list[int]:
        """A list of messages is rendered with the chat template used to train `adapter`; a string is raw text
        continued as-is (OpenAI `completions` semantics; wrap it as a user message to chat)."""
        if isinstance(messages_or_prompt, str):
            check_text(messages_or_prompt)
            return list(self.tokenizer(messages_or_prompt, add_special_tokens=False)["input_ids"])
        for i, message in enumerate(messages_or_prompt):
            check_text(message["content"], f"messages[{i}].content")
        template, system = self.prompt_settings(adapter)
        return render_prompt_ids(self.tokenizer, messages_or_prompt, template, system)

    @contextmanager
    def forced_template(self, template: str) -> Iterator[None]:
        """Render prompts for every variant with `template` (unless it is `auto`) instead of the one recorded
        with its run, and restore the recorded ones afterwards (evaluation with one template for all)."""
        if template == "auto":
            yield
            return
        with self.lock:
            saved_base, saved = self.template, dict(self.adapters.infos)
            self.template = template
            for name, info in saved.items():
                self.adapters.infos[name] = dataclasses.replace(info, template=template)
        try:
            yield
        finally:
            with self.lock:
                self.template = saved_base
                for name, info in saved.items():  # only versions still loaded (not replaced or unloaded meanwhile)
                    now = self.adapters.infos.get(name)
                    if now is not None and now.internal_name == info.internal_name:
                        self.adapters.infos[name] = info

    @contextmanager
    def forward_module(self, adapter: str = BASE) -> Iterator[Any]:
        """The module whose forward pass runs `adapter` (`base` = no adapter), held under the model lock — for
        teacher-forced scores (evaluation), routed exactly as generation is."""
        with self.lock, self.adapters.select([self.adapters.internal_name(adapter)]) as (module, _kwargs):
            yield module

    # --- generation ---------------------------------------------------------------------------------

    def generate(self, messages_or_prompt: PromptLike, adapter: str = BASE,
                 settings: GenerationSettings | None = None) -> GenerationResult:
        """Generate one answer with `adapter` (`base` = no adapter).

        Raises:
            ModelError: unknown adapter.
            LoraforgeError: invalid settings.
        """
        return self.generate_batch([messages_or_prompt], adapter, settings)[0]

    def generate_batch(self, prompts: Sequence[PromptLike], adapter: str | Sequence[str] = BASE,
                       settings: GenerationSettings | None = None) -> list[GenerationResult]:
        """Generate for several prompts in left-padded batches.

        `adapter` is one name for all rows, or one name per row. LoRA adapters and `base` share a batch through
        PEFT's per-row `adapter_names`; prompt-learning adapters run one row at a time, because their
        left-padded batched output differs from the unbatched one (FINDINGS trap 5).

        Raises:
            ModelError: unknown adapter; LoraforgeError: invalid settings.
        """
        settings = settings or GenerationSettings()
        settings.validate()
        names = [adapter] * len(prompts) if isinstance(adapter, str) else list(adapter)
        if len(names) != len(prompts):
            raise LoraforgeError([Problem("adapter", "need one adapter name per prompt", value=len(names),
                                          allowed=str(len(prompts)))])
        results: list[GenerationResult | None] = [None] * len(prompts)
        with self.lock:
            infos = [None if n == BASE else self.adapters.require(n) for n in names]
            batch_rows = [i for i, info in enumerate(infos) if info is None or not info.prompt_learning]
            ids = [self.prompt_ids(prompts[i], names[i]) for i in range(len(prompts))]
            if batch_rows:
                row_adapters = [infos[i].internal_name if infos[i] else PEFT_BASE for i in batch_rows]
                outs = self._generate_ids([ids[i] for i in batch_rows], row_adapters, settings)
                for i, out in zip(batch_rows, outs):
                    results[i] = self._finish(ids[i], out, settings, names[i])
            for i, info in enumerate(infos):
                if results[i] is None:
                    out = self._generate_ids([ids[i]], [info.internal_name], settings)[0]
                    results[i] = self._finish(ids[i], out, settings, names[i])
        return [r for r in results if r is not None]

    def stream(self, messages_or_prompt: PromptLike, adapter: str = BASE,
               settings: GenerationSettings | None = None) -> TextStream:
        """Generate with `adapter`, yielding text deltas as tokens arrive. After the iteration ends,
        `.result` holds the full `GenerationResult`. Closing the stream early stops generation.

        Raises (at call time, before any text):
            ModelError: unknown adapter; LoraforgeError: invalid settings.
        """
        settings = settings or GenerationSettings()
        settings.validate()
        with self.lock:  # validate the name now, so the caller gets the error before streaming starts
            info = None if adapter == BASE else self.adapters.require(adapter)
            ids = self.prompt_ids(messages_or_prompt, adapter)

        def run(streamer: Any, stopping: Any) -> list[int]:
            return self._stream_ids(ids, adapter, info, settings, streamer, stopping)

        return TextStream(run, lambda new: self._finish(ids, new, settings, adapter), tokenizer=self.tokenizer,
                          end_ids=self._end_ids, stops=settings.stop)

    # --- internals ----------------------------------------------------------------------------------

    def _stream_ids(self, ids: list[int], adapter: str, info: AdapterInfo | None, settings: GenerationSettings,
                    streamer: Any, stopping: Any) -> list[int]:
        """One streamed generation (in the stream's worker thread), on the version `adapter` points at now."""
        with self.lock:
            if info is not None and self.adapters.infos.get(info.name) is not info:
                # replaced or unloaded between the call and the start: use what the name points at now
                info = self.adapters.infos.get(info.name)
                if info is None:
                    raise ModelError([Problem("adapter", "adapter was unloaded", value=adapter)])
            internal = info.internal_name if info else PEFT_BASE
            return self._generate_ids([ids], [internal], settings, streamer=streamer, stopping=stopping)[0]

    def _generate_ids(self, rows: list[list[int]], internal_names: list[str], settings: GenerationSettings,
                      streamer: Any = None, stopping: Any = None) -> list[list[int]]:
        """Run `generate` on left-padded rows (caller holds the lock); returns each row's new token ids,
        cut after the first end token."""
        import torch

        input_ids, mask = left_pad(rows, self._pad_id)
        kwargs: dict[str, Any] = dict(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                      generation_config=generation_config(settings, self._end_ids, self._pad_id),
                                      streamer=streamer)
        if settings.stop:
            kwargs.update(stop_strings=list(settings.stop), tokenizer=self.tokenizer)
        criteria = [c for c in (stopping, StopOnEvent(settings.cancel) if settings.cancel else None) if c is not None]
        if criteria:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        with torch.inference_mode(), self.adapters.select(internal_names) as (module, extra):
            out = module.generate(**kwargs, **extra)
        return cut_after_end(out[:, input_ids.shape[1]:].tolist(), self._end_ids)

    def _finish(self, prompt: list[int], new: list[int], settings: GenerationSettings, adapter: str) -> GenerationResult:
        ended = bool(new) and new[-1] in self._end_ids
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        text, hit_stop = cut_at_stop(text, settings.stop)
        reason = "stop" if ended or hit_stop else "length"
        return GenerationResult(text=text, prompt_tokens=len(prompt), completion_tokens=len(new),
                                finish_reason=reason, adapter=adapter)


def _refuse_adapter_as_base(base: str) -> None:
    """Raises:
        ModelError: `base` is an adapter folder (with the command line that was probably meant).
    """
    if Path(base).is_dir() and (Path(base) / "adapter_config.json").is_file():
        run_base = read_run_config(Path(base)).get("base_model", "the run's base_model")
        raise ModelError([Problem("base", "this folder is an adapter, not a model", value=base,
                                  fix=f"--base {run_base} --adapter NAME={base}")])


def _torch_dtype(dtype: str) -> Any:
    """`auto` → bfloat16 on CUDA, float32 on CPU; or the named dtype.

    Raises:
        ModelError: an unknown dtype name.
    """
    import torch

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if dtype not in dtypes:
        raise ModelError([Problem("dtype", "unknown dtype", value=dtype, allowed="auto, " + ", ".join(dtypes))])
    return dtypes[dtype]
