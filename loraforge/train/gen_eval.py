"""Score greedy generations on the validation set during training (`eval_generation_metric`, off by default).

The prompt and the reference come straight from the encoded examples: the prompt is everything before the
last trained span (the final assistant reply), the reference is that span — so generation sees exactly the
rendering used in training.
"""

from __future__ import annotations

import torch

from loraforge.train.loss import IGNORE_INDEX

MAX_EXAMPLES = 32  # generation is slow on CPU; a fixed subset keeps evaluations comparable across steps


def last_reply_start(labels: list[int]) -> int:
    """Index where the last contiguous run of trained labels begins."""
    end = max(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


@torch.no_grad()
def score_validation_generations(model, tokenizer, data, cfg) -> dict[str, float]:
    from loraforge.metrics import score_generations

    was_training = model.training
    model.eval()
    preds, refs = [], []
    for ex in data.val[:MAX_EXAMPLES]:
        start = last_reply_start(ex.labels)
        prompt = torch.tensor([ex.input_ids[:start]], device=next(model.parameters()).device)
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=cfg.eval_generation_max_new_tokens, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id)
        preds.append(tokenizer.decode(out[0, start:], skip_special_tokens=True).strip())
        reference = [t for t in ex.labels[start:] if t != IGNORE_INDEX]
        refs.append([tokenizer.decode(reference, skip_special_tokens=True).strip()])
    if was_training:
        model.train()
    scores = score_generations(preds, refs, [cfg.eval_generation_metric], "auto")
    return {f"val_{k}": v for k, v in scores.items()}
