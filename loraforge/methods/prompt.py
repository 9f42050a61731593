"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691) through PEFT: `num_virtual_tokens` trainable input
embeddings are prepended to every sequence; the model itself stays frozen.

Initialization: `random`, or `text` — the embeddings of `prompt_tuning_init_text` (repeated or cut to
`num_virtual_tokens`), which the paper finds trains faster than random vectors.

This module also holds what the three PEFT prompt-learning methods (prompt, ptuning, prefix) share: the PEFT
task-type name and the measured list of method × architecture × task-type combinations that are broken with
the installed transformers/peft, reported by preflight instead of crashing (or silently mis-training) mid-run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loraforge.config.methods import PROMPT
from loraforge.errors import ConfigError, Problem
from loraforge.methods.base import Method, ModelShape, ParamEstimate
from loraforge.methods.common import peft_task_type

if TYPE_CHECKING:
    from torch import nn

    from loraforge.config import RunConfig
    from loraforge.methods.report import TrainableReport

# Virtual tokens lengthen the sequence (prompt, ptuning) — unlike prefix tuning, which adds keys/values only.
LENGTHENS_SEQUENCE = ("prompt", "ptuning")


def model_kind_of(hf_config: Any) -> str:
    """decoder-only / encoder-decoder / encoder-only (the registry's answer; a config flag as a fallback)."""
    try:
        from loraforge.models.registry import model_kind

        return model_kind(hf_config)
    except Exception:  # noqa: BLE001 - an unknown model is preflight's own problem; here we only need a guess
        return "encoder-decoder" if getattr(hf_config, "is_encoder_decoder", False) else "decoder-only"


def prompt_learning_problems(cfg: RunConfig, hf_config: Any, *, task_fit: bool = True) -> list[Problem]:
    """Combinations measured broken with transformers 5.23 / peft 0.21 (tiny LLaMA, GPT-2, T5 and BART models).

    - encoder-decoder model with any task type but SEQ_2_SEQ_LM: PEFT passes `inputs_embeds` / past key values
      the seq2seq classification, QA and bare models reject (shape errors, "input embeddings not supported").
    - prompt / ptuning with TOKEN_CLS or QUESTION_ANSWERING: PEFT prepends the virtual tokens to the logits but
      not to the labels (TOKEN_CLS: a batch-size mismatch) or the answer positions (QA: trains silently on
      positions shifted by `num_virtual_tokens`).
    - prompt / ptuning with SEQ_CLS on a decoder-only model: PEFT calls the model with `inputs_embeds`, so the
      classifier cannot find the last real token and pools whatever sits at the last position (a pad token in
      a right-padded batch) — transformers only warns.
    - prefix on multi-query Falcon (falcon-7b style: `multi_query` without `new_decoder_architecture`): PEFT
      builds one key/value head per attention head, the model has one — a shape error at the first forward.
    - SEQ_2_SEQ_LM on a decoder-only model (FINDINGS traps 4 and 6) — only with `task_fit`: preflight's own
      task-type check (`models.registry.check_task_type`) already reports it for every method.
    """
    from loraforge.config import TaskType

    method, task = cfg.method, cfg.task_type
    kind = model_kind_of(hf_config)
    model_type = getattr(hf_config, "model_type", None)
    problems: list[Problem] = []
    if kind == "encoder-decoder" and task is not TaskType.SEQ_2_SEQ_LM:
        problems.append(Problem(
            "task_type", f"{method} on an encoder-decoder model ({model_type}) only works for SEQ_2_SEQ_LM with "
            "the installed peft/transformers", value=task.value, allowed="SEQ_2_SEQ_LM",
            fix="use `method: lora` for this task, or `task_type: SEQ_2_SEQ_LM`"))
    if task_fit and task is TaskType.SEQ_2_SEQ_LM and kind == "decoder-only":
        problems.append(Problem(
            "task_type", f"SEQ_2_SEQ_LM needs an encoder-decoder model (T5, BART); {model_type} is decoder-only"
            + (" — prefix tuning crashes at the first forward" if method == "prefix" else ""),
            value=task.value, allowed="CAUSAL_LM", fix="use `task_type: CAUSAL_LM` with this model"))
    if method in LENGTHENS_SEQUENCE and task in (TaskType.TOKEN_CLS, TaskType.QUESTION_ANSWERING):
        problems.append(Problem(
            "method", f"{method} prepends virtual tokens to the outputs but PEFT does not shift the "
            f"{'labels' if task is TaskType.TOKEN_CLS else 'answer positions'} — {task.value} would be mis-trained",
            value=method, allowed="lora, qlora, prefix, freeze, full", fix="use `method: prefix` or `method: lora`"))
    if (method == "prefix" and model_type == "falcon" and getattr(hf_config, "multi_query", False)
            and not getattr(hf_config, "new_decoder_architecture", False)):
        problems.append(Problem(
            "method", "prefix tuning does not fit multi-query Falcon with the installed peft (one key/value head "
            "in the model, one per attention head in the prefix)", value=method,
            allowed="lora, qlora, ptuning, prompt, freeze, full", fix="use `method: lora` or `method: ptuning`"))
    if method in LENGTHENS_SEQUENCE and task is TaskType.SEQ_CLS and kind == "decoder-only":
        problems.append(Problem(
            "method", f"{method} feeds input embeddings, so a decoder-only classifier ({model_type}) cannot find the "
            "last real token and pools a padding position", value=method, allowed="lora, qlora, prefix, freeze, full",
            fix="use `method: prefix` or `method: lora` for SEQ_CLS"))
    return problems


