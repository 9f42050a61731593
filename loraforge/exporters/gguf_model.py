"""A transformers causal LM as one GGUF file llama.cpp loads: architecture metadata, tensors, tokenizer.

Tensors are streamed: every tensor's GGUF name, shape and type is planned first (the header needs them),
then each is converted, quantized and written on its own, so the file is never assembled in memory next to
the model. Tensor names come from the `gguf` package's maps (`model.layers.0.self_attn.q_proj.weight` →
`blk.0.attn_q.weight`); quantization is the `gguf` package's numpy code.

Per family (`ARCHS`): LLaMA-layout GGUFs (llama, mistral) rotate query/key pairs interleaved, HF checkpoints
rotate halves, so q_proj/k_proj rows are permuted as llama.cpp's own converter does; Qwen2/3 and Gemma use the
NeoX (halves) rotation in llama.cpp and are written as they are. Gemma's RMSNorm multiplies by (1 + weight)
while llama.cpp's multiplies by the stored weight, so every norm weight is written plus one (transformers' GGUF
loader subtracts it again); the sqrt(hidden) embedding scale and Gemma 2's soft-capping are in llama.cpp's graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from loraforge.errors import LoraforgeError, Problem

# Types the `gguf` package writes itself (numpy). 1-D tensors (norms, biases) always stay F32, as in llama.cpp.
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# Types only llama.cpp's C++ quantizer produces (k-quants, i-quants): export f16, then run llama-quantize.
LLAMA_QUANTIZE_ONLY = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
                       "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s",
                       "iq3_m", "iq4_nl", "iq4_xs", "tq1_0", "tq2_0")


@dataclass(frozen=True)
class GgufArch:
    """How one transformers `model_type` is written: llama.cpp's architecture name and its rope layout."""

    name: str  # gguf MODEL_ARCH name, e.g. "llama"
    permute_qk: bool  # LLaMA layout: HF half-rotation → interleaved pairs
    norm_plus_one: bool = False  # Gemma: HF scales by (1 + w), llama.cpp by w


ARCHS = {
    "llama": GgufArch("llama", permute_qk=True),  # LLaMA 1-3, SmolLM2
    "mistral": GgufArch("llama", permute_qk=True),  # llama.cpp runs Mistral as `llama`
    "qwen2": GgufArch("qwen2", permute_qk=False),
    "qwen3": GgufArch("qwen3", permute_qk=False),
    "gemma": GgufArch("gemma", permute_qk=False, norm_plus_one=True),
    "gemma2": GgufArch("gemma2", permute_qk=False, norm_plus_one=True),
}
# Families llama.cpp runs that this writer does not convert yet (their converters need per-family tensor
# surgery: Gemma's norm offset and embedding scale, GLM's fused gate_up, Phi-3's fused QKV, Mixtral's experts…).
# Matched by model_type or by loraforge's family name (models/registry.py).
LLAMA_CPP_ONLY = ("gemma3", "gemma3_text", "phi3", "phi", "glm", "glm4", "chatglm", "baichuan",
                  "qwen", "internlm2", "gpt2", "gpt_bigcode", "gpt_neox", "falcon", "bloom", "mpt", "mixtral",
                  "starcoder2", "olmo", "deepseek_v2")
HF_ROUTE = ("loraforge export RUN_DIR --to hf --out merged && "
            "python convert_hf_to_gguf.py merged --outfile model-f16.gguf --outtype f16")


def arch_for(model_type: str, *, family: str | None = None, kind: str = "decoder-only",
             hf_route: str = HF_ROUTE) -> GgufArch:
    """The writer's layout for `model_type`.

    `family` is loraforge's family name and `kind` its kind (models/registry.py); `hf_route` the commands that
    export this run through llama.cpp's own converter instead, printed when the writer refuses.

    Raises:
        LoraforgeError: naming the model type and family, and the way to export it.
    """
    if kind == "decoder-only" and model_type in ARCHS:
        return ARCHS[model_type]
    named = f"{model_type!r}" + (f" ({family} family)" if family and family != model_type else "")
    if kind != "decoder-only":
        why = f"--to gguf writes decoder-only language models for llama.cpp; {named} is an {kind} model"
        fix = "export it with --to hf"
    elif model_type in LLAMA_CPP_ONLY or family in LLAMA_CPP_ONLY:
        why = f"llama.cpp runs {named} models, but loraforge's GGUF writer does not convert that family yet"
        fix = f"convert it with llama.cpp's own converter: {hf_route}"
    else:
        why, fix = f"llama.cpp has no architecture for {named}", "export it with --to hf, or serve it: loraforge serve"
    raise LoraforgeError([Problem("model_type", why, value=model_type, allowed=", ".join(ARCHS), fix=fix)],
                         title="cannot export to GGUF")


