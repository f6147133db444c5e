"""`convert(patch_inference=...)`: the option, choosing the split and grid, the report.

`apply` resolves `until` (a Keras layer name) to the tensor it outputs in the
converted flatbuffer, builds the patched models with `patching.rewrite`, and
measures their arena in TFLite Micro. `"auto"` builds every split and grid up
to 6x6 within the MAC cap, drops those whose lower bound (activation bound
plus the unpatched TFLite Micro tail grown by the copied ops' structs and
per-channel data) is not below the unpatched arena, allocates the rest once
each in TFLite Micro (exact arena with its own planner), and measures the few
smallest as `convert` delivers them (offline memory plan when it lowers the
arena); it keeps the smallest, or the unpatched model when none is smaller.
"""

from __future__ import annotations

import re

import numpy as np

from keras_microtune.export import _tflite, patching, runtimes

MAX_MAC_OVERHEAD = 0.2  # "auto": at most +20% multiply-adds.
MAX_SIDE = 6  # "auto": grids up to 6 x 6 patches.
MEASURED = 3  # "auto": smallest allocated candidates measured with an arena search.
SHOWN = 10  # "auto": candidates listed in the report, smallest arena first.


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


def _channels(info) -> int:
    return sum(
        info.tensors[outs[0]].shape[-1]
        for name, _, outs in info.op_sequence
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D")
    )


def lower_bound(unpatched, patched, parts) -> int:
    """A floor under the patched arena, before allocating it: the activation
    bound plus the unpatched TFLite Micro tail grown by what the patches add
    for certain (a node struct per op and an eval tensor per tensor, sized as
    in the unpatched `parts` from `runtimes.tflm_allocations`, and 8 bytes per
    output channel of each copied convolution: its int32 multipliers and
    shifts; the kernels' other op data is left out)."""
    per_node = parts["nodes_bytes"] / max(parts["nodes_count"], 1)
    per_tensor = parts["eval_tensors_bytes"] / max(parts["eval_tensors_count"], 1)
    grown = per_node * (len(patched.op_sequence) - len(unpatched.op_sequence))
    grown += per_tensor * (len(patched.tensors) - len(unpatched.tensors))
    grown += 8 * (_channels(patched) - _channels(unpatched))
    return _tflite.activation_lower_bound(patched) + parts["tail_bytes"] + int(grown)


def _measure(data):
    """TFLite Micro's arena for `data` as `convert` delivers it: with the
    offline memory plan when that lowers it (`memory_plan.apply`)."""
    from keras_microtune.export import memory_plan

    info = _tflite.parse(data)
    lower = _tflite.activation_lower_bound(info)
    _, _, arena, _ = memory_plan.apply(data, info, lower)
    return arena["arena_bytes"], arena


def _grids(shape, grid):
    """The grids to try on a split of `shape`: `grid`, or with "auto" every
    rows x cols up to `MAX_SIDE` that the split's height and width allow."""
    if grid != "auto":
        return [grid]
    sides = range(1, MAX_SIDE + 1)
    return [
        (r, c)
        for r in sides
        for c in sides
        if (r, c) != (1, 1) and r <= shape[1] and c <= shape[2]
    ]


def _candidates(info, stripped, stages, spec, parts, before, describe):
    """Rewritten candidates within the MAC cap whose lower bound is below the
    unpatched arena `before` ("auto": a stage whose rest of the network alone
    cannot fit below it is passed over; a grid is not built when a grid with
    no more rows and columns is already over the cap: halos only grow)."""
    unpatched = _tflite.parse(stripped)
    live = _tflite.live_bytes_per_op(unpatched)
    macs_before = patching.macs(unpatched)
    auto = spec["until"] == "auto" or spec["grid"] == "auto"
    rows, considered = [], 0
    for st in stages:
        inside = set(st.ops)
        rest = max((b for k, b in enumerate(live) if k not in inside), default=0)
        if auto and rest + parts.get("tail_bytes", 0) >= before:
            continue
        over = []
        shape = info.tensors[st.split].shape
        for grid in _grids(shape, spec["grid"]):
            if any(r <= grid[0] and c <= grid[1] for r, c in over):
                continue
            patching.check_grid(grid, shape)
            try:
                data = patching.rewrite(stripped, st, grid, describe)
            except patching.PatchError:
                if not auto:
                    raise
                continue  # "auto": e.g. a 'same' pooling this grid cannot split.
            considered += 1
            patched = _tflite.parse(data)
            overhead = patching.macs(patched) / macs_before - 1 if macs_before else 0.0
            if auto and overhead > spec["max_mac_overhead"]:
                over.append(grid)
                continue
            floor = lower_bound(unpatched, patched, parts) if parts else 0
            if auto and floor >= before:
                continue
            rows.append(
                {"stage": st, "grid": grid, "data": data, "mac_overhead": overhead}
            )
    return rows, considered, macs_before


