"""Helpers for the optimize tests: int8 conversion and TFLite Micro runs.

`to_int8` is a stand-in for `kmt.convert(model, target="mcu")` until the
converter lands; it converts a QAT model to full int8 with no
representative data (the fake-quant ranges carry the scales).
"""

import types

import numpy as np
import pytest
import tensorflow as tf

FLOAT_OPS = {"DEQUANTIZE"}


def to_int8(model):
    shape = (1, *model.inputs[0].shape[1:])
    fn = tf.function(lambda x: model(x, training=False))
    concrete = fn.get_concrete_function(tf.TensorSpec(shape, tf.float32))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], model)
    converter.experimental_lower_to_saved_model = False
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def op_names(tflite_bytes):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=tflite_bytes)
    return sorted({op["op_name"] for op in interpreter._get_ops_details()})


def int8_weights(tflite_bytes):
    """The int8 filters of the CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED ops."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=tflite_bytes)
    interpreter.allocate_tensors()
    kernels = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}
    weights = []
    for op in interpreter._get_ops_details():
        if op["op_name"] in kernels:
            weights.append(interpreter.get_tensor(int(op["inputs"][1])))
    assert all(w.dtype == np.int8 for w in weights)
    return weights


def run_tflm(tflite_bytes, x):
    """Run a full-int8 model in TFLite Micro on float `x`, one sample at a time."""
    from ai_edge_litert.interpreter import Interpreter
    from tflite_micro.python.tflite_micro import runtime

    details = Interpreter(model_content=tflite_bytes)
    in_scale, in_zero = details.get_input_details()[0]["quantization"]
    out_scale, out_zero = details.get_output_details()[0]["quantization"]
    micro = runtime.Interpreter.from_bytes(tflite_bytes, arena_size=256 * 1024)
    outputs = []
    for sample in x:
        q = np.clip(np.round(sample / in_scale + in_zero), -128, 127).astype(np.int8)
        micro.set_input(q[None], 0)
        micro.invoke()
        y = micro.get_output(0).astype(np.float32)
        outputs.append((y - out_zero) * out_scale)
    return np.concatenate(outputs), out_scale


@pytest.fixture
def tools():
    """The helpers above, as a fixture (test modules cannot import conftest)."""
    return types.SimpleNamespace(
        to_int8=to_int8, op_names=op_names, int8_weights=int8_weights, run_tflm=run_tflm
    )
