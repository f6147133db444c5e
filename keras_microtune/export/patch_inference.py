"""`convert(patch_inference=...)`: the option, choosing the split and grid, the report.

`apply` resolves `until` (a Keras layer name) to the tensor it outputs in the
converted flatbuffer, builds the patched models with `patching.rewrite`, and
measures their arena in TFLite Micro as `convert` delivers it (with the
offline memory plan when that lowers it). `"auto"` estimates every split and
grid it considers (activation bound plus TFLite Micro's tail grown by the
copied ops), measures the best few under the MAC cap, and keeps the smallest,
or the unpatched model when none is smaller.
"""

from __future__ import annotations

import re

import numpy as np

from keras_microtune.export import _tflite, patching, runtimes

MAX_MAC_OVERHEAD = 0.2  # "auto": at most +20% multiply-adds.
GRIDS = ((2, 2), (2, 3), (3, 2), (3, 3), (4, 4))
MEASURED = 3  # "auto": candidates measured in TFLite Micro, best estimates first.


def check_option(value, target) -> dict | None:
    """`convert(patch_inference=...)` checked and normalised, before converting.

    Returns None (no patching) or `{"until", "grid", "max_mac_overhead"}`
    where `until`/`grid` may be `"auto"`.
    """
    if value is None:
        return None
    expected = (
        'expected None, "auto", or a dict {"until": layer name or "auto", '
        '"grid": (rows, cols) or "auto"} (optional "max_mac_overhead": a '
        "fraction, default 0.2)"
    )
    if value == "auto":
        value = {"until": "auto", "grid": "auto"}
    if not isinstance(value, dict) or not set(value) <= {
        "until",
        "grid",
        "max_mac_overhead",
    }:
        raise ValueError(
            f"Received an invalid value for `patch_inference`, {expected}. "
            f"Received: patch_inference={value!r}"
        )
    spec = {
        "until": value.get("until", "auto"),
        "grid": value.get("grid", "auto"),
        "max_mac_overhead": value.get("max_mac_overhead", MAX_MAC_OVERHEAD),
    }
    if not isinstance(spec["until"], str) or not spec["until"]:
        raise ValueError(
            f"Received an invalid value for `patch_inference['until']`, {expected}. "
            f"Received: until={spec['until']!r}"
        )
    if spec["grid"] != "auto":
        patching.check_grid(spec["grid"], (1, 1 << 30, 1 << 30, 1))
        spec["grid"] = tuple(spec["grid"])
    cap = spec["max_mac_overhead"]
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap < 0:
        raise ValueError(
            "Received an invalid value for `patch_inference['max_mac_overhead']`, "
            f"expected a fraction >= 0 (0.2: +20% MACs). Received: {cap!r}"
        )
    if not target.is_mcu:
        raise ValueError(
            "`patch_inference` is for TFLite Micro targets (it lowers the "
            f"tensor arena TFLite Micro measures); target {target.name!r} is not "
            "one. Use a microcontroller target such as 'mcu' or 'cortex-m4', "
            "or patch_inference=None."
        )
    return spec


def find_split(info, until: str, layer_names) -> int:
    """The tensor that layer `until` outputs in the (unstripped) model."""
    if until not in layer_names:
        raise ValueError(
            f"Received an invalid value for `patch_inference['until']`: the model "
            f"has no layer {until!r}. Layers: {list(layer_names)[:12]} ..."
        )
    pattern = re.compile(rf"^{re.escape(until)}(_\d+)?$")
    found = None
    for _, _, outs in info.op_sequence:
        for t in outs:
            hit = [p for p in patching.scopes(info.tensors[t].name) if pattern.match(p)]
            if any(p == until or p not in layer_names for p in hit):
                found = t
    if found is None:
        raise ValueError(
            f"Layer {until!r} has no output tensor of its own in the converted "
            "model (TFLite fused it into another op, or it is not in the "
            "graph). Pass the next layer (e.g. the activation after it)."
        )
    return found


