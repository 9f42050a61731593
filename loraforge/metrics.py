"""Text metrics for judging generations against references: exact match, contains-match, BLEU and ROUGE-L.

Pure Python (no torch), so the trainer can score validation generations cheaply every `eval_steps`.

Chinese and other CJK text has no spaces between words, so word-level metrics would treat a whole sentence as
one token. Every metric therefore takes a `tokenize` mode:

- ``auto``  — CJK characters are one token each, runs of other letters/digits are word tokens (mixed text works);
- ``char``  — every non-space character is a token;
- ``word``  — whitespace/punctuation-separated words (the usual English setting);
- ``jieba`` — Chinese word segmentation with jieba (imported only when asked for; ``pip install jieba``).

Scales: the per-example functions return 0..1; `bleu` returns sacrebleu's corpus BLEU (0..100); `score_generations`
reports every metric as a percentage (0..100) so that deltas between variants read the same way for all of them.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from typing import Iterable, Sequence

from loraforge.errors import ConfigError, Problem, suggestion

METRICS = ("exact_match", "contains", "bleu", "rouge_l")
TOKENIZE_MODES = ("auto", "char", "word", "jieba")

# Han (incl. extension A and compatibility ideographs), CJK punctuation block excluded on purpose: punctuation is
# stripped separately. Hiragana, Katakana and Hangul are included because they are also written without spaces
# between words for metric purposes (a character is a reasonable unit for all of them).
_CJK_RANGES = (
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3400, 0x4DBF),  # CJK Unified Ideographs Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xAC00, 0xD7AF),  # Hangul syllables
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0x20000, 0x2FA1F),  # Extensions B.. and Compatibility Supplement
)
_CJK_CLASS = "".join(f"{chr(a)}-{chr(b)}" for a, b in _CJK_RANGES)
# auto mode: one CJK character, or a run of other word characters (letters, digits, underscore).
_AUTO_TOKEN = re.compile(f"[{_CJK_CLASS}]|[^\\W{_CJK_CLASS}]+")
_SPACE_NEAR_CJK = re.compile(f"(?<=[{_CJK_CLASS}]) +| +(?=[{_CJK_CLASS}])")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _is_cjk_char(ch: str) -> bool:
    code = ord(ch)
    return any(a <= code <= b for a, b in _CJK_RANGES)


def is_cjk(text: str) -> bool:
    """True if `text` contains at least one CJK (Chinese, Japanese kana, Korean Hangul) character."""
    return any(_is_cjk_char(ch) for ch in text)


def _clean(text: str) -> str:
    """NFKC (full-width → ASCII), lowercase, every punctuation/symbol character → space, spaces collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join(text.split())


def normalize_answer(text: str) -> str:
    """Canonical form for answer matching (SQuAD-style, extended to CJK).

    Lowercase, NFKC, punctuation removed, English articles (a/an/the) removed, whitespace collapsed, and spaces
    next to CJK characters dropped (Chinese has no word spaces, so "北京 。" and "北京" must compare equal).
    """
    text = _ARTICLES.sub(" ", _clean(text))
    text = " ".join(text.split())
    return _SPACE_NEAR_CJK.sub("", text)


def _as_refs(refs: str | Sequence[str]) -> list[str]:
    return [refs] if isinstance(refs, str) else list(refs)


