"""Test setup: 8 fake CPU devices and cheap XLA compilation, before any JAX work."""
import gc
import os
import subprocess
import sys

FAST_COMPILE = "--xla_backend_optimization_level=0"
# XLA:CPU's MLIR fusion emitters take about half of the compile time of the tiny models; the
# older emitters compile twice as fast. Newer jaxlibs dropped the flag (an unknown XLA flag
# aborts the process), so it is tried once in a subprocess before it is used.
NO_FUSION_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _compile_flags() -> str:
    flags = f"{FAST_COMPILE} {NO_FUSION_EMITTERS}"
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1)"], capture_output=True,
                           env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"), timeout=300)
    return flags if probe.returncode == 0 else FAST_COMPILE


# Tiny shapes: compile time dominates, so trade generated-code speed for it. Set once by the
# pytest controller; the xdist workers, subprocesses and notebook kernels inherit it.
if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = _compile_flags()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Free each module's compiled programs when it ends. An xdist worker runs many modules, and the jit
    caches of their models (e.g. the generation steps, keyed by each model's graph) would otherwise only
    grow: a worker reached 6 GB and the other crashed in an XLA compile on the 24 GB CI machine."""
    yield
    jax.clear_caches()
    gc.collect()


# Longest modules first. With `--dist loadscope` (scripts/test.sh) a module runs whole on one
# worker, so a long module collected last would leave the other worker idle at the end; starting
# the long ones first (longest-processing-time order) keeps both workers busy to the finish.
# Costs from `--durations` on the 2-core CI machine, most expensive first.
SLOW_MODULES = ("test_aot.py", "test_trainer.py", "test_mmtp_ablation.py", "test_sharded_training.py",
                "test_multihost.py", "test_colabs.py", "test_fault_injection.py", "test_stage_meshes.py",
                "test_chain.py", "test_rl_trainer.py", "test_cogvit_mim_sharded.py", "test_rl_batch.py",
                "test_kernel_training.py",
                "test_vlm.py", "test_speculative.py", "test_engine.py", "test_expert_parallel.py",
                "test_sft_generated_eval.py", "test_muon.py", "test_qk_clip.py")


def pytest_configure(config):
    """Keep SLOW_MODULES' order. pytest-xdist sorts loadscope's modules by their number of tests, most
    first, unless told not to (option `loadscopereorder`, pytest-xdist >= 3.8): that undid the order
    and left the long modules with few tests (test_trainer 6, test_chain 3, test_stage_meshes 2,
    test_multihost 1) for the end of the run, one worker finishing them while the other idled."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise

