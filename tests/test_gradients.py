"""Gradient measurement: fast norm accuracy, torch-identical clipping, overflow, NaN, sync-free."""

from __future__ import annotations

import math
import warnings

import pytest

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
torch = pytest.importorskip("torch")

from emitter.gradients import (  # noqa: E402
    ClipStats,
    UpdateStats,
    clip_grad_norm_deferred,
    clip_grad_norm_with_stats,
    total_norm,
    total_norm_float64,
)


def reference_norm(tensors: list[torch.Tensor]) -> float:
    """Independent float64 reference: every element upcast, one flat vector."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def make_params(shapes: list[tuple[int, ...]], scale: float = 1.0, seed: int = 0
                ) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * scale
    return params


def mlp_params(seed: int = 0) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2))
    model(torch.randn(256, 4)).square().sum().backward()
    return list(model.parameters())


def grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad.clone() for p in params]


def clone_params(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


# ------------------------------------------------------------------ total norm


def test_total_norm_exact_on_3_4_5():
    assert total_norm([torch.tensor([3.0]), torch.tensor([4.0])]) == 5.0
    assert total_norm([torch.tensor([[3.0, 4.0]])]) == 5.0
    assert total_norm(torch.tensor([0.0, 3.0, 0.0, 4.0])) == 5.0


def test_total_norm_matches_float64_reference_at_8_5m_params():
    # 8.5M parameters laid out like a real network: 1M-element layers, biases, a big head.
    shapes = [(1024, 1024)] * 8 + [(1024,)] * 8 + [(200_000,)]
    params = make_params(shapes, scale=1e-3)
    tensors = [p.grad for p in params]
    assert sum(t.numel() for t in tensors) >= 8_500_000
    ref = reference_norm(tensors)
    assert abs(total_norm(tensors) - ref) / ref <= 1e-4
    assert abs(total_norm_float64(tensors) - ref) / ref <= 1e-12


def test_total_norm_is_finite_and_right_for_1e20_sized_gradients():
    huge = [torch.full((100,), 1e20), torch.full((10, 10), -3e20), torch.randn(50)]
    ref = reference_norm(huge)
    value = total_norm(huge)
    assert math.isfinite(value)
    assert value == pytest.approx(ref, rel=1e-6)
    # torch's float32 path overflows here: that is what the fallback is for.
    assert math.isinf(float(torch.nn.utils.get_total_norm(huge)))


def test_total_norm_combination_overflow_only():
    # Each per-tensor float32 norm is finite (1.5e19) but their float32 combination is not.
    tensors = [torch.tensor([1.5e19]), torch.tensor([1.5e19])]
    assert total_norm(tensors) == pytest.approx(1.5e19 * math.sqrt(2), rel=1e-6)


def test_total_norm_reports_nan_and_inf():
    assert math.isnan(total_norm([torch.tensor([1.0, float("nan")]), torch.ones(3)]))
    assert math.isinf(total_norm([torch.tensor([1.0, float("inf")])]))


def test_total_norm_needs_tensors():
    with pytest.raises(ValueError):
        total_norm([])


# ------------------------------------------------------------------ clipping


@pytest.mark.parametrize("max_norm", [0.01, 0.5, 3.0, 1e6])
@pytest.mark.parametrize("seed", [0, 1])
def test_clipped_gradients_identical_to_torch(max_norm, seed):
    ours = mlp_params(seed)
    theirs = clone_params(ours)
    torch_total = float(torch.nn.utils.clip_grad_norm_(theirs, max_norm))
    stats = clip_grad_norm_with_stats(ours, max_norm)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.grad, b.grad)
    assert stats.pre_clip_norm == pytest.approx(torch_total, rel=1e-6)
    assert stats.clipped == (max_norm < torch_total)
    assert stats.nonfinite_count == 0 and not stats.overflow_fallback


def test_clipped_gradients_identical_to_torch_large_model():
    ours = make_params([(1024, 1024), (1024,), (512, 1024), (512,)], scale=1e-2)
    theirs = clone_params(ours)
    torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    clip_grad_norm_with_stats(ours, 0.5)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("max_norm", [0.05, 0.5, 1e6])
def test_post_clip_norm_is_the_norm_of_the_clipped_gradients(max_norm):
    params = mlp_params(3)
    stats = clip_grad_norm_with_stats(params, max_norm)
    actual = reference_norm([p.grad for p in params])
    assert stats.post_clip_norm == pytest.approx(actual, rel=1e-6)
    # The design's formula, up to the float32 rounding of the coefficient torch applies.
    assert stats.post_clip_norm == pytest.approx(
        stats.pre_clip_norm * min(1.0, max_norm / (stats.pre_clip_norm + 1e-6)), rel=1e-6)
    assert stats.post_clip_norm == stats.pre_clip_norm * stats.clip_coef
    if max_norm < stats.pre_clip_norm:
        assert stats.post_clip_norm == pytest.approx(max_norm, rel=1e-5)


def test_max_norm_inf_means_no_clipping():
    params = mlp_params(4)
    before = grads(params)
    theirs = clone_params(params)
    torch.nn.utils.clip_grad_norm_(theirs, math.inf)
    stats = clip_grad_norm_with_stats(params, math.inf)
    for p, b, t in zip(params, before, theirs, strict=True):
        assert torch.equal(p.grad, b) and torch.equal(p.grad, t.grad)
    assert stats.clip_coef == 1.0 and not stats.clipped
    assert stats.post_clip_norm == stats.pre_clip_norm == pytest.approx(reference_norm(before), rel=1e-6)
    assert math.isinf(stats.max_norm)


@pytest.mark.parametrize("max_norm", [1.0, 7.5])
def test_overflow_case_is_clipped_correctly_not_wiped(max_norm):
    params = make_params([(64, 64), (64,), (100,)], scale=1e20)
    theirs = clone_params(params)
    torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    # What torch does here (the documented deviation): every gradient multiplied by 0.
    assert all(float(t.grad.abs().sum()) == 0.0 for t in theirs)

    ref = reference_norm([p.grad for p in params])
    stats = clip_grad_norm_with_stats(params, max_norm)
    assert stats.overflow_fallback and stats.nonfinite_count == 0
    assert stats.pre_clip_norm == pytest.approx(ref, rel=1e-6)
    after = [p.grad for p in params]
    assert all(bool(torch.isfinite(g).all()) for g in after)
    assert all(float(g.abs().sum()) > 0 for g in after)
    assert reference_norm(after) == pytest.approx(max_norm, rel=1e-6)
    assert stats.post_clip_norm == pytest.approx(max_norm, rel=1e-6)


def test_overflow_case_with_inf_max_norm_leaves_gradients_alone():
    params = make_params([(10,), (10,)], scale=1e20)
    before = grads(params)
    stats = clip_grad_norm_with_stats(params, math.inf)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))
    assert math.isfinite(stats.pre_clip_norm) and stats.post_clip_norm == stats.pre_clip_norm


def assert_same_as_torch_nan_aware(ours, theirs):
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, equal_nan=True)


def test_nan_gradient_gives_nan_norm_and_count_and_torch_behaviour():
    params = mlp_params(5)
    params[2].grad.view(-1)[7] = float("nan")
    theirs = clone_params(params)
    torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    stats = clip_grad_norm_with_stats(params, 0.5)
    assert math.isnan(stats.pre_clip_norm) and math.isnan(stats.post_clip_norm)
    assert stats.nonfinite_count == 1 and not stats.overflow_fallback
    assert_same_as_torch_nan_aware(params, theirs)


def test_inf_gradients_are_counted_and_never_disguised():
    params = mlp_params(6)
    params[0].grad.view(-1)[0] = float("inf")
    params[4].grad.view(-1)[1] = float("-inf")
    params[4].grad.view(-1)[0] = float("nan")
    theirs = clone_params(params)
    torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    stats = clip_grad_norm_with_stats(params, 0.5)
    assert not math.isfinite(stats.pre_clip_norm)
    assert not math.isfinite(stats.post_clip_norm)
    assert stats.nonfinite_count == 3
    assert_same_as_torch_nan_aware(params, theirs)


def test_no_gradients_is_a_clear_error():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        clip_grad_norm_with_stats(params, 0.5)
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        clip_grad_norm_with_stats([], 0.5)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_bad_max_norm_is_rejected(bad):
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_with_stats(mlp_params(), bad)


def test_parameters_without_grad_are_skipped_like_torch():
    params = mlp_params(7)
    params[1].grad = None
    theirs = clone_params([p for p in params if p.grad is not None])
    torch.nn.utils.clip_grad_norm_(theirs, 0.1)
    clip_grad_norm_with_stats(params, 0.1)
    for a, b in zip([p for p in params if p.grad is not None], theirs, strict=True):
        assert torch.equal(a.grad, b.grad)


# ------------------------------------------------------------------ sync-free path


def deferred_stats(out: torch.Tensor) -> tuple[float, float, float, int, bool]:
    pre, post, coef, count, overflow = out.tolist()
    return pre, post, coef, int(count), bool(overflow)


@pytest.mark.parametrize("case", ["normal", "unclipped", "overflow", "nan", "inf_max"])
def test_deferred_path_agrees_with_host_path(case):
    if case == "overflow":
        host = make_params([(32, 32), (32,)], scale=1e20)
    else:
        host = mlp_params(8)
    if case == "nan":
        host[3].grad.view(-1)[0] = float("nan")
    max_norm = {"unclipped": 1e9, "inf_max": math.inf}.get(case, 0.5)
    dev = clone_params(host)
    stats = clip_grad_norm_with_stats(host, max_norm)
    pre, post, coef, count, overflow = deferred_stats(clip_grad_norm_deferred(dev, max_norm))
    assert_same_as_torch_nan_aware(dev, host)
    for ours, theirs in ((pre, stats.pre_clip_norm), (post, stats.post_clip_norm),
                         (coef, stats.clip_coef)):
        if math.isnan(theirs):
            assert math.isnan(ours)
        else:
            assert ours == pytest.approx(theirs, rel=1e-12)
    assert count == stats.nonfinite_count
    assert overflow == stats.overflow_fallback


def test_update_stats_reads_the_host_once_per_update(monkeypatch):
    """The deferred path makes no host read per minibatch: only resolve() transfers."""
    params = mlp_params(9)
    stats = UpdateStats("cpu", deferred=True)
    reads: list[str] = []
    real_tolist = torch.Tensor.tolist

    def counting(name, real):
        def wrapper(self, *args, **kwargs):
            reads.append(name)
            return real(self, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch.Tensor, "item", counting("item", torch.Tensor.item))
    monkeypatch.setattr(torch.Tensor, "tolist", counting("tolist", real_tolist))
    monkeypatch.setattr(torch.Tensor, "__float__", counting("float", torch.Tensor.__float__))
    monkeypatch.setattr(torch.Tensor, "__bool__", counting("bool", torch.Tensor.__bool__))
    monkeypatch.setattr(torch.Tensor, "__int__", counting("int", torch.Tensor.__int__))

    for i in range(8):
        for p in params:
            p.grad = torch.full_like(p, 0.01 * (i + 1))
        stats.clip(params, 0.5)
        stats.add("loss", torch.tensor(float(i)))
        stats.add("ratio_min", torch.tensor(1.0 - i / 100), "min")
        stats.add("ratio_max", torch.tensor(1.0 + i / 100), "max")
    assert reads == []
    out = stats.resolve()
    assert reads == ["tolist"]
    assert out["loss"] == pytest.approx(3.5)
    assert out["ratio_min"] == pytest.approx(0.93) and out["ratio_max"] == pytest.approx(1.07)
    assert out["grad_norm"] <= 0.5 + 1e-6
    assert out["pre_clip_grad_norm_max"] >= out["pre_clip_grad_norm"]  # in the same one read
    assert out["nonfinite_grad_count"] == 0
    assert stats.resolve() == {}  # reset after resolving


def test_update_stats_propagates_nan_and_sums_counts():
    params = mlp_params(10)
    stats = UpdateStats()
    stats.clip(params, 0.5)
    params[0].grad.view(-1)[0] = float("nan")
    stats.clip(params, 0.5)
    out = stats.resolve()
    assert math.isnan(out["grad_norm"]) and math.isnan(out["pre_clip_grad_norm"])
    assert out["nonfinite_grad_count"] >= 1


def test_clip_stats_is_a_plain_record():
    stats = ClipStats(2.0, 1.0, 0.5, 1.0, 0)
    assert stats.clipped and not stats.overflow_fallback


@pytest.mark.parametrize("deferred", [False, True], ids=["host", "deferred"])
def test_update_stats_max_is_the_largest_minibatch_pre_clip_norm(deferred):
    """pre_clip_grad_norm_max is the max of the per-step pre-clip norms (each measured here
    independently, in float64, before clipping), while pre_clip_grad_norm stays their mean:
    one spiking minibatch among calm ones shows in the max and hardly in the mean."""
    params = mlp_params(11)
    stats = UpdateStats("cpu", deferred=deferred)
    scales = [1.0, 0.5, 30.0, 2.0, 0.25]  # the third minibatch spikes
    expected: list[float] = []
    gen = torch.Generator().manual_seed(12)
    for scale in scales:
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * scale
        expected.append(reference_norm([p.grad for p in params]))
        stats.clip(params, 0.5)
    out = stats.resolve()
    assert out["pre_clip_grad_norm_max"] == pytest.approx(max(expected), rel=1e-6)
    assert out["pre_clip_grad_norm"] == pytest.approx(sum(expected) / len(expected), rel=1e-6)
    assert out["pre_clip_grad_norm_max"] > 2 * out["pre_clip_grad_norm"]
    assert out["grad_norm"] <= 0.5 + 1e-6


@pytest.mark.parametrize("deferred", [False, True], ids=["host", "deferred"])
def test_update_stats_max_is_nan_when_any_step_was(deferred):
    params = mlp_params(13)
    stats = UpdateStats("cpu", deferred=deferred)
    stats.clip(params, 0.5)
    params[1].grad.view(-1)[0] = float("nan")
    stats.clip(params, 0.5)
    for p in params:
        p.grad = torch.ones_like(p)
    stats.clip(params, 0.5)
    assert math.isnan(stats.resolve()["pre_clip_grad_norm_max"])


@pytest.mark.parametrize("reduce", ["mean", "min", "max", "sum"])
def test_update_stats_floats_tensors_and_mixes_reduce_alike(reduce):
    """Python floats (the CPU clip path, reduced on the host), tensors of any float dtype
    and shape (1,) (stacked once per name), and a mix of both give one answer; NaN wins."""
    values = [0.5, 2.25, -1.0, 8.0, 0.125]
    expected = {"mean": sum(values) / 5, "min": -1.0, "max": 8.0, "sum": sum(values)}[reduce]
    stats = UpdateStats()
    for i, v in enumerate(values):
        stats.add("floats", v, reduce)
        stats.add("float32", torch.tensor(v), reduce)
        stats.add("shaped", torch.tensor([v], dtype=torch.float64), reduce)
        stats.add("mixed", v if i % 2 else torch.tensor(v, dtype=torch.float16), reduce)
        stats.add("nan", float("nan") if i == 3 else v, reduce)
    out = stats.resolve()
    assert list(out) == ["floats", "float32", "shaped", "mixed", "nan"]  # recording order
    for name in ("floats", "float32", "shaped", "mixed"):
        assert out[name] == pytest.approx(expected, rel=1e-12), name
    assert math.isnan(out["nan"])


def test_update_stats_refuses_a_many_element_tensor_at_once():
    stats = UpdateStats()
    with pytest.raises(RuntimeError):
        stats.add("loss", torch.ones(3))
    with pytest.raises(ValueError, match="reduction"):
        stats.add("loss", 1.0, "median")
