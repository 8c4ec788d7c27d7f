"""Metric writers after a kill: a partial metrics.jsonl line, the rows and TensorBoard events logged
again after a resume (rollback of metrics.jsonl, TensorBoard's purge), CPU only."""
import json
import logging
import os
import subprocess
import tempfile
import time

import pytest

from glm5v_jax.train.writers import JsonlWriter, TensorBoardWriter, plot_curves, read_jsonl, rollback_jsonl

PARTIAL = '{"loss": 0.5, "st'  # what a kill or a full disk leaves mid-write


def _write_metrics(path, steps, partial=True):
    lines = [json.dumps({"step": s, "loss": 10.0 / s}) for s in steps]
    path.write_text("\n".join(lines) + "\n" + (PARTIAL if partial else ""))


def test_read_jsonl_skips_unparsable_lines_with_one_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    _write_metrics(path, [1, 2, 3], partial=False)
    with open(path, "a") as f:
        f.write("not json\n" + json.dumps({"step": 2, "eval/loss/total": 7.0}) + "\n[1, 2]\n" + PARTIAL)
    with caplog.at_level(logging.WARNING, logger="glm5v_jax.train.writers"):
        rows = read_jsonl(path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1] == {"step": 2, "loss": 5.0, "eval/loss/total": 7.0}  # same step merged
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "skipped 3 unparsable" in warnings[0] and "metrics.jsonl" in warnings[0]


def test_read_jsonl_same_step_last_row_wins(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in [(1, 3.0), (2, 2.0), (2, 9.0)]))
    assert read_jsonl(path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 9.0}]


def test_plot_curves_after_a_partial_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_metrics(path, range(1, 6))
    plot_curves(path, tmp_path / "loss_curves.png")
    assert (tmp_path / "loss_curves.png").read_bytes().startswith(b"\x89PNG")


def test_rollback_keeps_rows_up_to_the_step_in_order(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "eval/loss/total": 9.0}] + [{"step": s, "loss": 10.0 / s} for s in range(1, 9)]
    rows.insert(3, {"step": 2, "eval/loss/total": 4.0})  # two rows of step 2, in the order written
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "garbage\n" + PARTIAL)
    os.chmod(path, 0o640)
    assert rollback_jsonl(path, 4) == 4
    assert [json.loads(line) for line in path.read_text().splitlines()] == [r for r in rows if r["step"] <= 4]
    assert path.read_text().endswith("\n")
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]  # no temporary file left
    assert rollback_jsonl(path, 4) == 0  # idempotent
    assert rollback_jsonl(path, 100) == 0


def test_rollback_missing_file_is_a_no_op(tmp_path):
    assert rollback_jsonl(tmp_path / "metrics.jsonl", 3) == 0
    assert rollback_jsonl(tmp_path / "metrics.jsonl", -1) == 0
    assert os.listdir(tmp_path) == []


def test_rollback_fresh_start_keeps_a_copy(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for n in (1, 2):
        _write_metrics(path, [1, 2, n])
        assert rollback_jsonl(path, -1) == 3
        assert not path.exists()
        assert [r["step"] for r in read_jsonl(tmp_path / f"metrics.jsonl.before-restart-{n}")] == sorted({1, 2, n})
    path.write_text(PARTIAL)  # no rows: nothing worth a copy
    assert rollback_jsonl(path, -1) == 0
    assert path.read_text() == ""
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "metrics.jsonl.before-restart-1",
                                            "metrics.jsonl.before-restart-2"]


def test_jsonl_writer_after_a_partial_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_metrics(path, [1, 2])
    w = JsonlWriter(path)
    w.write_scalars(3, {"loss": 1.5})
    w.close()
    assert path.read_text().splitlines()[-2:] == [PARTIAL, '{"loss": 1.5, "step": 3}']
    assert read_jsonl(path) == [{"step": 1, "loss": 10.0}, {"step": 2, "loss": 5.0}, {"step": 3, "loss": 1.5}]
    n_lines = len(path.read_text().splitlines())
    JsonlWriter(path).close()  # a file that ends in a newline gets no blank line
    assert len(path.read_text().splitlines()) == n_lines and path.read_text().endswith("}\n")


