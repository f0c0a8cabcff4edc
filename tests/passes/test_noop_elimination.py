import pytest
import torch

from fx_helpers import aten_graph, op_counts, run_pass
from infer.passes.noop_elimination import NoopEliminationPass


def identity_heavy(x):
    a = x.view(x.shape)                    # identity view
    b = a.to(x.dtype)                      # identity cast
    c = b[:, :]                            # full slice
    d = c.view(-1).view(x.shape[0] * 2, -1)  # view chain
    return d * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 6), (3, 10)])
def test_identity_ops_removed_and_numbers_kept(dtype, shape):
    x = torch.randn(shape, dtype=dtype)
    gm = aten_graph(identity_heavy, x)
    before = op_counts(gm)
    rewrites, _ = run_pass(NoopEliminationPass, gm)
    after = op_counts(gm)
    assert rewrites >= 2
    assert sum(after.values()) < sum(before.values())
    assert after["aten.view.default"] == 1  # the chain collapsed to one real view
    assert after["aten.mul.Tensor"] == 1
    torch.testing.assert_close(gm(x), identity_heavy(x), rtol=0, atol=0)


def test_real_views_and_casts_are_kept():
    def fn(x):
        return x.view(2, -1).to(torch.float64).permute(1, 0)[1:] * 3

    x = torch.randn(4, 6)
    gm = aten_graph(fn, x)
    before = op_counts(gm)
    rewrites, _ = run_pass(NoopEliminationPass, gm)
    assert rewrites == 0
    assert op_counts(gm) == before
    torch.testing.assert_close(gm(x), fn(x))