def describe_ops(info, layer_names):
    return lambda k: patching.layer_of(info, k, set(layer_names))


def _layer_name(info, split, layer_names):
    producer = patching._producers(info)[split]
    text = patching.layer_of(info, producer, set(layer_names))
    match = re.match(r"layer '(.+?)'", text)
    return match.group(1) if match else None


def estimate(unpatched, patched, tail_bytes) -> int:
    """Arena estimate before measuring: the activation bound plus TFLite
    Micro's tail grown by the ops and tensors the patches add."""
    extra_ops = len(patched.op_sequence) - len(unpatched.op_sequence)
    extra_tensors = len(patched.tensors) - len(unpatched.tensors)

    def channels(info):
        return sum(
            info.tensors[outs[0]].shape[-1]
            for name, _, outs in info.op_sequence
            if name in ("CONV_2D", "DEPTHWISE_CONV_2D")
        )

    grown = 112 * extra_ops + 24 * extra_tensors
    grown += 8 * (channels(patched) - channels(unpatched))
    return _tflite.activation_lower_bound(patched) + tail_bytes + grown


def _measure(data):
    """TFLite Micro's arena for `data` as `convert` delivers it: with the
    offline memory plan when that lowers it (`memory_plan.apply`)."""
    from keras_microtune.export import memory_plan

    info = _tflite.parse(data)
    lower = _tflite.activation_lower_bound(info)
    _, _, arena, _ = memory_plan.apply(data, info, lower)
    return arena["arena_bytes"], arena


def apply(tflite: bytes, info, spec: dict, layer_names=(), timing_repeats=20):
    """Patch `tflite` (converted, names kept) as `spec` (`check_option`) asks.

    Arenas are measured in TFLite Micro on stripped copies, each with the
    offline memory plan when it helps (as `convert` delivers them, before
    compression); with `"auto"` the best estimated candidates under the MAC
    cap are measured and the smallest is kept, or none when none is below the
    unpatched arena.

    Returns:
        (tflite, report): the patched model (or `tflite` itself when "auto"
        finds no smaller arena) and the `report["patch_inference"]` entry.
    """
    describe = describe_ops(info, layer_names)
    stripped = _tflite.strip(tflite)  # Same ops and tensors, without names.
    unpatched = _tflite.parse(stripped)
    before, before_memory = _measure(stripped)
    if spec["until"] == "auto":
        candidates = _narrow(info, patching.stages(info))
    else:
        split = find_split(info, spec["until"], layer_names)
        candidates = [patching.stage(info, split, describe)]
    macs_before = patching.macs(unpatched)
    rows = []
    for st in candidates:
        shape = info.tensors[st.split].shape
        grids = [spec["grid"]] if spec["grid"] != "auto" else GRIDS
        for grid in grids:
            if spec["grid"] == "auto" and (grid[0] > shape[1] or grid[1] > shape[2]):
                continue
            patching.check_grid(grid, shape)
            try:
                data = patching.rewrite(stripped, st, grid, describe)
            except patching.PatchError:
                if spec["until"] != "auto":
                    raise
                continue  # "auto": e.g. a 'same' pooling this grid cannot split.
            patched = _tflite.parse(data)
            overhead = patching.macs(patched) / macs_before - 1 if macs_before else 0.0
            rows.append(
                {
                    "stage": st,
                    "grid": grid,
                    "data": data,
                    "mac_overhead": overhead,
                    "estimate": estimate(
                        unpatched, patched, before_memory.get("tail_bytes", 0)
                    ),
                }
            )
    auto = spec["until"] == "auto" or spec["grid"] == "auto"
    report = {
        "requested": {
            k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()
        },
        "arena_bytes_before": before,
        "macs_before": macs_before,
        "live_bytes_before": _tflite.live_bytes_per_op(unpatched),
    }
    if auto:
        allowed = [r for r in rows if r["mac_overhead"] <= spec["max_mac_overhead"]]
        allowed.sort(key=lambda r: r["estimate"])
        rows = allowed[:MEASURED]
    for r in rows:
        try:
            r["arena_bytes"], _ = _measure(r["data"])
        except runtimes.RuntimeFailure as e:
            if not auto:
                raise
            # TFLite Micro has been seen to crash near the arena size of
            # models with hundreds of ops: "auto" passes over such a candidate.
            r["arena_bytes"], r["error"] = None, str(e)[:200]
    report["candidates"] = [
        {
            "until": _layer_name(info, r["stage"].split, layer_names),
            "grid": list(r["grid"]),
            "mac_overhead": round(r["mac_overhead"], 4),
            "arena_bytes": r["arena_bytes"],
            **({"error": r["error"]} if "error" in r else {}),
        }
        for r in rows
    ]
    rows = [r for r in rows if r["arena_bytes"] is not None]
    best = min(rows, key=lambda r: r["arena_bytes"], default=None)
    if best is None or (auto and best["arena_bytes"] >= before):
        report["applied"] = False
        report["reason"] = (
            f"no patched arena below the unpatched {before:,} B"
            if best is not None
            else "TFLite Micro could not run the candidates"
            if report["candidates"]
            else "no split and grid within the MAC cap"
        )
        return tflite, report
    st = best["stage"]
    report.update(
        {
            "applied": True,
            "until": _layer_name(info, st.split, layer_names),
            "split_shape": list(info.tensors[st.split].shape),
            "grid": list(best["grid"]),
            "patches": best["grid"][0] * best["grid"][1],
            "stage_ops": len(st.ops),
            "arena_bytes_after": best["arena_bytes"],
            "arena_ratio": round(best["arena_bytes"] / before, 4),
            "macs_after": round(macs_before * (1 + best["mac_overhead"])),
            "mac_overhead": round(best["mac_overhead"], 4),
        }
    )
    if timing_repeats:
        zeros = [
            np.zeros(unpatched.tensors[t].shape, unpatched.tensors[t].dtype)
            for t in unpatched.inputs
        ]
        after_s, before_s = runtimes.tflm_invoke_times(
            best["data"],  # Without a plan: twice the planned arena is room.
            2 * best["arena_bytes"],
            stripped,
            2 * before,
            zeros,
            repeats=timing_repeats,
        )
        report["invoke_time_ratio"] = round(after_s / before_s, 3)
    return best["data"], report


