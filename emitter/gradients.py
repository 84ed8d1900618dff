"""Gradient measurement that costs (next to) nothing: one norm pass, clip, and telemetry.

Why this module exists: the number an operator most wants from a PPO run is the gradient
norm, before and after clipping. ``torch.nn.utils.clip_grad_norm_`` already computes the
pre-clip norm; measuring "post-clip" with a second pass over the gradients, or upcasting
every gradient to float64 to get a trustworthy number, would cost more than the training
step can afford (float64 upcast is ~20x slower at 8.5M parameters on a 2-core CPU). So:

* **Fast total norm** (:func:`total_norm`): per-tensor L2 norms in the gradient's own dtype
  with torch's fused foreach kernel (``torch._foreach_norm``, one read of every gradient),
  combined in float64. Only when that result is not finite (a float32 norm overflows above
  ~1.8e19, or a gradient holds NaN/inf) is it recomputed in float64, so 1e20-sized
  gradients give a finite, right answer while the common case pays nothing extra.
* **One-pass clip with stats** (:func:`clip_grad_norm_with_stats`): the norm that clipping
  needs *is* the pre-clip norm; the post-clip norm follows from the coefficient,
  ``pre * min(1, max_norm / (pre + 1e-6))``. Gradients end up bit-for-bit as
  ``clip_grad_norm_`` leaves them (same per-tensor kernel, same float32 combination, same
  coefficient), with one deliberate exception described below.
* **Sync-free device path** (:func:`clip_grad_norm_deferred` and :class:`UpdateStats`): on
  CUDA nothing here calls ``.item()``; every per-minibatch scalar stays a device tensor and
  an update's telemetry crosses to the host in a single transfer in
  :meth:`UpdateStats.resolve`.

Deliberate deviation from ``clip_grad_norm_`` (the *overflow case*): when every gradient
element is finite but the float32 norm overflows (elements around 1e18 and up), torch
computes ``total_norm = inf`` and multiplies every gradient by ``max_norm / inf = 0``,
silently wiping the update (or by NaN when ``max_norm`` is inf). Here the float64 norm is
used instead and the gradients are clipped correctly: afterwards their norm is
``max_norm`` (or they are left untouched when ``max_norm`` is inf). In every other case,
NaN/inf gradients included, the gradients are left exactly as torch leaves them.

Host synchronisations added by telemetry:

* CPU: none exist (CPU tensors are host memory); :func:`clip_grad_norm_with_stats` reads
  its few scalars directly, costing microseconds.
* CUDA, using :class:`UpdateStats`: **one per update** (the ``tolist()`` in
  :meth:`UpdateStats.resolve`), zero per minibatch. :func:`clip_grad_norm_with_stats`
  itself returns host floats, so calling it directly on CUDA costs one sync per call; the
  PPO worker therefore goes through :class:`UpdateStats`, which uses the deferred path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ClipStats",
    "UpdateStats",
    "clip_grad_norm_deferred",
    "clip_grad_norm_with_stats",
    "nonfinite_count",
    "total_norm",
    "total_norm_float64",
]

#: Added to the norm before dividing, exactly as torch.nn.utils.clip_grad_norm_ does.
EPS = 1e-6


@dataclass(frozen=True, slots=True)
class ClipStats:
    """What one call to :func:`clip_grad_norm_with_stats` measured and did.

    ``pre_clip_norm`` is the L2 norm of all gradients before clipping (NaN or inf when a
    gradient holds NaN/inf: that is the news, never hidden). ``post_clip_norm`` is the norm
    of what the optimizer will apply. ``clip_coef`` is the factor the gradients were
    multiplied by (1.0 when nothing was clipped). ``nonfinite_count`` counts NaN/inf
    gradient elements (0 on the fast path, where the finite norm proves there are none).
    ``overflow_fallback`` is True when the float32 norm overflowed on finite gradients and
    the float64 norm was used instead (the documented deviation from torch).
    """

    pre_clip_norm: float
    post_clip_norm: float
    clip_coef: float
    max_norm: float
    nonfinite_count: int
    overflow_fallback: bool = False

    @property
    def clipped(self) -> bool:
        """True when the gradients were scaled down."""
        return self.clip_coef < 1.0


# ---------------------------------------------------------------------------- helpers


def _grads(parameters: Iterable[Tensor] | Tensor) -> list[Tensor]:
    """Gradients of ``parameters`` (those that have one), as clip_grad_norm_ selects them."""
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def _tensor_list(tensors: Iterable[Tensor] | Tensor) -> list[Tensor]:
    if isinstance(tensors, Tensor):
        return [tensors]
    return list(tensors)


def _per_tensor_norms(tensors: list[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
    """L2 norm of each tensor with the fused foreach kernel, grouped by (device, dtype).

    Grouping mirrors clip_grad_norm_ (foreach needs same-device, same-dtype lists), and the
    kernel is the one clip_grad_norm_ uses, so the norms are bit-identical to torch's.
    """
    first = tensors[0]
    if all(t.device == first.device and t.dtype == first.dtype for t in tensors):
        groups = [tensors]
    else:
        by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for t in tensors:
            by_key.setdefault((t.device, t.dtype), []).append(t)
        groups = list(by_key.values())
    norms: list[Tensor] = []
    for group in groups:
        if dtype is None:
            norms.extend(torch._foreach_norm(group, 2.0))
        else:
            norms.extend(torch._foreach_norm(group, 2.0, dtype=dtype))
    return norms


def _stack(norms: list[Tensor], device: torch.device) -> Tensor:
    return torch.stack([n.to(device) for n in norms])


def total_norm_float64(tensors: Iterable[Tensor] | Tensor) -> float:
    """Reference/fallback: the L2 norm of all ``tensors`` with every element in float64.

    Slow (each tensor is upcast, i.e. copied), but finite and right for any finite input.
    """
    tensors = _tensor_list(tensors)
    if not tensors:
        raise ValueError("total_norm_float64() needs at least one tensor")
    norms = _per_tensor_norms([t.detach().to(torch.float64) for t in tensors])
    return float(torch.linalg.vector_norm(_stack(norms, tensors[0].device)))


def nonfinite_count(tensors: Iterable[Tensor] | Tensor) -> int:
    """Number of NaN/inf elements over ``tensors`` (one extra pass: call it only when a
    norm already says something is not finite)."""
    return int(sum(int((~torch.isfinite(t)).sum()) for t in _tensor_list(tensors)))


def _combine64(stacked: Tensor) -> float:
    """Combine per-tensor norms in float64 on the host (a handful of scalars)."""
    values = stacked.tolist()
    return math.hypot(*values) if values else 0.0


def total_norm(tensors: Iterable[Tensor] | Tensor) -> float:
    """L2 norm of all ``tensors`` together, fast and overflow-safe.

    Per-tensor norms in the tensors' dtype (one fused read of every element), combined in
    float64; recomputed in float64 only when that result is not finite. NaN/inf elements
    give NaN/inf (never a made-up number). One host read on CUDA: use
    :func:`clip_grad_norm_deferred` in a training loop.
    """
    tensors = _tensor_list(tensors)
    if not tensors:
        raise ValueError("total_norm() needs at least one tensor")
    tensors = [t.detach() for t in tensors]
    norm = _combine64(_stack(_per_tensor_norms(tensors), tensors[0].device))
    if not math.isfinite(norm):
        norm = total_norm_float64(tensors)
    return norm


def _check_max_norm(max_norm: float) -> float:
    max_norm = float(max_norm)
    if math.isnan(max_norm) or max_norm <= 0.0:
        raise ValueError(f"max_norm must be > 0 (inf disables clipping), got {max_norm!r}")
    return max_norm


# ---------------------------------------------------------------------------- clipping


@torch.no_grad()
def clip_grad_norm_with_stats(parameters: Iterable[Tensor] | Tensor,
                              max_norm: float) -> ClipStats:
    """Clip gradients in place like ``torch.nn.utils.clip_grad_norm_`` and report the
    pre- and post-clip norms, all from ONE norm pass over the gradients.

    ``max_norm=inf`` disables clipping (gradients untouched, post == pre). Raises
    ValueError when no parameter has a gradient (clipping nothing is a bug in the caller,
    not a norm of 0) or when ``max_norm`` is not > 0.

    Gradients afterwards are bit-identical to ``clip_grad_norm_``'s, except the overflow
    case (finite gradients whose float32 norm overflows): torch would zero them; here they
    are scaled by ``max_norm / norm64`` so the update survives (see the module docstring).
    When the coefficient is exactly 1 the multiply is skipped: ``x * 1.0 == x`` bit for bit,
    so the result is the same and an unclipped step pays one read instead of read + write.

    Cost: one fused read of the gradients (+ one write when clipping). Reads a few scalars
    on the host: free on CPU, one sync per call on CUDA (use :class:`UpdateStats` there).
    """
    max_norm = _check_max_norm(max_norm)
    grads = _grads(parameters)
    if not grads:
        raise ValueError("clip_grad_norm_with_stats(): no parameter has a gradient "
                         "(call backward() first, or check requires_grad)")
    device = grads[0].device
    stacked = _stack(_per_tensor_norms(grads), device)
    pre = _combine64(stacked)

    if math.isfinite(pre):
        # Exactly torch's combination and coefficient, so the clipped values match bit for bit.
        total32 = torch.linalg.vector_norm(stacked, 2.0)
        finite32 = math.isfinite(float(total32))
        if math.isinf(max_norm):
            # No clipping. torch multiplies by 1.0 (identity), or by NaN when its float32
            # norm overflowed: the overflow case again, where we leave the gradients intact.
            return ClipStats(pre, pre, 1.0, max_norm, 0, overflow_fallback=not finite32)
        if finite32:
            coef_t = torch.clamp(max_norm / (total32 + EPS), max=1.0)
            coef = float(coef_t)
            if coef != 1.0:
                torch._foreach_mul_(grads, coef_t.to(device))
            return ClipStats(pre, pre * coef, coef, max_norm, 0)
        # Per-tensor norms were finite but their float32 combination overflowed.
        return _clip_overflow(grads, pre, max_norm)

    count = nonfinite_count(grads)
    if count == 0:
        # Finite gradients whose float32 norm overflowed: the float64 norm is right.
        return _clip_overflow(grads, total_norm_float64(grads), max_norm)
    # NaN/inf gradients: do exactly what torch does (coefficient NaN or 0) and say so.
    total32 = torch.linalg.vector_norm(stacked, 2.0)
    coef_t = torch.clamp(max_norm / (total32 + EPS), max=1.0)
    torch._foreach_mul_(grads, coef_t.to(device))
    pre = float(total32)
    coef = float(coef_t)
    return ClipStats(pre, pre * coef, coef, max_norm, count)


def _clip_overflow(grads: list[Tensor], pre: float, max_norm: float) -> ClipStats:
    """The documented deviation: clip finite-but-huge gradients with the float64 norm."""
    coef = min(1.0, max_norm / (pre + EPS))
    if coef != 1.0:
        torch._foreach_mul_(grads, coef)
    return ClipStats(pre, pre * coef, coef, max_norm, 0, overflow_fallback=True)


#: Layout of the tensor returned by :func:`clip_grad_norm_deferred`.
DEFERRED_FIELDS = ("pre_clip_norm", "post_clip_norm", "clip_coef", "nonfinite_count",
                   "overflow_fallback")


@torch.no_grad()
def clip_grad_norm_deferred(parameters: Iterable[Tensor] | Tensor, max_norm: float) -> Tensor:
    """Sync-free twin of :func:`clip_grad_norm_with_stats` for accelerators.

    Returns a float64 tensor on the gradients' device laid out as :data:`DEFERRED_FIELDS`;
    nothing is read on the host, so the GPU is never stalled. Since it cannot branch on
    the norm, it reads the gradients three times instead of once: the float32 foreach
    norm (torch-identical coefficient), a float64-accumulating foreach norm (the overflow
    fallback, selected with ``torch.where``) and a non-finite count. On a GPU these are
    bandwidth-bound reads costing microseconds, far less than one host round trip.
    Gradients end up as with :func:`clip_grad_norm_with_stats` (the multiply by 1.0 is
    not skipped, which changes no value). Intended for CUDA; correct on any device.
    """
    max_norm = _check_max_norm(max_norm)
    grads = _grads(parameters)
    if not grads:
        raise ValueError("clip_grad_norm_deferred(): no parameter has a gradient "
                         "(call backward() first, or check requires_grad)")
    device = grads[0].device
    stacked = _stack(_per_tensor_norms(grads), device)
    total32 = torch.linalg.vector_norm(stacked, 2.0)
    coef_torch = torch.clamp(max_norm / (total32 + EPS), max=1.0).to(torch.float64)
    pre_fast = torch.linalg.vector_norm(stacked.to(torch.float64))
    pre_safe = torch.linalg.vector_norm(
        _stack(_per_tensor_norms(grads, dtype=torch.float64), device).to(torch.float64))
    count = torch.stack([(~torch.isfinite(g)).sum().to(device) for g in grads]).sum()
    finite_grads = count == 0
    overflow = finite_grads & ~torch.isfinite(total32)
    pre = torch.where(torch.isfinite(pre_fast), pre_fast,
                      torch.where(finite_grads, pre_safe, total32.to(torch.float64)))
    coef_safe = torch.clamp(max_norm / (pre + EPS), max=1.0)
    coef = torch.where(overflow, coef_safe, coef_torch)
    for group in _group(grads):
        torch._foreach_mul_(group, coef.to(device=group[0].device, dtype=group[0].dtype))
    return torch.stack([pre, pre * coef, coef, count.to(torch.float64),
                        overflow.to(torch.float64)])


def _group(tensors: list[Tensor]) -> list[list[Tensor]]:
    by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        by_key.setdefault((t.device, t.dtype), []).append(t)
    return list(by_key.values())


# ---------------------------------------------------------------------------- per update


class UpdateStats:
    """Collects one PPO update's telemetry scalars without reading them per minibatch.

    Tensors are recorded as they are (``detach()``-ed, left on their device, not copied)
    and Python numbers as floats; everything is reduced only in :meth:`resolve`, which
    stacks each name's values once, reduces them in float64 and moves every tensor result
    to the host with a single ``tolist()``: **one host synchronisation per update on CUDA,
    none per minibatch** (on CPU there is nothing to synchronise).

    Why record lazily: a per-record ``.to(float64)`` costs ~5-15 µs of dispatcher time and
    an allocation, and a CleanRL-style update records ~100 values; deferring that to one
    stack per name in :meth:`resolve` keeps telemetry's share of a small-network training
    loop under a percent (``make bench``, the CleanRL-style row).

    Reductions: ``mean`` (e.g. losses over minibatches), ``min``/``max`` (e.g. ratio
    range), ``sum`` (e.g. non-finite element counts). NaN propagates through all of them.
    """

    _REDUCE = {"mean": torch.mean, "min": torch.amin, "max": torch.amax, "sum": torch.sum}

    def __init__(self, device: torch.device | str = "cpu", *, deferred: bool | None = None) -> None:
        """``deferred``: use the sync-free clip path; None (default) = only off the CPU."""
        self.device = torch.device(device)
        self.deferred = deferred
        self._values: dict[str, tuple[str, list[Tensor | float]]] = {}

    def add(self, name: str, value: Tensor | float, reduce: str = "mean") -> None:
        """Record one value (no host read). ``reduce`` is fixed by the first record.

        A tensor is kept by reference until :meth:`resolve` (detached, not copied): pass
        ``.clone()`` of one you will modify in place before then (a running sum, say).
        It must hold one element.
        """
        if reduce not in self._REDUCE:
            raise ValueError(f"unknown reduction {reduce!r}")
        slot = self._values.get(name)
        if slot is None:
            slot = self._values[name] = (reduce, [])
        if isinstance(value, Tensor):
            value = value.detach()
            if value.dim():
                value = value.reshape(())  # a 1-element tensor of any shape; others raise here
            slot[1].append(value)
        else:
            slot[1].append(float(value))

    def clip(self, parameters: Iterable[Tensor] | Tensor, max_norm: float) -> None:
        """Clip gradients (see :func:`clip_grad_norm_with_stats`) and record the norms.

        Records ``pre_clip_grad_norm`` and ``grad_norm`` (post-clip) as means over the
        update's minibatches, ``pre_clip_grad_norm_max`` as their maximum pre-clip norm
        (one spiking minibatch among many calm ones barely moves the mean; NaN wins, as
        the news it is) and ``nonfinite_grad_count`` as a sum. The max shares the pre-clip
        value already recorded, so it costs no extra norm pass and no host read (it is
        reduced with the rest in :meth:`resolve`). On CPU the host path
        is used (its scalar reads are plain memory reads there, and knowing the coefficient
        lets it skip the multiply when nothing is clipped); elsewhere the sync-free
        :func:`clip_grad_norm_deferred`, so a minibatch never waits for the device.
        """
        params = _tensor_list(parameters)
        deferred = self.deferred
        if deferred is None:
            first = next((p.grad for p in params if p.grad is not None), None)
            deferred = first is not None and first.device.type != "cpu"
        if deferred:
            out = clip_grad_norm_deferred(params, max_norm)
            pre, post, count = out[0], out[1], out[3]
        else:
            stats = clip_grad_norm_with_stats(params, max_norm)
            pre, post = stats.pre_clip_norm, stats.post_clip_norm
            count = float(stats.nonfinite_count)
        self.add("pre_clip_grad_norm", pre)
        self.add("pre_clip_grad_norm_max", pre, "max")
        self.add("grad_norm", post)
        self.add("nonfinite_grad_count", count, "sum")

    def _stacked(self, values: list[Tensor | float]) -> Tensor:
        """One name's values as a float64 vector on ``self.device``: one stack when they are
        alike (the usual case), element by element otherwise."""
        first = values[0]
        if isinstance(first, Tensor) and all(
                isinstance(v, Tensor) and v.dtype == first.dtype and v.device == first.device
                for v in values):
            return torch.stack(values).to(self.device, torch.float64)  # type: ignore[arg-type]
        return torch.stack([v.to(self.device, torch.float64) if isinstance(v, Tensor)
                            else torch.tensor(v, dtype=torch.float64, device=self.device)
                            for v in values])

    def resolve(self) -> dict[str, float]:
        """Reduce everything and read it on the host in ONE transfer; then reset.

        Names recorded only as Python floats (the CPU clip path) are reduced in Python:
        they are on the host already.
        """
        if not self._values:
            return {}
        out: dict[str, float] = {}
        names: list[str] = []
        reduced: list[Tensor] = []
        for name, (reduce, values) in self._values.items():
            if all(type(v) is float for v in values):
                out[name] = _reduce_floats(reduce, values)  # type: ignore[arg-type]
            else:
                names.append(name)
                reduced.append(self._REDUCE[reduce](self._stacked(values)))
        if reduced:
            host = torch.stack(reduced).tolist()  # the one host synchronisation per update
            out.update(zip(names, host, strict=True))
        result = {name: out[name] for name in self._values}  # recording order
        self._values.clear()
        return result


def _reduce_floats(reduce: str, values: list[float]) -> float:
    """The host twin of ``UpdateStats._REDUCE`` (NaN propagates, as torch's reductions do)."""
    if reduce == "mean":
        return sum(values) / len(values)
    if reduce == "sum":
        return float(sum(values))
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values) if reduce == "max" else min(values)