def exact_match(pred: str, refs: str | Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized reference, else 0.0."""
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(r) for r in _as_refs(refs)))


def contains_match(pred: str, refs: str | Sequence[str]) -> float:
    """1.0 if any (non-empty) normalized reference occurs inside the normalized prediction, else 0.0.

    Non-CJK references must match whole words ("cat" is not found in "concatenate"); CJK references match as a
    substring, since CJK words are not separated by spaces.
    """
    p = normalize_answer(pred)
    for ref in _as_refs(refs):
        r = normalize_answer(ref)
        if not r:
            continue
        if (r in p) if is_cjk(r) else _word_bounded(p, r):
            return 1.0
    return 0.0


def _word_bounded(text: str, part: str) -> bool:
    """`part` occurs in `text` with no letter/digit glued to either side (a CJK neighbour counts as a boundary,
    e.g. "gpt4" inside "使用gpt4模型")."""
    start = text.find(part)
    while start != -1:
        end = start + len(part)
        before = text[start - 1] if start > 0 else " "
        after = text[end] if end < len(text) else " "
        if not (before.isalnum() and not _is_cjk_char(before)) and not (after.isalnum() and not _is_cjk_char(after)):
            return True
        start = text.find(part, start + 1)
    return False


def check_tokenize(tokenize: str, key: str = "tokenize") -> None:
    """Raise ConfigError unless `tokenize` is one of TOKENIZE_MODES."""
    if tokenize not in TOKENIZE_MODES:
        raise ConfigError([Problem(key, "unknown tokenization mode", value=tokenize, allowed=", ".join(TOKENIZE_MODES),
                                   fix=suggestion(tokenize, TOKENIZE_MODES) or "use `auto`")])


def check_metrics(metrics: Iterable[str], key: str = "metrics") -> tuple[str, ...]:
    """The metric names as a tuple; ConfigError naming every unknown one."""
    names = tuple(metrics)
    problems = [Problem(f"{key}[{i}]", "unknown metric", value=m, allowed=", ".join(METRICS),
                        fix=suggestion(m, METRICS))
                for i, m in enumerate(names) if m not in METRICS]
    if problems:
        raise ConfigError(problems)
    return names


def _jieba_cut(text: str) -> list[str]:
    try:
        import jieba
    except ImportError as exc:  # optional dependency
        raise ConfigError([Problem("tokenize", "the `jieba` tokenization needs the jieba package", value="jieba",
                                   allowed="auto, char, word", fix="pip install jieba (or loraforge[eval])")]) from exc
    # jieba logs "Building prefix dict ... Loading model cost 1.2 seconds" at DEBUG to stderr on first use;
    # that is noise in an eval report's terminal output. This only touches jieba's own logger.
    jieba.setLogLevel(logging.WARNING)
    return [t for t in jieba.lcut(text) if t.strip()]


def tokenize_text(text: str, tokenize: str = "auto") -> list[str]:
    """Tokens for ROUGE-L after lowercasing, NFKC and punctuation removal.

    Raises:
        ConfigError: unknown `tokenize` mode, or `jieba` without the jieba package.
    """
    check_tokenize(tokenize)
    text = _clean(text)
    if tokenize == "auto":
        return _AUTO_TOKEN.findall(text)
    if tokenize == "char":
        return [ch for ch in text if not ch.isspace()]
    if tokenize == "word":
        return text.split()
    return _jieba_cut(text)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, O(len(a)·len(b)) time and O(len(b)) memory."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, refs: str | Sequence[str], tokenize: str = "auto") -> float:
    """ROUGE-L F1 (Lin, 2004; beta = 1) of `pred` against the best-matching reference, in 0..1.

    precision = LCS / len(pred tokens), recall = LCS / len(ref tokens), F1 = 2PR / (P + R).
    Two empty texts score 1.0; one empty text scores 0.0.
    """
    pred_tokens = tokenize_text(pred, tokenize)
    best = 0.0
    for ref in _as_refs(refs):
        ref_tokens = tokenize_text(ref, tokenize)
        if not pred_tokens and not ref_tokens:
            return 1.0
        lcs = _lcs_length(pred_tokens, ref_tokens)
        if lcs == 0:
            continue
        precision, recall = lcs / len(pred_tokens), lcs / len(ref_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def bleu(preds: Sequence[str], refs_lists: Sequence[str | Sequence[str]], tokenize: str = "auto") -> float:
    """Corpus BLEU (sacrebleu, 0..100) of `preds` against one or more references per prediction.

    Tokenization: ``auto`` → sacrebleu's ``zh`` tokenizer if any text is CJK, else ``13a`` (its default);
    ``char`` → ``char``; ``word`` → ``13a``; ``jieba`` → jieba segmentation, then no further tokenization.
    Examples may have different numbers of references (sacrebleu skips the missing ones).

    Raises:
        ConfigError: unknown `tokenize`, or sacrebleu (or jieba) not installed.
    """
    check_tokenize(tokenize)
    if len(preds) != len(refs_lists):
        raise ValueError(f"bleu: {len(preds)} predictions but {len(refs_lists)} reference lists")
    try:
        import sacrebleu
    except ImportError as exc:  # optional dependency
        raise ConfigError([Problem("metrics", "BLEU needs the sacrebleu package", value="bleu",
                                   fix="pip install sacrebleu (or loraforge[eval]), or drop `bleu` from the metrics")]) from exc
    if not preds:
        return 0.0
    refs = [_as_refs(r) for r in refs_lists]
    hyps = list(preds)
    if tokenize == "jieba":
        hyps = [" ".join(_jieba_cut(h)) for h in hyps]
        refs = [[" ".join(_jieba_cut(r)) for r in rs] for rs in refs]
        backend = "none"
    elif tokenize == "auto":
        any_cjk = any(is_cjk(h) for h in hyps) or any(is_cjk(r) for rs in refs for r in rs)
        backend = "zh" if any_cjk else "13a"
    else:
        backend = {"char": "char", "word": "13a"}[tokenize]
    # sacrebleu wants reference *streams*: stream k holds the k-th reference of every example (None if absent).
    n_streams = max(len(rs) for rs in refs)
    streams = [[rs[k] if k < len(rs) else None for rs in refs] for k in range(n_streams)]
    return float(sacrebleu.corpus_bleu(hyps, streams, tokenize=backend).score)


def score_generations(preds: Sequence[str], refs_lists: Sequence[str | Sequence[str]],
                      metrics: Iterable[str] = METRICS, tokenize: str = "auto") -> dict[str, float]:
    """Score a set of generations; every metric as a percentage (0..100).

    exact_match / contains / rouge_l are means over examples (×100); bleu is corpus BLEU. This is what the trainer
    calls on the validation set every `eval_steps` when `eval_generation_metric` is set.

    Raises:
        ConfigError: unknown metric name or tokenize mode.
    """
    names = check_metrics(metrics)
    check_tokenize(tokenize)
    if len(preds) != len(refs_lists):
        raise ValueError(f"score_generations: {len(preds)} predictions but {len(refs_lists)} reference lists")
    n = max(len(preds), 1)
    out: dict[str, float] = {}
    for name in names:
        if name == "exact_match":
            out[name] = 100.0 * sum(exact_match(p, r) for p, r in zip(preds, refs_lists)) / n
        elif name == "contains":
            out[name] = 100.0 * sum(contains_match(p, r) for p, r in zip(preds, refs_lists)) / n
        elif name == "rouge_l":
            out[name] = 100.0 * sum(rouge_l(p, r, tokenize) for p, r in zip(preds, refs_lists)) / n
        else:
            out[name] = bleu(preds, refs_lists, tokenize)
    return out


def example_scores(pred: str, refs: str | Sequence[str], metrics: Iterable[str] = METRICS,
                   tokenize: str = "auto") -> dict[str, float]:
    """Per-example scores (0..100) for the report's per-example rows. BLEU is a corpus metric and is left out."""
    out: dict[str, float] = {}
    for name in metrics:
        if name == "exact_match":
            out[name] = 100.0 * exact_match(pred, refs)
        elif name == "contains":
            out[name] = 100.0 * contains_match(pred, refs)
        elif name == "rouge_l":
            out[name] = 100.0 * rouge_l(pred, refs, tokenize)
    return out
