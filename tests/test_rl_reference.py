"""The reference model in host memory: the host copy lives in a host memory kind (pinned where the backend has
it), `on_device` gives arrays equal to the originals with the trainer's shardings (on 8 devices too), the
reference forward gives the same log-probabilities as the model itself, and after release the device-resident
bytes in `jax.live_arrays()` return to their earlier level."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from glm5v_jax.models.vlm import GLM5V
from glm5v_jax.rl.reference import HostReference, device_resident_bytes, host_memory_kind
from glm5v_jax.sharding.mesh import MeshSpec, make_mesh
from helpers import small_batch, small_spec


def test_host_reference_round_trip_and_release():
    model = GLM5V(small_spec(), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    mesh = make_mesh(MeshSpec(shape=(1, 8, 1, 1)), jax.devices()[:8])
    shardings = jax.tree.map(lambda x: NamedSharding(mesh, P(*([None] * x.ndim))), params)
    params = jax.device_put(params, shardings)
    ref = HostReference(params, shardings)
    assert ref.memory_kind == host_memory_kind(jax.devices()[0]) == "pinned_host"
    assert all(x.sharding.memory_kind == "pinned_host" for x in jax.tree.leaves(ref.host))

    batch = small_batch()

    @jax.jit
    def logp(p, rest, batch):
        logits = nnx.merge(graphdef, p, rest)(batch)["logits"]
        return jax.nn.log_softmax(logits, axis=-1)

    want = np.asarray(logp(params, rest, batch))
    del params  # the trainer's own copy is not what is measured
    before = device_resident_bytes()
    ref.prefetch()
    with ref.on_device() as on_device:
        assert ref.device_bytes() == ref.nbytes > 0
        assert device_resident_bytes() >= before + ref.nbytes
        for a, b in zip(jax.tree.leaves(on_device), jax.tree.leaves(ref.host)):
            assert a.sharding.memory_kind == "device" and a.sharding.mesh == mesh
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        got = np.asarray(logp(on_device, rest, batch))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert ref.device_bytes() == 0
    # the release gave every byte back, even with the caller still holding the parameters it was given
    assert device_resident_bytes() == before and all(x.is_deleted() for x in jax.tree.leaves(on_device))
    with ref.on_device() as again:  # and it can come back
        assert jnp.all(jnp.isfinite(jax.tree.leaves(again)[0]))
    assert device_resident_bytes() == before
