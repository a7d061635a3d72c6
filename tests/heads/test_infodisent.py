"""InfoDisent: the rotation stays orthogonal, its gradient, and the signed pooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from head_helpers import DIM, make, tokens



def test_infodisent_rotation_stays_orthogonal():
    head = make("infodisent")
    g = torch.Generator().manual_seed(3)
    for _ in range(5):  # optimiser-like steps folded into the rotation
        head.skew.data = torch.randn(DIM, DIM, generator=g) * 0.3
        head.retract()
        assert float(head.skew.detach().abs().max()) == 0.0
    u = head.rotation
    torch.testing.assert_close(u @ u.T, torch.eye(DIM), atol=1e-5, rtol=0)
    assert not torch.allclose(u, torch.eye(DIM))
    head.eval()
    head.skew.data = torch.randn(DIM, DIM, generator=g) * 0.1  # inference uses exp(A - A^T) R exactly
    expected = torch.linalg.matrix_exp(head.skew - head.skew.T) @ head.rotation
    torch.testing.assert_close(head.rotation_matrix(), expected)
    torch.testing.assert_close(expected @ expected.T, torch.eye(DIM), atol=1e-5, rtol=0)


def test_infodisent_gradient_at_zero_matches_matrix_exp():
    head = make("infodisent").train()
    head.rotation.copy_(torch.linalg.matrix_exp(torch.randn(DIM, DIM) * 0.2 - torch.randn(DIM, DIM) * 0.2))
    target = torch.randn(DIM, DIM)
    (head.rotation_matrix() * target).sum().backward()
    ours = head.skew.grad.clone()
    skew = torch.zeros(DIM, DIM, requires_grad=True)
    (torch.linalg.matrix_exp(skew - skew.T) @ head.rotation * target).sum().backward()
    torch.testing.assert_close(ours, skew.grad, atol=1e-5, rtol=1e-4)


def test_infodisent_pooling_positive_and_negative_evidence():
    head = make("infodisent").eval()
    x = tokens()
    j = x @ head.rotation_matrix().T
    pos, neg = head.channel_evidence(x)
    torch.testing.assert_close(pos, F.relu(j).amax(dim=1))
    torch.testing.assert_close(neg, F.relu(-j).amax(dim=1))
    torch.testing.assert_close(head(x), (pos - neg) @ F.relu(head.weight).T)
    head.train()  # the Gumbel-softmax stand-in is a weighted mean: never above the hard max
    with torch.no_grad():
        soft_pos, _ = head.channel_evidence(x)
    assert (soft_pos <= pos + 1e-5).all()
