"""minift.losses.distill: forward / reverse KL and the generalized JSD by hand, equal to trl's
generalized_jsd_loss (oracle); the sparse top-k + tail variant equal to the dense one when k covers V; the
chunked loss through the LM heads equal to the plain one in values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from oracles import trl_generalized_jsd

from minift.losses import (
    chunked_distill_loss,
    distill_divergence,
    sparse_distill_divergence,
)


def test_by_hand_on_two_tokens():
    # student S = (.5, .5) (logits 0, 0); teacher T = (.8, .2) (logits log 4, 0)
    s, t = torch.zeros(1, 2), torch.tensor([[math.log(4.0), 0.0]])
    forward = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)  # KL(T || S) = .192745
    reverse = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)  # KL(S || T) = .223144
    assert distill_divergence(s, t, beta=0.0).item() == pytest.approx(forward, abs=1e-6)
    assert distill_divergence(s, t, beta=1.0).item() == pytest.approx(reverse, abs=1e-6)
    # beta .5: M = (.65, .35); .5 KL(T || M) + .5 KL(S || M)
    m = (0.65, 0.35)
    jsd = 0.5 * (0.8 * math.log(0.8 / m[0]) + 0.2 * math.log(0.2 / m[1])) + \
        0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    assert distill_divergence(s, t, beta=0.5).item() == pytest.approx(jsd, abs=1e-6)
    # temperature 2 on logits (log 4, 0): T = (2/3, 1/3)
    t2 = (2 / 3, 1 / 3)
    assert distill_divergence(s, t, beta=0.0, temperature=2.0).item() == pytest.approx(
        t2[0] * math.log(t2[0] / 0.5) + t2[1] * math.log(t2[1] / 0.5), abs=1e-6)
    assert distill_divergence(t, t, beta=0.3).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_equals_trl_generalized_jsd(beta, temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g) * 2, torch.randn(2, 5, 11, generator=g) * 2
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = labels[1, 4] = -100
    ours = distill_divergence(student[labels != -100], teacher[labels != -100], beta=beta, temperature=temperature)
    theirs = trl_generalized_jsd(student, teacher, labels, beta=beta, temperature=temperature)
    assert ours.mean().item() == pytest.approx(theirs.item(), abs=1e-6)


def test_gradients_flow_to_the_student_only():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(3, 7, generator=g, requires_grad=True)
    teacher = torch.randn(3, 7, generator=g, requires_grad=True)
    distill_divergence(student, teacher.detach(), beta=0.5).sum().backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_sparse_teacher_with_a_tail_bucket(beta):
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    teacher_logps = teacher.log_softmax(-1)
    dense = distill_divergence(student, teacher, beta=beta)
    for k, tol in ((8, 1e-6), (9, 1e-5)):  # k = V - 1: the tail is the one token left; k = V: no tail
        values, ids = teacher_logps.topk(k, dim=-1)
        assert torch.allclose(sparse_distill_divergence(student, ids, values, beta=beta), dense, atol=tol)
    # k = 3: the buckets by hand for row 0
    values, ids = teacher_logps.topk(3, dim=-1)
    s = student.log_softmax(-1)[0]
    s_buckets = torch.cat([s[ids[0]], torch.log(1 - s[ids[0]].exp().sum())[None]])
    t_buckets = torch.cat([values[0], torch.log(1 - values[0].exp().sum())[None]])
    expected = distill_divergence(s_buckets[None], t_buckets[None], beta=beta)  # log-probs are their own logits
    sparse = sparse_distill_divergence(student, ids, values, beta=beta)
    assert sparse[0].item() == pytest.approx(expected.item(), abs=1e-6)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="beta must be in"):
        distill_divergence(torch.zeros(1, 3), torch.zeros(1, 3), beta=1.5)
    with pytest.raises(ValueError, match="both be"):
        distill_divergence(torch.zeros(1, 3), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="teacher_ids and teacher_logps"):
        sparse_distill_divergence(torch.zeros(2, 3), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2))


def _heads(seed: int, n=13, hs=8, ht=12, vs=19, vt=23):
    """Student and teacher hidden states and heads; the teacher's head has 4 padded rows past the shared 19."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, hs, generator=g, dtype=torch.float64), torch.randn(vs, hs, generator=g, dtype=torch.float64),
            torch.randn(vs, generator=g, dtype=torch.float64), torch.randn(n, ht, generator=g, dtype=torch.float64),
            torch.randn(vt, ht, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_equals_unchunked_in_values_and_gradients(beta, temperature):
    """Chunks of 4 rows (13 rows: the last chunk is short) against the divergence of the full logits, with the
    teacher's padded rows sliced off: the summed value and the gradients of hidden, weight and bias to 1e-6."""
    hidden, weight, bias, t_hidden, t_weight = _heads(3)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    plain = distill_divergence(leaves[0] @ leaves[1].T + leaves[2], t_hidden @ t_weight[:19].T, beta=beta,
                               temperature=temperature).sum()
    plain.backward()
    chunked_leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    chunked = chunked_distill_loss(chunked_leaves[0], chunked_leaves[1], bias=chunked_leaves[2], teacher_hidden=t_hidden,
                                   teacher_weight=t_weight, beta=beta, temperature=temperature, chunk_size=4)
    (chunked * 1.5).backward()  # the upstream factor reaches every gradient
    assert chunked.item() == pytest.approx(plain.item(), abs=1e-6)
    for ours, theirs in zip(chunked_leaves, leaves):
        assert torch.allclose(ours.grad, 1.5 * theirs.grad, atol=1e-6, rtol=0), (ours.grad - 1.5 * theirs.grad).abs().max()
    with torch.no_grad():  # eval: the same value without gradients
        assert chunked_distill_loss(hidden, weight, bias=bias, teacher_hidden=t_hidden, teacher_weight=t_weight,
                                    beta=beta, temperature=temperature, chunk_size=5).item() == pytest.approx(plain.item(), abs=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_sparse_teacher_equals_the_sparse_divergence(beta):
    hidden, weight, _, t_hidden, t_weight = _heads(4)
    values, ids = (t_hidden @ t_weight[:19].T).log_softmax(-1).topk(5, dim=-1)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    plain = sparse_distill_divergence(h @ w.T, ids, values, beta=beta).sum()
    plain.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    chunked = chunked_distill_loss(h2, w2, teacher_ids=ids, teacher_logps=values, beta=beta, chunk_size=3)
    chunked.backward()
    assert chunked.item() == pytest.approx(plain.item(), abs=1e-6)
    assert torch.allclose(h2.grad, h.grad, atol=1e-6, rtol=0) and torch.allclose(w2.grad, w.grad, atol=1e-6, rtol=0)


def test_chunked_frozen_head_and_bad_teachers():
    hidden, weight, _, t_hidden, t_weight = _heads(5)
    h = hidden.clone().requires_grad_()
    chunked_distill_loss(h, weight, teacher_hidden=t_hidden, teacher_weight=t_weight, chunk_size=4).backward()
    h_plain = hidden.clone().requires_grad_()
    distill_divergence(h_plain @ weight.T, t_hidden @ t_weight[:19].T).sum().backward()
    assert torch.allclose(h.grad, h_plain.grad, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="either as teacher_hidden"):
        chunked_distill_loss(hidden, weight, teacher_hidden=t_hidden)
    with pytest.raises(ValueError, match="either as teacher_hidden"):
        chunked_distill_loss(hidden, weight)
    with pytest.raises(ValueError, match="teacher_hidden must be"):
        chunked_distill_loss(hidden, weight, teacher_hidden=t_hidden[:4], teacher_weight=t_weight)
    with pytest.raises(ValueError, match="vocab_size 30 is more than"):
        chunked_distill_loss(hidden, weight, teacher_hidden=t_hidden, teacher_weight=t_weight, vocab_size=30)
    with pytest.raises(ValueError, match="past the vocabulary"):
        chunked_distill_loss(hidden, weight, teacher_ids=torch.full((13, 2), 19), teacher_logps=torch.zeros(13, 2))
