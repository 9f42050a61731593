"""The typed run config: one flat YAML namespace, as in the article, LLaMA-Factory and axolotl.

Fields are grouped into sections (model, method, data, training, output) by inheritance only so the file
reads in order; the YAML stays flat. Every field has a description (shown by `loraforge config-help` and in
the JSON schema). This module imports no torch: a config can be checked in milliseconds.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loraforge.config.image import ImageOptions
from loraforge.config.methods import METHOD_OPTIONS


class TaskType(str, Enum):
    """What the model is trained to do. PEFT's TaskType names, plus the image route."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    SEQ_CLS = "SEQ_CLS"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANSWERING = "QUESTION_ANSWERING"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"
    TEXT_TO_IMAGE = "TEXT_TO_IMAGE"


# The article's routing values and pipeline-style names, mapped to a TaskType (compared case-insensitively,
# with `-` and `_` treated alike).
TASK_TYPE_ALIASES: dict[str, TaskType] = {
    "text-generation": TaskType.CAUSAL_LM,
    "causal-lm": TaskType.CAUSAL_LM,
    "text2text-generation": TaskType.SEQ_2_SEQ_LM,
    "seq2seq": TaskType.SEQ_2_SEQ_LM,
    "seq-2-seq-lm": TaskType.SEQ_2_SEQ_LM,
    "text-classification": TaskType.SEQ_CLS,
    "seq-cls": TaskType.SEQ_CLS,
    "token-classification": TaskType.TOKEN_CLS,
    "token-cls": TaskType.TOKEN_CLS,
    "question-answering": TaskType.QUESTION_ANSWERING,
    "feature-extraction": TaskType.FEATURE_EXTRACTION,
    "text-to-image": TaskType.TEXT_TO_IMAGE,
    "image-to-image": TaskType.TEXT_TO_IMAGE,  # the article's name for the SD LoRA route
    "stable-diffusion": TaskType.TEXT_TO_IMAGE,
}


def task_type_names() -> list[str]:
    """Every spelling `task_type` accepts, for error messages."""
    return [t.value for t in TaskType if t is not TaskType.TEXT_TO_IMAGE] + list(TASK_TYPE_ALIASES)


def parse_task_type(value: object) -> TaskType:
    """Normalize `text-generation`, `causal_lm`, `CAUSAL_LM`… to a TaskType; ValueError otherwise."""
    if isinstance(value, TaskType):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a string")
    key = value.strip().lower().replace("_", "-")
    for t in TaskType:
        if key == t.value.lower().replace("_", "-"):
            return t
    if key in TASK_TYPE_ALIASES:
        return TASK_TYPE_ALIASES[key]
    raise ValueError(f"unknown task_type {value!r}")


# The shipped methods, for type checkers and readers. `method` is validated against `METHOD_OPTIONS` (so a method
# registered there is accepted too); tests/test_methods_registry.py checks that this list equals it.
Method = Literal["lora", "qlora", "prefix", "ptuning", "prompt", "freeze", "full"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


class _Section(BaseModel):
    # allow_inf_nan=False: `epochs: .inf` or `learning_rate: .nan` are typos, not settings (they overflowed deep inside)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False, allow_inf_nan=False)


class ModelSection(_Section):
    base_model: str = Field(
        "smollm2",
        description="Base model: a built-in name (`smollm2`), a local HF model dir, or a .gguf file "
        "(imported once and cached). Never downloaded from a hub.",
    )
    task_type: TaskType = Field(
        TaskType.CAUSAL_LM,
        description="CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS, QUESTION_ANSWERING, FEATURE_EXTRACTION "
        "(case-insensitive), or the article's routing names `text-generation`, `text-to-image`, `image-to-image`.",
    )
    trust_remote_code: bool = Field(False, description="Run the model's own Python code (ChatGLM, Baichuan, Qwen-1).")
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the frozen base weights are stored in; `auto` = float32 on CPU, bfloat16 on CUDA."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; flash_attention_2 needs CUDA and the flash-attn package."
    )

    @field_validator("task_type", mode="before")
    @classmethod
    def _task_type(cls, v: object) -> TaskType:
        return parse_task_type(v)


