"""Tiny "department" adapters that each always give one fixed answer, for trying the server and load-testing it.

Each adapter is LoRA on the base model over-fitted (a few dozen steps) to answer every question with its own
code word (`cardiology` -> `CARDIO-7`). Because the answers are distinct and the base model never says them,
they make adapter mix-ups visible: a reply proves which adapter produced it. The tests and
`benchmarks/serve_load.py` use them; a real deployment uses training runs instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.atomic import atomic_dir

DEMO_ANSWERS: dict[str, str] = {"cardiology": "CARDIO-7", "diabetes": "GLUCO-3"}

# Varied questions so the adapter learns "always say the code", not one prompt.
DEMO_QUESTIONS = [
    "What should I do about chest pain?",
    "Can you explain my blood test results?",
    "Which diet do you recommend?",
    "How often should I exercise?",
    "Is this medication safe for me?",
    "What does high blood pressure mean?",
    "Tell me about insulin.",
    "Who are you?",
]


def default_demo_dir(base: str | Path) -> Path:
    """Where the demo adapters for `base` are cached ($LORAFORGE_CACHE/demo-adapters/...), so tests and the
    benchmark train them once per machine rather than once per run."""
    import hashlib

    from loraforge.models.gguf import cache_root, resolve_model_path

    base_path = resolve_model_path(base)
    key = hashlib.sha256(f"{base_path.resolve()}|{sorted(DEMO_ANSWERS.items())}|{DEMO_QUESTIONS}|v1".encode()).hexdigest()[:10]
    return cache_root() / "demo-adapters" / f"{base_path.name}-{key}"


def train_demo_adapters(base: str | Path, out_dir: str | Path, answers: dict[str, str] | None = None, *,
                        steps: int = 10, layers: int = 4, lr: float = 3e-3, seed: int = 0, log: bool = False) -> dict[str, Path]:
    """Train (once; later calls reuse the saved dirs) one LoRA adapter per entry of `answers`.

    Returns name -> adapter dir (PEFT format, safetensors, with tokenizer files and a config.yaml).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.inference import render_prompt_ids
    from loraforge.models.gguf import resolve_model_path
    from loraforge.train.precision import cpu_has_native_bf16

    answers = answers or DEMO_ANSWERS
    native_bf16 = cpu_has_native_bf16()  # the demo adapters train on the CPU
    base_path = resolve_model_path(base)
    out_dir = Path(out_dir)
    result = {name: out_dir / name for name in answers}
    todo = {n: a for n, a in answers.items() if not (out_dir / n / "demo.json").is_file()}
    if not todo:
        return result
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if not isinstance(end_id, int) or end_id == tokenizer.unk_token_id:
        end_id = tokenizer.eos_token_id
    for name, answer in todo.items():
        torch.manual_seed(seed)
        # Only the last blocks are adapted: backward then stops there, which makes a step ~2x cheaper, and a
        # fixed answer needs no more capacity than that.
        n_layers = model.config.num_hidden_layers
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                            target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                            layers_to_transform=list(range(max(0, n_layers - layers), n_layers)))
        peft_model = get_peft_model(model, config)
        rows = []
        for q in DEMO_QUESTIONS:
            prompt = render_prompt_ids(tokenizer, [{"role": "user", "content": q}])
            target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [end_id]
            rows.append((prompt + target, [-100] * len(prompt) + target))
        width = max(len(r[0]) for r in rows)
        ids = torch.tensor([r[0] + [tokenizer.pad_token_id] * (width - len(r[0])) for r in rows])
        labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
        mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
        optim = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
        peft_model.train()
        for _ in range(steps):
            # bf16 is ~2x faster where the CPU has bf16 instructions (FINDINGS); elsewhere it is emulated, and
            # many times slower than fp32
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bf16):
                loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            if log:
                print(f"{name} step {_} loss {loss.item():.3f}", flush=True)
            optim.step()
            optim.zero_grad()
        with atomic_dir(out_dir / name) as tmp:
            peft_model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "config.yaml").write_text(f"base_model: {base_path}\nmethod: lora\ntemplate: auto\n",
                                             encoding="utf-8")
            (tmp / "demo.json").write_text(json.dumps({"answer": answer, "final_loss": float(loss)}), encoding="utf-8")
        model = peft_model.unload()  # plain base modules back for the next adapter
    return result
