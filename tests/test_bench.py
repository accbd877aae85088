"""Benchmark helpers: timing sample counts, peers of the expert path."""

import statistics
import time

import pytest
import torch

from omni_moe.bench import common


class FakeClock:
    """A clock that only the timed function moves: call i costs costs(i) ms."""

    def __init__(self, costs):
        self.now, self.calls, self.costs = 0.0, 0, costs

    def __call__(self):
        return self.now

    def fn(self):
        self.now += self.costs(self.calls) / 1e3
        self.calls += 1


@pytest.mark.parametrize("rep_ms, want", [(1.0, common.MIN_SAMPLES), (40.0, 40)])
def test_slow_first_call_leaves_a_full_sample(rep_ms, want):
    # 1 s first call, then 1 ms per call: the old helper sized its sample from the first
    # call and timed it once.
    clock = FakeClock(lambda i: 1000.0 if i == 0 else 1.0)
    times = common.samples_ms(clock.fn, warmup_ms=5, rep_ms=rep_ms, clock=clock, cuda=False)
    assert len(times) == want
    assert times == pytest.approx([1.0] * want)  # the first call is not among them
    # first call, 3 calls for the estimate, 5 ms of warm-up, then the timed calls
    assert clock.calls == 1 + 3 + 5 + want


def test_median_ms_with_a_real_slow_first_call():
    calls = []

    def fn():
        calls.append(None)
        if len(calls) == 1:
            time.sleep(0.3)

    ms = common.median_ms(fn, warmup_ms=1, rep_ms=1)
    assert ms < 100
    assert len(calls) >= 1 + common.MIN_SAMPLES


def test_min_samples_respected_when_every_call_is_slow():
    clock = FakeClock(lambda i: 50.0)
    times = common.samples_ms(clock.fn, warmup_ms=1, rep_ms=1, min_samples=7, clock=clock, cuda=False)
    assert len(times) == 7 and statistics.median(times) == pytest.approx(50.0)


def test_grad_to_none_resets_before_every_call():
    x = torch.ones(3, requires_grad=True)
    seen = []

    def step():
        seen.append(x.grad is None)
        (x * 2).sum().backward()

    common.samples_ms(step, warmup_ms=0, rep_ms=0, min_samples=3, grad_to_none=[x], cuda=False)
    assert all(seen) and len(seen) >= 1 + 3 + 3
