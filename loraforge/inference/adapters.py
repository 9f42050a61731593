"""The adapters loaded onto one base model, and which module runs a row for a given adapter.

LoRA adapters live side by side in one `PeftModel` (PEFT keeps each adapter's A/B matrices under its own name),
so switching costs nothing and several adapters can even share one batch through PEFT's per-row
`adapter_names`. Prompt-learning adapters (prefix / P-tuning / prompt tuning) cannot share a `PeftModel` with
LoRA ones (PEFT refuses mixed types), so each gets its own thin wrapper around the same base weights; while one
runs, the LoRA layers are disabled.

Each load gets a versioned internal PEFT name (`cardiology@2`), so a replaced adapter's new weights can be
loaded beside the old ones before the public name points at them. `AdapterPool` is not locked itself: its
owner (`InferenceModel`) calls it under the model lock.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from loraforge.errors import LoraforgeError, ModelError, Problem, suggestion
from loraforge.inference.adapter_files import read_run_config, resolve_adapter_path
from loraforge.inference.settings import BASE, PEFT_BASE


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


class AdapterPool:
    """Named adapters on one base model (whose modules PEFT changes in place). The caller holds the lock."""

    def __init__(self, model: Any, base_path: Path, roots: Sequence[Path] | None = None):
        self.model = model
        self.base_path = base_path
        self.roots = [Path(r) for r in roots] if roots else None
        self.infos: dict[str, AdapterInfo] = {}  # public name -> the version it serves, in load order
        self._lora: Any = None  # one PeftModel holding every LoRA adapter
        self._prompt_models: dict[str, Any] = {}  # internal name -> PeftModel (prompt learning)
        self._versions: dict[str, int] = {}

    @property
    def names(self) -> list[str]:
        """`base` followed by the loaded adapters' public names, in load order."""
        return [BASE] + list(self.infos)

    def require(self, name: str) -> AdapterInfo:
        """Raises:
            ModelError: no adapter with this name (the loaded ones listed, with a "did you mean").
        """
        if name not in self.infos:
            raise ModelError([Problem("adapter", "no adapter with this name is loaded", value=name,
                                      allowed=", ".join(self.names), fix=suggestion(name, self.names))])
        return self.infos[name]

    def internal_name(self, name: str) -> str:
        """The PEFT adapter name that public `name` points at now (PEFT's base marker for `base`)."""
        return PEFT_BASE if name == BASE else self.require(name).internal_name

    # --- loading and unloading ----------------------------------------------------------------------

    def load(self, name: str, path: str | Path, default_template: str) -> AdapterInfo:
        """Read the adapter at `path` into PEFT under a new version of `name`; the name does not point at it
        yet (the caller assigns `infos[name]`, which makes a replacement atomic).

        Raises:
            ModelError: the path is refused, the config is unreadable, the type is unsupported, or the weights
                do not fit the base model.
        """
        from peft import PeftConfig

        from loraforge.models.fit import check_adapter_fits

        resolved = resolve_adapter_path(path, self.roots, key=f"adapter `{name}`")
        check_adapter_fits(resolved, self.base_path, key=f"adapter `{name}`")  # recorded base, shapes, coverage
        version = self._versions.get(name, 0) + 1
        internal = f"{name}@{version}"
        try:
            config = PeftConfig.from_pretrained(str(resolved))
        except Exception as err:  # a malformed adapter_config.json is a user file problem
            raise ModelError([Problem(f"adapter `{name}`", f"cannot read adapter_config.json: {err}", value=str(resolved))]) from err
        peft_type = str(getattr(config.peft_type, "value", config.peft_type))
        run_cfg = read_run_config(resolved)
        if _saves_complete_model(run_cfg.get("method")):
            raise ModelError([Problem(f"adapter `{name}`", "a full/freeze run is a complete model", value=str(resolved),
                                      fix=f"use it as the base model: --base {resolved}")])
        self._read_weights(name, resolved, internal, config, peft_type)
        self._versions[name] = version
        return AdapterInfo(name=name, path=resolved, internal_name=internal, peft_type=peft_type,
                           prompt_learning=bool(config.is_prompt_learning),
                           template=str(run_cfg.get("template") or default_template),
                           system_prompt=run_cfg.get("system_prompt"))

    def _read_weights(self, name: str, resolved: Path, internal: str, config: Any, peft_type: str) -> None:
        """Load the weights into the shared LoRA PeftModel, or into a prompt-learning wrapper of its own.

        Raises:
            ModelError: an unsupported adapter type, or weights of another base model (shape mismatch).
        """
        from peft import PeftModel

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

    def drop(self, info: AdapterInfo) -> None:
        """Remove one loaded version's weights from PEFT (the public name is the caller's business)."""
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

    # --- running ------------------------------------------------------------------------------------

    @contextmanager
    def select(self, internal_names: Sequence[str]) -> Iterator[tuple[Any, dict[str, Any]]]:
        """The module that runs rows with these internal adapter names, and the extra keyword arguments its
        `generate` / forward needs: (module, kwargs).

        One name for every row: the plain model with LoRA disabled (`base`), the prompt-learning wrapper with
        LoRA disabled, or the LoRA PeftModel with that adapter active. Several names (LoRA and base only): the
        LoRA PeftModel with PEFT's per-row `adapter_names`.
        """
        unique = set(internal_names)
        only = next(iter(unique)) if len(unique) == 1 else None
        if only == PEFT_BASE:
            with self._lora_off():
                yield self.model, {}
        elif only is not None and only in self._prompt_models:
            with self._lora_off():
                yield self._prompt_models[only], {}
        elif only is not None:
            self._lora.set_adapter(only, inference_mode=True)
            yield self._lora, {}
        else:
            yield self._lora, {"adapter_names": list(internal_names)}

    def _lora_off(self) -> Any:
        """A context in which the LoRA layers (if any are loaded) compute the plain base model."""
        return self._lora.disable_adapter() if self._lora is not None else nullcontext()


def _saves_complete_model(method: str | None) -> bool:
    """True for a loraforge run dir whose method saves a complete model (full, freeze), not an adapter."""
    from loraforge.methods import METHODS, is_adapter_method

    return method in METHODS and not is_adapter_method(method)
