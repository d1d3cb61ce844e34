"""Warmup + half-cycle cosine, in steps (pretraining) and fractional epochs (finetuning)."""
import math

import pytest

from pipeline.schedule import lr_at


def test_warmup_then_half_cosine_in_steps():
    kw = dict(base_lr=1.0, min_lr=0.1, warmup=10, total=110)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(5, **kw) == pytest.approx(0.5)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)  # clamped past the end
    after = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert lr_at(3, base_lr=2.0, min_lr=0.0, warmup=0, total=4) == \
        pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))


def test_fractional_epochs():
    kw = {"base_lr": 1e-3, "min_lr": 1e-6, "warmup": 2, "total": 10}
    assert lr_at(1, **kw) == pytest.approx(5e-4)
    assert lr_at(6, **kw) == pytest.approx((1e-3 + 1e-6) / 2)
    after = [lr_at(2 + 0.5 * i, **kw) for i in range(17)]
    assert all(a > b for a, b in zip(after, after[1:]))
