"""Run converted models in LiteRT and in TFLite Micro, and size TFLM's arena.

TFLite Micro runs in a child process (`_tflm_worker.py`): a model that makes it
crash (small arenas have been seen to segfault) cannot take the caller down.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np

from keras_microtune.export import _tflite

_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_tflm_worker.py")
_MAX_ARENA = 1 << 30
_MAX_CRASH_RETRY_ARENA = 64 << 20  # A crash at every size up to here: give up.


class RuntimeFailure(RuntimeError):
    """A runtime could not load or run the model."""


def io_details(tflite: bytes, info=None) -> tuple[list[dict], list[dict]]:
    """LiteRT's input and output details (dtype, shape, quantization).

    Models LiteRT cannot load because TFLite Micro's weight compression
    (`TFLM_DECODE`) is in them are described from the flatbuffer (`info`:
    its `_tflite.parse` result, when the caller has it).
    """
    from ai_edge_litert.interpreter import Interpreter

    try:
        interp = Interpreter(model_content=bytes(tflite))
    except ValueError:
        info = info or _tflite.parse(tflite)
        if "CUSTOM:TFLM_DECODE" not in info.ops:
            raise
        return _flatbuffer_io_details(tflite, info)
    return interp.get_input_details(), interp.get_output_details()


def _flatbuffer_io_details(tflite: bytes, info) -> tuple[list[dict], list[dict]]:
    schema = _tflite._schema()
    sub = schema.Model.GetRootAs(bytes(tflite), 0).Subgraphs(0)

    def detail(index):
        tensor, spec = sub.Tensors(index), info.tensors[index]
        q = tensor.Quantization()
        scale = zero = 0
        if q is not None and q.ScaleLength():
            scale, zero = float(q.Scale(0)), int(q.ZeroPoint(0))
        return {
            "index": index,
            "dtype": np.dtype(spec.dtype).type,
            "shape": np.array(spec.shape, "int32"),
            "quantization": (scale, zero),
        }

    return [detail(t) for t in info.inputs], [detail(t) for t in info.outputs]


def quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    """Float input -> what the model's input tensor takes (int8 or float)."""
    dtype = np.dtype(detail["dtype"])
    scale, zero = detail["quantization"]
    if np.issubdtype(dtype, np.integer) and scale:
        info = np.iinfo(dtype)
        q = np.round(x / scale) + zero
        return np.clip(q, info.min, info.max).astype(dtype)
    return x.astype(dtype)


def dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    """A model output tensor -> float32."""
    scale, zero = detail["quantization"]
    if np.issubdtype(np.dtype(detail["dtype"]), np.integer) and scale:
        return ((y.astype("float32") - zero) * scale).astype("float32")
    return y.astype("float32")