def apply(tflite: bytes, info, spec: dict, layer_names=(), timing_repeats=20):
    """Patch `tflite` (converted, names kept) as `spec` (`check_option`) asks.

    With `"auto"`, every split the model allows and every grid up to
    `MAX_SIDE` x `MAX_SIDE` within the MAC cap whose lower bound is below the
    unpatched arena is allocated once in TFLite Micro (its recording
    allocator: the exact arena with TFLite Micro's own planner); the
    `MEASURED` smallest are then measured as `convert` delivers them (arena
    search, offline memory plan when it helps, before compression) and the
    smallest is kept, or none when none is below the unpatched arena.

    Returns:
        (tflite, report): the patched model (or `tflite` itself when "auto"
        finds no smaller arena) and the `report["patch_inference"]` entry.
    """
    describe = describe_ops(info, layer_names)
    stripped = _tflite.strip(tflite)  # Same ops and tensors, without names.
    unpatched = _tflite.parse(stripped)
    before, _ = _measure(stripped)
    parts = runtimes.tflm_allocations([stripped], 2 * before + (1 << 16))[0] or {}
    if spec["until"] == "auto":
        stages = patching.stages(info)
    else:
        split = find_split(info, spec["until"], layer_names)
        stages = [patching.stage(info, split, describe)]
    rows, considered, macs_before = _candidates(
        info, stripped, stages, spec, parts, before, describe
    )
    auto = spec["until"] == "auto" or spec["grid"] == "auto"
    report = {
        "requested": {
            k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()
        },
        "arena_bytes_before": before,
        "arena_parts_before": parts,
        "macs_before": macs_before,
        "live_bytes_before": _tflite.live_bytes_per_op(unpatched),
    }
    if auto:
        report["candidates_built"] = considered
        allocated = runtimes.tflm_allocations(
            [r["data"] for r in rows], 2 * before + (1 << 16)
        )
        for r, a in zip(rows, allocated):
            r["parts"] = a
            r["allocated_bytes"] = a["total_bytes"] if a else None
        report["candidates_allocated"] = len(rows)
        rows = [r for r in rows if r["allocated_bytes"] is not None]
        rows.sort(key=lambda r: r["allocated_bytes"])
        shown = rows[:SHOWN]
        rows = rows[:MEASURED]
    else:
        shown = rows
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
            "arena_bytes": r.get("arena_bytes", r.get("allocated_bytes")),
            **({"error": r["error"]} if "error" in r else {}),
        }
        for r in shown
    ]
    rows = [r for r in rows if r["arena_bytes"] is not None]
    best = min(rows, key=lambda r: r["arena_bytes"], default=None)
    if best is None or (auto and best["arena_bytes"] >= before):
        report["applied"] = False
        if best is not None:
            report["reason"] = f"no patched arena below the unpatched {before:,} B"
        elif shown:
            report["reason"] = "TFLite Micro could not run the candidates"
        else:
            report["reason"] = (
                "no split and grid within the MAC cap whose lower bound is "
                f"below the unpatched {before:,} B"
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
            "arena_parts_after": best.get("parts")
            or runtimes.tflm_allocations([best["data"]], 2 * before + (1 << 16))[0],
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
        ),
        *_tail_row(rep),
    ]


def _tail_row(rep):
    before, after = rep.get("arena_parts_before"), rep.get("arena_parts_after")
    if not (before and after):
        return []
    return [
        (
            "patch inference: TFLite Micro tail",
            f"{before['tail_bytes']:,} -> {after['tail_bytes']:,} B (per-op data "
            f"{before['op_data_bytes']:,} -> {after['op_data_bytes']:,} B, "
            f"{before['nodes_count']} -> {after['nodes_count']} ops; copies of the "
            "stage's ops keep their own per-channel multipliers and shifts)",
        )
    ]
