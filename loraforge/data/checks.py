"""What the data looks like after encoding: counts, what was cut or dropped, and token-length percentiles.

`build_datasets` fills a `DataStats`; the CLI prints `format_stats(stats)` before training (and `validate`
prints it without training) so a user sees at once that, say, 30% of the examples exceed `cutoff_len`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence


@dataclass
class DataStats:
    """Summary of the encoded training (and validation) data.

    Attributes:
        files: the training files read.
        examples: training examples kept.
        dropped: examples removed (longer than cutoff_len with `overlong: drop`, or no trained token left
            within cutoff_len after truncation).
        truncated: examples kept but cut to cutoff_len.
        trained_tokens: tokens that carry a loss in the kept training examples.
        p50, p90, p99, max: token lengths of all training examples *before* truncation.
        val_examples: validation examples kept (0 without validation).
        cutoff_len, overlong: the settings these counts refer to.
        total_tokens: tokens in the kept training examples (after truncation).
        over_cutoff: examples longer than cutoff_len (= truncated + dropped for length).
    """

    files: list[str] = field(default_factory=list)
    examples: int = 0
    dropped: int = 0
    truncated: int = 0
    trained_tokens: int = 0
    p50: int = 0
    p90: int = 0
    p99: int = 0
    max: int = 0
    val_examples: int = 0
    cutoff_len: int = 0
    overlong: str = "truncate"
    total_tokens: int = 0
    over_cutoff: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DataStats":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile (q in 0..100) of already sorted values; 0 for no values."""
    if not sorted_values:
        return 0
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n*q/100), at least the first value
    return int(sorted_values[int(rank) - 1])


def length_percentiles(lengths: Sequence[int]) -> dict[str, int]:
    values = sorted(lengths)
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99),
            "max": values[-1] if values else 0}


def format_stats(stats: DataStats) -> str:
    """The few lines printed before training."""
    files = ", ".join(stats.files) if len(stats.files) <= 3 else f"{stats.files[0]} and {len(stats.files) - 1} more"
    lines = [
        f"data: {stats.examples} training examples from {files}"
        + (f", {stats.val_examples} validation" if stats.val_examples else ""),
        f"  tokens per example: p50 {stats.p50}, p90 {stats.p90}, p99 {stats.p99}, max {stats.max} "
        f"(cutoff_len {stats.cutoff_len})",
        f"  trained tokens: {stats.trained_tokens} of {stats.total_tokens}"
        + (f" ({100 * stats.trained_tokens / stats.total_tokens:.0f}%)" if stats.total_tokens else ""),
    ]
    if stats.over_cutoff or stats.dropped:
        lines.append(f"  longer than cutoff_len: {stats.over_cutoff} (overlong: {stats.overlong}); "
                     f"truncated {stats.truncated}, dropped {stats.dropped}")
    return "\n".join(lines)
