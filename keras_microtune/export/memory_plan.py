"""An offline tensor-arena plan for TFLite Micro, stored in the model's metadata.

TFLite Micro places activation tensors with a greedy planner (largest first,
lowest free offset). On chain-shaped networks such as MobileNetV1 that leaves
gaps, so the arena's activation part ends up above the liveness lower bound.
TFLite Micro also reads a plan computed ahead of time from the metadata entry
`OfflineMemoryAllocation`: an int32 array `[version 0, number of subgraphs,
number of tensors n, offset of tensor 0, ..., offset of tensor n-1]`, each
offset in bytes from the start of the non-persistent arena, `-1` for tensors
the online planner should place (constants, and here anything not planned).
Scratch buffers requested by kernels are still placed online, in the gaps the
plan leaves.

`apply` computes a plan, embeds it, measures both models in TFLite Micro and
keeps whichever needs the smaller arena, after checking that the outputs are
bit-identical.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from keras_microtune.export import _tflite, runtimes

METADATA_NAME = "OfflineMemoryAllocation"
ALIGNMENT = 16  # TFLite Micro's MicroArenaBufferAlignment().
# Ops whose output TFLite Micro may hand the input's buffer (same bytes, same
# data): planned as one buffer, so the kernel's copy is skipped or a no-op.
_ALIAS_OPS = ("RESHAPE",)


@dataclasses.dataclass
class Plan:
    """Offsets for every tensor of subgraph 0 (-1: placed by TFLite Micro).

    Attributes:
        offsets: list of int, one per tensor.
        arena_bytes: int. Extent of the planned tensors (the arena's head).
        greedy_bytes: int. The same tensors placed as TFLite Micro's greedy
            planner does (an estimate of the head without a plan).
        lower_bound: int. Liveness lower bound with 16-byte aligned sizes.
    """

    offsets: list
    arena_bytes: int
    greedy_bytes: int
    lower_bound: int


def _align(n: int) -> int:
    return (int(n) + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def buffers(info: _tflite.ModelInfo):
    """Buffers to plan, as TFLite Micro's AllocationInfoBuilder sees them.

    Returns:
        (buffers, owner): `buffers` is a list of `[size, first, last]` in
        allocation scopes (graph inputs at 0, op i at i + 1, graph outputs
        live to the end); `owner[t]` is the buffer index of tensor `t`.
    """
    n = len(info.op_sequence)
    first, last = {}, {}
    for t in info.inputs + info.outputs:
        first[t], last[t] = 0, 0
    for i, (_, ins, outs) in enumerate(info.op_sequence):
        for t in outs:
            first[t], last[t] = i + 1, i + 1
        for t in ins + outs:
            if t >= 0 and t in first:
                last[t] = max(last[t], i + 1)
    for t in info.outputs:
        last[t] = n
    planned = [
        t
        for t in sorted(first)
        if not info.tensors[t].constant and info.tensors[t].nbytes > 0
    ]
    parent = {t: t for t in planned}

    def root(t):
        while parent[t] != t:
            t = parent[t]
        return t

    for name, ins, outs in info.op_sequence:
        if name in _ALIAS_OPS and ins and outs and ins[0] in parent:
            a, b = ins[0], outs[0]
            if b in parent and info.tensors[a].nbytes == info.tensors[b].nbytes:
                parent[root(b)] = root(a)
    groups = {}
    for t in planned:
        groups.setdefault(root(t), []).append(t)
    bufs, owner = [], {}
    for members in groups.values():
        for t in members:
            owner[t] = len(bufs)
        bufs.append(
            [
                _align(max(info.tensors[t].nbytes for t in members)),
                min(first[t] for t in members),
                max(last[t] for t in members),
            ]
        )
    return bufs, owner


def _conflicts(bufs):
    out = [[] for _ in bufs]
    for i, (_, f1, l1) in enumerate(bufs):
        for j in range(i):
            _, f2, l2 = bufs[j]
            if f1 <= l2 and f2 <= l1:
                out[i].append(j)
                out[j].append(i)
    return out


def _place(bufs, conflicts, order, policy, cap=None):
    """Place buffers in `order`; None when one does not fit under `cap`."""
    offsets = [None] * len(bufs)
    for i in order:
        size = bufs[i][0]
        busy = sorted(
            (offsets[j], offsets[j] + bufs[j][0])
            for j in conflicts[i]
            if offsets[j] is not None
        )
        gaps, start = [], 0
        for lo, hi in busy:
            if lo - start >= size:
                gaps.append((start, lo))
            start = max(start, hi)
        top = cap if cap is not None else start + size
        if top - start >= size:
            gaps.append((start, top))
        if not gaps:
            return None
        if policy == "best":
            lo, hi = min(gaps, key=lambda g: (g[1] - g[0], g[0]))
            offsets[i] = lo
        elif policy == "far" and cap is not None and busy:
            # Opposite end from the biggest live neighbour (a chain's input).
            big = max(
                (j for j in conflicts[i] if offsets[j] is not None),
                key=lambda j: bufs[j][0],
            )
            low_side = offsets[big] + bufs[big][0] / 2 < cap / 2
            offsets[i] = gaps[-1][1] - size if low_side else gaps[0][0]
        else:
            offsets[i] = gaps[0][0]
    return offsets


def _extent(bufs, offsets):
    return max((o + b[0] for o, b in zip(offsets, bufs)), default=0)


def _bound(bufs):
    times = {f for _, f, _ in bufs}
    return max(
        (sum(s for s, f, last in bufs if f <= t <= last) for t in times), default=0
    )


def compute(info: _tflite.ModelInfo) -> Plan | None:
    """The smallest plan found over a few orderings and placement policies.

    Returns None for models this module does not plan (several subgraphs).
    """
    if info.num_subgraphs != 1:
        return None
    bufs, owner = buffers(info)
    if not bufs:
        return None
    conflicts = _conflicts(bufs)
    idx = range(len(bufs))
    by_size = sorted(idx, key=lambda i: (-bufs[i][0], bufs[i][1]))
    by_time = sorted(idx, key=lambda i: (bufs[i][1], -bufs[i][0]))
    by_life = sorted(idx, key=lambda i: (bufs[i][1] - bufs[i][2], -bufs[i][0]))
    greedy = _place(bufs, conflicts, by_size, "low")
    best = greedy
    for order in (by_size, by_time, by_life):
        cand = _place(bufs, conflicts, order, "best")
        if _extent(bufs, cand) < _extent(bufs, best):
            best = cand
    # Two-ended placement under a cap, bisected between the bound and the best.
    low, high = _bound(bufs), _extent(bufs, best)
    while high - low > ALIGNMENT:
        cap = _align((low + high) // 2)
        if cap >= high:
            break
        found = None
        for order in (by_time, by_size):
            for policy in ("far", "best"):
                found = found or _place(bufs, conflicts, order, policy, cap)
        if found is None:
            low = cap
        else:
            best, high = found, _extent(bufs, found)
    offsets = [-1] * len(info.tensors)
    for t, b in owner.items():
        offsets[t] = int(best[b])
    return Plan(offsets, _extent(bufs, best), _extent(bufs, greedy), _bound(bufs))


def check(info: _tflite.ModelInfo, offsets) -> None:
    """Raise ValueError when two tensors live at once share bytes."""
    bufs, owner = buffers(info)
    where = {}
    for t, b in owner.items():
        if offsets[t] < 0 or offsets[t] % ALIGNMENT:
            raise ValueError(f"Tensor {t} has an invalid offset {offsets[t]}.")
        where.setdefault(b, offsets[t])
        if where[b] != offsets[t]:
            raise ValueError(f"Aliased tensor {t} is not at its buffer's offset.")
    conflicts = _conflicts(bufs)
    for i, near in enumerate(conflicts):
        for j in near:
            a, b = where[i], where[j]
            if a < b + bufs[j][0] and b < a + bufs[i][0]:
                raise ValueError(f"Buffers {i} and {j} overlap in time and memory.")


def embed(data: bytes, offsets) -> bytes:
    """Return `data` with `offsets` stored as its OfflineMemoryAllocation."""
    model = _tflite._schema().Model.GetRootAs(bytes(data), 0)
    values = np.array([0, model.SubgraphsLength(), len(offsets), *offsets], "<i4")
    return _tflite.with_metadata(data, METADATA_NAME, values.tobytes())


def read(data: bytes) -> list | None:
    """The offsets stored in `data`'s OfflineMemoryAllocation, or None."""
    raw = _tflite.metadata(data, METADATA_NAME)
    if raw is None:
        return None
    values = np.frombuffer(raw[: len(raw) // 4 * 4], "<i4")
    if len(values) < 3 or not 0 <= values[2] <= len(values) - 3:
        return None
    return [int(v) for v in values[3 : 3 + values[2]]]


def _random_inputs(info, samples=2, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for t in info.inputs:
        spec = info.tensors[t]
        dtype = np.dtype(spec.dtype)
        lim = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
        shape = (samples, *spec.shape[1:])
        if lim is not None:
            x = rng.integers(lim.min, lim.max, shape, endpoint=True)
        else:
            x = rng.normal(size=shape)
        out.append(x.astype(dtype))
    return out


def apply(tflite: bytes, info: _tflite.ModelInfo, lower_bound: int = 0):
    """Embed an offline plan when it lowers TFLite Micro's measured arena.

    The model is measured without a plan first; a plan is embedded and
    measured only when it is smaller than the head TFLite Micro's own planner
    used, and kept only when the arena shrinks and the outputs are bit-identical.

    Args:
        tflite: bytes. A stripped MCU model.
        info: its `_tflite.parse` result.
        lower_bound: int. Activation lower bound, to seed the arena search.

    Returns:
        (tflite, info, arena, memory): the model kept (with or without the
        plan), it parsed, its `runtimes.measure_arena` dict, and report
        entries: `offline_plan` (bool) and, when a plan was tried,
        `arena_bytes_without_plan`,
        `offline_plan_bytes` (the planned head) and, if it was dropped,
        `offline_plan_rejected`. Without a plan the arena is the same as
        `arena_bytes`, so only `offline_plan: False` is reported.

    Raises:
        runtimes.RuntimeFailure: TFLite Micro cannot run the model at all.
    """
    without = runtimes.measure_arena(tflite, lower_bound, info=info)
    plan = compute(info)
    head = without.get("head_bytes", plan.greedy_bytes if plan else 0)
    if plan is None or plan.arena_bytes >= head:
        # TFLite Micro's own planner does as well: the arena is `without`.
        return tflite, info, without, {"offline_plan": False}
    memory = {
        "offline_plan": False,
        "arena_bytes_without_plan": without["arena_bytes"],
        "offline_plan_bytes": plan.arena_bytes,
    }
    check(info, plan.offsets)
    planned = embed(tflite, plan.offsets)
    planned_info = _tflite.parse(planned)
    try:
        with_plan = runtimes.measure_arena(planned, lower_bound, info=planned_info)
    except runtimes.RuntimeFailure as e:
        memory["offline_plan_rejected"] = f"TFLite Micro: {e}"[:300]
        return tflite, info, without, memory
    if with_plan["arena_bytes"] >= without["arena_bytes"]:
        memory["offline_plan_rejected"] = "no smaller measured arena"
        return tflite, info, without, memory
    xs = _random_inputs(info)
    a = runtimes.tflm_run(tflite, xs, without["arena_bytes"], info=info)
    b = runtimes.tflm_run(planned, xs, with_plan["arena_bytes"], info=planned_info)
    if not all(np.array_equal(u, v) for u, v in zip(a, b)):
        memory["offline_plan_rejected"] = "outputs differ"
        return tflite, info, without, memory
    memory["offline_plan"] = True
    return planned, planned_info, with_plan, memory
