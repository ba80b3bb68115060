"""Loss functions on small tensors: hand-computed values, masking, empty and degenerate cases."""

import math

import pytest
import torch
import torch.nn.functional as F

import train_latent_comm as tlc


def test_kl_is_zero_for_identical_distributions():
    logits = torch.randn(4, 11)
    torch.testing.assert_close(tlc.kl_per_token(logits, logits.clone(), 4.0), torch.zeros(4), atol=1e-6, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_matches_hand_computation(temperature):
    target = torch.tensor([[0.0, 0.0]])  # p = [1/2, 1/2] at any temperature
    logits = torch.tensor([[0.0, temperature * math.log(3.0)]])  # q = [1/4, 3/4] after dividing by T
    expected = temperature**2 * (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75))
    assert tlc.kl_per_token(target, logits, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_entropy_of_uniform_and_peaked():
    assert tlc.entropy_from_logits(torch.zeros(1, 50)).item() == pytest.approx(math.log(50), rel=1e-6)
    assert tlc.entropy_from_logits(torch.tensor([[100.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_uncertainty_weights_relu_quantile_clip_and_mean_normalisation():
    h_b = torch.tensor([3.0, 2.0, 1.0, 5.0, 1.0])
    h_d = torch.tensor([1.0, 2.0, 2.0, 1.0, 0.0])
    # u = [2, 0, 0, 4, 1]; positive u = [2, 4, 1], median 2 -> clipped [2, 0, 0, 2, 1], mean 1.
    w = tlc.uncertainty_weights(h_b, h_d, quantile=0.5)
    torch.testing.assert_close(w, torch.tensor([2.0, 0.0, 0.0, 2.0, 1.0]))
    # quantile 1 keeps the maximum: u / mean(u) with mean 7/5.
    w = tlc.uncertainty_weights(h_b, h_d, quantile=1.0)
    torch.testing.assert_close(w, torch.tensor([2.0, 0.0, 0.0, 4.0, 1.0]) / 1.4)
    assert not w.requires_grad


def test_uniform_weighting_ignores_entropies():
    w = tlc.uncertainty_weights(torch.rand(6), torch.rand(6), 0.95, mode="uniform")
    torch.testing.assert_close(w, torch.ones(6))


def test_all_zero_weights_give_zero_kl_with_graph_connected():
    kl = torch.rand(5, requires_grad=True)
    w = tlc.uncertainty_weights(torch.zeros(5), torch.ones(5), 0.95)
    assert torch.count_nonzero(w) == 0
    loss = tlc.weighted_kl(kl, w)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    torch.testing.assert_close(kl.grad, torch.zeros(5))


def test_weighted_kl_is_weighted_mean():
    kl = torch.tensor([1.0, 2.0, 3.0])
    w = torch.tensor([1.0, 0.0, 3.0])
    assert tlc.weighted_kl(kl, w).item() == pytest.approx(10.0 / (4.0 + 1e-6), rel=1e-6)


def test_alignment_loss_values():
    a = torch.randn(3, 4, 8)
    assert tlc.alignment_loss(a, a.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert tlc.alignment_loss(a, -a).item() == pytest.approx(2.0, abs=1e-6)
    x = torch.zeros(1, 2, 4)
    y = torch.zeros(1, 2, 4)
    x[..., 0], y[..., 1] = 1.0, 1.0
    assert tlc.alignment_loss(x, y).item() == pytest.approx(1.0, abs=1e-6)
    # Means over K first: per-latent directions that cancel do not count.
    z = torch.tensor([[[1.0, 0.0], [1.0, 2.0]]])
    assert tlc.alignment_loss(z, torch.tensor([[[0.0, 1.0], [2.0, 1.0]]])).item() == pytest.approx(0.0, abs=1e-6)


@pytest.fixture()
def head_and_rows():
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(16, 37, bias=False)
    rows = torch.randn(23, 16, requires_grad=True)
    return lm_head, rows


def test_chunked_nll_matches_full_cross_entropy_and_gradient(head_and_rows, monkeypatch):
    lm_head, rows = head_and_rows
    targets = torch.randint(0, 37, (23,))
    full = F.cross_entropy(lm_head(rows), targets, reduction="sum")
    (grad_full,) = torch.autograd.grad(full, rows)
    monkeypatch.setattr(tlc, "LOGIT_CHUNK_ELEMENTS", 37 * 5)  # 5 rows a chunk, 5 chunks
    chunked = tlc.chunked_nll(rows, targets, lm_head).sum()
    (grad_chunked,) = torch.autograd.grad(chunked, rows)
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(grad_chunked, grad_full)


def test_chunked_kl_matches_unchunked_with_gradient_only_to_the_student_side(head_and_rows, monkeypatch):
    lm_head, rows = head_and_rows
    target_rows = torch.randn(23, 16)
    full = tlc.kl_per_token(lm_head(target_rows), lm_head(rows), 2.0)
    (grad_full,) = torch.autograd.grad(full.sum(), rows)
    monkeypatch.setattr(tlc, "LOGIT_CHUNK_ELEMENTS", 37 * 4)
    chunked = tlc.chunked_kl(rows, target_rows, lm_head, 2.0)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), rows)
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(grad_chunked, grad_full)


def test_chunked_helpers_accept_no_rows(head_and_rows):
    lm_head, _ = head_and_rows
    empty = torch.zeros(0, 16)
    assert tlc.chunked_entropy(empty, lm_head).shape == (0,)
    assert tlc.chunked_kl(empty, empty, lm_head, 1.0).shape == (0,)
    assert tlc.chunked_nll(empty, torch.zeros(0, dtype=torch.long), lm_head).shape == (0,)