def litert_run(
    tflite: bytes,
    inputs: list[np.ndarray],
    reference: bool = False,
    carry_state: bool = False,
):
    """Run each sample (batch 1) in LiteRT; return raw outputs per output tensor.

    Args:
        tflite: bytes. The model.
        inputs: list of arrays `(N, ...)` already in the input tensors' dtypes.
        reference: bool. Use LiteRT's reference kernels (bit-exact with TFLite
            Micro) instead of the optimized ones (XNNPACK).
        carry_state: bool. Keep variable tensors (a fused LSTM's h and c,
            resource variables) from one sample to the next, as a streaming
            model needs; by default they are zeroed before each sample, as
            `tflm_run` resets TFLite Micro. Defaults to `False`.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kwargs = {}
    if reference:
        kwargs["experimental_op_resolver_type"] = OpResolverType.BUILTIN_REF
    try:
        interp = Interpreter(model_content=bytes(tflite), **kwargs)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        raise RuntimeFailure(f"LiteRT could not load the model: {e}") from None
    ins, outs = interp.get_input_details(), interp.get_output_details()
    results = [[] for _ in outs]
    for s in range(len(inputs[0])):
        if not carry_state:
            interp.reset_all_variables()
        for detail, x in zip(ins, inputs):
            sample = x[s : s + 1]
            if tuple(detail["shape"]) != sample.shape:
                interp.resize_tensor_input(detail["index"], sample.shape)
                interp.allocate_tensors()
            interp.set_tensor(detail["index"], sample)
        interp.invoke()
        for k, detail in enumerate(outs):
            results[k].append(interp.get_tensor(detail["index"]).copy())
    return [np.concatenate(r) for r in results]


def litert_tensors(
    tflite: bytes,
    inputs: list[np.ndarray],
    tensors: list[int] | None = None,
    reference: bool = False,
):
    """Tensors' raw values after each sample (batch 1, variable tensors
    zeroed per sample), from LiteRT keeping all intermediate tensors.

    Args:
        tflite: bytes. The model.
        inputs: list of arrays `(N, ...)` already in the input tensors' dtypes.
        tensors: list of tensor indices to keep, or None for all.
        reference: bool. LiteRT's reference kernels, else its built-in
            kernels without the default delegates. Defaults to `False`.

    Returns:
        `(values, details)`: tensor index -> `(N, ...)` array, and tensor
        index -> LiteRT's tensor detail (dtype, quantization).
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interp = Interpreter(
        model_content=bytes(tflite),
        experimental_op_resolver_type=OpResolverType.BUILTIN_REF
        if reference
        else resolver,
        experimental_preserve_all_tensors=True,
    )
    interp.allocate_tensors()
    ins = interp.get_input_details()
    details = {d["index"]: d for d in interp.get_tensor_details()}
    values = {t: [] for t in (details if tensors is None else tensors)}
    for s in range(len(inputs[0])):
        interp.reset_all_variables()
        for detail, x in zip(ins, inputs):
            interp.set_tensor(detail["index"], x[s : s + 1])
        interp.invoke()
        for t in values:
            values[t].append(interp.get_tensor(t).copy())
    return {t: np.concatenate(v) for t, v in values.items()}, details


def litert_stream(tflite: bytes, sequences: np.ndarray, reference: bool = False):
    """A streaming model in LiteRT: each sequence `(T, ...)` fed one frame per
    invoke from a fresh interpreter (zero state); raw outputs `(N, T, ...)`
    of the first output."""
    out = []
    for sequence in sequences:
        # One "sample" per frame through one interpreter: the state carries.
        out.append(litert_run(tflite, [sequence], reference, carry_state=True)[0][None])
    return np.concatenate(out)


# Run the worker file by path without putting its folder on sys.path (where
# `inspect.py` would shadow the standard library's `inspect`).
_LAUNCH = (
    "import runpy, sys; path = sys.argv[1]; sys.argv = sys.argv[1:]; "
    "runpy.run_path(path, run_name='__main__')"
)


def _worker(args, timeout):
    cwd = os.path.dirname(str(args[1]))  # The private temporary folder.
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _LAUNCH, _WORKER, *map(str, args)],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeFailure(f"TFLite Micro did not finish in {timeout} s.") from None
    return proc


