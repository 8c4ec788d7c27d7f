"""TPU (Mosaic) grouped matmul `glm5v_jax.kernels.gmm_tpu`, tested on CPU.

* HLO interpreter (`interpret=True`): forward and vjp against `jax.lax.ragged_dot` and
  the float32 `gmm_reference`, with group sizes traced under jit (so one compile
  serves many group layouts): empty groups, one group, sum below m, sizes that are
  not tile multiples, k and n that are not multiples of 128, transpose_rhs, bf16.
* TPU-semantics interpreter with the race detector (megacore: 2 cores) on a subset.
* TPU lowering (`tpu_custom_call`) and a full Mosaic compile for a v5p topology.
* Tiling validation.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from glm5v_jax.kernels.gmm_tpu import (
    DEFAULT_TILING,
    check_tiling,
    default_tiling,
    gmm_tpu,
    group_offsets,
    make_visits,
    tgmm_tpu,
)
from glm5v_jax.kernels.reference import gmm_reference

from helpers import rel_err

SMALL_TILING = (64, 128, 128)  # several m tiles per problem, shared tiles, padded n


def _tgmm_ref(lhs, rhs, sizes) -> np.ndarray:
    """out[g] = lhs[rows_g].T @ rhs[rows_g] in float64."""
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    ends = np.cumsum(sizes)
    return np.stack([lhs[e - s:e].T @ rhs[e - s:e] for s, e in zip(sizes, ends)])


def _inputs(m, k, n, g, dtype, *, transpose_rhs=False, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    lhs = jax.random.normal(k1, (m, k), jnp.float32).astype(dtype)
    rhs = jax.random.normal(k2, (g, n, k) if transpose_rhs else (g, k, n), jnp.float32).astype(dtype)
    ct = jax.random.normal(k3, (m, n), jnp.float32).astype(dtype)
    return lhs, rhs, ct


def _vjp(fn):
    """jit(lhs, rhs, sizes, ct) -> (out, dlhs, drhs) for fn(lhs, rhs, sizes); sizes traced."""
    def run(lhs, rhs, sizes, ct):
        out, pullback = jax.vjp(lambda a, b: fn(a, b, sizes), lhs, rhs)
        return (out, *pullback(ct))
    return jax.jit(run)


def _as_kn(rhs, transpose_rhs):
    return jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs


@functools.cache
def _reference_vjps(transpose_rhs: bool):
    """Jitted (ragged_dot, gmm_reference) vjps, shared by all tests with this layout."""
    return (_vjp(lambda a, b, s: jax.lax.ragged_dot(a, _as_kn(b, transpose_rhs), s)),
            _vjp(lambda a, b, s: gmm_reference(a, _as_kn(b, transpose_rhs), s)))


def _check_against_refs(kernel_vjp, lhs, rhs, sizes, ct, *, transpose_rhs, tol):
    """Kernel forward + vjp vs ragged_dot (same dtype) and vs the float32 reference."""
    sizes_j = jnp.asarray(sizes, jnp.int32)
    out, dlhs, drhs = kernel_vjp(lhs, rhs, sizes_j, ct)
    ragged_vjp, ref_vjp = _reference_vjps(transpose_rhs)
    rd = ragged_vjp(lhs, rhs, sizes_j, ct)
    f32 = [x.astype(jnp.float32) for x in (lhs, rhs, ct)]
    ref = ref_vjp(*f32[:2], sizes_j, f32[2])
    for name, got, want_rd, want_ref in zip(("out", "dlhs", "drhs"), (out, dlhs, drhs), rd, ref):
        assert got.dtype == want_rd.dtype, name
        assert rel_err(got, want_rd) <= tol, (name, "ragged_dot", sizes)
        assert rel_err(got, want_ref) <= tol, (name, "reference", sizes)
    total = int(np.sum(sizes))
    # Rows past the sum: zero output and zero gradient, exactly.
    assert not np.any(np.asarray(out[total:])) and not np.any(np.asarray(dlhs[total:]))


# m=256, k=96 (one full-dim k tile), n=200 (padded to 2 n tiles), G=6, tm=64 (4 m tiles).
F32_SIZES = {
    "mixed": [0, 37, 0, 100, 3, 60],  # empty groups, shared tiles, sum 200 < m
    "tail_tiles": [10, 0, 50, 0, 0, 20],  # sum 80: two whole tiles past the end
    "aligned": [64, 64, 0, 64, 64, 0],  # tile multiples, sum == m
    "one_group": [0, 0, 256, 0, 0, 0],
    "all_empty": [0, 0, 0, 0, 0, 0],
}
_f32_vjp = _vjp(lambda a, b, s: gmm_tpu(a, b, s, tiling=SMALL_TILING, interpret=True))


@pytest.mark.parametrize("case", list(F32_SIZES))
def test_gmm_f32_forward_and_grads(case):
    lhs, rhs, ct = _inputs(256, 96, 200, 6, jnp.float32)
    _check_against_refs(_f32_vjp, lhs, rhs, F32_SIZES[case], ct, transpose_rhs=False, tol=1e-5)


def test_gmm_bf16_transpose_rhs_odd_shapes():
    """bf16, rhs [G, n, k]; m=200 (padded), k=160 (padded to 2 k tiles), n=96 (full dim)."""
    lhs, rhs, ct = _inputs(200, 160, 96, 3, jnp.bfloat16, transpose_rhs=True)
    fn = _vjp(lambda a, b, s: gmm_tpu(a, b, s, tiling=(32, 128, 128), transpose_rhs=True, interpret=True))
    for sizes in ([70, 0, 100], [0, 200, 0]):
        _check_against_refs(fn, lhs, rhs, sizes, ct, transpose_rhs=True, tol=2e-2)


def test_gmm_default_tiling_one_group():
    """Default tiling (one 512-row tile shared by all groups); a single group, G=1."""
    lhs, rhs, ct = _inputs(512, 256, 256, 1, jnp.float32)
    fn = _vjp(lambda a, b, s: gmm_tpu(a, b, s, interpret=True))
    _check_against_refs(fn, lhs, rhs, [300], ct, transpose_rhs=False, tol=1e-5)


def test_gmm_output_dtype_and_int_grad():
    """preferred_element_type sets the output dtype; group_sizes gets a float0 cotangent."""
    lhs, rhs, _ = _inputs(64, 128, 128, 2, jnp.bfloat16)
    sizes = jnp.array([20, 30], jnp.int32)
    out = gmm_tpu(lhs, rhs, sizes, preferred_element_type=jnp.float32, interpret=True)
    assert out.dtype == jnp.float32 and out.shape == (64, 128)
    ref = gmm_reference(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes)
    assert rel_err(out, ref) <= 1e-2
    loss = lambda a, b, s: jnp.sum(gmm_tpu(a, b, s, interpret=True).astype(jnp.float32))  # noqa: E731
    d_sizes = jax.grad(loss, argnums=2, allow_int=True)(lhs, rhs, sizes)
    assert d_sizes.dtype == jax.dtypes.float0 and d_sizes.shape == (2,)


def test_tgmm_direct():
    """tgmm vs float64 numpy: empty groups are zero, rows past the sum are ignored, num_groups."""
    lhs, _, rhs = _inputs(256, 96, 200, 1, jnp.float32, seed=1)
    fn = jax.jit(lambda a, b, s: tgmm_tpu(a, b, s, tiling=SMALL_TILING, interpret=True))
    for sizes in ([0, 37, 0, 100, 3, 60], [0, 0, 0, 0, 0, 0], [256, 0, 0, 0, 0, 0]):
        out = fn(lhs, rhs, jnp.asarray(sizes, jnp.int32))
        assert out.shape == (6, 96, 200)
        assert rel_err(out, _tgmm_ref(lhs, rhs, sizes)) <= 1e-5, sizes
    out = tgmm_tpu(lhs, rhs, jnp.array([40, 0, 100], jnp.int32), num_groups=2, interpret=True)
    assert out.shape == (2, 96, 200)
    assert rel_err(out, _tgmm_ref(lhs, rhs, [40, 0])) <= 1e-5


def test_visit_metadata():
    """The visit list: row order, the static bound, tail visits, empty-group visits."""
    sizes = jnp.array([0, 37, 0, 100, 3, 30], jnp.int32)  # sum 170: tile 3 (rows 192..255) is past the end
    offsets = group_offsets(sizes, 256)
    gid, tile, num = make_visits(offsets, 4, 64, visit_empty_groups=False, visit_tail_tiles=True)
    assert gid.shape == tile.shape == (4 + 6 - 1,)
    n = int(num)
    pairs = list(zip(np.asarray(gid)[:n].tolist(), np.asarray(tile)[:n].tolist()))
    assert pairs == [(1, 0), (3, 0), (3, 1), (3, 2), (4, 2), (5, 2), (5, 3)]  # last one: tail tile 3
    gid, tile, num = make_visits(offsets, 4, 64, visit_empty_groups=True, visit_tail_tiles=False)
    assert np.asarray(gid)[:int(num)].tolist() == [0, 1, 2, 3, 3, 3, 4, 5]


@pytest.fixture
def race_state():
    """The TPU interpreter's race-detection state (private module), reset around the test."""
    ipc = pytest.importorskip("jax._src.pallas.mosaic.interpret.interpret_pallas_call")
    pltpu.reset_tpu_interpret_mode_state()
    yield ipc
    pltpu.reset_tpu_interpret_mode_state()


