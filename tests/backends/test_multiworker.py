"""Microtuning under tf.distribute.MultiWorkerMirroredStrategy: two local
worker processes on loopback ports (`multiworker_script.py`), bounded in
time. The workers must end with identical weights, see the same schedules
and convert on the chief only; after one worker is killed mid-training and
both are restarted, training resumes from the last backup and ends where an
uninterrupted run ends. (The script trains with `fit`'s loop written out:
Keras 3.15's `model.fit` fails under this strategy, see its docstring.)
On the JAX backend, Keras' own `model.fit` runs across two processes with
`keras.distribution.DataParallel` (`jax_multiprocess_script.py`)."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "backends", "multiworker_script.py")
TIMEOUT = 600

pytestmark = pytest.mark.slow


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start(out, backup, workers=None, kill_at=None):
    """Start both workers; worker 1 kills itself at `kill_at` (epoch, batch)."""
    workers = workers or [f"127.0.0.1:{port}" for port in _free_ports(2)]
    procs = []
    for index in range(2):
        config = {
            "cluster": {"worker": workers},
            "task": {"type": "worker", "index": index},
        }
        env = {**os.environ, "TF_CONFIG": json.dumps(config), "PYTHONPATH": ROOT}
        env.update(KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
        command = [sys.executable, SCRIPT, str(out), str(backup)]
        if kill_at is not None and index == 1:
            command += ["--kill-at", ",".join(map(str, kill_at))]
        log = open(os.path.join(out, f"worker{index}.log"), "w")
        procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=log))
    return procs, workers


def _log(out, index):
    with open(os.path.join(out, f"worker{index}.log")) as f:
        return f.read()[-3000:]


def _wait(procs, out, deadline, expected=(0, 0)):
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, code) in enumerate(zip(procs, expected)):
        ok = p.returncode == code if code is not None else p.returncode > 0
        assert ok, f"worker {i} exit {p.returncode}:\n{_log(out, i)}"


def _results(out):
    reports, weights = [], []
    for index in range(2):
        with open(os.path.join(out, f"worker{index}.json")) as f:
            reports.append(json.load(f))
        with np.load(os.path.join(out, f"worker{index}.npz")) as f:
            weights.append({k: f[k] for k in f.files})
    return reports, weights


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("multiworker")
    procs, _ = _start(out, tmp_path_factory.mktemp("backup"))
    _wait(procs, out, time.monotonic() + TIMEOUT)
    return _results(out)


KILL_AT = (2, 1)  # Epoch 2, before its second batch: backups of epochs 0-1 exist.


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Kill worker 1 mid-training; worker 0 must fail by itself (its
    collectives abort once worker 1 stops sending heartbeats); restart both
    on the same addresses, as a cluster manager does."""
    backup = tmp_path_factory.mktemp("backup")
    killed = tmp_path_factory.mktemp("killed")
    procs, workers = _start(killed, backup, kill_at=KILL_AT)
    # SIGKILL: -9. Worker 0: an error exit (UnavailableError), not a hang.
    _wait(procs, killed, time.monotonic() + TIMEOUT, expected=(None, -9))
    out = tmp_path_factory.mktemp("resumed")
    procs, _ = _start(out, backup, workers)
    _wait(procs, out, time.monotonic() + TIMEOUT)
    return _results(out)


SCHEDULED = ("learning_rate", "quantization_enabled", "ranges_frozen")


def _assert_identical(weights, *others):
    """Bit-identical weights, named by path in a failure."""
    for other in others:
        assert other.keys() == weights.keys()
        for key in weights:
            np.testing.assert_array_equal(other[key], weights[key], err_msg=key)


def test_workers_end_with_identical_weights_and_schedules(run):
    reports, weights = run
    _assert_identical(*weights)
    chief, other = reports
    assert [e["epoch"] for e in chief["qat"]] == [0, 1, 2, 3]
    for name in SCHEDULED + ("int8_size_bytes", "arena_bytes", "fits_target"):
        assert [e[name] for e in chief["qat"]] == [e[name] for e in other["qat"]]
    assert [e["quantization_enabled"] for e in chief["qat"]] == [0, 1, 1, 1]
    assert [e["ranges_frozen"] for e in chief["qat"]] == [0, 0, 0, 1]
    # 64 samples, global batch 16: 4 steps an epoch on both workers.
    steps = [e["pruning_step"] for e in chief["pruning"]]
    assert steps == [e["pruning_step"] for e in other["pruning"]] == [4.0, 8.0]
    assert [e["sparsity"] for e in chief["pruning"]] == [
        e["sparsity"] for e in other["pruning"]
    ]


def test_device_budget_converts_on_the_chief_only(run):
    reports, _ = run
    assert reports[0]["is_chief"] and not reports[1]["is_chief"]
    assert reports[0]["converted"] and not reports[1]["converted"]
    sizes = [e["int8_size_bytes"] for e in reports[1]["qat"]]
    assert np.isnan(sizes[0]) and sizes[1] > 0 and sizes[3] > 0


def test_training_resumes_from_the_backup_after_a_worker_is_killed(run, resumed):
    reference, weights = run[0][0], run[1][0]
    reports, resumed_weights = resumed
    for report in reports:  # Both workers restarted at the backed-up epoch.
        assert [e["epoch"] for e in report["qat"]] == [2, 3]
        for entry, expected in zip(report["qat"], reference["qat"][2:]):
            for name in SCHEDULED + ("loss",):
                assert entry[name] == expected[name], name
    assert reports[0]["converted"] and not reports[1]["converted"]
    # Bit-identical to the uninterrupted run, on both workers: weights, QAT
    # ranges, LoRA factors, optimizer-driven updates all resumed exactly.
    _assert_identical(weights, *resumed_weights)


JAX_SCRIPT = os.path.join(ROOT, "tests", "backends", "jax_multiprocess_script.py")


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory):
    """Keras' own `model.fit` over two JAX processes (keras.distribution)."""
    pytest.importorskip("jax")
    out = tmp_path_factory.mktemp("jax_processes")
    (port,) = _free_ports(1)
    procs = []
    for index in range(2):
        env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
        command = [sys.executable, JAX_SCRIPT, str(out), str(port), str(index)]
        log = open(os.path.join(out, f"worker{index}.log"), "w")
        procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=log))
    _wait(procs, out, time.monotonic() + TIMEOUT)
    return _results(out)


def test_model_fit_across_two_jax_processes_with_our_callbacks(jax_run):
    reports, weights = jax_run
    _assert_identical(*weights)
    first, second = reports
    for name in SCHEDULED + ("loss", "int8_size_bytes", "fits_target"):
        assert [e[name] for e in first["qat"]] == [e[name] for e in second["qat"]]
    assert [e["quantization_enabled"] for e in first["qat"]] == [0, 1, 1, 1]
    assert [e["ranges_frozen"] for e in first["qat"]] == [0, 0, 0, 1]
    # One fit over the global batch 16: 4 steps an epoch, as on TensorFlow.
    assert [e["pruning_step"] for e in first["pruning"]] == [4.0, 8.0]
    assert [e["pruning_step"] for e in second["pruning"]] == [4.0, 8.0]
    # No chief here: every process converts (the same weights, the same bytes).
    assert first["converted"] and second["converted"]
