"""The linear probe."""

from __future__ import annotations

import torch

from head_helpers import CLASSES, make, tokens



def test_linear_probe_on_pooled_or_mean():
    head = make("linear").eval()
    x = tokens()
    torch.testing.assert_close(head(x), head(None, pooled=x.mean(1)))
    torch.testing.assert_close(head.presence(x) + head.linear.bias, head(x), rtol=1e-5, atol=1e-5)
    assert head.prototype_count == CLASSES