def test_no_races_tpu_interpreter(race_state, capfd):
    """TPU-semantics interpreter, 2 cores (the parallel grid axis is split): exact results, no races."""
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    sizes = [0, 37, 30, 20]  # sum 87: empty group, shared tiles, a whole tile (rows 96..127) past the end
    lhs, rhs, _ = _inputs(128, 96, 256, 4, jnp.float32)
    out = gmm_tpu(lhs, rhs, jnp.asarray(sizes, jnp.int32), tiling=(32, 128, 128), interpret=params)
    assert rel_err(out, gmm_reference(lhs, rhs, jnp.asarray(sizes, jnp.int32))) <= 1e-5
    assert not race_state.races.races_found
    out = tgmm_tpu(lhs, out, jnp.asarray(sizes, jnp.int32), tiling=(32, 128, 128), interpret=params)
    assert rel_err(out, _tgmm_ref(lhs, gmm_reference(lhs, rhs, jnp.asarray(sizes, jnp.int32)), sizes)) <= 1e-5
    assert not race_state.races.races_found
    assert "RACE DETECTED" not in capfd.readouterr().out


LOWER_SHAPES = dict(lhs=(512, 256), rhs=(4, 256, 256), sizes=(4,))


def _value_and_grad(lhs, rhs, sizes):
    loss = lambda a, b: jnp.sum(jnp.sin(gmm_tpu(a, b, sizes).astype(jnp.float32)))  # noqa: E731
    return jax.value_and_grad(loss, argnums=(0, 1))(lhs, rhs)