def arch_of_config(config: dict, *, hf_route: str = HF_ROUTE) -> GgufArch:
    """`arch_for` a config.json read as it is (a remote-code checkpoint's config cannot be loaded by transformers).

    Raises:
        LoraforgeError: see `arch_for`; or a config that does not say what kind of model it is.
    """
    from loraforge.models.registry import family_for, model_kind

    fam = family_for(config)
    return arch_for(str(config.get("model_type") or ""), family=fam.name if fam else None, kind=model_kind(config),
                    hf_route=hf_route)


def quantize_command(out: Path, name: str, quant: str, *, source: str = "f16") -> str:
    """The llama-quantize command that turns the exported `out/<name>-<source>.gguf` into `quant`."""
    import shlex

    q = quant.upper()
    return (f"llama-quantize {shlex.quote(str(out / f'{name}-{source}.gguf'))} "
            f"{shlex.quote(str(out / f'{name}-{q}.gguf'))} {q}")


def check_quant(quant: str, *, out: Path, name: str, export_command: str, then: str = "") -> str:
    """`quant` lower-cased when the `gguf` package writes it.

    `out`/`name` are the export's folder and model name and `export_command` the same export at f16, so a
    refusal prints the exact two commands that produce the type (the f16 file's real path included), and
    `then` what to do after them.

    Raises:
        LoraforgeError: a type only llama.cpp's quantizer writes (with those commands), or an unknown type.
    """
    q = quant.lower()
    if q in QUANTS:
        return q
    if q in LLAMA_QUANTIZE_ONLY:
        raise LoraforgeError([Problem("--quant", f"{quant} is produced only by llama.cpp's own quantizer", value=quant,
                                      allowed=", ".join(QUANTS),
                                      fix=f"export f16, then quantize it: {export_command} && "
                                          f"{quantize_command(out, name, q)}{then}")], title="cannot quantize")
    from loraforge.errors import suggestion

    raise LoraforgeError([Problem("--quant", "unknown GGUF type", value=quant, allowed=", ".join(QUANTS),
                                  fix=suggestion(q, QUANTS + LLAMA_QUANTIZE_ONLY))])


def gguf_type(quant: str) -> Any:
    import gguf

    return gguf.GGMLQuantizationType[quant.upper()]


def file_type(quant: str) -> int:
    import gguf

    return int(gguf.LlamaFileType.ALL_F32 if quant == "f32" else gguf.LlamaFileType[f"MOSTLY_{quant.upper()}"])


def add_arch_metadata(writer: Any, config: Any, *, name: str) -> None:
    """The `<arch>.*` keys llama.cpp reads to build the graph."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)  # always: readers default it differently (transformers' qwen3 → 128)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if config.model_type == "gemma2":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        writer.add_sliding_window(int(config.sliding_window))


def check_config(config: Any) -> None:
    """What llama.cpp's graph for the family fixes rather than reads must hold: for Gemma the tanh-GELU, and
    Gemma 2's query scale 1/sqrt(head_dim) (1/sqrt(hidden/heads) only for the 46-layer 27B). Checked before
    the weights are loaded.

    Raises:
        LoraforgeError: naming the config field, its value and the one llama.cpp assumes.
    """
    if not config.model_type.startswith("gemma"):
        return
    fix = "export --to hf and convert with llama.cpp's convert_hf_to_gguf.py"
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    problems = []
    if act != "gelu_pytorch_tanh":
        problems.append(Problem("hidden_activation", "llama.cpp's Gemma graph uses the tanh approximation of GELU",
                                value=act, allowed="gelu_pytorch_tanh", fix=fix))
    if config.model_type == "gemma2":
        per_head = config.hidden_size // config.num_attention_heads
        allowed = {config.head_dim} | ({per_head} if config.num_hidden_layers == 46 else set())
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if not getattr(config, key, None):  # llama.cpp divides by it: 0 would be NaN logits
                problems.append(Problem(key, "llama.cpp's Gemma 2 graph always soft-caps", value=getattr(config, key),
                                        allowed="a positive number (Gemma 2 checkpoints: 50.0 / 30.0)", fix=fix))
        if config.query_pre_attn_scalar not in allowed:
            problems.append(Problem("query_pre_attn_scalar", "llama.cpp scales Gemma 2 queries by 1/sqrt(head_dim)",
                                    value=config.query_pre_attn_scalar,
                                    allowed=", ".join(map(str, sorted(allowed))), fix=fix))
    if problems:
        raise LoraforgeError(problems, title=f"cannot export this {config.model_type} model to GGUF")


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and params.get("rope_type", "default") not in ("default", None):
        raise LoraforgeError([Problem("rope_scaling", "rope scaling is not written to GGUF by loraforge yet",
                                      value=params.get("rope_type"), allowed="default",
                                      fix="export --to hf and convert with llama.cpp's convert_hf_to_gguf.py")],
                             title="cannot export to GGUF")
    return params.get("rope_theta") if isinstance(params, dict) and params.get("rope_theta") else \
        getattr(config, "rope_theta", 10000.0)


def permute_rows(weight: Any, n_head: int) -> Any:
    """HF's rotate-half row order → GGUF/llama.cpp's interleaved pairs, per head (llama.cpp's `permute`)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclass
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]
    qtype: Any  # GGMLQuantizationType
    nbytes: int
    load: Callable[[], Any]  # → float32 numpy array in HF layout (row permutation applied)


