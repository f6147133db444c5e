"""keras_microtune on the JAX backend, in child processes (Keras fixes the
backend at import): training every stage and callback, and converting a
JAX-trained model through TensorFlow to the bytes a TensorFlow-backend
process gets from the same weights."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_microtune as kmt
from keras_microtune.export import backend_bridge

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "backends", "stages_script.py")

pytest.importorskip("jax")


def _run_on_jax(out, mode, timeout):
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": ROOT}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.run(
        [sys.executable, SCRIPT, str(out), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(out, "logs.json")) as f:
        logs = json.load(f)
    assert logs["backend"] == "jax"
    return logs["logs"]


@pytest.fixture(scope="module")
def jax_qat(tmp_path_factory):
    out = tmp_path_factory.mktemp("jax_qat")
    return out, _run_on_jax(out, "--qat-convert", timeout=600)


def test_qat_and_pruning_train_on_jax(tmp_path):
    logs = _run_on_jax(tmp_path, "--quick", timeout=600)
    assert logs["qat"]["quantization_enabled"] == [0.0, 1.0, 1.0, 1.0]
    assert logs["pruning"]["pruning_step"] == [4.0, 8.0, 12.0]


@pytest.mark.slow
def test_jax_trained_qat_model_converts_to_the_tensorflow_bytes(jax_qat):
    out, logs = jax_qat
    assert logs["qat"]["quantization_enabled"] == [0.0, 1.0]
    # The .keras file carries everything: weights and QAT ranges.
    model = keras.saving.load_model(out / "qat.keras")
    x = np.random.default_rng(0).uniform(size=(64, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(
        model.predict(x, verbose=0), np.load(out / "predictions.npy"), atol=1e-5
    )
    ranges = [v for v in model.variables if v.name == "range_max"]
    assert ranges and all(float(v.numpy()) != 6.0 for v in ranges)  # Trained.
    # Converting the same weights here, on TensorFlow, gives the same bytes.
    ours = kmt.convert(model, "mcu", representative_data=x[:16], verbose=0)
    jax_bytes = (out / "model.tflite").read_bytes()
    assert ours.tflite == jax_bytes
    with open(out / "report.json") as f:
        assert json.load(f) == json.loads(json.dumps(ours.report))
    y = (x[:, :4].mean(axis=(1, 2, 3)) > x[:, 4:].mean(axis=(1, 2, 3))).astype(int)
    tflm = kmt.evaluate(jax_bytes, x, y, runtime="tflm")
    assert tflm == kmt.evaluate(ours, x, y, runtime="tflm")


def test_the_child_process_converts_with_the_options_convert_checked(monkeypatch):
    """What a JAX or PyTorch process runs, from this one: `convert`'s checked
    options go to the TensorFlow child, which must accept them as they are
    (a defaulted `train_batch_size` once made every non-trainable target
    fail there) and give the bytes this process gives."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    x = np.random.default_rng(0).uniform(size=(16, 4)).astype("float32")
    here = kmt.convert(model, "mcu", representative_data=x, verbose=0)
    monkeypatch.setattr(backend_bridge, "needed", lambda: True)
    there = kmt.convert(model, "mcu", representative_data=x, verbose=0)
    assert there.tflite == here.tflite
    assert there.report == json.loads(json.dumps(here.report))


def test_convert_on_another_backend_needs_tensorflow(monkeypatch, tmp_path):
    spec = backend_bridge.importlib.util.find_spec
    monkeypatch.setattr(
        backend_bridge.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorflow" else spec(name, *a),
    )
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    target = kmt.targets.get("mcu")
    with pytest.raises(ImportError, match=r"TensorFlow is not installed\. Install"):
        backend_bridge.convert_elsewhere(model, target, {"representative_data": None})


@pytest.mark.slow
def test_every_stage_and_callback_trains_on_jax(tmp_path):
    logs = _run_on_jax(tmp_path, "--stages", timeout=1200)
    assert {"attach", "prefix_cache_True", "qat", "pruning", "clustering"} <= set(logs)
    assert {"unfreeze", "clip", "distillation", "converting"} <= set(logs)
