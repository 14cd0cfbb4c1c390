"""The expert-parallel exchange from Python: Dispatcher on loopback worlds (ranks as threads).

Every rank dispatches its tokens by the plan the config's gate and capacity make from its probs,
runs the experts it holds in NumPy on the received rows (segment by segment), and combines. The
result must equal each token's gated sum of its experts computed directly (1e-5), in capacity and
dropless mode, for 1, 2 and 4 ranks; the segments must name the rows they hold; and the backward
pair must return gate-weighted gradients.
"""

import numpy as np
import pytest

import moe_runtime
from ranks import run_ranks

M, H, E, S = 8, 16, 8, 24


def config(dropless, groups=1):
    return f"""
moe {{ model_dim: {M} num_experts: {E} expert {{ hidden_dim: {H} activation: RELU }}
      router {{ top_k: 2 capacity_factor_eval: {0.0 if dropless else 1.0} min_capacity: 1
                num_local_groups: {groups} }} }}
parallel {{ dropless_exchange: {str(dropless).lower()} }}
"""


def experts(seed=11):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((M, H)).astype(np.float32) * 0.3, rng.standard_normal(H).astype(np.float32) * 0.1,
             rng.standard_normal((H, M)).astype(np.float32) * 0.3, rng.standard_normal(M).astype(np.float32) * 0.1)
            for _ in range(E)]


def ffn(p, rows):
    w1, b1, w2, b2 = p
    return np.maximum(rows @ w1 + b1, 0.0) @ w2 + b2


def softmax(a):
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("dropless", [False, True])
def test_dispatch_experts_combine(ranks, dropless):
    rng = np.random.default_rng(ranks)
    xs = [rng.standard_normal((S, M)).astype(np.float32) for _ in range(ranks)]
    probs = [softmax(rng.standard_normal((S, E)).astype(np.float32) * 2) for _ in range(ranks)]
    dys = [rng.standard_normal((S, M)).astype(np.float32) for _ in range(ranks)]
    params = experts()

    def rank(c):
        d = moe_runtime.Dispatcher(config(dropless), comm=c)
        assert d.ranks == ranks and d.local_experts == E // ranks
        h = d.dispatch(xs[c.rank], probs[c.rank])
        out = np.zeros_like(h.rows)
        held = []
        for local, source, group, first, n in h.segments:
            e = c.rank * d.local_experts + local
            rows = h.rows[first:first + n]
            out[first:first + n] = ffn(params[e], rows)
            held.append((e, source, rows.copy()))
        y = d.combine(h, out)
        grad_rows = d.dispatch_backward(h, dys[c.rank])
        dx = d.combine_backward(h, np.ascontiguousarray(grad_rows))
        return y, h.experts, h.gates, held, dx, h.dropped_slots

    results = run_ranks(ranks, rank)
    dropped = 0
    for r, (y, ex, gates, _, dx, drops) in enumerate(results):
        want = np.zeros((S, M), np.float32)
        for t in range(S):
            for j in range(2):
                if ex[t, j] >= 0:
                    want[t] += gates[t, j] * ffn(params[ex[t, j]], xs[r][t:t + 1])[0]
        np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(dx, dys[r] * gates.sum(axis=1, keepdims=True), atol=1e-6, rtol=1e-6)
        dropped += drops
    if dropless:
        assert dropped == 0
    # Every received row is a token of its source rank routed to the segment's expert; in capacity
    # mode a segment is its block's C rows, the kept ones first and then zero padding.
    received = 0
    for _, _, _, held, _, _ in results:
        for e, source, rows in held:
            _, ex, _, _, _, _ = results[source]
            routed = xs[source][(ex == e).any(axis=1)]
            real = rows[np.any(rows != 0, axis=1)]
            if not dropless:
                assert not np.any(rows[len(real):]), "padding after the kept rows"
            for row in real:
                assert (routed == row).all(axis=1).any(), (e, source)
            received += len(real)
    kept = sum(int((ex >= 0).sum()) for _, ex, _, _, _, _ in results)
    assert received == kept


def test_capacity_drops_match_the_layer():
    """With the Layer's own router probs, the dispatcher keeps and drops the Layer's slots."""
    x = np.random.default_rng(5).standard_normal((S, M)).astype(np.float32)
    layer = moe_runtime.Layer(config(False), seed=2)
    _, routing = layer.forward(x)
    wg = layer.parameters()["router"]
    d = moe_runtime.Dispatcher(config(False))
    h = d.dispatch(x, softmax(x @ wg))
    assert np.array_equal(h.experts, routing["experts"])
    np.testing.assert_allclose(h.gates, routing["gates"], atol=1e-6)
    assert h.dropped_slots == routing["dropped_slots"] > 0