def plan_model_tensors(model: Any, arch: GgufArch, quant: str) -> list[PlannedTensor]:
    """Every tensor of `model` with its GGUF name and type; no data is converted yet.

    Raises:
        LoraforgeError: a tensor the architecture's name map does not know (an unsupported variant).
    """
    import gguf

    config = model.config
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.name.upper()], config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    planned = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LoraforgeError([Problem("tensor", f"no GGUF name for {hf_name} in llama.cpp's {arch.name} layout",
                                          value=hf_name, fix="export --to hf and convert with llama.cpp's converter")],
                                 title="cannot export to GGUF")
        n_head = heads if hf_name.endswith("q_proj.weight") else kv_heads if hf_name.endswith("k_proj.weight") else 0
        permute = arch.permute_qk and n_head and tensor.dim() == 2
        qtype = _tensor_type(tuple(tensor.shape), quant)
        plus_one = arch.norm_plus_one and hf_name.endswith("norm.weight")
        planned.append(PlannedTensor(name, tuple(tensor.shape), qtype, _nbytes(tuple(tensor.shape), qtype),
                                     _loader(tensor, n_head if permute else 0, plus_one)))
    return planned


def _loader(tensor: Any, permute_heads: int, plus_one: bool = False) -> Callable[[], Any]:
    def load() -> Any:
        data = tensor.detach().float().cpu().numpy() + (1.0 if plus_one else 0.0)
        return permute_rows(data, permute_heads) if permute_heads else data
    return load


def _tensor_type(shape: tuple[int, ...], quant: str) -> Any:
    """1-D → F32; a row that is not a whole number of quant blocks → F16 (llama.cpp's converter does the same)."""
    import gguf

    if len(shape) < 2 or quant == "f32":
        return gguf.GGMLQuantizationType.F32
    qtype = gguf_type(quant)
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    count = 1
    for d in shape:
        count *= d
    return count // block * size


def encode(data: Any, qtype: Any) -> Any:
    """float32 array → the bytes GGUF stores for `qtype` (F32/F16 as numpy floats, others via gguf.quants)."""
    import numpy as np
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def write_gguf(path: Path, arch: GgufArch, add_metadata: Callable[[Any], None], tensors: list[PlannedTensor],
               *, progress: bool = True) -> None:
    """Header and metadata first, then each tensor converted and written on its own."""
    import numpy as np
    import gguf

    writer = gguf.GGUFWriter(str(path), arch.name)
    add_metadata(writer)
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32) if t.qtype != gguf.GGMLQuantizationType.F16
                               else np.dtype(np.float16), t.nbytes, raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in _progress(tensors, progress, path.name):
        writer.write_tensor_data(encode(t.load(), t.qtype))
    writer.close()


def _progress(items: list[PlannedTensor], enabled: bool, label: str) -> Iterator[PlannedTensor]:
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    with tqdm(total=sum(t.nbytes for t in items), unit="B", unit_scale=True, desc=f"writing {label}") as bar:
        for t in items:
            yield t
            bar.update(t.nbytes)
