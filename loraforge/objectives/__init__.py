"""Training objectives: one module each, one record each (`base.Objective`), and the one place that maps a run
config to its objective.

Today the task type decides (`TASK_OBJECTIVES`); an objective that does not follow from the task type (a
preference stage: DPO, ORPO, SimPO, KTO on a CAUSAL_LM run) is a new module with its record, one line in
`OBJECTIVES`, and its config key read by `objective_for`. See docs/ARCHITECTURE.md, "Adding an objective".

Importing this package imports torch (the loss modules are `nn.Module`s); the config and data layers never do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loraforge.errors import ConfigError, DataError, Problem
from loraforge.objectives import contrastive, dpo, kto, model_loss, orpo, sft, simpo
from loraforge.objectives.base import Objective

if TYPE_CHECKING:
    from loraforge.config import RunConfig

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (sft.OBJECTIVE, model_loss.SEQ2SEQ, model_loss.SEQ_CLS,
                                                         model_loss.TOKEN_CLS, model_loss.EXTRACTIVE_QA,
                                                         contrastive.OBJECTIVE, dpo.OBJECTIVE, orpo.OBJECTIVE,
                                                         simpo.OBJECTIVE, kto.OBJECTIVE)}

# `stage` → objective name: preference stages train a CAUSAL_LM run on pairs (or KTO's unpaired rows).
STAGE_OBJECTIVES: dict[str, str] = {"dpo": "dpo", "orpo": "orpo", "simpo": "simpo", "kto": "kto"}

# task_type → objective name. TEXT_TO_IMAGE has its own recipe (loraforge.image) and no entry here.
TASK_OBJECTIVES: dict[str, str] = {
    "CAUSAL_LM": "sft",
    "SEQ_2_SEQ_LM": "seq2seq",
    "SEQ_CLS": "seq_cls",
    "TOKEN_CLS": "token_cls",
    "QUESTION_ANSWERING": "extractive_qa",
    "FEATURE_EXTRACTION": "contrastive",
}


def objective_for(cfg: RunConfig) -> Objective:
    """The objective a text run trains with.

    Raises:
        DataError: a task type without a text training objective (text-to-image has its own recipe).
        ConfigError: a preference `stage` on a task type other than CAUSAL_LM.
    """
    task = getattr(cfg.task_type, "value", cfg.task_type)
    stage = getattr(cfg, "stage", "sft")
    if stage != "sft":
        if task != "CAUSAL_LM":
            raise ConfigError([Problem("stage", "preference stages train causal LMs only", value=stage,
                                       allowed="sft with this task type", fix="set `task_type: CAUSAL_LM` or "
                                       "`stage: sft`")])
        return OBJECTIVES[STAGE_OBJECTIVES[stage]]
    name = TASK_OBJECTIVES.get(task)
    if name is None:
        fix = "text-to-image data is read by the image recipe (`loraforge.image`), not here" \
            if task == "TEXT_TO_IMAGE" else "use `task_type: CAUSAL_LM` with chat/alpaca data"
        raise DataError([Problem("task_type", "loraforge has no text data pipeline for this task type", value=task,
                                 allowed=", ".join(TASK_OBJECTIVES), fix=fix)])
    return OBJECTIVES[name]


def build_data(cfg: RunConfig, tokenizer: Any):
    """Encoded train (and validation) examples of `cfg`'s objective, with their `DataStats`.

    Raises:
        DataError: see `objective_for` and the objective's data builder (missing files, bad rows, …).
    """
    return objective_for(cfg).build_data(cfg, tokenizer)


__all__ = ["OBJECTIVES", "Objective", "STAGE_OBJECTIVES", "TASK_OBJECTIVES", "build_data", "objective_for"]
