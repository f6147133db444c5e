"""TFLite Micro vs LiteRT kernel by kernel, each fed the same inputs.

End to end, TFLite Micro and LiteRT's reference kernels can end more steps
apart than any one kernel differs: a one-step rounding difference early in
the graph is amplified by ops that divide by a small quantity. In the tiny
transformer of `examples/tiny_transformer.py` (BasicMotions), the outputs
end 6 steps apart (tolerance 5), yet fed LiteRT's own input values, every
one of its 47 kernels (BATCH_MATMUL, SOFTMAX, MEAN, L2_NORMALIZATION, MUL,
LOGISTIC, ...) is bit-exact with LiteRT except FULLY_CONNECTED, which is 1
step off on about 1% of its outputs. The 1-step differences grow in
the LayerNorms: `L2_NORMALIZATION` of a token whose deviations from its mean
span a few int8 steps divides by their small norm (its input differs by 2
steps, its output by 35).

`check` proves this for any model: it rewires every op to read its own
graph inputs, feeds each the values LiteRT's reference kernels computed, and
compares each op's output in TFLite Micro and LiteRT. `parity.measure` runs
it when the end-to-end difference exceeds the tolerance.
"""

from __future__ import annotations

import copy

import numpy as np

from keras_microtune.export import _tflite, runtimes

MAX_SAMPLES = 4  # Samples whose every tensor is compared.
# Steps a TFLite Micro kernel may differ from LiteRT's reference kernel on
# the same inputs (`parity.TFLM_TOLERANCE_STEPS` has why FULLY_CONNECTED
# rounds differently). Every other op must be bit-exact.
KERNEL_TOLERANCE_STEPS = {"FULLY_CONNECTED": 1}
_OFFLINE_PLAN = "OfflineMemoryAllocation"  # Tensor-indexed: dropped here.


def _disconnected(data: bytes, info: _tflite.ModelInfo) -> tuple[bytes, list, list]:
    """`data` with each op reading fresh graph inputs (copies of its
    non-constant input tensors) and every op output a graph output.

    Returns `(model, feeds, outputs)`: `feeds[i]` is the original tensor
    whose values graph input `i` takes; `outputs[k]` is `(op index, op
    name, tensor)` of graph output `k`.
    """
    schema = _tflite._schema()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(bytes(data), 0))
    sub = model.subgraphs[0]
    # Only tensors with the batch axis first (batch 1, as the graph inputs)
    # are fed; others stay wired to the op computing them: a tensor on
    # constants alone, or one whose batch axis a RESHAPE removed (a
    # (1, 1, 1, 56) -> (56,) bias-like add in an adapter), which cannot be fed
    # sample by sample.
    per_sample = {int(t) for t in sub.inputs}
    for op in sub.operators:
        if any(int(t) in per_sample for t in op.inputs):
            per_sample.update(int(t) for t in op.outputs)
    per_sample = {t for t in per_sample if info.tensors[t].shape[:1] == (1,)}
    feeds, inputs, outputs = [], [], []
    for i, op in enumerate(sub.operators):
        wired = []
        for t in (int(t) for t in op.inputs):
            if t < 0 or info.tensors[t].constant or t not in per_sample:
                wired.append(t)
                continue
            fresh = copy.copy(sub.tensors[t])
            fresh.buffer, fresh.isVariable = 0, False
            sub.tensors.append(fresh)
            feeds.append(t)
            inputs.append(len(sub.tensors) - 1)
            wired.append(len(sub.tensors) - 1)
        op.inputs = wired
        name = info.op_sequence[i][0]
        outputs += [(i, name, int(t)) for t in op.outputs if t >= 0]
    sub.inputs, sub.outputs = inputs, [t for _, _, t in outputs]
    model.signatureDefs = None
    model.metadata = [
        m for m in model.metadata or [] if _tflite._metadata_name(m) != _OFFLINE_PLAN
    ] or None
    return _tflite.pack(model, len(data)), feeds, outputs


def check(tflite: bytes, info: _tflite.ModelInfo, q: list[np.ndarray]) -> dict | None:
    """Each op's output in TFLite Micro vs LiteRT's reference kernels, both
    fed the reference run's values of its inputs.

    Args:
        tflite: bytes. An int8 model of one subgraph.
        info: `tflite` parsed.
        q: the model's inputs `(N, ...)`, in its input dtypes; the first
            `MAX_SAMPLES` are used.

    Returns:
        None for a model this cannot rewire (several subgraphs, variable
        tensors), else `{"samples", "ops": {op: {"max_abs_diff",
        "differing_fraction", "tolerance_steps"}}, "within_tolerance"}`.
    """
    if info.num_subgraphs != 1 or any(
        op in info.ops for op in ("VAR_HANDLE", "UNIDIRECTIONAL_SEQUENCE_LSTM")
    ):
        return None
    q = [x[:MAX_SAMPLES] for x in q]
    model, feeds, outputs = _disconnected(tflite, info)
    values, _ = runtimes.litert_tensors(tflite, q, sorted(set(feeds)), reference=True)
    fed = [values[t] for t in feeds]
    ref = runtimes.litert_run(model, fed, reference=True)
    arena = 4 * _tflite.activation_lower_bound(_tflite.parse(model)) + (1 << 20)
    tflm = runtimes.tflm_run(model, fed, arena)
    ops = {}
    for (_, op, _), a, b in zip(outputs, ref, tflm):
        diff = np.abs(a.astype("int64") - b.astype("int64"))
        row = ops.setdefault(op, {"max_abs_diff": 0, "differing": 0, "values": 0})
        row["max_abs_diff"] = max(row["max_abs_diff"], int(diff.max(initial=0)))
        row["differing"] += int((diff > 0).sum())
        row["values"] += int(diff.size)
    for op, row in ops.items():
        row["differing_fraction"] = row.pop("differing") / max(1, row.pop("values"))
        row["tolerance_steps"] = KERNEL_TOLERANCE_STEPS.get(op, 0)
    return {
        "samples": len(q[0]),
        "ops": dict(sorted(ops.items())),
        "within_tolerance": all(
            row["max_abs_diff"] <= row["tolerance_steps"] for row in ops.values()
        ),
    }