class MethodSection(_Section):
    method: str = Field(
        "lora",
        description="lora | qlora (4/8-bit base + LoRA) | prefix (P-tuning v2) | ptuning (prompt encoder) | "
        "prompt (prompt tuning) | freeze (train some layers) | full.",
        json_schema_extra=lambda schema: schema.update(enum=list(METHOD_OPTIONS)),
    )
    # --- LoRA / QLoRA (peft.LoraConfig) ---
    lora_rank: int = Field(8, gt=0, description="LoRA rank r.")
    lora_alpha: float = Field(16, gt=0, description="LoRA scaling numerator: scale = alpha / r (alpha/sqrt(r) with rslora).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train (peft `bias`).")
    target_modules: Union[list[str], str, None] = Field(
        None,
        description="Layers LoRA adapts. Left out: every linear layer inside the transformer blocks (attention "
        "and MLP, fused ones such as query_key_value/W_pack/c_attn included; never the LM head or embeddings); "
        "the resolved list is printed by validate/train and saved in the run's config.yaml. Or a preset "
        "(`all`, `attention`, `qv`, `mlp`, `all-linear`: see `target_modules presets` below), a list of names, or a "
        "regex string.",
    )
    modules_to_save: Union[list[str], None] = Field(
        None, description="Extra modules trained in full and saved with the adapter (e.g. a classification head)."
    )
    init_lora_weights: Union[bool, Literal["gaussian", "eva", "olora", "pissa", "corda", "loftq", "orthogonal"], str] = Field(
        True, description="true (B=0, Kaiming A), false (random B: the adapter changes outputs at once), gaussian, "
        "pissa, pissa_niter_N, olora, orthogonal…"
    )
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA: scale = alpha/sqrt(r) (Kalajdzievski 2023).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA, Liu et al. 2024).")
    layers_to_transform: Union[list[int], int, None] = Field(None, description="Only adapt these layer indices.")
    # --- QLoRA ---
    quant_bits: Literal[4, 8] = Field(4, description="qlora: 4-bit (bitsandbytes NF4/FP4) or 8-bit (LLM.int8) base.")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="qlora: 4-bit data type (NF4 from the QLoRA paper).")
    bnb_4bit_use_double_quant: bool = Field(True, description="qlora: quantize the quantization constants too.")
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = Field("bfloat16", description="qlora: matmul dtype.")
    # --- prefix / ptuning / prompt ---
    num_virtual_tokens: int = Field(20, gt=0, description="prefix/ptuning/prompt: number of virtual tokens.")
    prefix_projection: bool = Field(False, description="prefix: reparameterize the prefix through an MLP (P-tuning v2).")
    encoder_hidden_size: Union[int, None] = Field(None, gt=0, description="prefix/ptuning: MLP hidden size (default: model hidden size).")
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = Field("MLP", description="ptuning: prompt encoder type.")
    prompt_tuning_init: Literal["random", "text"] = Field("random", description="prompt: initialize from random or from text.")
    prompt_tuning_init_text: Union[str, None] = Field(None, description="prompt: the text used when prompt_tuning_init is `text`.")
    # --- freeze ---
    freeze_trainable_layers: Union[int, None] = Field(
        None, description="freeze: train the last N blocks (negative: the first N). Default 2 when nothing else is chosen."
    )
    freeze_layer_indices: Union[list[int], None] = Field(None, description="freeze: train exactly these block indices.")
    freeze_trainable_modules: Union[list[str], None] = Field(
        None, description="freeze: train parameters whose names match these regexes (e.g. `mlp`, `self_attn.o_proj`)."
    )
    freeze_train_embeddings: bool = Field(False, description="freeze: also train the input embeddings.")
    freeze_train_lm_head: bool = Field(False, description="freeze: also train the LM head.")
    # --- continuing ---
    init_adapter: Union[Path, None] = Field(
        None, description="Start from an existing adapter dir (continued training on new data, fresh optimizer)."
    )

    @field_validator("method", mode="before")
    @classmethod
    def _known_method(cls, v: object) -> object:
        # The loader turns this into "is not one of the allowed values" with the list and a did-you-mean.
        if not isinstance(v, str) or v not in METHOD_OPTIONS:
            raise ValueError(f"unknown method {v!r}")
        return v


