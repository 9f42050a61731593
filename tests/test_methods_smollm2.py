"""Real learning on the real model: SmolLM2-135M-Instruct over-fits two replies with LoRA and with P-tuning v2 (prefix
tuning), trained through `loraforge.train.loop.train`; the adapters then reload with plain PEFT and generate
the trained reply."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from loraforge.config import config_from_dict  # noqa: E402

ROWS = [{"instruction": "What is the codename of project X?", "output": "Bluefin Harbor."},
        {"instruction": "Who maintains the zeta cluster?", "output": "Mira Okafor."}]
METHODS = {
    "lora": {"learning_rate": 3e-3, "target_modules": "all-linear", "lora_dropout": 0.0},
    # P-tuning v2 (prefix): the article's method; per-layer key/values have the capacity to memorize replies,
    # which prompt tuning's 8 input embeddings do not at this model size (Lester et al. 2021: it needs scale).
    "prefix": {"learning_rate": 3e-2, "max_steps": 16, "num_virtual_tokens": 8},
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_smollm2_overfits_and_reloads(method, smollm2_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.train.loop import train

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = config_from_dict({"base_model": str(smollm2_dir), "method": method, "metadata_path": str(data),
                            "output_dir": str(tmp_path / "run"), "batch_size": 2, "max_steps": 12,
                            "lr_scheduler": "constant", "logging_steps": 1, "save_steps": None,
                            "report_to": ["none"], "plot_loss": False, "tokenized_cache": False, **METHODS[method]})
    result = train(cfg, echo=lambda _m: None)
    losses = [json.loads(x)["loss"] for x in (result.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses[-1] < 0.5 * losses[0], losses

    tok = AutoTokenizer.from_pretrained(result.run_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), result.run_dir).eval()
    messages = [{"role": "user", "content": ROWS[0]["instruction"]}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False, use_cache=True)
    reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Bluefin" in reply, (reply, losses)
