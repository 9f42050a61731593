"""What every preference objective (dpo, orpo, simpo, kto) shares: collation of pairs into packed rows, the
per-sequence log-probabilities of the responses, the reference model, and the step metrics.

A micro-batch's sequences (pair p: chosen = sequence 2p, rejected = 2p+1; KTO: the examples, then their
mismatched KL sequences) go into the rows of one batch: when the model's attention honours packed
`position_ids` (the SFT varlen path, `data/batching.py`), all sequences of a row share it with per-sequence
positions and attention — no padding, one forward for both sides; otherwise one padded row per sequence.
`seq_ids[r, t]` names the sequence whose response token `labels[r, t]` is (-1: prompt or padding), so the
per-token log-probs of the chunked LM head (`train/loss.py:token_logps`) sum into per-sequence log-probs.

Each stage module gives a `losses(policy, reference, batch, cfg) -> (per-example losses, metrics)` function;
`PreferenceLoss` runs the forwards and returns `(sum of per-example losses, examples)`, so a step's loss is the
mean over its pairs (or KTO examples), as in TRL.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from loraforge.data.templates import IGNORE_INDEX, Encoded
from loraforge.train.loss import token_logps

if TYPE_CHECKING:
    from loraforge.config import RunConfig

BATCH_FIELDS = ("input_ids", "labels", "seq_ids")
OPTIONAL_FIELDS = ("attention_mask", "position_ids", "desirable", "ref_logps")


@dataclass
class SeqLogps:
    """Per-sequence sums of response-token log-probs, and the response token counts."""

    sums: torch.Tensor  # [S] fp32
    counts: torch.Tensor  # [S]

    @property
    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp_min(1)


# ---------------------------------------------------------------------------------------------- collation


@lru_cache(maxsize=8)
def _packs(base_model: str, batching: str, method: str, trust_remote_code: bool, task_type: str) -> bool:
    from types import SimpleNamespace

    from loraforge.data.batching import choose_batching
    from loraforge.models.gguf import resolve_model_path

    cfg = SimpleNamespace(base_model=base_model, batching=batching, method=method, task_type=task_type,
                          trust_remote_code=trust_remote_code)
    return choose_batching(cfg, resolve_model_path(base_model)) == "packed"


def packs_rows(cfg: RunConfig) -> bool:
    """Whether sequences share rows (the run's batching is `packed`)."""
    return _packs(str(cfg.base_model), cfg.batching, cfg.method, cfg.trust_remote_code,
                  getattr(cfg.task_type, "value", cfg.task_type))


def collate_sequences(rows: Sequence[Sequence[Encoded]], pad_token_id: int, pack: bool, *,
                      share_prefixes: bool = False, bucket: bool = False) -> dict[str, torch.Tensor]:
    """Tensors for rows of sequences, numbered in order (`seq_ids`).

    Args:
        rows: `rows[r]` = the sequences of row r (one sequence per row unless `pack`).
        pack: several sequences per row with restarting `position_ids` and no attention mask (the packed SFT
            layout); else each sequence is its own right-padded row with an attention mask.
        share_prefixes: in packed rows, a sequence beginning like the row's latest full one (a pair's two sides share the
            prompt) is laid out as a branch reading that prefix (`data.row_layout`: same log-probs, fewer tokens).
        bucket: pad the width up to one of a few lengths per doubling (`row_layout.bucket_width`).
    """
    from loraforge.data.row_layout import plan_rows

    if not pack:
        rows = [[s] for row in rows for s in row]
    starts, width = plan_rows(rows, share_prefixes, bucket)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    seq_ids = torch.full(shape, -1, dtype=torch.long)
    attention = torch.zeros(shape, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    k = 0
    for r, (row, bs) in enumerate(zip(rows, starts)):
        at = 0
        for s, b in zip(row, bs):
            n = len(s.input_ids) - b
            input_ids[r, at:at + n] = torch.tensor(s.input_ids[b:])
            lab = torch.tensor(s.labels[b:])
            lab[0] = IGNORE_INDEX  # predicted from the previous sequence's last token: never a target
            labels[r, at:at + n] = lab
            seq_ids[r, at:at + n] = torch.where(lab != IGNORE_INDEX, k, -1)
            positions[r, at:at + n] = torch.arange(b, b + n)
            at, k = at + n, k + 1
        attention[r, :at] = 1
        positions[r, at:] = torch.arange(width - at)  # pads: their own block, never attended by real tokens
    out = {"input_ids": input_ids, "labels": labels, "seq_ids": seq_ids}
    out.update({"position_ids": positions} if pack else {"attention_mask": attention})
    return out


def collate_pairs(examples: Sequence[Any], micro_batch: Sequence[Sequence[int]], pad_token_id: int, cfg: RunConfig):
    """Pairs of a micro-batch: row r holds the chosen and rejected sides of its pairs (sequences 2p, 2p+1)."""
    rows = [[side for i in row for side in examples[i].sides] for row in micro_batch]
    from loraforge.data.row_layout import layout_options

    batch = collate_sequences(rows, pad_token_id, packs_rows(cfg), **layout_options(cfg))
    if getattr(examples[micro_batch[0][0]], "ref_logps", None) is not None:  # `pref_reference: precomputed`
        batch["ref_logps"] = torch.tensor([lp for row in micro_batch for i in row for lp in examples[i].ref_logps])
    return batch


def one_per_example(example: Any) -> int:
    """A pair (or a KTO example) counts once in the step's normalizer: the loss is a mean over examples."""
    return 1


# ---------------------------------------------------------------------------------------------- the loss module

LossesFn = Callable[[SeqLogps, "SeqLogps | None", dict, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> SeqLogps:
    """Per-sequence response log-probs of a collated batch (`seq_ids` numbers the sequences)."""
    lp, keep = token_logps(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"),
                           batch.get("position_ids"))
    seq = batch["seq_ids"][:, 1:].reshape(-1)[keep]
    n = int(batch["seq_ids"].max()) + 1
    sums = torch.zeros(n, dtype=torch.float32, device=lp.device).index_add(0, seq, lp)
    return SeqLogps(sums, torch.bincount(seq, minlength=n))


def uses_adapter_as_reference(cfg: RunConfig) -> bool:
    """The base with the adapter disabled is the reference: an adapter method training a fresh adapter. A run
    continuing an adapter (`init_adapter`) needs that adapter as its reference, so it keeps a frozen copy."""
    from loraforge.methods import METHODS

    method = METHODS.get(cfg.method)
    return (cfg.pref_reference == "auto" and method is not None and method.saves_adapter
            and cfg.init_adapter is None)


class PreferenceLoss(nn.Module):
    """`forward(**batch) -> (sum of per-example preference losses, number of examples)`.

    Attributes:
        model: the trained model.
        ref_model: a frozen copy, when the reference is not the adapter-disabled model (None otherwise, or for
            objectives without a reference).
    """

    def __init__(self, model: nn.Module, cfg: RunConfig, losses: LossesFn, needs_reference: bool):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.losses = losses
        self.needs_reference = needs_reference
        self.ref_model = None
        if needs_reference and cfg.pref_reference != "precomputed" and not uses_adapter_as_reference(cfg):
            self.ref_model = copy.deepcopy(model).requires_grad_(False).eval()
        self._sums: dict[str, dict[str, torch.Tensor]] = {"train": defaultdict(float), "val": defaultdict(float)}

    def train(self, mode: bool = True):
        super().train(mode)
        if self.ref_model is not None:
            self.ref_model.eval()  # the reference never runs dropout
        return self

    def reference(self, batch: dict[str, torch.Tensor]) -> SeqLogps:
        if "ref_logps" in batch:
            return SeqLogps(batch["ref_logps"].float(), torch.zeros_like(batch["ref_logps"], dtype=torch.long))
        if self.cfg.pref_reference == "precomputed" and self.needs_reference:
            raise RuntimeError("pref_reference is `precomputed` but the batch has no reference log-probs: "
                               "prepare_data was not called")
        with torch.no_grad():
            if self.ref_model is not None:
                return sequence_logps(self.ref_model, batch)
            with self.model.disable_adapter():
                return sequence_logps(self.model, batch)

    def prepare_data(self, data: Any, collate: Callable, pad_token_id: int) -> None:
        """`pref_reference: precomputed`: one pass over the train and validation examples with the model as it is
        before the first step (the reference), storing each pair's reference log-probs on it (`ref_logps`), so no
        reference model is kept or run during training. Called once by `train/model.py` after building."""
        if not (self.needs_reference and self.cfg.pref_reference == "precomputed"):
            return
        was_training = self.model.training
        self.model.eval()  # no dropout in the reference pass
        with torch.no_grad():
            for examples in (data.train, data.val or []):
                for start in range(0, len(examples), self.cfg.batch_size):
                    idx = list(range(start, min(start + self.cfg.batch_size, len(examples))))
                    batch = collate(examples, [[i] for i in idx], pad_token_id, self.cfg)
                    batch.pop("ref_logps", None)
                    sums = sequence_logps(self.model, batch).sums.tolist()
                    per = len(sums) // len(idx)
                    for k, i in enumerate(idx):
                        examples[i].ref_logps = tuple(sums[k * per:(k + 1) * per])
        self.model.train(was_training)

    def forward(self, **batch):
        policy = sequence_logps(self.model, batch)
        ref = self.reference(batch) if self.needs_reference else None
        losses, metrics = self.losses(policy, ref, batch, self.cfg)
        sums = self._sums["train" if self.training else "val"]
        for name, values in metrics.items():
            values = values.detach().float()
            sums[name] = sums[name] + values.sum()
            sums[name + "#n"] = sums[name + "#n"] + values.numel()
        return losses.sum(), torch.tensor(losses.numel(), device=losses.device)

    def pop_metrics(self, split: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(sum, count) of each metric since the last call, for `split` (`train` or `val`); then resets it."""
        sums, self._sums[split] = self._sums[split], defaultdict(float)
        return {k: (torch.as_tensor(v), torch.as_tensor(sums[k + "#n"])) for k, v in sums.items()
                if not k.endswith("#n")}


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, policy: SeqLogps | None = None,
                   chosen: slice | torch.Tensor = slice(0, None, 2), rejected: slice | torch.Tensor = slice(1, None, 2)
                   ) -> dict[str, torch.Tensor]:
    """TRL's names: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies (+ logps/…)."""
    out = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
           "rewards/margins": chosen_rewards - rejected_rewards,
           "rewards/accuracies": (chosen_rewards > rejected_rewards).float()}
    if policy is not None:
        out["logps/chosen"], out["logps/rejected"] = policy.sums[chosen], policy.sums[rejected]
    return out


def make_loss(losses: LossesFn, needs_reference: bool) -> Callable[[nn.Module, "RunConfig"], nn.Module]:
    def loss(model: nn.Module, cfg: RunConfig) -> nn.Module:
        return PreferenceLoss(model, cfg, losses, needs_reference)

    return loss


def build_data(cfg: RunConfig, tokenizer: Any):
    from loraforge.data.preference import build_preference_data

    return build_preference_data(cfg, tokenizer)


__all__ = ["BATCH_FIELDS", "OPTIONAL_FIELDS", "PreferenceLoss", "SeqLogps", "build_data", "collate_pairs",
           "collate_sequences", "make_loss", "one_per_example", "packs_rows", "reward_metrics", "sequence_logps",
           "uses_adapter_as_reference"]
