"""convert(streaming=True): one frame per invoke, state in resource variables."""

import keras
import numpy as np
import pytest

import keras_microtune as kmt
from keras_microtune.export import _tflite, runtimes, stream_metadata, streaming

L = keras.layers
T, F = 8, 3
STATE_OPS = {"VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "CALL_ONCE"}


def _x(n=32, seed=0):
    return np.random.default_rng(seed).normal(size=(n, T, F)).astype("float32")


def per_frame_model():
    """A per-frame classifier: LSTM -> Dense -> GRU, an output every step."""
    inp = keras.Input((T, F))
    h = L.LSTM(4, return_sequences=True, name="lstm")(inp)
    h = L.Dense(4, activation="relu")(h)
    h = L.GRU(3, return_sequences=True, name="gru")(h)
    out = L.TimeDistributed(L.Dense(3, activation="softmax"))(h)
    return keras.Model(inp, out, name="per_frame")


@pytest.fixture(scope="module")
def streamed():
    keras.utils.set_random_seed(4)
    model = per_frame_model()
    result = kmt.convert(
        model, "mcu", representative_data=_x(), streaming=True, verbose=0
    )
    return model, result


def test_streaming_model_keeps_state_in_resource_variables(streamed):
    model, result = streamed
    assert STATE_OPS <= set(result.ops)
    assert "WHILE" not in result.ops
    ins, outs = runtimes.io_details(result.tflite)
    assert tuple(ins[0]["shape"]) == (1, F)  # One frame per invoke.
    assert ins[0]["dtype"] == np.int8 and outs[0]["dtype"] == np.int8
    rows = {p["name"]: p for p in result.report["passes"]}
    described = rows["lower_recurrent"]["streaming"]
    assert [r["layer"] for r in described["layers"]] == ["lstm", "gru"]
    assert described["state_variables"] == 3  # LSTM h, c; GRU h.
    assert described["form"] == "variables"  # No fused GRU kernel.
    assert rows["convert_to_tflite"]["resource_variables"] == 3


def test_streaming_outputs_per_frame_equal_the_full_sequence_model(streamed):
    model, result = streamed
    x = _x(8, seed=5)
    ins, outs = runtimes.io_details(result.tflite)
    raw = runtimes.tflm_run(
        result.tflite, [runtimes.quantize(x, ins[0])], result.arena_bytes, frames=True
    )[0]
    got = runtimes.dequantize(raw, outs[0])  # (N, T, classes), zero state each
    want = np.asarray(model(x))
    assert got.shape == want.shape
    step = outs[0]["quantization"][0]
    assert np.abs(got - want).max() <= 6 * step, np.abs(got - want).max()
    p = result.parity
    assert p["step_float_max_abs_error"] < 1e-5  # The step graph is the model.
    assert p["frames_per_sample"] == T and p["tflm_within_tolerance"]
    assert result.report["verified"]


def test_streaming_state_really_carries_between_invokes(streamed):
    # Without memory, the outputs for the reversed sequence would be the
    # reversed outputs; and each sequence starts again from a zero state.
    _, result = streamed
    ins, outs = runtimes.io_details(result.tflite)
    x = _x(1, seed=6)
    both = np.concatenate([x, x[:, ::-1]])
    raw = runtimes.tflm_run(
        result.tflite,
        [runtimes.quantize(both, ins[0])],
        result.arena_bytes,
        frames=True,
    )[0]
    assert not np.array_equal(raw[0], raw[1][::-1])
    assert np.array_equal(
        raw[0, 0],
        runtimes.tflm_run(
            result.tflite,
            [runtimes.quantize(x, ins[0])],
            result.arena_bytes,
            frames=True,
        )[0][0, 0],
    )


def lstm_model():
    """An LSTM with an output per frame: the fused streaming form."""
    inp = keras.Input((T, F))
    h = L.LSTM(4, return_sequences=True, name="lstm")(inp)
    out = L.TimeDistributed(L.Dense(3, activation="softmax"))(h)
    return keras.Model(inp, out, name="lstm_per_frame")


@pytest.fixture(scope="module")
def fused():
    """The LSTM converted with streaming=True and as a whole-sequence model."""
    keras.utils.set_random_seed(8)
    model, x = lstm_model(), _x()
    stream = kmt.convert(model, "mcu", representative_data=x, streaming=True, verbose=0)
    whole = kmt.convert(model, "mcu", representative_data=x, verbose=0)
    return model, stream, whole


def _stream_outputs(result, x):
    ins, outs = runtimes.io_details(result.tflite)
    raw = runtimes.tflm_run(
        result.tflite, [runtimes.quantize(x, ins[0])], result.arena_bytes, frames=True
    )[0]
    return raw, runtimes.dequantize(raw, outs[0]), outs[0]["quantization"][0]


def test_streaming_lstm_keeps_its_state_inside_the_fused_op(fused):
    _, result, _ = fused
    assert "UNIDIRECTIONAL_SEQUENCE_LSTM" in result.ops
    assert not STATE_OPS & set(result.ops)  # No resource variables.
    ins, _ = runtimes.io_details(result.tflite)
    assert tuple(ins[0]["shape"]) == (1, F)
    rows = {p["name"]: p for p in result.report["passes"]}
    assert rows["lower_recurrent"]["streaming"]["form"] == "fused"
    assert rows["lower_recurrent"]["layers"][0]["lowering"] == "fused"
    assert rows["convert_to_tflite"]["resource_variables"] == 0
    assert result.report["streaming"]["timesteps"] == T
    assert "Reset()" in result.report["streaming"]["reset"]
    p = result.parity
    assert p["tflm_reference"] == "float" and result.report["verified"], p


def test_streaming_lstm_steps_equal_the_whole_sequence_model(fused):
    # The target: after each frame, the streamed int8 output is the
    # whole-sequence model's output for that step, within the int8 tolerance.
    model, stream, whole = fused
    x = _x(8, seed=9)
    _, got, step = _stream_outputs(stream, x)
    ins, outs = runtimes.io_details(whole.tflite)
    raw = runtimes.tflm_run(
        whole.tflite, [runtimes.quantize(x, ins[0])], whole.arena_bytes
    )[0]
    want = runtimes.dequantize(raw, outs[0])
    assert got.shape == want.shape == (8, T, 3)
    tolerance = 5 * max(step, outs[0]["quantization"][0])
    assert np.abs(got - want).max() <= tolerance, np.abs(got - want).max()
    assert np.abs(got - np.asarray(model(x))).max() <= 3 * tolerance


def test_evaluate_feeds_a_streaming_model_frame_by_frame(fused):
    _, result, _ = fused
    x = _x(6, seed=10)
    raw, got, _ = _stream_outputs(result, x)
    y = got.argmax(-1)  # Labels the streamed model gets right by definition,
    y[:, ::2] = (y[:, ::2] + 1) % 3  # then half of them made wrong.
    want = float(np.mean(got.argmax(-1) == y))
    for runtime in ("tflm", "litert"):
        metrics = kmt.evaluate(result, x, y, runtime=runtime)
        assert metrics["accuracy"] == pytest.approx(want)
        assert metrics["samples"] == 6 and metrics["frames_per_sample"] == T
    # The file alone says it streams (its metadata), as inspect reports.
    assert kmt.evaluate(result.tflite, x, y)["accuracy"] == pytest.approx(want)
    inspected = kmt.inspect(result.tflite)
    assert inspected.report["streaming"] == result.report["streaming"]
    assert inspected.arena_bytes == result.arena_bytes


def test_evaluate_refuses_frames_and_unlabelled_streams(fused):
    model, result, _ = fused
    x = _x(4, seed=11)
    with pytest.raises(ValueError, match=r"single frames.*evaluate takes whole"):
        kmt.evaluate(result, x[:, 0], np.zeros(4, "int64"))
    with pytest.raises(ValueError, match=r"label per frame, shape \(4, 8\)"):
        kmt.evaluate(result, x, np.zeros(4, "int64"))
    # A streaming graph converted without the metadata entry: sequences are
    # refused with the way out instead of being fed as if stateless.
    step = streaming.StepModel(model)
    target = kmt.targets.get("mcu")
    bare = streaming.convert(step, streaming.trace(step), [_x()], target)
    with pytest.raises(ValueError, match=r"keep state between invokes.*streaming"):
        kmt.evaluate(bare, x, np.zeros((4, T), "int64"))


def test_inspect_and_evaluate_know_a_resource_variable_stream(streamed):
    model, result = streamed
    inspected = kmt.inspect(result.tflite)
    assert inspected.report["streaming"]["form"] == "variables"
    assert inspected.report["streaming"]["sequence_output"]
    assert inspected.arena_bytes == result.arena_bytes
    x = _x(4, seed=3)
    _, got, _ = _stream_outputs(result, x)
    y = np.asarray(model(x)).argmax(-1)  # Per-frame labels (4, T).
    metrics = kmt.evaluate(result.tflite, x, y)
    assert metrics["accuracy"] == pytest.approx(np.mean(got.argmax(-1) == y))


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"{not json", r"not JSON"),
        (b'{"version": 2}', r"not version 1"),
        (b'{"version": 1, "timesteps": 0, "frame_shape": [3]}', r"is invalid"),
    ],
)
def test_a_corrupted_streaming_entry_is_refused(fused, payload, match):
    _, result, _ = fused
    bad = _tflite.with_metadata(result.tflite, stream_metadata.NAME, payload)
    with pytest.raises(kmt.export.InvalidModelError, match=match):
        kmt.inspect(bad)
    with pytest.raises(ValueError, match=match):
        kmt.evaluate(bad, _x(2), np.zeros(2, "int64"))


