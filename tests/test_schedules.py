import math

import pytest

from pixpro.schedules import ema_momentum, learning_rate, scaled_lr

BASE, FINAL, K, W = 4.0, 1e-6, 1000, 100


def lr(step: int) -> float:
    return learning_rate(step, base_lr=BASE, total_steps=K, warmup_steps=W)


def test_learning_rate_warmup():
    assert lr(0) == pytest.approx(BASE / 100)
    assert lr(50) == pytest.approx(BASE / 100 + (BASE - BASE / 100) * 50 / 100)
    assert lr(W) == pytest.approx(BASE)


def test_learning_rate_cosine():
    mid = W + (K - W) // 2
    assert lr(mid) == pytest.approx(FINAL + (BASE - FINAL) / 2)
    k = 700
    assert lr(k) == pytest.approx(FINAL + (BASE - FINAL) * (1 + math.cos(math.pi * (k - W) / (K - W))) / 2)
    assert lr(K - 1) == pytest.approx(
        FINAL + (BASE - FINAL) * (1 + math.cos(math.pi * (K - 1 - W) / (K - W))) / 2
    )
    assert lr(K) == pytest.approx(FINAL)
    assert lr(K + 10) == pytest.approx(FINAL)


def test_learning_rate_without_warmup_and_bad_arguments():
    assert learning_rate(0, base_lr=1.0, total_steps=10, warmup_steps=0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        learning_rate(0, base_lr=1.0, total_steps=10, warmup_steps=11)


def test_ema_momentum():
    assert ema_momentum(0, total_steps=K) == pytest.approx(0.99)
    assert ema_momentum(W, total_steps=K) == pytest.approx(1 - 0.01 * (math.cos(math.pi * W / K) + 1) / 2)
    assert ema_momentum(K // 2, total_steps=K) == pytest.approx(0.995)
    assert ema_momentum(K - 1, total_steps=K) == pytest.approx(
        1 - 0.01 * (math.cos(math.pi * (K - 1) / K) + 1) / 2
    )
    assert ema_momentum(K, total_steps=K) == pytest.approx(1.0)
    assert ema_momentum(0, total_steps=K, base=0.996) == pytest.approx(0.996)


def test_scaled_lr():
    assert scaled_lr(1.0, 1024) == pytest.approx(4.0)
    assert scaled_lr(1.0, 64, rule="sqrt") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="sqrt"):
        scaled_lr(1.0, 256, rule="cubic")  # type: ignore[arg-type]
