"""Generation with one base model and any number of named adapters, switched per call.

`InferenceModel` holds the base model once. LoRA adapters live side by side in one `PeftModel` (PEFT keeps
each adapter's A/B matrices under its own name), so switching costs nothing and several adapters can even
share one batch through PEFT's per-row `adapter_names`. Prompt-learning adapters (prefix / P-tuning / prompt
tuning) cannot share a `PeftModel` with LoRA ones (PEFT refuses mixed types), so each gets its own thin
wrapper around the same base weights; while one runs, the LoRA layers are disabled.

Every model call holds one lock: generation, loading and unloading never interleave, so a request never sees
another request's adapter, and `replace_adapter` is atomic from a request's point of view (it resolves the
public name to an internal, versioned PEFT name when it takes the lock).

The adapter name `base` means "no adapter".
"""

from __future__ import annotations

import queue
import re
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, Union

from loraforge.errors import LoraforgeError, ModelError, Problem, suggestion

if TYPE_CHECKING:  # pragma: no cover
    import torch

BASE = "base"
# PEFT's own spelling of "no adapter for this row" in a mixed batch.
_PEFT_BASE = "__base__"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")

Message = dict[str, str]
PromptLike = Union[str, Sequence[Message]]


@dataclass
class GenerationSettings:
    """How to sample. `temperature == 0` is greedy decoding (top_p is then ignored)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def validate(self) -> None:
        """Raises:
            LoraforgeError: a value out of range (each problem named).
        """
        problems = []
        if self.max_new_tokens < 1:
            problems.append(Problem("max_new_tokens", "must be at least 1", value=self.max_new_tokens, allowed=">= 1"))
        if self.temperature < 0:
            problems.append(Problem("temperature", "must not be negative", value=self.temperature, allowed=">= 0 (0 = greedy)"))
        if not 0 < self.top_p <= 1:
            problems.append(Problem("top_p", "must be in (0, 1]", value=self.top_p, allowed="0 < top_p <= 1"))
        if any(not s for s in self.stop):
            problems.append(Problem("stop", "stop strings must not be empty", value=self.stop))
        if problems:
            raise LoraforgeError(problems, title="invalid generation settings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class GenerationResult:
    """One finished generation. `finish_reason` is `stop` (end of turn or a stop string) or `length`."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    adapter: str = BASE


@dataclass(frozen=True)
class AdapterInfo:
    """A loaded adapter: its public name, where it came from, and how prompts are rendered for it."""

    name: str
    path: Path
    internal_name: str  # versioned PEFT adapter name, e.g. `cardiology@2`
    peft_type: str  # LORA, PREFIX_TUNING, PROMPT_TUNING, P_TUNING, ...
    prompt_learning: bool
    template: str = "auto"
    system_prompt: str | None = None


# ----------------------------------------------------------------------------------------------- paths


