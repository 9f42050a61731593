"""Fine-tuning methods: one module each, one record each, one registry.

Each `loraforge/methods/<name>.py` exports `METHOD`, a `base.Method` holding all the rest of loraforge needs to
know about it (apply, load-time kwargs, preflight check, whether it saves an adapter, its parameter estimate, its
rules on what trains, its post-build training steps, and — through `options` — its config side). `METHODS` maps
the `method:` value to that record; adding a method is a new module and one line below (and its config side in
`loraforge/config/methods.py`; see docs/ARCHITECTURE.md).

Importing this package imports no torch or peft: the modules import them inside their functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loraforge.errors import ConfigError, Problem
from loraforge.methods import freeze, full, lora, prefix, prompt, ptuning, qlora
from loraforge.methods.base import Method
from loraforge.methods.report import nothing_trainable

if TYPE_CHECKING:
    from torch import nn

    from loraforge.config import RunConfig
    from loraforge.methods.report import TrainableReport

METHODS: dict[str, Method] = {m.name: m for m in (lora.METHOD, qlora.METHOD, prefix.METHOD, ptuning.METHOD,
                                                   prompt.METHOD, freeze.METHOD, full.METHOD)}


def method_for(cfg: RunConfig) -> Method:
    """The record of `cfg.method`.

    Raises:
        ConfigError: the config names a method no record is registered for (a config option without a method
            module: a broken installation or a half-registered method).
    """
    try:
        return METHODS[cfg.method]
    except KeyError:
        raise ConfigError([Problem("method", "no method module is registered under this name", value=cfg.method,
                                   allowed=", ".join(METHODS),
                                   fix="register its record in loraforge.methods.METHODS")]) from None


def apply_method(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Apply `cfg.method` to `model` and return the model to train."""
    return method_for(cfg).apply(model, cfg)


def is_adapter_method(method: str) -> bool:
    """True when the run saves a PEFT adapter (else a complete model); unknown names are not adapters."""
    record = METHODS.get(method)
    return record is not None and record.saves_adapter


def verify_trainable(report: TrainableReport, cfg: RunConfig) -> list[Problem]:
    """Problems when the built model does not train what the config asked for: nothing trains at all, or the
    method's own rule (`Method.verify`) fails."""
    return nothing_trainable(report, cfg) or method_for(cfg).verify(report, cfg)


__all__ = ["METHODS", "Method", "apply_method", "is_adapter_method", "method_for", "verify_trainable"]