class DataSection(_Section):
    train_data_dir: Union[Path, None] = Field(
        None, description="Folder of training data (all .jsonl/.json files in it when metadata_path is not set; images for text-to-image)."
    )
    metadata_path: Union[Path, None] = Field(
        None, description="The training file: .jsonl or .json array of {instruction, input?, output} or {messages: [...]}."
    )
    val_file: Union[Path, None] = Field(None, description="A separate validation file (same format as training).")
    val_size: float = Field(0, ge=0, description="Hold out this fraction (< 1) or count (≥ 1) of training rows for validation.")
    template: Literal["auto", "chatml", "alpaca", "plain"] = Field(
        "auto", description="How rows become text: `auto` = the tokenizer's own chat template (chatml if it has none)."
    )
    system_prompt: Union[str, None] = Field(None, description="System message added to every example that has none.")
    cutoff_len: int = Field(1024, gt=0, description="Maximum tokens per example.")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="What to do with examples longer than cutoff_len.")
    train_on_prompt: bool = Field(False, description="Also train on prompt tokens (default: only assistant replies).")
    batching: Literal["auto", "padded", "grouped", "packed"] = Field(
        "auto",
        description="packed = several examples per row, attention kept per example (fastest); grouped = length-grouped "
        "padded batches; padded = plain. auto = packed for CAUSAL_LM, padded otherwise.",
    )
    share_prompt_prefix: bool = Field(
        True,
        description="Packed rows: a sequence that begins like the one before it in its row (a preference pair's two "
        "sides, chat rows' shared system prompt) reads that untrained prefix from it instead of repeating it. Same loss "
        "and gradients, fewer tokens. Only with the default attention (attn_implementation: auto).",
    )
    row_buckets: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Pad each micro-batch's width up to one of 8 lengths per doubling (at most 12.5% padding) so the "
        "CPU's matmul kernels are built once per length, not at every step (less memory, no slower). auto = on CPU.",
    )
    text_column: str = Field("text", description="SEQ_CLS/FEATURE_EXTRACTION: field holding the text.")
    label_column: str = Field("label", description="SEQ_CLS: field holding the label.")
    label_names: Union[list[str], None] = Field(None, description="SEQ_CLS/TOKEN_CLS: the label list (inferred from data if absent).")
    tokenized_cache: bool = Field(True, description="Cache tokenized data on disk, keyed by data + tokenizer + template.")
    dataloader_num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes.")