def _error_lines(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    keep = [ln for ln in lines if "Error" in ln or "op" in ln.lower()][-3:]
    return "; ".join(keep or lines[-3:])


def _zeros(info: _tflite.ModelInfo) -> dict:
    return {
        f"in{i}": np.zeros(info.tensors[t].shape, info.tensors[t].dtype)
        for i, t in enumerate(info.inputs)
    }


def tflm_run(
    tflite: bytes,
    inputs: list[np.ndarray],
    arena_bytes: int,
    timeout=600,
    info=None,
    frames: bool = False,
):
    """Run each sample in the TFLite Micro interpreter (in a child process).

    `info`: `tflite` parsed (`_tflite.parse`), when the caller has it.
    `frames=True` (a streaming model): each sample `(T, ...)` is fed one frame
    per invoke from a reset state; outputs are `(N, T, ...)`.
    """
    info = info or _tflite.parse(tflite)
    with tempfile.TemporaryDirectory(prefix="kmt_tflm_") as tmp:
        model_path, in_path = os.path.join(tmp, "m.tflite"), os.path.join(tmp, "i.npz")
        out_path = os.path.join(tmp, "o.npz")
        with open(model_path, "wb") as f:
            f.write(tflite)
        np.savez(in_path, **{f"in{i}": x for i, x in enumerate(inputs)})
        command = "stream" if frames else "run"
        proc = _worker(
            [command, model_path, arena_bytes, len(info.outputs), in_path, out_path],
            timeout,
        )
        if proc.returncode != 0:
            raise RuntimeFailure(
                f"TFLite Micro failed (exit code {proc.returncode}): "
                f"{_error_lines(proc.stderr + proc.stdout)}"
            )
        with np.load(out_path, allow_pickle=False) as out:
            return [out[f"out{k}"] for k in range(len(info.outputs))]


def tflm_invoke_times(
    tflite: bytes,
    arena_bytes: int,
    other: bytes,
    other_arena_bytes: int,
    inputs: list[np.ndarray],
    repeats: int = 30,
    timeout=600,
) -> tuple[float, float]:
    """Median TFLite Micro invoke seconds of two models, timed alternately in
    one child process (same inputs, sample 0)."""
    with tempfile.TemporaryDirectory(prefix="kmt_tflm_") as tmp:
        paths = [os.path.join(tmp, n) for n in ("a.tflite", "b.tflite", "i.npz")]
        for path, data in zip(paths, (tflite, other)):
            with open(path, "wb") as f:
                f.write(data)
        np.savez(paths[2], **{f"in{i}": x for i, x in enumerate(inputs)})
        args = [paths[0], arena_bytes, paths[1], other_arena_bytes, paths[2]]
        proc = _worker(["time", *args, repeats], timeout)
        for line in proc.stdout.splitlines():
            if line.startswith("time "):
                first, second = (float(v) for v in line.split()[1:3])
                return first, second
        raise RuntimeFailure(
            f"TFLite Micro timing failed (exit code {proc.returncode}): "
            f"{_error_lines(proc.stderr + proc.stdout)}"
        )


def measure_arena(tflite: bytes, lower_bound: int = 0, timeout=600, info=None) -> dict:
    """Smallest tensor arena (16-byte steps) with which TFLite Micro allocates
    and invokes the model, found by bisection in a child process.

    `info` is `tflite` parsed (`_tflite.parse`), when the caller has it.

    Returns:
        dict with `arena_bytes`, and `head_bytes`/`tail_bytes` from TFLite Micro's
        recording allocator.

    Raises:
        RuntimeFailure: TFLite Micro cannot run the model at any arena size
            (e.g. an op it does not implement); the message gives its reason.
    """
    info = info or _tflite.parse(tflite)
    needed = max(lower_bound, _tflite.activation_lower_bound(info))
    if needed > _MAX_ARENA:  # Refused before anything is allocated.
        raise RuntimeFailure(
            f"the model's activations need at least {needed:,} bytes, more "
            f"than the {_MAX_ARENA:,}-byte arena limit for TFLite Micro."
        )
    low = max(0, lower_bound // 16 * 16 - 16)
    high = max(64 * 1024, 2 * lower_bound + 16 * 1024)
    with tempfile.TemporaryDirectory(prefix="kmt_tflm_") as tmp:
        model_path, in_path = os.path.join(tmp, "m.tflite"), os.path.join(tmp, "i.npz")
        with open(model_path, "wb") as f:
            f.write(tflite)
        np.savez(in_path, **_zeros(info))
        high_ok = False  # whether `high` was seen to allocate
        for _attempt in range(64):
            proc = _worker(["arena", model_path, low, high, in_path], timeout)
            result, probed = None, False
            for line in proc.stdout.splitlines():
                parts = line.split()
                probed = probed or parts[:1] == ["probe"]
                if parts[:1] == ["probe"]:
                    size = int(parts[1])
                    if parts[2] == "ok":
                        high, high_ok = size, True
                    else:
                        low = size
                elif parts[:1] == ["result"]:
                    result = parts[1:]
            if result and result[0] == "none":
                if high >= _MAX_ARENA:
                    raise RuntimeFailure(
                        "TFLite Micro cannot run this model: "
                        f"{_error_lines(proc.stderr + proc.stdout)}"
                    )
                low, high = high, min(high * 4, _MAX_ARENA)
                continue
            if result is None and not probed and not high_ok:
                # It died on `high` itself: some kernels crash instead of
                # failing when the arena is too small, so grow it as for "none".
                if high >= _MAX_CRASH_RETRY_ARENA:
                    raise RuntimeFailure(
                        f"TFLite Micro crashed (exit code {proc.returncode}): "
                        f"{_error_lines(proc.stderr)}"
                    )
                low, high = high, min(high * 4, _MAX_ARENA)
                continue
            if result is None:  # The child died (crash): skip the probe it was on.
                low = (low + high) // 2 // 16 * 16
                if high - low <= 16 and high_ok:
                    low = high - 16  # next run only confirms `high` with an invoke
                    high_ok = False
                    continue
                if high - low <= 16:
                    raise RuntimeFailure(
                        f"TFLite Micro crashed (exit code {proc.returncode}): "
                        f"{_error_lines(proc.stderr)}"
                    )
                continue
            return {
                "arena_bytes": int(result[0]),
                **_recording(proc.stdout + proc.stderr),
            }
    raise RuntimeFailure("TFLite Micro arena search did not converge.")


_RECORDED = {
    "TfLiteEvalTensor data": "eval_tensors",
    "Persistent TfLiteTensor data": "persistent_tensors",
    "Persistent TfLiteTensor quantization data": "persistent_quantization",
    "Persistent buffer data": "op_data",  # Kernels' own: per-channel multipliers...
    "NodeAndRegistration struct": "nodes",
}


def tflm_allocations(models: list[bytes], arena_bytes: int, timeout=600) -> list:
    """TFLite Micro's recording allocator on each model, allocated once in an
    arena of `arena_bytes` (large enough: head and tail do not depend on it).

    The total is the arena the model needs with TFLite Micro's own planner
    (what `measure_arena` finds by bisection, without invoking), at the cost of
    one allocation. Models are allocated in one child process; one that
    crashes it is passed over (None) and the rest are allocated in a new one.

    Returns:
        per model, None (does not allocate) or a dict: `total_bytes`,
        `head_bytes`, `tail_bytes` and, per part of the tail, `{part}_bytes`
        and `{part}_count` (parts: eval_tensors, nodes, op_data (the kernels'
        persistent buffers: per-channel multipliers and shifts, op params),
        persistent_tensors, persistent_quantization).
    """
    results = [None] * len(models)
    with tempfile.TemporaryDirectory(prefix="kmt_tflm_") as tmp:
        paths = []
        for k, data in enumerate(models):
            paths.append(os.path.join(tmp, f"m{k}.tflite"))
            with open(paths[-1], "wb") as f:
                f.write(data)
        start = 0
        while start < len(models):
            listing = os.path.join(tmp, "models.txt")
            with open(listing, "w") as f:
                f.write("\n".join(paths[start:]))
            proc = _worker(["record", listing, arena_bytes], timeout)
            blocks, current, begun = {}, None, -1
            for line in proc.stderr.splitlines():
                parts = line.split()
                if parts[:1] == ["record"] and parts[2:] == ["begin"]:
                    begun, current = int(parts[1]), None
                elif parts[:1] == ["record"]:
                    current = start + int(parts[1])
                    blocks[current] = [] if parts[2:] != ["fail"] else None
                elif current is not None and blocks[current] is not None:
                    blocks[current].append(line)
            for k, lines in blocks.items():
                text = "\n".join(lines or ())
                if lines is not None and "Arena allocation total" in text:
                    results[k] = {**_recording(text), **_tail_parts(text)}
            if proc.returncode == 0:
                break
            start += begun + 1  # The child died on the model it began last.
    return results


def _tail_parts(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        for label, key in _RECORDED.items():
            if f"'{label}' used " in line:
                out[f"{key}_bytes"] = int(line.split(" used ")[1].split()[0])
                out[f"{key}_count"] = int(line.rsplit(" for ", 1)[1].split()[0])
    return out


def _recording(stdout: str) -> dict:
    out = {}
    for line in stdout.splitlines():
        for key in ("total", "head", "tail"):
            marker = f"Arena allocation {key} "
            if marker in line:
                out[f"{key}_bytes"] = int(line.split(marker)[1].split()[0])
    return out