def _narrow(info, candidates, limit=12):
    """Splits worth measuring: the first at each spatial size (a stage that
    ends right after a downsampling) and the narrow ones (no larger than the
    splits before and after: where an inverted residual block's projection
    ends), at most `limit`, closest to the input first."""
    sizes = [info.tensors[s.split].nbytes for s in candidates]
    picked, seen = [], set()
    for i, st in enumerate(candidates):
        shape = info.tensors[st.split].shape[1:3]
        first = shape not in seen
        seen.add(shape)
        narrow = sizes[i] <= min(
            sizes[max(i - 1, 0)], sizes[min(i + 1, len(sizes) - 1)]
        )
        if first or narrow:
            picked.append(st)
    return picked[:limit]


def rows(report: dict) -> list[tuple[str, str]]:
    """Report table rows for `report["patch_inference"]` (none without it)."""
    rep = report.get("patch_inference")
    if not rep:
        return []
    if not rep["applied"]:
        return [("patch inference", f"not applied: {rep['reason']}")]
    timing = rep.get("invoke_time_ratio")
    return [
        (
            "patch inference",
            f"stage until {rep['until'] or 'op'} {rep['split_shape']}, grid "
            f"{rep['grid'][0]}x{rep['grid'][1]}: arena {rep['arena_bytes_before']:,}"
            f" -> {rep['arena_bytes_after']:,} B ({rep['arena_ratio']:.2f}x), "
            f"MACs +{100 * rep['mac_overhead']:.1f}%"
            + (f", TFLite Micro invoke time {timing:.2f}x" if timing else ""),
        )
    ]