def _lower_args(dtype, sharding=None):
    shapes = LOWER_SHAPES
    return (jax.ShapeDtypeStruct(shapes["lhs"], dtype, sharding=sharding),
            jax.ShapeDtypeStruct(shapes["rhs"], dtype, sharding=sharding),
            jax.ShapeDtypeStruct(shapes["sizes"], jnp.int32, sharding=sharding))


def test_lowers_for_tpu():
    """Default tiling lowers to Mosaic: 1 kernel forward, 3 for value_and_grad (fwd, dlhs, drhs)."""
    args = _lower_args(jnp.bfloat16)
    fwd = jax.jit(lambda a, b, s: gmm_tpu(a, b, s)).trace(*args).lower(lowering_platforms=("tpu",))
    assert fwd.as_text().count("tpu_custom_call") == 1
    vg = jax.jit(_value_and_grad).trace(*args).lower(lowering_platforms=("tpu",))
    assert vg.as_text().count("tpu_custom_call") == 3


def test_mosaic_compile_v5p(monkeypatch):
    """Full TPU compile (Mosaic included) on a v5p topology from a CPU host."""
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5p-8")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    topologies = pytest.importorskip("jax.experimental.topologies")
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
    except Exception as e:  # no libtpu / unsupported topology
        pytest.skip(f"TPU topology unavailable: {e}")
    mesh = jax.sharding.Mesh(np.array(topo.devices[:1]), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    compiled = jax.jit(_value_and_grad).lower(*_lower_args(jnp.bfloat16, sharding)).compile()
    assert compiled.memory_analysis() is not None


def test_tiling_rules():
    """Illegal tilings raise ValueError naming `tiling` before lowering; legal ones are clipped."""
    assert DEFAULT_TILING == (512, 1024, 1024)
    assert check_tiling((64, 128, 128), 512, 96, 1000, jnp.float32) == (64, 96, 128)  # tk clipped to k
    assert default_tiling(4096, 1536, 96, jnp.bfloat16) == (512, 768, 96)
    lhs = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16)
    rhs = jax.ShapeDtypeStruct((4, 256, 256), jnp.bfloat16)
    sizes = jax.ShapeDtypeStruct((4,), jnp.int32)
    bad = {
        (100, 128, 128): "tm=100 must be a multiple of 16",  # sublane rule
        (8, 128, 128): "tm=8 must be a multiple of 16",  # bf16 needs 16 rows
        (64, 96, 128): "tk=96 must be a multiple of 128",  # lane rule
        (64, 128, 200): "tn=200 must be a multiple of 128",
        (64, 128): "tuple of three positive ints",
    }
    for tiling, msg in bad.items():
        with pytest.raises(ValueError, match="tiling") as info:
            jax.eval_shape(lambda a, b, s: gmm_tpu(a, b, s, tiling=tiling), lhs, rhs, sizes)
        assert msg in str(info.value)
    with pytest.raises(ValueError, match="tiling.*VMEM"):
        big = jax.ShapeDtypeStruct((8192, 8192), jnp.float32)
        jax.eval_shape(lambda a, b, s: gmm_tpu(a, b, s, tiling=(4096, 8192, 8192)), big,
                       jax.ShapeDtypeStruct((4, 8192, 8192), jnp.float32), sizes)
    with pytest.raises(ValueError, match="tk=100"):
        jax.eval_shape(lambda a, b, s: tgmm_tpu(a, b, s, tiling=(64, 100, 128)), lhs, lhs, sizes)
