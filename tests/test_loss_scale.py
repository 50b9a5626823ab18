"""Dynamic loss scaling: exactness in float32, fp16 underflow and overflow, the scale schedule,
skipped steps, jit and pytree behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stackwise_jax import loss_scale

F16_TINY = 2.0 ** -24  # smallest float16 subnormal (~6e-8); half of it rounds to zero


def state_with(scale, good_steps=0):
    return loss_scale.LossScale(scale=jnp.asarray(scale, jnp.float32),
                                good_steps=jnp.asarray(good_steps, jnp.int32))


def mlp_loss(params, inputs_Bx3, targets_B):
    hidden_Bx4 = jnp.tanh(inputs_Bx3 @ params["w1"] + params["b1"])
    preds_B = hidden_Bx4 @ params["w2"]
    return jnp.mean((preds_B - targets_B) ** 2)


def mlp_setup(seed=0):
    rng = np.random.default_rng(seed)
    params = {"w1": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
              "b1": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
              "w2": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    inputs_Bx3 = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    targets_B = jnp.asarray(rng.normal(size=(5,)), jnp.float32)
    return params, inputs_Bx3, targets_B


def test_float32_matches_value_and_grad():
    params, inputs_Bx3, targets_B = mlp_setup()
    ref_loss, ref_grads = jax.value_and_grad(mlp_loss)(params, inputs_Bx3, targets_B)
    # A power of two divides back exactly; 3000 exercises a scale that does not.
    for scale in (2.0**10, 3000.0):
        loss, grads, grads_finite = loss_scale.scaled_value_and_grad(
            mlp_loss, state_with(scale))(params, inputs_Bx3, targets_B)
        assert loss.dtype == jnp.float32 and grads_finite.dtype == jnp.bool_
        assert bool(grads_finite)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
        for name in params:
            assert grads[name].dtype == jnp.float32
            np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-6, atol=1e-7)


# d loss / d weights = activations * 1e-4 ~ 1e-8 per element: below half the smallest fp16
# subnormal, while every forward value (weights 4096, activations, products, the 1e-4
# constant, the loss ~3e-4) is a normal float16.
ACTIVATIONS = jnp.asarray([1.0e-4, 1.5e-4, 2.0e-4, 2.5e-4], jnp.float32)
REDUCTION = 1e-4


def tiny_grad_loss(weights, activations):
    products = weights.astype(jnp.float16) * activations.astype(jnp.float16)
    return jnp.sum(products) * jnp.float16(REDUCTION)


@pytest.mark.parametrize("weight_dtype", [jnp.float32, jnp.float16], ids=["f32", "f16"])
def test_scaling_rescues_fp16_underflow(weight_dtype):
    weights = jnp.full((4,), 4096.0, weight_dtype)
    true_grads = np.asarray(ACTIVATIONS) * REDUCTION
    assert np.all(true_grads < F16_TINY / 2)  # the test is only meaningful if this holds

    _, grads_unscaled, finite_unscaled = loss_scale.scaled_value_and_grad(
        tiny_grad_loss, state_with(1.0))(weights, ACTIVATIONS)
    assert bool(finite_unscaled)
    np.testing.assert_array_equal(grads_unscaled, np.zeros(4, np.float32))  # flushed to zero

    loss, grads, grads_finite = loss_scale.scaled_value_and_grad(
        tiny_grad_loss, loss_scale.init(2.0**15))(weights, ACTIVATIONS)
    assert bool(grads_finite)
    assert grads.dtype == jnp.float32 and loss.dtype == jnp.float32
    assert np.all(np.asarray(grads) > 0)
    np.testing.assert_allclose(grads, true_grads, rtol=1e-2)
    np.testing.assert_allclose(loss, 4096.0 * np.sum(ACTIVATIONS) * REDUCTION, rtol=1e-2)


def big_grad_loss(weights, activations):
    return jnp.sum(weights.astype(jnp.float16) * activations.astype(jnp.float16))


@pytest.mark.parametrize("scale,activation", [
    (2.0**24, 1.0),  # the scale itself is inf once cast to float16
    (2.0**15, 4.0),  # a representable scale whose gradient (2**17) is not
], ids=["scale_beyond_fp16", "grad_beyond_fp16"])
def test_overflow_is_detected_and_step_skipped(scale, activation):
    weights = jnp.ones((4,), jnp.float32)
    activations = jnp.full((4,), activation, jnp.float32)
    state = state_with(scale, good_steps=7)

    loss, grads, grads_finite = loss_scale.scaled_value_and_grad(
        big_grad_loss, state)(weights, activations)
    assert not bool(grads_finite)
    assert not np.all(np.isfinite(grads))
    np.testing.assert_allclose(loss, 4 * activation)  # the reported loss stays unscaled

    new_state = loss_scale.update(state, grads_finite)
    assert float(new_state.scale) == scale / 2
    assert int(new_state.good_steps) == 0

    old_tree = {"params": weights, "count": jnp.asarray(3, jnp.int32)}
    new_tree = {"params": weights - grads, "count": jnp.asarray(4, jnp.int32)}
    kept = loss_scale.select_if_finite(grads_finite, new_tree, old_tree)
    for name in old_tree:
        assert kept[name].dtype == old_tree[name].dtype
        np.testing.assert_array_equal(kept[name], old_tree[name])
    taken = loss_scale.select_if_finite(jnp.asarray(True), new_tree, old_tree)
    np.testing.assert_array_equal(taken["params"], new_tree["params"])
    assert int(taken["count"]) == 4


def test_update_schedule_cap_and_floor():
    state = loss_scale.init(2.0**10)
    assert state.scale.dtype == jnp.float32 and state.good_steps.dtype == jnp.int32
    assert float(state.scale) == 2.0**10 and int(state.good_steps) == 0

    for expected_good in (1, 2):
        state = loss_scale.update(state, True, period=3)
        assert int(state.good_steps) == expected_good and float(state.scale) == 2.0**10
    state = loss_scale.update(state, True, period=3)
    assert int(state.good_steps) == 0 and float(state.scale) == 2.0**11
    assert state.scale.dtype == jnp.float32 and state.good_steps.dtype == jnp.int32

    # An overflow in the middle of a run of good steps restarts the count.
    state = loss_scale.update(state_with(2.0**11, good_steps=2), False, period=3)
    assert int(state.good_steps) == 0 and float(state.scale) == 2.0**10
    state = loss_scale.update(state, False, period=3, factor=4.0)
    assert float(state.scale) == 2.0**8

    # Cap: growth stops at 2**24, also when a large factor would jump past it.
    capped = loss_scale.update(state_with(2.0**24), True, period=1)
    assert float(capped.scale) == 2.0**24 and int(capped.good_steps) == 0
    capped = loss_scale.update(state_with(2.0**23), True, period=1, factor=4.0)
    assert float(capped.scale) == 2.0**24

    # Floor: shrinking stops at min_scale.
    floored = loss_scale.update(state_with(1.5), False)
    assert float(floored.scale) == 1.0
    floored = loss_scale.update(floored, False)
    assert float(floored.scale) == 1.0
    floored = loss_scale.update(state_with(40.0), False, factor=8.0, min_scale=16.0)
    assert float(floored.scale) == 16.0


def test_jitted_step_and_pytree():
    params, inputs_Bx3, targets_B = mlp_setup(seed=1)
    optimizer = optax.adam(1e-2)

    def fp16_loss(params, inputs_Bx3, targets_B):
        # float32 master weights, float16 compute: the mixed-precision setting this is for.
        params_f16 = jax.tree.map(lambda p: p.astype(jnp.float16), params)
        return mlp_loss(params_f16, inputs_Bx3.astype(jnp.float16), targets_B.astype(jnp.float16))

    @jax.jit
    def train_step(params, opt_state, ls_state, inputs_Bx3, targets_B):
        loss, grads, grads_finite = loss_scale.scaled_value_and_grad(fp16_loss, ls_state)(
            params, inputs_Bx3, targets_B)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        params, opt_state = loss_scale.select_if_finite(
            grads_finite, (new_params, new_opt_state), (params, opt_state))
        return params, opt_state, loss_scale.update(ls_state, grads_finite, period=2), loss

    opt_state = optimizer.init(params)
    ls_state = loss_scale.init(2.0**8)
    losses = []
    for _ in range(2):
        params, opt_state, ls_state, loss = train_step(params, opt_state, ls_state,
                                                       inputs_Bx3, targets_B)
        losses.append(float(loss))
    assert all(np.isfinite(losses)) and losses[1] < losses[0]
    assert float(ls_state.scale) == 2.0**9 and int(ls_state.good_steps) == 0
    assert int(opt_state[0].count) == 2

    # A batch whose gradients are not finite: nothing moves except the scale.
    bad_inputs_Bx3 = inputs_Bx3.at[0, 0].set(jnp.inf)
    before = (params, opt_state)
    params, opt_state, ls_state, _ = train_step(params, opt_state, ls_state,
                                                bad_inputs_Bx3, targets_B)
    for kept, old in zip(jax.tree.leaves((params, opt_state)), jax.tree.leaves(before)):
        assert kept.dtype == old.dtype
        np.testing.assert_array_equal(kept, old)
    assert float(ls_state.scale) == 2.0**8 and int(ls_state.good_steps) == 0

    leaves, treedef = jax.tree.flatten(ls_state)
    assert len(leaves) == 2 and all(isinstance(leaf, jax.Array) for leaf in leaves)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert isinstance(rebuilt, loss_scale.LossScale)
    assert float(rebuilt.scale) == 2.0**8 and int(rebuilt.good_steps) == 0
    assert rebuilt.scale.dtype == jnp.float32 and rebuilt.good_steps.dtype == jnp.int32
