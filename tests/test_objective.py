"""Masked diffusion: the mask is applied, only masked positions count, schedules, weighting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stackwise_jax import config, objective

MASK = 99


def test_masked_positions_hold_mask_id_others_unchanged():
    ids = jax.random.randint(jax.random.key(0), (64, 256), 0, 90)
    inputs, masked, t = objective.sample_mask(jax.random.key(1), ids, 0.15, 0.9, MASK)
    assert bool((inputs[masked] == MASK).all())
    assert bool((inputs[~masked] == ids[~masked]).all())
    assert bool(((t >= 0.15) & (t <= 0.9)).all())
    # Per-sequence fraction tracks that sequence's t (binomial, 256 positions).
    np.testing.assert_allclose(masked.mean(axis=1), t, atol=0.12)


def test_unmasked_positions_contribute_nothing():
    B, L, V = 3, 10, 20
    logits = jax.random.normal(jax.random.key(0), (B, L, V))
    targets = jax.random.randint(jax.random.key(1), (B, L), 0, V)
    masked = jax.random.uniform(jax.random.key(2), (B, L)) < 0.5
    t = jnp.full((B,), 0.5)
    for weighting in ("mean", "inv_t"):
        loss = objective.masked_diffusion_loss(logits, targets, masked, t, weighting)
        scrambled = jnp.where(masked[..., None], logits, 1e3 * jax.random.normal(jax.random.key(3), logits.shape))
        assert float(objective.masked_diffusion_loss(scrambled, targets, masked, t, weighting)) == float(loss)
        grads = jax.grad(objective.masked_diffusion_loss)(logits, targets, masked, t, weighting)
        assert float(jnp.abs(grads[~masked]).max()) == 0.0
        assert float(jnp.abs(grads[masked]).max()) > 0.0


def test_weightings_match_their_definitions():
    B, L, V = 2, 8, 11
    logits = jax.random.normal(jax.random.key(0), (B, L, V))
    targets = jax.random.randint(jax.random.key(1), (B, L), 0, V)
    masked = jax.random.uniform(jax.random.key(2), (B, L)) < 0.6
    t = jnp.array([0.3, 0.8])
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    mean = (ce * masked).sum() / masked.sum()
    inv_t = jnp.mean((ce * masked).sum(1) / (t * L))
    np.testing.assert_allclose(objective.masked_diffusion_loss(logits, targets, masked, t, "mean"), mean, rtol=1e-6)
    np.testing.assert_allclose(objective.masked_diffusion_loss(logits, targets, masked, t, "inv_t"), inv_t, rtol=1e-6)


def test_causal_loss_predicts_next_token():
    ids = jnp.array([[1, 2, 3, 4]])
    logits = jax.nn.one_hot(jnp.array([[2, 3, 4, 0]]), 5) * 50.0  # perfect next-token guesses
    assert float(objective.causal_loss(logits, ids)) < 1e-6
    assert float(objective.causal_loss(jnp.roll(logits, 1, axis=1), ids)) > 10


@pytest.mark.parametrize("kind,direction,expected", [
    ("uniform", "increasing", [(0.2, 0.8)] * 3),
    ("linear", "increasing", [(0.2, 0.2), (0.5, 0.5), (0.8, 0.8)]),
    ("linear", "decreasing", [(0.8, 0.8), (0.5, 0.5), (0.2, 0.2)]),
    ("cosine", "increasing", [(0.2, 0.2), (0.5, 0.5), (0.8, 0.8)]),
])
def test_depth_as_time_schedules(kind, direction, expected):
    t = config.defaults().training
    t.min_mask_fraction, t.max_mask_fraction = 0.2, 0.8
    t.mask_schedule_type, t.mask_schedule_direction = kind, direction
    got = [objective.stage_mask_range(t, k, 3) for k in range(3)]
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_cosine_schedule_is_not_linear():
    t = config.defaults().training
    t.min_mask_fraction, t.max_mask_fraction, t.mask_schedule_type = 0.0 + 1e-9, 1.0, "cosine"
    lo, _ = objective.stage_mask_range(t, 1, 5)  # x = 0.25 -> (1 - cos(pi/4)) / 2
    np.testing.assert_allclose(lo, (1 - np.cos(np.pi / 4)) / 2, atol=1e-6)
