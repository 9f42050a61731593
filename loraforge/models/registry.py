"""Model families: what kind of model a config describes, its query/value LoRA names, and which task types fit.

Everything here works from the Hugging Face config alone (no weights, no model build), so a wrong `task_type`
is refused in milliseconds. The transformers auto mappings are the source of truth for which Auto class exists
for a `model_type`; the family table adds what transformers cannot tell us (remote-code families, default
names, fused QKV names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from loraforge.config.schema import TaskType
from loraforge.errors import ModelError, Problem

ModelKind = Literal["decoder-only", "encoder-decoder", "encoder-only"]


@dataclass(frozen=True)
class Family:
    """A model family and the facts loraforge needs about it.

    Attributes:
        name: short name shown to users (`llama`, `chatglm`).
        model_types: the `model_type` values in config.json that belong to this family.
        kind: decoder-only, encoder-decoder or encoder-only.
        qv_targets: the query and value projections (or the one fused QKV layer): the `qv` preset, LoRA's
            original choice. Left out, `target_modules` means every linear layer of the blocks instead
            (`models/targets.py`).
        fused_qkv: leaf names of a single layer that computes query, key and value together.
        remote_code_modules: for families whose modelling code ships with the checkpoint (trust_remote_code),
            the linear leaf names of that code, so target_modules can be checked when the code cannot run.
        architectures: `architectures` entries that identify the family when `model_type` is ambiguous.
        converts_to: the native transformers architecture a checkpoint of this remote-code family is converted
            to (`loraforge convert`, automatic as base_model; `models/native/`), or "" when it has none.
    """

    name: str
    model_types: tuple[str, ...]
    kind: ModelKind
    qv_targets: tuple[str, ...]
    fused_qkv: tuple[str, ...] = ()
    remote_code_modules: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    converts_to: str = ""

    @property
    def needs_remote_code(self) -> bool:
        return bool(self.remote_code_modules)


# Model types whose attention honours per-example position_ids in a packed row (transformers builds the
# block-diagonal mask from position_ids when use_cache=False; FINDINGS trap 2). ALiBi models (bloom, falcon
# with alibi) and learned absolute positions without that path are not in the list: they are never packed.
PACKABLE_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma",
                                  "gemma2", "gemma3_text", "phi3", "glm", "glm4", "olmo", "olmo2", "smollm3", "granite",
                                  "starcoder2", "cohere"})


# Module names were measured on tiny random models built from configs (transformers 5.23, see FINDINGS.md);
# the remote-code ones come from the published modelling files of each checkpoint.
FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), "decoder-only", ("q_proj", "v_proj")),
    Family("mistral", ("mistral", "mixtral"), "decoder-only", ("q_proj", "v_proj")),
    Family("qwen", ("qwen",), "decoder-only", ("c_attn",), fused_qkv=("c_attn",),
           remote_code_modules=("c_attn", "c_proj", "w1", "w2", "lm_head"), architectures=("QWenLMHeadModel",),
           converts_to="Qwen2ForCausalLM"),
    Family("qwen2", ("qwen2",), "decoder-only", ("q_proj", "v_proj")),
    Family("qwen3", ("qwen3",), "decoder-only", ("q_proj", "v_proj")),
    # ChatGLM2/3 and the remote-code GLM-4 share model_type `chatglm`; their code registers AutoModelForSeq2SeqLM
    # although the model is decoder-only — the root of the SEQ_2_SEQ_LM mistake the preflight refuses.
    Family("chatglm", ("chatglm",), "decoder-only", ("query_key_value",), fused_qkv=("query_key_value",),
           remote_code_modules=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "output_layer"),
           architectures=("ChatGLMModel", "ChatGLMForConditionalGeneration"), converts_to="GlmForCausalLM"),
    # transformers' native GLM / GLM-4 (the `-hf` checkpoints): split q/k/v, fused gate_up.
    Family("glm", ("glm", "glm4"), "decoder-only", ("q_proj", "v_proj")),
    Family("baichuan", ("baichuan",), "decoder-only", ("W_pack",), fused_qkv=("W_pack",),
           remote_code_modules=("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"),
           architectures=("BaichuanForCausalLM", "BaiChuanForCausalLM"), converts_to="LlamaForCausalLM"),
    Family("internlm2", ("internlm2",), "decoder-only", ("wqkv",), fused_qkv=("wqkv",),
           remote_code_modules=("wqkv", "wo", "w1", "w2", "w3", "output"), architectures=("InternLM2ForCausalLM",)),
    Family("gpt2", ("gpt2",), "decoder-only", ("c_attn",), fused_qkv=("c_attn",)),
    Family("gpt_bigcode", ("gpt_bigcode",), "decoder-only", ("c_attn",), fused_qkv=("c_attn",)),
    Family("gpt_neox", ("gpt_neox",), "decoder-only", ("query_key_value",), fused_qkv=("query_key_value",)),
    Family("bloom", ("bloom",), "decoder-only", ("query_key_value",), fused_qkv=("query_key_value",)),
    Family("falcon", ("falcon", "RefinedWeb", "RefinedWebModel"), "decoder-only", ("query_key_value",),
           fused_qkv=("query_key_value",)),
    Family("mpt", ("mpt",), "decoder-only", ("Wqkv",), fused_qkv=("Wqkv",)),
    Family("opt", ("opt",), "decoder-only", ("q_proj", "v_proj")),
    Family("phi", ("phi",), "decoder-only", ("q_proj", "v_proj")),
    Family("phi3", ("phi3",), "decoder-only", ("qkv_proj",), fused_qkv=("qkv_proj",)),
    Family("gemma", ("gemma", "gemma2", "gemma3", "gemma3_text"), "decoder-only", ("q_proj", "v_proj")),
    Family("t5", ("t5", "mt5", "umt5"), "encoder-decoder", ("q", "v")),
    Family("bart", ("bart", "mbart"), "encoder-decoder", ("q_proj", "v_proj")),
    Family("bert", ("bert", "roberta", "xlm-roberta", "electra", "camembert"), "encoder-only", ("query", "value")),
    Family("deberta-v2", ("deberta-v2",), "encoder-only", ("query_proj", "value_proj")),
    Family("deberta", ("deberta",), "encoder-only", ("in_proj",), fused_qkv=("in_proj",)),
    Family("distilbert", ("distilbert",), "encoder-only", ("q_lin", "v_lin")),
)

# Encoder-only model types that transformers also maps to a *ForCausalLM (BertLMHeadModel…): the causal-LM
# mapping alone would call them decoder-only.
ENCODER_ONLY_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "deberta", "deberta-v2", "electra", "distilbert", "albert",
    "camembert", "modernbert", "mpnet", "ernie", "megatron-bert", "rembert", "roformer", "xmod", "data2vec-text",
    "nomic_bert", "esm", "funnel", "squeezebert", "mobilebert", "convbert", "layoutlm",
})

# What each kind of model can be trained for. The per-model list is this intersected with the Auto classes
# transformers registers for its model_type (see supported_task_types).
_KIND_TASKS: dict[str, tuple[TaskType, ...]] = {
    "decoder-only": (TaskType.CAUSAL_LM, TaskType.SEQ_CLS, TaskType.TOKEN_CLS, TaskType.QUESTION_ANSWERING,
                     TaskType.FEATURE_EXTRACTION),
    # T5 also has T5ForTokenClassification; BART has none — the auto mapping decides per model.
    "encoder-decoder": (TaskType.SEQ_2_SEQ_LM, TaskType.SEQ_CLS, TaskType.TOKEN_CLS, TaskType.QUESTION_ANSWERING,
                        TaskType.FEATURE_EXTRACTION),
    "encoder-only": (TaskType.SEQ_CLS, TaskType.TOKEN_CLS, TaskType.QUESTION_ANSWERING, TaskType.FEATURE_EXTRACTION),
}

# TaskType -> (transformers auto-mapping name, Auto class name). The Auto class name is also the key a
# remote-code config.json uses in its `auto_map`.
_TASK_MAPPINGS: dict[TaskType, tuple[str, str]] = {
    TaskType.CAUSAL_LM: ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    TaskType.SEQ_2_SEQ_LM: ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    TaskType.SEQ_CLS: ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification"),
    TaskType.TOKEN_CLS: ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "AutoModelForTokenClassification"),
    TaskType.QUESTION_ANSWERING: ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "AutoModelForQuestionAnswering"),
    TaskType.FEATURE_EXTRACTION: ("MODEL_MAPPING_NAMES", "AutoModel"),
}

_EXAMPLES: dict[str, str] = {
    "decoder-only": "LLaMA, Qwen, ChatGLM, GPT-2",
    "encoder-decoder": "T5, BART",
    "encoder-only": "BERT, RoBERTa",
}


def _get(hf_config: Any, key: str, default: Any = None) -> Any:
    """Read a config attribute; works for PreTrainedConfig objects and plain dicts."""
    if isinstance(hf_config, dict):
        return hf_config.get(key, default)
    return getattr(hf_config, key, default)


def family_for(hf_config: Any) -> Family | None:
    """The family of a config, by `model_type` first and then by `architectures` (remote-code checkpoints)."""
    model_type = _get(hf_config, "model_type") or ""
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    archs = _get(hf_config, "architectures") or []
    for fam in FAMILIES:
        if any(a in fam.architectures for a in archs):
            return fam
    return None


def _known_model_type(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


def model_kind(hf_config: Any) -> ModelKind:
    """decoder-only, encoder-decoder or encoder-only, decided from the config alone.

    Raises:
        ModelError: nothing in the config says what kind of text model it is (e.g. a vision-only model).
    """
    from transformers.models.auto import modeling_auto

    model_type = _get(hf_config, "model_type") or ""
    if _get(hf_config, "is_encoder_decoder", False):
        return "encoder-decoder"
    fam = family_for(hf_config)
    if fam is not None:
        return fam.kind
    if model_type in ENCODER_ONLY_TYPES:
        return "encoder-only"
    archs = _get(hf_config, "architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        return "decoder-only"
    if model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder-only"
    if model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES or any(a.endswith("ForMaskedLM") for a in archs):
        return "encoder-only"
    raise ModelError([Problem(
        "base_model", "cannot tell from config.json whether this is a decoder-only, encoder-decoder or encoder-only "
        "text model", value=model_type or None,
        allowed="text models with a causal-LM, seq2seq or masked-LM architecture",
        fix="check that base_model points at a text model")])


def allowed_task_types(kind: ModelKind) -> list[TaskType]:
    """The task types a kind of model can be trained for (before asking transformers about the exact model)."""
    return list(_KIND_TASKS[kind])


def auto_class_task_types(hf_config: Any) -> list[TaskType] | None:
    """Task types transformers (or the checkpoint's remote code, via `auto_map`) has an Auto class for.

    None when unknown: a model_type transformers does not know and a config without `auto_map`.
    """
    from transformers.models.auto import modeling_auto

    model_type = _get(hf_config, "model_type") or ""
    if _known_model_type(model_type):
        return [t for t, (mapping, _) in _TASK_MAPPINGS.items() if model_type in getattr(modeling_auto, mapping)]
    auto_map = _get(hf_config, "auto_map") or {}
    if auto_map:
        return [t for t, (_, cls) in _TASK_MAPPINGS.items() if cls in auto_map]
    return None


def supported_task_types(hf_config: Any) -> list[TaskType]:
    """The task types that fit this model: its kind's list, narrowed to the Auto classes that exist for it."""
    kind_tasks = allowed_task_types(model_kind(hf_config))
    auto = auto_class_task_types(hf_config)
    return kind_tasks if auto is None else [t for t in kind_tasks if t in auto]


def _describe(hf_config: Any) -> str:
    fam = family_for(hf_config)
    model_type = _get(hf_config, "model_type") or "?"
    return f"`{model_type}`" + (f" ({fam.name} family)" if fam and fam.name != model_type else "")


def check_task_type(hf_config: Any, task_type: TaskType) -> list[Problem]:
    """Problems (key `task_type`) when `task_type` does not fit the model; empty when it does.

    A decoder-only model with SEQ_2_SEQ_LM is the classic mistake: in transformers 5 it no longer crashes on
    `decoder_input_ids` but trains on misaligned labels (FINDINGS.md trap 4), so it must be refused here.
    """
    if task_type is TaskType.TEXT_TO_IMAGE:
        return [Problem("task_type", "text-to-image trains a Stable Diffusion pipeline, but base_model is a text model",
                        value=task_type.value, allowed=", ".join(t.value for t in supported_task_types(hf_config)),
                        fix="point base_model at a diffusers pipeline folder, or pick a text task type")]
    kind = model_kind(hf_config)
    name = _describe(hf_config)
    supported = supported_task_types(hf_config)
    allowed = ", ".join(t.value for t in supported)
    if task_type not in _KIND_TASKS[kind]:
        if kind == "decoder-only" and task_type is TaskType.SEQ_2_SEQ_LM:
            note = ""
            auto_map = _get(hf_config, "auto_map") or {}
            if "AutoModelForSeq2SeqLM" in auto_map:
                note = (" (its remote code registers AutoModelForSeq2SeqLM, but the model has no encoder: "
                        "seq2seq training would feed it misaligned labels)")
            return [Problem("task_type", f"{name} is a decoder-only model; SEQ_2_SEQ_LM needs an encoder-decoder "
                            f"model such as {_EXAMPLES['encoder-decoder']}{note}", value=task_type.value,
                            allowed=allowed, fix="set `task_type: CAUSAL_LM` (instruction tuning of a decoder-only "
                            "model is causal language modelling)")]
        if kind == "encoder-decoder" and task_type is TaskType.CAUSAL_LM:
            return [Problem("task_type", f"{name} is an encoder-decoder model; CAUSAL_LM needs a decoder-only model "
                            f"such as {_EXAMPLES['decoder-only']}", value=task_type.value, allowed=allowed,
                            fix="set `task_type: SEQ_2_SEQ_LM`")]
        fix = ("use a decoder-only model (LLaMA, Qwen, SmolLM2) for text generation, or one of: " + allowed
               if kind == "encoder-only" else f"use one of: {allowed}")
        return [Problem("task_type", f"{name} is an {kind} model and cannot be trained for {task_type.value}",
                        value=task_type.value, allowed=allowed, fix=fix)]
    if task_type not in supported:
        auto_cls = _TASK_MAPPINGS[task_type][1]
        where = ("transformers" if _known_model_type(_get(hf_config, "model_type") or "")
                 else "the checkpoint's remote code (config.json `auto_map`)")
        return [Problem("task_type", f"{where} has no {auto_cls} for {name}", value=task_type.value,
                        allowed=allowed, fix=f"use one of: {allowed}")]
    return []