def resolve_adapter_path(path: str | Path, roots: Sequence[str | Path] | None = None, *, key: str = "adapter") -> Path:
    """Check an adapter dir before anything is read from it.

    With `roots`, a relative path is looked up under each root in turn and the real path (symlinks resolved)
    must lie inside one of them, so `../` or a symlink cannot reach other files. Only safetensors weights are
    accepted: `.bin` files are Python pickles that can run code when loaded.

    Raises:
        ModelError: outside the roots, missing, a full model instead of an adapter, or pickle-only weights.
    """
    raw = Path(str(path)).expanduser()
    if roots:
        real_roots = [Path(r).expanduser().resolve() for r in roots]
        candidates = [raw.resolve()] if raw.is_absolute() else [(r / raw).resolve() for r in real_roots]
        inside = [c for c in candidates if any(c == r or r in c.parents for r in real_roots)]
        if not inside:
            raise ModelError([Problem(key, "adapter path is outside the allowed adapter roots", value=str(path),
                                      allowed=", ".join(str(r) for r in real_roots),
                                      fix="put the adapter under one of the roots and give its path relative to it")])
        existing = [c for c in inside if c.exists()]
        resolved = existing[0] if existing else inside[0]
    else:
        resolved = raw.resolve()
    if not resolved.is_dir():
        raise ModelError([Problem(key, "adapter folder not found", value=str(path),
                                  fix="give the run's output_dir (the folder with adapter_config.json)")])
    if not (resolved / "adapter_config.json").is_file():
        if (resolved / "config.json").is_file():
            raise ModelError([Problem(key, "this folder is a complete model (a full or freeze run), not an adapter",
                                      value=str(path), fix=f"use it as the base model: --base {path}")])
        raise ModelError([Problem(key, "no adapter_config.json in this folder (not a PEFT adapter dir)", value=str(path),
                                  fix="give the run's output_dir or one of its checkpoint-N folders")])
    if not (resolved / "adapter_model.safetensors").is_file():
        pickles = sorted(p.name for p in resolved.glob("adapter_model*.bin"))
        message = ("adapter weights are a pickle (.bin), which loraforge never loads: unpickling can run code"
                   if pickles else "adapter_model.safetensors is missing")
        raise ModelError([Problem(key, message, value=str(resolved / (pickles[0] if pickles else "adapter_model.safetensors")),
                                  allowed="adapter_model.safetensors",
                                  fix="convert it once in a trusted environment: load it with PEFT and call "
                                      "save_pretrained(dir, safe_serialization=True)")])
    return resolved


def check_adapter_name(name: str, *, key: str = "adapter") -> str:
    """Raises:
        ModelError: `base` (reserved) or characters outside [A-Za-z0-9._:-].
    """
    if name == BASE or name == _PEFT_BASE:
        raise ModelError([Problem(key, "`base` is reserved for the model without adapter", value=name,
                                  fix="choose another name, e.g. the run's name")])
    if not _NAME_RE.match(name):
        raise ModelError([Problem(key, "invalid adapter name", value=name,
                                  allowed="1-64 characters from A-Z a-z 0-9 . _ : -, starting with a letter or digit")])
    return name


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The resolved loraforge config saved beside an adapter (`config.yaml`), or {} when there is none
    (a plain PEFT adapter from elsewhere). Read as plain YAML: only a few keys matter here."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


# ----------------------------------------------------------------------------------------------- prompts


