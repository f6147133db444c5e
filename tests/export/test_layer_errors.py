"""Per-layer error: each Keras layer's int8 output against float, worst first."""

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter, OpResolverType

import keras_microtune as kmt
from keras_microtune.export import layer_errors, plots, runtimes

KEYS = {"layer", "sqnr_db", "cosine", "max_abs_error", "op", "dtype"}


@pytest.mark.parametrize("name", ["ds_cnn", "residual", "stages"])
def test_rows_name_keras_layers_worst_first(mcu_results, trained, name):
    model = trained[name][0]
    rows = mcu_results[name].report["layer_errors"]
    assert rows and all(set(row) == KEYS for row in rows)
    assert {row["layer"] for row in rows} <= {layer.name for layer in model.layers}
    assert len({row["layer"] for row in rows}) == len(rows)
    sqnr = [row["sqnr_db"] for row in rows]
    assert sqnr == sorted(sqnr)
    assert all(row["dtype"] == "int8" for row in rows)
    # The model's last layer is measured on the converted output tensor.
    assert model.layers[-1].name in {row["layer"] for row in rows}


def test_output_layer_row_matches_an_independent_litert_run(mcu_results, trained):
    """The last layer's figures equal float vs LiteRT's builtin kernels
    computed here, sample by sample."""
    model, x, _ = trained["conv1d"]
    result = mcu_results["conv1d"]
    row = next(r for r in result.report["layer_errors"] if r["op"] == "SOFTMAX")
    assert row["layer"] == model.layers[-1].name
    xs = x[: layer_errors.MAX_SAMPLES]
    expected = model.predict(xs, verbose=0)
    interp = Interpreter(
        model_content=result.tflite,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interp.allocate_tensors()
    (inp,), (out,) = interp.get_input_details(), interp.get_output_details()
    got = []
    for sample in xs:
        interp.set_tensor(inp["index"], runtimes.quantize(sample[None], inp))
        interp.invoke()
        got.append(runtimes.dequantize(interp.get_tensor(out["index"]), out))
    independent = layer_errors.metrics(expected, np.concatenate(got))
    assert row["sqnr_db"] == pytest.approx(independent["sqnr_db"], abs=1e-3)
    assert row["cosine"] == pytest.approx(independent["cosine"], abs=1e-5)
    assert row["max_abs_error"] == pytest.approx(independent["max_abs_error"])


def test_metrics_on_known_values():
    ref = np.array([3.0, 4.0])
    assert layer_errors.metrics(ref, ref)["sqnr_db"] == layer_errors.SQNR_CAP_DB
    noisy = layer_errors.metrics(ref, ref + np.array([0.0, 0.5]))
    # signal 25, noise 0.25: 20 dB.
    assert noisy["sqnr_db"] == pytest.approx(20.0)
    assert noisy["max_abs_error"] == pytest.approx(0.5)
    assert layer_errors.metrics(ref, -ref)["cosine"] == pytest.approx(-1.0)


def test_scopes_of_layers_named_like_tensorflow_suffixes():
    """`dense` runs in scope `dense_1` and `dense_1` in `dense_1_2`: each
    layer still gets its own row (mobile-int8: float I/O)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="dense"),
            keras.layers.Dense(8, activation="tanh", name="dense_1"),
            keras.layers.Dense(3, name="dense_1_1"),
        ]
    )
    x = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
    result = kmt.convert(model, "mobile-int8", representative_data=x, verbose=0)
    rows = {row["layer"]: row for row in result.report["layer_errors"]}
    assert set(rows) == {"dense", "dense_1", "dense_1_1"}
    assert rows["dense_1"]["op"] == "TANH"
    # Each row is that layer's own output: compare with a float sub-model.
    probe = keras.Model(model.inputs[0], model.get_layer("dense").output)
    assert rows["dense"]["max_abs_error"] < 0.05 * np.abs(probe(x)).max()


def test_report_md_table_and_plot(mcu_results):
    result = mcu_results["residual"]
    files = result.files()
    md = files["report.md"].decode()
    assert "## Per-layer error" in md
    worst = result.report["layer_errors"][0]
    assert f"| {worst['layer']} | {worst['sqnr_db']:.1f} |" in md
    if plots.available():
        assert files["layer_errors.png"].startswith(b"\x89PNG")
        assert "![layer_errors](layer_errors.png)" in md
