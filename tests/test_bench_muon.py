"""experiments/bench_muon.py's Newton-Schulz FLOP count: the formula T (4 m^2 n + 2 m^3),
the closed-form overhead, routing-table counting, and XLA's own cost analysis."""

import jax
import jax.numpy as jnp
import optax
import pytest

from glm5v_jax.optim.newton_schulz import newton_schulz
from glm5v_jax.optim.routing import MatrixSpec
from helpers import experiment_module

bench = experiment_module("bench_muon")


def test_ns_flops_formula_and_closed_form():
    m, n = 128, 512
    assert bench.ns_flops(n, m, 5) == bench.ns_flops(m, n, 5) == 5 * (4 * m * m * n + 2 * m ** 3)
    assert bench.ns_flops(m, n, 1) * 5 == bench.ns_flops(m, n, 5)
    tokens = 4096  # NS / training FLOPs (6 m n B) equals T m (2n + m) / (3 n B) and is below T m / B
    ratio = bench.ns_flops(m, n) / (6 * m * n * tokens)
    assert ratio == pytest.approx(bench.ns_overhead_closed_form(m, n, tokens), rel=1e-12)
    assert ratio < 5 * m / tokens


def test_counting_over_a_routing_table():
    shapes = {("q",): (3, 64, 4, 32), ("o",): (4, 32, 64), ("norm",): (64,)}
    table = {("q",): MatrixSpec((0,), (1,), (2, 3)), ("o",): MatrixSpec((), (0, 1), (2,)), ("norm",): None}
    leaves = {leaf.path: leaf for leaf in bench.muon_matrices(shapes, table)}
    assert set(leaves) == {("q",), ("o",)}
    assert (leaves[("q",)].count, leaves[("q",)].fan_in, leaves[("q",)].fan_out) == (3, 64, 128)
    assert (leaves[("o",)].count, leaves[("o",)].fan_in, leaves[("o",)].fan_out) == (1, 128, 64)
    count, flops = bench.ns_flops_of_table(shapes, table, steps=5)
    assert count == 4
    assert flops == 3 * bench.ns_flops(64, 128) + bench.ns_flops(128, 64)


def _xla_flops(fn, x) -> float:
    try:
        cost = jax.jit(fn).lower(x).compile().cost_analysis()
    except Exception as e:  # noqa: BLE001 - backend without cost analysis
        pytest.skip(f"cost_analysis unavailable: {e}")
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        pytest.skip("cost_analysis reports no flops")
    return float(cost["flops"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(128, 512), (512, 128)])
def test_against_xla_cost_analysis_of_newton_schulz(shape, dtype):
    x = jnp.ones(shape, jnp.float32)
    one = _xla_flops(lambda a: newton_schulz(a, steps=1, dtype=dtype), x)
    assert one == pytest.approx(bench.ns_flops(*shape, steps=1), rel=0.05)
    # newton_schulz loops with lax.scan, an HLO while loop: XLA's cost analysis may count its
    # body once (this jax/XLA does) or times the trip count; either must match the formula.
    five = _xla_flops(lambda a: newton_schulz(a, steps=5, dtype=dtype), x)
    err = min(abs(five / bench.ns_flops(*shape, steps=5) - 1), abs(five / bench.ns_flops(*shape, steps=1) - 1))
    assert err < 0.05, (five, bench.ns_flops(*shape, steps=5))


def test_against_xla_cost_analysis_of_unrolled_optax_newton_schulz():
    # optax's default (one coefficient row) unrolls its 5 steps, so XLA counts every step.
    x = jnp.ones((128, 512), jnp.float32)
    coeffs = jnp.asarray((3.4445, -4.7750, 2.0315))
    flops = _xla_flops(lambda a: optax.contrib._muon.orthogonalize_via_newton_schulz(a, coeffs, 5), x)
    assert flops == pytest.approx(bench.ns_flops(128, 512, steps=5), rel=0.05)