def render_prompt_ids(tokenizer: Any, messages: Sequence[Message], template: str = "auto",
                      system_prompt: str | None = None) -> list[int]:
    """Token ids of a chat prompt ending with the assistant generation prompt, rendered exactly as in training.

    The training data pipeline owns the template code (`loraforge.data.templates`); this is the one place
    inference calls it, with the tokenizer's own chat template as a fallback for older installs.
    """
    msgs = [dict(m) for m in messages]
    if system_prompt and not any(m.get("role") == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    try:
        from loraforge.data.templates import build_generation_ids
    except ImportError:
        build_generation_ids = None
    if build_generation_ids is not None:
        return list(build_generation_ids(tokenizer, msgs, template))
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_token_ids(tokenizer: Any, model_config: Any, template: str = "auto") -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS, the model's generation EOS ids and the template's
    end-of-turn token (`<|im_end|>` for ChatML)."""
    ids: list[int] = []
    gen = getattr(model_config, "eos_token_id", None)
    for value in ([gen] if isinstance(gen, int) else list(gen or [])) + [tokenizer.eos_token_id]:
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    try:
        from loraforge.data.templates import stop_token_ids
    except ImportError:
        stop_token_ids = None
    if stop_token_ids is not None:
        extra = list(stop_token_ids(tokenizer, template))
    else:
        extra = [t for t in (tokenizer.convert_tokens_to_ids("<|im_end|>"),) if isinstance(t, int) and t != tokenizer.unk_token_id]
    return ids + [t for t in extra if t not in ids]


def _partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string (held back while
    streaming, since the next token may complete the stop string)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


# ----------------------------------------------------------------------------------------------- the model


class InferenceModel:
    """A base causal LM plus named adapters. Thread-safe: every model call holds `self.lock`.

    Build it with `InferenceModel.load(...)`.
    """

    def __init__(self, model: Any, tokenizer: Any, *, base_path: Path, adapter_roots: Sequence[Path] | None = None,
                 template: str = "auto"):
        self.model = model  # the transformers model; LoRA layers are injected into it in place
        self.tokenizer = tokenizer
        self.base_path = base_path
        self.adapter_roots = [Path(r) for r in adapter_roots] if adapter_roots else None
        self.template = template
        self.base_system_prompt: str | None = None  # from a full/freeze run's config.yaml
        self.lock = threading.RLock()
        self._lora: Any = None  # one PeftModel holding every LoRA adapter
        self._prompt_models: dict[str, Any] = {}  # internal name -> PeftModel (prompt learning)
        self._adapters: dict[str, AdapterInfo] = {}
        self._versions: dict[str, int] = {}
        self.device = next(model.parameters()).device
        self._end_ids = end_token_ids(tokenizer, model.generation_config, template)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self._end_ids[0]

    # --- construction -----------------------------------------------------------------------------

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

        base_str = str(base)
        if Path(base_str).is_dir() and (Path(base_str) / "adapter_config.json").is_file():
            run_base = read_run_config(Path(base_str)).get("base_model", "the run's base_model")
            raise ModelError([Problem("base", "this folder is an adapter, not a model", value=base_str,
                                      fix=f"--base {run_base} --adapter NAME={base_str}")])
        base_path = resolve_model_path(base_str)
        run_cfg = read_run_config(base_path)  # a full/freeze run dir carries its template
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        elif dtype in dtypes:
            torch_dtype = dtypes[dtype]
        else:
            raise ModelError([Problem("dtype", "unknown dtype", value=dtype, allowed="auto, " + ", ".join(dtypes))])
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
        return [BASE] + list(self._adapters)

    def adapter_info(self, name: str) -> AdapterInfo | None:
        return self._adapters.get(name)

    def load_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        """Load a new adapter under `name`.

        Raises:
            ModelError: the name is taken or invalid, or the path is refused (see `resolve_adapter_path`).
        """
        check_adapter_name(name)
        with self.lock:
            if name in self._adapters:
                raise ModelError([Problem("adapter", "an adapter with this name is already loaded", value=name,
                                          fix="unload it first, or replace it")])
            info = self._load_into_peft(name, path)
            self._adapters[name] = info
            return info

    def unload_adapter(self, name: str) -> AdapterInfo:
        """Remove an adapter; requests that name it afterwards get an unknown-adapter error.

        Raises:
            ModelError: no such adapter.
        """
        with self.lock:
            info = self._require(name)
            del self._adapters[name]
            self._drop_from_peft(info)
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
            old = self._require(name)
            new = self._load_into_peft(name, path)
            self._adapters[name] = new
            self._drop_from_peft(old)
            return old, new

    def _require(self, name: str) -> AdapterInfo:
        if name not in self._adapters:
            raise ModelError([Problem("adapter", "no adapter with this name is loaded", value=name,
                                      allowed=", ".join(self.adapter_names),
                                      fix=suggestion(name, self.adapter_names))])
        return self._adapters[name]

    def _load_into_peft(self, name: str, path: str | Path) -> AdapterInfo:
        from peft import PeftConfig, PeftModel

        resolved = resolve_adapter_path(path, self.adapter_roots, key=f"adapter `{name}`")
        version = self._versions.get(name, 0) + 1
        internal = f"{name}@{version}"
        try:
            config = PeftConfig.from_pretrained(str(resolved))
        except Exception as err:  # a malformed adapter_config.json is a user file problem
            raise ModelError([Problem(f"adapter `{name}`", f"cannot read adapter_config.json: {err}", value=str(resolved))]) from err
        peft_type = str(getattr(config.peft_type, "value", config.peft_type))
        run_cfg = read_run_config(resolved)
        if run_cfg.get("method") in ("full", "freeze"):
            raise ModelError([Problem(f"adapter `{name}`", "a full/freeze run is a complete model", value=str(resolved),
                                      fix=f"use it as the base model: --base {resolved}")])
        try:
            if config.is_prompt_learning:
                # A separate thin wrapper around the same base weights (PEFT cannot mix types in one PeftModel).
                wrapper = PeftModel.from_pretrained(self.model, str(resolved), adapter_name=internal)
                self._prompt_models[internal] = wrapper.eval()
            elif peft_type == "LORA":
                if self._lora is None:
                    self._lora = PeftModel.from_pretrained(self.model, str(resolved), adapter_name=internal).eval()
                else:
                    self._lora.load_adapter(str(resolved), adapter_name=internal)
            else:
                raise ModelError([Problem(f"adapter `{name}`", "unsupported adapter type", value=peft_type,
                                          allowed="LORA, PREFIX_TUNING, P_TUNING, PROMPT_TUNING")])
        except LoraforgeError:
            raise
        except (RuntimeError, ValueError, KeyError) as err:  # shape mismatch = trained on another base model
            raise ModelError([Problem(f"adapter `{name}`", f"does not fit the base model {self.base_path}: {err}".splitlines()[0][:400],
                                      value=str(resolved), fix=f"use the base it was trained on ({config.base_model_name_or_path})")]) from err
        self._versions[name] = version
        return AdapterInfo(name=name, path=resolved, internal_name=internal, peft_type=peft_type,
                           prompt_learning=bool(config.is_prompt_learning),
                           template=str(run_cfg.get("template") or self.template),
                           system_prompt=run_cfg.get("system_prompt"))

    def _drop_from_peft(self, info: AdapterInfo) -> None:
        if info.prompt_learning:
            self._prompt_models.pop(info.internal_name, None)
            return
        if self._lora is None:
            return
        if len(self._lora.peft_config) == 1:
            # Deleting PEFT's last adapter leaves a PeftModel with no active adapter; take the LoRA layers out
            # instead, which restores the plain base modules in place.
            self._lora.unload()
            self._lora = None
        else:
            if info.internal_name in self._lora.active_adapters:  # PEFT would warn and pick one itself
                other = next(n for n in self._lora.peft_config if n != info.internal_name)
                self._lora.set_adapter(other, inference_mode=True)
            self._lora.delete_adapter(info.internal_name)

    # --- prompts ------------------------------------------------------------------------------------

    def prompt_ids(self, messages_or_prompt: PromptLike, adapter: str = BASE) -> list[int]:
        """A list of messages is rendered with the chat template used to train `adapter`; a string is raw text
        continued as-is (OpenAI `completions` semantics; wrap it as a user message to chat)."""
        if isinstance(messages_or_prompt, str):
            return list(self.tokenizer(messages_or_prompt, add_special_tokens=False)["input_ids"])
        info = self._adapters.get(adapter)
        template = info.template if info else self.template
        system = info.system_prompt if info else self.base_system_prompt
        return render_prompt_ids(self.tokenizer, messages_or_prompt, template, system)

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
            infos = [None if n == BASE else self._require(n) for n in names]
            batch_rows = [i for i, info in enumerate(infos) if info is None or not info.prompt_learning]
            ids = [self.prompt_ids(prompts[i], names[i]) for i in range(len(prompts))]
            if batch_rows:
                row_adapters = [infos[i].internal_name if infos[i] else _PEFT_BASE for i in batch_rows]
                outs = self._generate_ids([ids[i] for i in batch_rows], row_adapters, settings)
                for i, out in zip(batch_rows, outs):
                    results[i] = self._finish(ids[i], out, settings, names[i])
            for i, info in enumerate(infos):
                if results[i] is None:
                    out = self._generate_ids([ids[i]], [info.internal_name], settings)[0]
                    results[i] = self._finish(ids[i], out, settings, names[i])
        return [r for r in results if r is not None]

    def stream(self, messages_or_prompt: PromptLike, adapter: str = BASE,
               settings: GenerationSettings | None = None) -> "TextStream":
        """Generate with `adapter`, yielding text deltas as tokens arrive. After the iteration ends,
        `.result` holds the full `GenerationResult`. Closing the stream early stops generation.

        Raises (at call time, before any text):
            ModelError: unknown adapter; LoraforgeError: invalid settings.
        """
        settings = settings or GenerationSettings()
        settings.validate()
        with self.lock:  # validate the name now, so the caller gets the error before streaming starts
            info = None if adapter == BASE else self._require(adapter)
            ids = self.prompt_ids(messages_or_prompt, adapter)
        return TextStream(self, ids, adapter, settings, info)

    # --- internals ----------------------------------------------------------------------------------

    def _generation_config(self, settings: GenerationSettings) -> Any:
        from transformers import GenerationConfig

        kw: dict[str, Any] = dict(max_new_tokens=settings.max_new_tokens, eos_token_id=self._end_ids,
                                  pad_token_id=self._pad_id, use_cache=True)  # prefix tuning needs the cache (FINDINGS 6)
        if settings.greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=None)
        return GenerationConfig(**kw)

    def _generate_ids(self, rows: list[list[int]], internal_names: list[str], settings: GenerationSettings,
                      streamer: Any = None, stopping: Any = None) -> list[list[int]]:
        """Run `generate` on left-padded rows (caller holds the lock); returns each row's new token ids,
        cut after the first end token."""
        import torch

        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        kwargs: dict[str, Any] = dict(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                      generation_config=self._generation_config(settings), streamer=streamer)
        if settings.stop:
            kwargs.update(stop_strings=list(settings.stop), tokenizer=self.tokenizer)
        if stopping is not None:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([stopping])
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        unique = set(internal_names)
        with torch.inference_mode():
            if unique == {_PEFT_BASE}:
                ctx = self._lora.disable_adapter() if self._lora is not None else nullcontext()
                with ctx:
                    out = self.model.generate(**kwargs)
            elif len(unique) == 1 and next(iter(unique)) in self._prompt_models:
                ctx = self._lora.disable_adapter() if self._lora is not None else nullcontext()
                with ctx:
                    out = self._prompt_models[next(iter(unique))].generate(**kwargs)
            elif len(unique) == 1:
                self._lora.set_adapter(next(iter(unique)), inference_mode=True)
                out = self._lora.generate(**kwargs)
            else:
                out = self._lora.generate(**kwargs, adapter_names=list(internal_names))
        new = out[:, width:].tolist()
        ends = set(self._end_ids)
        result = []
        for row in new:
            cut = next((j + 1 for j, t in enumerate(row) if t in ends), len(row))
            result.append(row[:cut])
        return result

    def _finish(self, prompt: list[int], new: list[int], settings: GenerationSettings, adapter: str) -> GenerationResult:
        ended = bool(new) and new[-1] in self._end_ids
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        text, hit_stop = _cut_at_stop(text, settings.stop)
        reason = "stop" if ended or hit_stop else "length"
        return GenerationResult(text=text, prompt_tokens=len(prompt), completion_tokens=len(new),
                                finish_reason=reason, adapter=adapter)


class _Cancelled:
    """A stopping criterion that ends generation when the stream's consumer goes away."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: "torch.Tensor", scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class TextStream:
    """Iterator of text deltas from a generation running in a worker thread (which holds the model lock).

    Text is decoded from all tokens so far and only the stable part is emitted: an incomplete UTF-8
    character (decoded as U+FFFD) or the beginning of a stop string is held back until the next token.
    """

    def __init__(self, model: InferenceModel, prompt: list[int], adapter: str, settings: GenerationSettings,
                 info: AdapterInfo | None):
        self._model, self._prompt, self._adapter, self._settings = model, prompt, adapter, settings
        self._queue: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self.result: GenerationResult | None = None
        self._iter = self._run(info)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._iter)

    def close(self) -> None:
        """Stop generating (the worker finishes its current token and releases the lock)."""
        self._cancel.set()
        self._iter.close()

    def _worker(self, info: AdapterInfo | None) -> None:
        model = self._model

        class _Streamer:  # transformers' BaseStreamer protocol: put(first the prompt, then each new token), end()
            first = True

            def put(inner, value: Any) -> None:
                if inner.first:
                    inner.first = False
                    return
                self._queue.put(("tokens", value.reshape(-1).tolist()))

            def end(inner) -> None:
                pass

        try:
            with model.lock:
                if info is not None and model._adapters.get(info.name) is not info:
                    # replaced or unloaded between the call and the start: use what the name points at now
                    info = model._adapters.get(info.name)
                    if info is None:
                        raise ModelError([Problem("adapter", "adapter was unloaded", value=self._adapter)])
                internal = info.internal_name if info else _PEFT_BASE
                new = model._generate_ids([self._prompt], [internal], self._settings, streamer=_Streamer(),
                                          stopping=_Cancelled(self._cancel))[0]
            self._queue.put(("done", new))
        except BaseException as err:  # re-raised in the consumer's thread
            self._queue.put(("error", err))

    def _run(self, info: AdapterInfo | None) -> Iterator[str]:
        tokenizer, stops = self._model.tokenizer, self._settings.stop
        end_ids = set(self._model._end_ids)
        thread = threading.Thread(target=self._worker, args=(info,), daemon=True, name="loraforge-generate")
        thread.start()
        tokens: list[int] = []
        sent = ""
        try:
            while True:
                kind, payload = self._queue.get()
                if kind == "error":
                    raise payload
                if kind == "done":
                    final = self._model._finish(self._prompt, payload, self._settings, self._adapter)
                    if final.text.startswith(sent) and len(final.text) > len(sent):
                        yield final.text[len(sent):]
                    self.result = final
                    return
                tokens.extend(t for t in payload if t not in end_ids)
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                text, hit = _cut_at_stop(text, stops)
                if hit:
                    self._cancel.set()
                stable = text.rstrip("\ufffd")
                if not hit:
                    stable = stable[: len(stable) - _partial_stop_len(stable, stops)]
                if len(stable) > len(sent) and stable.startswith(sent):
                    delta, sent = stable[len(sent):], stable
                    yield delta
        finally:
            self._cancel.set()
            thread.join(timeout=60)


