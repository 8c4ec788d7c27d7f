"""Multi-host readiness on one machine: two JAX processes (4 CPU devices each, gloo
collectives) train on a mesh spanning both, each feeding only its own rows through
`jax.make_array_from_process_local_data`; the losses equal one process on one device."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

import multihost_worker

TESTS = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_device(tmp_path):
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]))
    procs = [subprocess.Popen([sys.executable, str(TESTS / "multihost_worker.py"), str(i), str(port),
                               str(tmp_path / f"{i}.json")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    results = [json.loads((tmp_path / f"{i}.json").read_text())["losses"] for i in range(2)]
    reference = multihost_worker.losses((1, 1, 1, 1), jax.devices()[:1])
    for losses in results:  # both hosts see the same (global) loss
        np.testing.assert_allclose(losses, reference, rtol=1e-5, atol=1e-5)
    assert reference[-1] < reference[0]