def test_streaming_files_register_the_variable_ops(streamed, tmp_path):
    _, result = streamed
    result.save(tmp_path / "out")
    resolver = (tmp_path / "out" / "op_resolver.h").read_text()
    for method in ("AddVarHandle", "AddReadVariable", "AddAssignVariable"):
        assert method in resolver


@pytest.mark.parametrize(
    "layers, match",
    [
        ([L.Bidirectional(L.LSTM(2))], r"Bidirectional.*future frames"),
        ([L.Conv1D(2, 3), L.LSTM(2)], r"'conv1d\w*' \(Conv1D\) acts on the time axis"),
        ([L.LSTM(2, return_state=True)], r"return_state=True"),
        ([L.Dense(2)], r"needs an LSTM, GRU or SimpleRNN"),
    ],
    ids=["bidirectional", "conv-before", "return-state", "no-rnn"],
)
def test_streaming_refuses_what_it_cannot_stream(layers, match):
    inp = keras.Input((T, F))
    h = inp
    for layer in layers:
        h = layer(h)
        h = h[0] if isinstance(h, (list, tuple)) else h
    with pytest.raises(ValueError, match=match):
        streaming.StepModel(keras.Model(inp, h))


def test_streaming_flag_must_be_bool():
    with pytest.raises(TypeError, match=r"`streaming`, expected True or False"):
        kmt.convert(per_frame_model(), "mcu", streaming="yes")


@pytest.mark.slow
def test_streaming_final_output_of_a_sequence_classifier():
    keras.utils.set_random_seed(7)
    inp = keras.Input((T, F))
    h = L.SimpleRNN(4, return_sequences=True)(inp)
    h = L.LSTM(4)(h)
    model = keras.Model(inp, L.Dense(3, activation="softmax")(L.Dense(6)(h)))
    x = _x()
    result = kmt.convert(
        model,
        "mcu",
        representative_data=x,
        validation_data=x,
        streaming=True,
        verbose=0,
    )
    p = result.parity
    assert p["step_float_max_abs_error"] < 1e-5
    assert p["top1_agreement"] >= 0.9 and result.report["verified"]
    assert p["tflm_float_max_abs_error"] <= 0.05
