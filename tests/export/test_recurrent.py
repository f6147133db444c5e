"""Recurrent layers for `mcu`: fused LSTM or unrolled, run in TFLite Micro."""

import keras
import numpy as np
import pytest

import keras_microtune as kmt
from keras_microtune.export import _tflite, recurrent, runtimes

L = keras.layers
T, F = 8, 3
GRU_T = 5
# Every op an unrolled recurrent layer may lower to (TFLite Micro has each).
UNROLLED_OPS = {
    "ADD",
    "SUB",
    "MUL",
    "FULLY_CONNECTED",
    "LOGISTIC",
    "TANH",
    "SPLIT",
    "UNPACK",
    "PACK",
    "RESHAPE",
    "STRIDED_SLICE",
    "CONCATENATION",
    "SOFTMAX",
    "QUANTIZE",
    "DEQUANTIZE",
}


def _x(n=48, seed=0, steps=T):
    return np.random.default_rng(seed).normal(size=(n, steps, F)).astype("float32")


def lstm_stack():
    inp = keras.Input((T, F))
    h = L.LSTM(4, return_sequences=True, name="lstm_a")(inp)
    h = L.Bidirectional(L.LSTM(3, return_sequences=True), name="bi")(h)
    h = L.LSTM(4, go_backwards=True, name="lstm_back")(h)
    return keras.Model(inp, L.Dense(3, activation="softmax")(h), name="lstm_stack")


def gru_stack():
    inp = keras.Input((GRU_T, F))  # Unrolled: one graph step per time step.
    h = L.GRU(3, return_sequences=True, name="gru_a")(inp)
    h = L.Bidirectional(L.GRU(2), merge_mode="sum", name="bi_gru")(h)
    return keras.Model(inp, L.Dense(3, activation="softmax")(h), name="gru_stack")


def _tflm_vs_keras(model, result, x):
    """Max |TFLite Micro int8 output (dequantized) - Keras float| and the
    output's quantization step."""
    ins, outs = runtimes.io_details(result.tflite)
    q = runtimes.quantize(x, ins[0])
    raw = runtimes.tflm_run(result.tflite, [q], result.arena_bytes)[0]
    got = runtimes.dequantize(raw, outs[0])
    want = model.predict(x, verbose=0)
    return float(np.abs(got - want).max()), float(outs[0]["quantization"][0])


@pytest.fixture(scope="module")
def converted():
    keras.utils.set_random_seed(1)
    out = {}
    for build in (lstm_stack, gru_stack):
        model = build()
        x = _x(steps=model.inputs[0].shape[1])
        out[model.name] = (
            model,
            kmt.convert(model, "mcu", representative_data=x, verbose=0),
        )
    return out


def test_lstm_stack_lowers_to_fused_lstm_in_tflite_micro(converted):
    model, result = converted["lstm_stack"]
    info = _tflite.parse(result.tflite)
    # lstm_a, bi (forward + backward), lstm_back: four fused ops, no loop.
    sequence = [op for op, _, _ in info.op_sequence]
    assert sequence.count("UNIDIRECTIONAL_SEQUENCE_LSTM") == 4
    assert not {"WHILE", "VAR_HANDLE", "CALL_ONCE"} & set(result.ops)
    tensors = info.tensors
    assert [tensors[t].dtype for t in info.inputs + info.outputs] == ["int8"] * 2
    passes = {p["name"]: p for p in result.report["passes"]}
    rows = passes["lower_recurrent"]["layers"]
    assert [(r["layer"], r["type"], r["lowering"]) for r in rows] == [
        ("lstm_a", "LSTM", "fused"),
        ("bi", "Bidirectional(LSTM)", "fused"),
        ("lstm_back", "LSTM", "fused"),
    ]
    cost = passes["recurrent_cost"]
    assert cost["size_bytes"] == result.size_bytes
    assert cost["arena_bytes"] == result.arena_bytes
    assert result.report["recurrent"]["fused_lstm_ops"] == 4
    # Four stacked int8 LSTMs (16-bit cell state) vs float: a few steps.
    error, step = _tflm_vs_keras(model, result, _x(16, seed=2))
    assert error <= 8 * step, (error, step)
    assert result.report["verified"], result.parity


def test_litert_runs_each_sample_from_a_zero_lstm_state(converted):
    # The fused op keeps h and c in variable tensors, which persist between
    # invokes: parity must zero them per sample, as TFLite Micro's Reset().
    _, result = converted["lstm_stack"]
    ins, _ = runtimes.io_details(result.tflite)
    q = runtimes.quantize(_x(2, seed=3), ins[0])
    both = runtimes.litert_run(result.tflite, [q])[0]
    alone = runtimes.litert_run(result.tflite, [q[1:]])[0]
    carried = runtimes.litert_run(result.tflite, [q], carry_state=True)[0]
    assert np.array_equal(both[1], alone[0])
    assert not np.array_equal(carried[1], alone[0])