def check(cfg: RunConfig, hf_config: Any) -> list[Problem]:
    """Preflight problems for prompt tuning."""
    problems = prompt_learning_problems(cfg, hf_config, task_fit=False)
    if cfg.prompt_tuning_init == "text" and not cfg.prompt_tuning_init_text:
        problems.append(Problem("prompt_tuning_init_text", "prompt_tuning_init is `text` but no text is given",
                                fix="set `prompt_tuning_init_text: \"Classify the sentiment:\"` or "
                                    "`prompt_tuning_init: random`"))
    return problems


def model_path(model: nn.Module) -> str | None:
    """The local dir the model was loaded from (where its tokenizer lives)."""
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def prompt_config(cfg: RunConfig, model: nn.Module):
    """The `peft.PromptTuningConfig` for this run.

    Raises:
        ConfigError: text init without text.
    """
    from peft import PromptTuningConfig, PromptTuningInit

    kwargs: dict[str, Any] = {}
    if cfg.prompt_tuning_init == "text":
        if not cfg.prompt_tuning_init_text:
            raise ConfigError(check(cfg, model.config)[-1:])
        kwargs = dict(prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=cfg.prompt_tuning_init_text,
                      tokenizer_name_or_path=model_path(model))
    return PromptTuningConfig(task_type=peft_task_type(cfg.task_type), num_virtual_tokens=cfg.num_virtual_tokens,
                              modules_to_save=cfg.modules_to_save, **kwargs)


def apply_prompt_learning(model: nn.Module, cfg: RunConfig, peft_config) -> nn.Module:
    """`get_peft_model` (or continue from `cfg.init_adapter`), refusing known-broken combinations first.

    Raises:
        ConfigError: a combination measured broken (see `prompt_learning_problems`).
    """
    from peft import PeftModel, get_peft_model

    problems = prompt_learning_problems(cfg, model.config)
    if problems:
        raise ConfigError(problems, title=f"{cfg.method} cannot train this model/task combination")
    if cfg.init_adapter is not None:
        return PeftModel.from_pretrained(model, str(cfg.init_adapter), is_trainable=True)
    return get_peft_model(model, peft_config)


def verify_prompt_learning(report: TrainableReport, cfg: RunConfig) -> list[Problem]:
    """Prefix / P-tuning / prompt tuning: only the virtual-token parameters (and saved task heads) train."""
    stray = sorted(set(report.trained_kinds) - {"prompt", "saved_module"})
    if not stray:
        return []
    return [Problem("method", f"base weights are trainable in a {cfg.method} run: {', '.join(stray)}",
                    value=cfg.method)]


def virtual_token_estimate(new_params: int) -> ParamEstimate:
    """What the three prompt-learning methods share: no base weight trains, but the virtual tokens make every
    layer's input need gradients, and PEFT's forward (not the fused LM-head loss) computes the logits."""
    return ParamEstimate(new_params=new_params, every_layer_needs_grad=True, fused_lm_head=False)


def estimate_params(cfg: RunConfig, shape: ModelShape) -> ParamEstimate:
    """`num_virtual_tokens` embeddings of the hidden size."""
    return virtual_token_estimate(cfg.num_virtual_tokens * shape.dims["hidden"])


def apply(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Prompt tuning: trainable virtual-token embeddings, everything else frozen (a SEQ_CLS head trains too,
    saved through PEFT's `modules_to_save`)."""
    return apply_prompt_learning(model, cfg, prompt_config(cfg, model))


METHOD = Method(
    options=PROMPT,
    apply=apply,
    saves_adapter=True,
    estimate_params=estimate_params,
    verify=verify_prompt_learning,
    check=check,
)