# ----------------------------------------------------------------------------------------------- chat


CHAT_HELP = """commands:
  /adapter          show the current adapter and the loaded ones
  /adapter NAME     switch adapter (`/adapter base` = no adapter)
  /reset            forget the conversation
  /quit             leave (also Ctrl-D)"""


def chat_repl(model: InferenceModel, input_fn: Callable[[str], str] = input, print_fn: Callable[..., None] = print,
              *, adapter: str | None = None, settings: GenerationSettings | None = None,
              system_prompt: str | None = None) -> list[Message]:
    """Interactive chat: each line is a user turn answered (streamed) with the current adapter.

    Starts on `adapter`, or on the first loaded adapter, or on `base`. Returns the final history.
    """
    settings = settings or GenerationSettings()
    current = adapter or (model.adapter_names[1] if len(model.adapter_names) > 1 else BASE)
    if current not in model.adapter_names:
        model._require(current)  # raises the unknown-adapter error with the list
    history: list[Message] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    print_fn(f"chatting with adapter `{current}` (loaded: {', '.join(model.adapter_names)}); /help for commands")
    while True:
        try:
            line = input_fn(f"[{current}] > ")
        except (EOFError, KeyboardInterrupt):
            print_fn("")
            return history
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit", "/q"):
                return history
            if cmd == "/reset":
                history = history[:1] if system_prompt else []
                print_fn("conversation cleared")
            elif cmd == "/adapter" and not arg:
                print_fn(f"current: {current}; loaded: {', '.join(model.adapter_names)}")
            elif cmd == "/adapter":
                if arg in model.adapter_names:
                    current = arg
                    print_fn(f"switched to `{current}`")
                else:
                    hint = suggestion(arg, model.adapter_names)
                    print_fn(f"unknown adapter `{arg}`; loaded: {', '.join(model.adapter_names)}" + (f" ({hint})" if hint else ""))
            else:
                print_fn(CHAT_HELP)
            continue
        history.append({"role": "user", "content": line})
        stream = model.stream(history, current, settings)
        for delta in stream:
            print_fn(delta, end="", flush=True)
        print_fn("")
        answer = stream.result.text if stream.result else ""
        history.append({"role": "assistant", "content": answer})

