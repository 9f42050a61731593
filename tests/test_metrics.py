"""Metric unit tests with hand-computed values (English and Chinese)."""

from __future__ import annotations

import math

import pytest

from loraforge.errors import ConfigError
from loraforge.metrics import (
    bleu,
    contains_match,
    example_scores,
    exact_match,
    is_cjk,
    normalize_answer,
    rouge_l,
    score_generations,
    tokenize_text,
)


def test_is_cjk():
    assert is_cjk("北京")
    assert is_cjk("hello 世界")
    assert is_cjk("カタカナ") and is_cjk("한국어")
    assert not is_cjk("hello, world!")
    assert not is_cjk("")


@pytest.mark.parametrize("text, expected", [
    ("The Capital of Zanthoria is  Qelmor!", "capital of zanthoria is qelmor"),
    ("  An apple, a day. ", "apple day"),
    ("北京。", "北京"),
    ("首都是 北京 ！", "首都是北京"),
    ("ＡＢＣ１２３", "abc123"),  # full-width forms fold to ASCII (NFKC)
    ("答案是 GPT 4", "答案是gpt 4"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_normalizes_and_accepts_any_reference():
    assert exact_match("Qelmor.", "qelmor") == 1.0
    assert exact_match("The answer: Paris", ["answer paris", "Lyon"]) == 1.0
    assert exact_match("Paris is the capital", "Paris") == 0.0
    assert exact_match("北京。", ["上海", "北京"]) == 1.0
    assert exact_match("北京市", "北京") == 0.0


def test_contains_match_respects_word_boundaries_but_not_for_cjk():
    assert contains_match("I think the capital of Zanthoria is Qelmor.", "Qelmor") == 1.0
    assert contains_match("concatenate", "cat") == 0.0
    assert contains_match("cats", "cat") == 0.0
    assert contains_match("中国的首都是北京。", "北京") == 1.0
    assert contains_match("我们使用GPT4模型", "gpt4") == 1.0  # CJK neighbours count as word boundaries
    assert contains_match("anything", ["", "  "]) == 0.0  # an empty reference never matches
    assert contains_match("red and blue", ["green", "Blue"]) == 1.0


def test_tokenize_modes():
    assert tokenize_text("Hello, World!", "word") == ["hello", "world"]
    assert tokenize_text("我爱北京", "auto") == ["我", "爱", "北", "京"]
    # mixed text in auto mode: CJK characters one by one, Latin runs as words
    assert tokenize_text("我用Python写代码", "auto") == ["我", "用", "python", "写", "代", "码"]
    assert tokenize_text("ab c", "char") == ["a", "b", "c"]
    assert tokenize_text("我爱北京天安门", "jieba") == ["我", "爱", "北京", "天安门"]
    with pytest.raises(ConfigError) as err:
        tokenize_text("x", "chars")
    assert "did you mean `char`" in err.value.format()


def test_rouge_l_english_hand_computed():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5; P = 5/6, R = 5/5 -> F1 = 10/11
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(10 / 11)
    # LCS("a b c d", "a c e") = 2 ("a c"); P = 2/4, R = 2/3 -> F1 = 2*(1/2)(2/3)/(1/2+2/3) = 4/7
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("", "") == 1.0
    assert rouge_l("", "a") == 0.0
    # best of several references
    assert rouge_l("a b c d", ["x", "a b c d"]) == 1.0


def test_rouge_l_chinese_character_and_word_level():
    # characters: 我 爱 北 京 vs 我 在 北 京 -> LCS 3 of 4 each -> 0.75
    assert rouge_l("我爱北京", "我在北京") == pytest.approx(0.75)
    assert rouge_l("我爱北京", "我在北京", tokenize="char") == pytest.approx(0.75)
    # word mode on unspaced Chinese sees one token each: no overlap at all (why auto exists)
    assert rouge_l("我爱北京", "我在北京", tokenize="word") == 0.0
    # jieba: [我, 爱, 北京, 天安门] vs [我, 在, 北京] -> LCS 2; P = 2/4, R = 2/3 -> 4/7
    assert rouge_l("我爱北京天安门", "我在北京", tokenize="jieba") == pytest.approx(4 / 7)


def test_bleu_perfect_partial_and_chinese():
    assert bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)
    assert bleu(["completely different words here"], [["the cat sat on the mat"]]) == pytest.approx(0.0)
    # Hand-computed: hyp "a b c d e" vs ref "a b c d f": p1=4/5, p2=3/4, p3=2/3, p4=1/2, BP=1
    # BLEU = (4/5 * 3/4 * 2/3 * 1/2) ** (1/4) = 0.2 ** 0.25
    assert bleu(["a b c d e"], [["a b c d f"]]) == pytest.approx(100 * 0.2 ** 0.25, abs=1e-6)
    # Chinese: with `auto` each character is a token (sacrebleu's zh tokenizer), so a one-character change
    # gives the same hand-computed value as above; without it, the sentence would be one token and score 0.
    assert bleu(["我爱北京天安门"], [["我爱北京天安们"]]) == pytest.approx(
        100 * ((6 / 7) * (5 / 6) * (4 / 5) * (3 / 4)) ** 0.25, abs=1e-6)
    assert bleu(["我爱北京天安门"], [["我爱北京天安们"]], tokenize="word") == pytest.approx(0.0)
    assert bleu(["我爱北京天安门"], [["我爱北京天安门"]], tokenize="jieba") == pytest.approx(100.0)


def test_bleu_multiple_and_variable_references():
    # the second reference of the first example matches exactly; the second example has one reference
    score = bleu(["a b c d", "e f g h"], [["x y z w", "a b c d"], ["e f g h"]])
    assert score == pytest.approx(100.0)
    assert bleu([], []) == 0.0


def test_score_generations_percentages():
    preds = ["Qelmor.", "It is Qelmor", "no idea"]
    refs = [["qelmor"], "Qelmor", ["Qelmor", "Q."]]
    scores = score_generations(preds, refs, ("exact_match", "contains", "rouge_l", "bleu"))
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["contains"] == pytest.approx(200 / 3)
    # rouge_l: 1, F1("it is qelmor", "qelmor") = 2*(1/3)(1)/(4/3) = 1/2, 0 -> mean 0.5
    assert scores["rouge_l"] == pytest.approx(50.0)
    assert 0.0 <= scores["bleu"] <= 100.0 and not math.isnan(scores["bleu"])
    assert list(score_generations(["a"], ["a"], ["contains"])) == ["contains"]


def test_score_generations_rejects_unknown_metric_with_suggestion():
    with pytest.raises(ConfigError) as err:
        score_generations(["a"], ["a"], ["exact_match", "rougel"])
    text = err.value.format()
    assert "metrics[1]" in text and "rougel" in text and "did you mean `rouge_l`" in text


def test_example_scores_leave_out_corpus_bleu():
    assert example_scores("Qelmor", ["qelmor"]) == {"exact_match": 100.0, "contains": 100.0, "rouge_l": 100.0}