def test_gru_stack_is_unrolled_into_tflite_micro_ops(converted):
    model, result = converted["gru_stack"]
    assert set(result.ops) <= UNROLLED_OPS, result.ops
    rows = result.report["recurrent"]["layers"]
    assert [(r["layer"], r["lowering"], r["timesteps"]) for r in rows] == [
        ("gru_a", "unrolled", GRU_T),
        ("bi_gru", "unrolled", GRU_T),
    ]
    error, step = _tflm_vs_keras(model, result, _x(16, seed=2, steps=GRU_T))
    assert error <= 8 * step, (error, step)
    assert result.report["verified"]
    # An unrolled graph costs more than the fused op: record both figures.
    fused = converted["lstm_stack"][1]
    assert result.size_bytes > fused.size_bytes


@pytest.mark.parametrize(
    "return_sequences", [True, pytest.param(False, marks=pytest.mark.slow)]
)
def test_fused_lstm_equals_keras_in_float(return_sequences):
    inp = keras.Input((T, F))
    outputs = []
    for mode in ("concat", "sum", "ave", "mul", None):
        inner = L.LSTM(3, return_sequences=return_sequences)
        y = L.Bidirectional(inner, merge_mode=mode, name=f"bi_{mode}")(inp)
        outputs += list(y) if mode is None else [y]
    outputs.append(L.LSTM(2, go_backwards=True, return_sequences=return_sequences)(inp))
    model = keras.Model(inp, outputs)
    lowered, rows = recurrent.lower(model)
    assert [r["lowering"] for r in rows] == ["fused"] * 6
    assert sum(isinstance(la, recurrent.FusedLSTM) for la in lowered.layers) == 6
    x = _x(4)
    for want, got in zip(model(x), lowered(x)):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_lstm_that_the_fused_op_cannot_compute_is_unrolled():
    inp = keras.Input((T, F))
    h = L.LSTM(3, activation="relu", name="relu_lstm")(inp)
    out, _, _ = L.LSTM(2, return_state=True, name="with_state")(inp)
    model = keras.Model(inp, [h, out])
    lowered, rows = recurrent.lower(model)
    assert sorted((r["layer"], r["lowering"]) for r in rows) == [
        ("relu_lstm", "unrolled"),
        ("with_state", "unrolled"),
    ]
    x = _x(4)
    for want, got in zip(model(x), lowered(x)):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_model_without_loops_is_left_alone():
    model = keras.Sequential([keras.Input((T, F)), L.LSTM(2, unroll=True)])
    assert recurrent.lower(model) == (model, [])


def test_stateful_layer_is_refused_with_advice():
    model = keras.Sequential(
        [keras.Input((T, F), batch_size=1), L.LSTM(2, stateful=True, name="st")]
    )
    with pytest.raises(ValueError, match=r"'st' \(LSTM\) is stateful=True.*"):
        recurrent.lower(model)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layer",
    [
        lambda: L.SimpleRNN(4, name="rnn"),
        lambda: L.Bidirectional(L.LSTM(3, return_sequences=True), merge_mode="ave"),
        lambda: L.Bidirectional(L.LSTM(3), merge_mode="mul"),
    ],
    ids=["simple_rnn", "bi_lstm_ave_sequences", "bi_lstm_mul"],
)
def test_more_recurrent_forms_run_in_tflite_micro(layer):
    keras.utils.set_random_seed(3)
    inp = keras.Input((T, F))
    h = layer()(inp)
    if len(h.shape) == 3:
        h = L.Flatten()(h)
    model = keras.Model(inp, L.Dense(3)(h))
    x = _x()
    result = kmt.convert(model, "mcu", representative_data=x, verbose=0)
    assert "WHILE" not in result.ops
    error, step = _tflm_vs_keras(model, result, _x(16, seed=2))
    assert error <= 6 * step, (error, step)
    assert result.report["verified"]


def test_arena_search_grows_when_tflite_micro_crashes_on_too_small_arena(
    monkeypatch,
):
    # Some kernels (an unrolled Bidirectional GRU's) segfault instead of
    # failing cleanly when the arena is too small: a crash on the first
    # (upper) probe must grow the arena, not end the search.
    import subprocess

    tflite = converted_tiny_tflite()
    calls = []

    def worker(args, timeout):
        low, high = int(args[2]), int(args[3])
        calls.append((low, high))
        if high < 100_000:
            return subprocess.CompletedProcess(args, -11, "", "Segmentation fault")
        out = f"probe {high // 2} ok\nresult 99376\n"
        return subprocess.CompletedProcess(args, 0, out, "")

    monkeypatch.setattr(runtimes, "_worker", worker)
    assert runtimes.measure_arena(tflite)["arena_bytes"] == 99376
    assert calls[0][1] == 64 * 1024 and calls[1] == (64 * 1024, 256 * 1024)


def converted_tiny_tflite():
    import tensorflow as tf

    model = keras.Sequential([keras.Input((2,)), L.Dense(2)])
    fn = tf.function(lambda x: model(x)).get_concrete_function(
        tf.TensorSpec((1, 2), tf.float32)
    )
    return tf.lite.TFLiteConverter.from_concrete_functions([fn], model).convert()