def test_resume_rolls_back_then_appends(tmp_path):
    """The run layer's sequence: killed at step 7 (partial line), checkpoint at 4, resumed at 5."""
    path = tmp_path / "metrics.jsonl"
    _write_metrics(path, range(1, 8))
    assert rollback_jsonl(path, 4) == 3
    w = JsonlWriter(path)
    for s in range(5, 9):
        w.write_scalars(s, {"loss": 100.0 + s})
    w.close()
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == list(range(1, 9))
    assert [r["loss"] for r in read_jsonl(path)][4:] == [105.0, 106.0, 107.0, 108.0]


def _tensorboard_run(logdir, first_purge_step):
    """Steps 1..10 (values = step), then a writer resumed with purge_step=5 writes 5..12 (100 + step)."""
    w = TensorBoardWriter(logdir, purge_step=first_purge_step)
    for s in range(1, 11):
        w.write_scalars(s, {"loss": float(s)})
    w.close()
    w = TensorBoardWriter(logdir, purge_step=5)  # opened within the same second as the first
    for s in range(5, 13):
        w.write_scalars(s, {"loss": 100.0 + s})
    w.close()


EXPECTED = [(s, float(s)) for s in range(1, 5)] + [(s, 100.0 + s) for s in range(5, 13)]


@pytest.mark.parametrize("first_purge_step", [None, 0])
def test_tensorboard_purge_event_accumulator(tmp_path, first_purge_step):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _tensorboard_run(tmp_path, first_purge_step)
    assert len(os.listdir(tmp_path)) == 2  # one event file per writer, none truncated by the other
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == EXPECTED


def test_tensorboard_purge_plugin_event_accumulator(tmp_path):
    """TensorBoard's Python loader (`--load_fast=false`) takes the first START event for the initial
    start: the fresh run writes one (purge_step=0) so that the resumed run's START purges."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    _tensorboard_run(tmp_path, 0)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    got = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors("loss")]
    assert got == EXPECTED


def test_tensorboard_purge_rust_data_server(tmp_path):
    """TensorBoard's default loader (the Rust data server) preempts by step, reading files in name order."""
    server_binary = pytest.importorskip("tensorboard_data_server").server_binary()
    grpc = pytest.importorskip("grpc")
    from tensorboard import context
    from tensorboard.data import grpc_provider
    from tensorboard.data.proto import data_provider_pb2_grpc

    if server_binary is None:
        pytest.skip("no tensorboard data server binary")
    _tensorboard_run(tmp_path / "logs", 0)
    port_file = tmp_path / "port"
    server = subprocess.Popen([server_binary, f"--logdir={tmp_path / 'logs'}", "--reload=once", "--port=0",
                               f"--port-file={port_file}", "--die-after-stdin"], stdin=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    try:
        deadline, got = time.monotonic() + 30, []
        while time.monotonic() < deadline and not (port_file.exists() and port_file.read_text().strip()):
            time.sleep(0.05)
        addr = f"localhost:{int(port_file.read_text())}"
        with grpc.insecure_channel(addr) as channel:
            provider = grpc_provider.GrpcDataProvider(addr, data_provider_pb2_grpc.TensorBoardDataProviderStub(channel))
            while time.monotonic() < deadline and len(got) < len(EXPECTED):  # until both files are loaded
                result = provider.read_scalars(context.RequestContext(), experiment_id="", plugin_name="scalars",
                                               downsample=1000)
                got = [(p.step, p.value) for p in result.get(".", {}).get("loss", [])]
                time.sleep(0.05)
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    assert got == EXPECTED


def test_json_default_writes_result_files_readably():
    import json
    import math

    import numpy as np

    from glm5v_jax.train.writers import json_default

    text = json.dumps({"a": (1, 2), "b": np.float32(0.5), "c": np.int64(3), "d": object}, default=json_default)
    out = json.loads(text)
    assert out["a"] == [1, 2] and out["b"] == 0.5 and out["c"] == 3 and "object" in out["d"]
    assert json_default(math.inf) is None and json_default(np.float64(2.0)) == 2.0