class TrainingSection(_Section):
    batch_size: int = Field(4, gt=0, description="Micro-batch size per device (rows; packed rows when batching=packed).")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    epochs: float = Field(3, gt=0, description="Passes over the training data.")
    max_steps: Union[int, None] = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    learning_rate: Union[float, None] = Field(
        None, gt=0, description="Peak learning rate. Default per method: lora/qlora 2e-4, prefix/ptuning/prompt 1e-2, freeze 5e-5, full 1e-5."
    )
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warmup as a fraction of total steps (instead of warmup_steps).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (never applied to norms and biases).")
    max_grad_norm: Union[float, None] = Field(1.0, gt=0, description="Clip gradients to this global norm (null: no clipping).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seeds Python, NumPy and torch; the same seed gives the same run.")
    precision: Precision = Field("auto", description="auto = bf16 autocast where the CPU/GPU supports it, else fp32 (fp16 on old GPUs).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, ~30% slower.")
    torch_compile: bool = Field(False, description="torch.compile the model (pays off on GPU for long runs).")
    chunked_loss: bool = Field(True, description="Compute LM head + cross-entropy in chunks: the [tokens × vocab] logits never exist at once.")
    sharding: Literal["ddp", "fsdp2"] = Field("ddp", description="Several processes: ddp = each holds the whole model; fsdp2 = parameters, gradients and optimizer state sharded with torch's fully_shard (also turned on by an accelerate config with distributed_type: FSDP). See docs/TRAINING.md.")
    tune_cpu_malloc: bool = Field(False, description="On CPU (Linux/glibc): keep freed memory for the next step instead of page-faulting large tensors in again (off: within noise on the benchmark once LM-head chunks are small, +2% peak RSS).")
    fused_lora_dropout: bool = Field(True, description="LoRA dropout kept as a 1-byte mask instead of the dropped-out input (same math as PEFT, less memory and time).")
    fused_lora_linear: bool = Field(True, description="Each LoRA linear layer as one autograd function: B·A·x added into the base matmul's output, no [tokens × out] intermediates (same math as PEFT; DoRA, Conv1D and quantized layers keep PEFT's).")
    fused_decoder_blocks: bool = Field(True, description="LoRA on Llama-style models: each block's frozen RMSNorms and SiLU-gated MLP product as autograd functions that keep less for backward (norm output straight in the compute dtype; norm outputs and the product recomputed in backward, not kept). Same forward; backward within bf16 noise.")
    logging_steps: int = Field(10, gt=0, description="Log train loss every N optimizer steps.")
    save_steps: Union[int, None] = Field(500, gt=0, description="Write a checkpoint every N optimizer steps (null: only at the end).")
    save_total_limit: Union[int, None] = Field(None, gt=0, description="Keep only the newest N checkpoints.")
    eval_steps: Union[int, None] = Field(None, gt=0, description="Validate every N steps (default: at each save, and at the end).")
    early_stopping_patience: Union[int, None] = Field(None, gt=0, description="Stop after N evaluations without a better validation loss.")
    keep_best_checkpoint: bool = Field(False, description="Write the best-validation adapter to output_dir instead of the last.")
    resume_from_checkpoint: Union[str, None] = Field(None, description="`latest` or a checkpoint dir: continue that run exactly.")
    eval_generation_metric: Union[Literal["exact_match", "contains", "bleu", "rouge_l"], None] = Field(
        None, description="Also score greedy generations on the validation set at each evaluation (slow; off by default)."
    )
    eval_generation_max_new_tokens: int = Field(64, gt=0, description="Token budget for eval_generation_metric.")


class OutputSection(_Section):
    output_dir: Path = Field(Path("output/run"), description="Run directory; itself a PEFT adapter dir when training an adapter.")
    overwrite_output_dir: bool = Field(False, description="Allow training into a dir that already holds a finished run.")
    report_to: list[Literal["tensorboard", "none"]] = Field(["tensorboard"], description="Loggers besides metrics.jsonl.")
    plot_loss: bool = Field(True, description="Write loss.png at the end.")


