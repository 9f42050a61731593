"""The chunked LM loss equals the plain one (value and gradients), and counts only labelled positions."""

import torch
from torch import nn

from loraforge.train.loss import IGNORE_INDEX, chunked_lm_loss, lm_loss_sum, trained_token_count


def _case(seed=0, B=3, T=11, H=16, V=50):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    head = nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a masked prompt
    labels[2, 7:] = IGNORE_INDEX  # padding
    return hidden, head, labels


def test_chunked_loss_matches_plain_value_and_gradients():
    hidden, head, labels = _case()
    plain, n_plain = lm_loss_sum(head(hidden), labels)
    plain.backward()
    g_hidden, g_head = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    for chunk in (1, 5, 4096):
        chunked, n = chunked_lm_loss(hidden, head, labels, chunk)
        chunked.backward()
        assert n.item() == n_plain.item()
        torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hidden.grad, g_hidden, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(head.weight.grad, g_head, rtol=1e-5, atol=1e-6)
        hidden.grad, head.weight.grad = None, None


def test_token_count_ignores_first_label_and_masked():
    assert trained_token_count([5, 6, 7]) == 2  # label 0 is never predicted
    assert trained_token_count([IGNORE_INDEX, IGNORE_INDEX, 7, 8]) == 2
    hidden, head, labels = _case()
    _, n = lm_loss_sum(head(hidden), labels)
    assert n.item() == sum(trained_token_count(row.tolist()) for row in labels)
