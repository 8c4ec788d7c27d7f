"""One host of a 2-process CPU "pod" (gloo collectives): trains the tiny VLM a few steps
on a mesh spanning both processes, each feeding only its own half of every batch array
through `global_batch`. Run by tests/test_multihost.py; `losses()` is also its reference."""
from __future__ import annotations

import json
import os
import sys

STEPS = 3


def batch():
    from glm5v_jax.data.synthetic import packed_vlm_batch

    from helpers import IMAGE_ID, IMAGE_SIZES

    # 8 image slots so that image arrays split over hosts like rows do
    return packed_vlm_batch(rows=8, seq_len=64, vocab_size=128, image_token_id=IMAGE_ID, image_sizes=IMAGE_SIZES,
                            max_patches=16, max_images=8, seed=0)


def losses(mesh_shape, devices=None) -> list[float]:
    """Losses of STEPS train steps on `mesh_shape`; each process passes its own rows."""
    import jax

    from glm5v_jax.sharding.mesh import MeshSpec, make_mesh
    from glm5v_jax.sharding.partition import create_sharded
    from glm5v_jax.sharding.rules import DEFAULT_RULES, check_rules
    from glm5v_jax.train.parallel import MeshPlan, batch_shardings, global_batch, jit_step

    from helpers import loss_step, sharded_muon_vlm, small_spec

    mesh = make_mesh(MeshSpec(shape=mesh_shape), devices)
    plan = MeshPlan(mesh, check_rules(DEFAULT_RULES, mesh.axis_names))
    make, shardings = sharded_muon_vlm(small_spec(trunk="isolate_vision"), mesh, plan.rules)
    graphdef, state, state_sh = create_sharded(make, mesh, shardings)
    full = batch()
    batch_sh = batch_shardings(full, plan)
    n, p = jax.process_count(), jax.process_index()
    mine = {k: v[p * (len(v) // n):(p + 1) * (len(v) // n)] for k, v in full.items()}  # this host's rows

    jitted = jit_step(loss_step(graphdef), plan, state_sh, batch_sh)
    out = []
    for _ in range(STEPS):
        state, loss = jitted(state, global_batch(mine, batch_sh))
        out.append(float(loss))
    return out


def main(process_id: int, port: int, out_path: str) -> None:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
    assert jax.process_count() == 2 and jax.device_count() == 8
    result = losses((2, 2, 1, 2))
    with open(out_path, "w") as f:
        json.dump({"process": process_id, "losses": result}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