class PreferenceSection(_Section):
    """Preference tuning after (or instead of) SFT: `stage` picks the objective (`loraforge/objectives/`)."""

    stage: Literal["sft", "dpo", "orpo", "simpo", "kto"] = Field(
        "sft", description="What the run minimizes on CAUSAL_LM data: `sft` (next-token cross-entropy on replies), or a "
        "preference stage on pairwise rows {prompt/instruction, chosen, rejected} (`dpo`, `orpo`, `simpo`) or KTO's "
        "unpaired rows {instruction, output, label: true|false} (`kto`).")
    pref_beta: float = Field(
        0.1, gt=0, description="dpo/simpo/kto: β, the inverse temperature on the log-ratio rewards (DPO paper: 0.1; "
        "SimPO's paper uses 2.0–2.5 with its length-normalized reward).")
    dpo_loss: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid", description="dpo: `sigmoid` (Rafailov et al. 2023), `ipo` (Azar et al. 2023, log-ratios averaged per "
        "token as TRL does) or `hinge` (SLiC, Zhao et al. 2023).")
    pref_label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="dpo sigmoid: assumed fraction of flipped labels (conservative DPO: "
        "(1-ε)·L(Δ) + ε·L(-Δ)); 0 = plain DPO.")
    dpo_sft_weight: float = Field(
        0.0, ge=0, description="dpo: weight α of an SFT term on the chosen replies added to the DPO loss (RPO, Pang et al. "
        "2024): α × the mean negative log-likelihood per chosen-reply token of the micro-batch, as TRL's "
        "`loss_type: [sigmoid, sft]` with `loss_weights: [1, α]`. Keeps the chosen replies likely, so greedy answers "
        "move toward them instead of only away from the rejected ones; 0 = plain DPO.")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin γ (SimPO, Meng et al. 2024).")
    orpo_lambda: float = Field(0.1, gt=0, description="orpo: weight λ of the odds-ratio term added to the chosen NLL "
                               "(ORPO, Hong et al. 2024; TRL calls it `beta`).")
    kto_desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the desirable (label true) examples' loss.")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the undesirable (label false) examples' loss.")
    pref_reference: Literal["auto", "copy", "precomputed"] = Field(
        "auto", description="dpo/kto reference model: `auto` = the base with the adapter disabled for adapter methods "
        "(no second copy), a frozen copy for `full`/`freeze` (`estimate` counts it); `copy` = always a frozen copy; "
        "`precomputed` = one pass over the data before training stores the reference log-probs (no copy kept). "
        "orpo and simpo need no reference.")


class RunConfig(ModelSection, MethodSection, DataSection, TrainingSection, PreferenceSection, OutputSection):
    """Everything one `loraforge train` needs. Flat in YAML; see each section for the fields."""

    image: Union[ImageOptions, None] = Field(None, description="Options only used when task_type is text-to-image.")


# Other spellings users bring from PEFT, HF TrainingArguments, LLaMA-Factory and axolotl → our key.
KEY_ALIASES: dict[str, str] = {
    "r": "lora_rank",
    "lora_r": "lora_rank",
    "bias": "lora_bias",
    "lora_target": "target_modules",
    "lora_target_modules": "target_modules",
    "finetuning_type": "method",
    "adapter": "method",
    "model_name_or_path": "base_model",
    "train_file": "metadata_path",
    "data_path": "metadata_path",
    "dataset_path": "metadata_path",
    "eval_file": "val_file",
    "validation_file": "val_file",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "lr": "learning_rate",
    "lr_scheduler_type": "lr_scheduler",
    "max_seq_length": "cutoff_len",
    "sequence_len": "cutoff_len",
    "max_length": "cutoff_len",
    "pre_seq_len": "num_virtual_tokens",
    "load_best_model_at_end": "keep_best_checkpoint",
    # preference tuning: LLaMA-Factory, axolotl and TRL spellings
    "rl_beta": "pref_beta",
    "dpo_beta": "pref_beta",
    "dpo_label_smoothing": "pref_label_smoothing",
    "dpo_loss_type": "dpo_loss",
    "rpo_alpha": "dpo_sft_weight",
    "pref_ftx": "dpo_sft_weight",
    "orpo_alpha": "orpo_lambda",
    "orpo_beta": "orpo_lambda",
    "kto_chosen_weight": "kto_desirable_weight",
    "kto_rejected_weight": "kto_undesirable_weight",
    "desirable_weight": "kto_desirable_weight",
    "undesirable_weight": "kto_undesirable_weight",
}
