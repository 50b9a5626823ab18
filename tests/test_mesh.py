"""The device mesh: the sharding rules, bad mesh configs, and exactness of training on
8 simulated devices against one device (tests/mesh_exactness.py in subprocesses: this
process keeps its single CPU device)."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import mesh_exactness
from conftest import small_config
from stackwise_jax import config, optim, phases, resident, sharding, train
from stackwise_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_mesh(cfg, data, fsdp, tensor):
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = data, fsdp, tensor
    return cfg


def defaults_with(**model):
    c = config.defaults()
    for k, v in model.items():
        c.model[k] = v
    return c


# ----------------------------------------------------------------------- bad meshes


def test_mesh_sizes_resolve_against_the_device_count():
    cfg = config.defaults()  # data=-1: every device on data
    assert sharding.mesh_shape(cfg, 1) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert sharding.mesh_shape(cfg, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert sharding.mesh_shape(with_mesh(cfg, 2, -1, 2), 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(UserError, match=r"mesh.data=2 x mesh.fsdp=2 x mesh.tensor=1 = 4 "
                                        r"devices, but there are 8"):
        sharding.mesh_shape(with_mesh(cfg, 2, 2, 1), 8)
    with pytest.raises(UserError, match=r"fixed axes \(3 devices\) do not divide the 8 devices"):
        sharding.mesh_shape(with_mesh(config.defaults(), -1, 3, 1), 8)
    with pytest.raises(UserError, match=r"mesh.data=-1 and mesh.tensor=-1: at most one"):
        sharding.mesh_shape(with_mesh(config.defaults(), -1, 1, -1), 8)
    # The default on a machine whose device count does not divide the batch: says what -1 took.
    with pytest.raises(UserError, match=r"data\.batch_size=16 is not divisible by .* = 3: .*"
                                        r"\(mesh\.data=-1 took the 3 devices"):
        sharding.mesh_shape(config.defaults(), 3)


def test_indivisible_dimensions_are_named():
    cases = [
        ((1, 1, 8), 16, "model.n_kv_heads=4 is not divisible by mesh.tensor=8"),
        ((1, 3, 1), 48, "model.d_model=256 is not divisible by mesh.fsdp=3"),
        ((3, 1, 1), 16, "data.batch_size=16 is not divisible by mesh.data x mesh.fsdp = 3 x 1 = 3"),
    ]
    for shape, batch_size, message in cases:
        cfg = with_mesh(config.defaults(), *shape)
        cfg.data.batch_size = batch_size
        with pytest.raises(UserError, match=message.replace(".", r"\.")):
            sharding.mesh_shape(cfg, int(np.prod(shape)))
    cfg = config.defaults()
    cfg.model.n_kv_heads = 8
    cfg.model.vocab_size = 4100
    with pytest.raises(UserError, match=r"model\.vocab_size=4100 is not divisible by mesh\.tensor=8"):
        sharding.mesh_shape(with_mesh(cfg, 1, 1, 8), 8)
    cfg.model.vocab_size, cfg.model.d_ff = 4096, 780
    with pytest.raises(UserError, match=r"model\.d_ff=780 is not divisible by mesh\.tensor=8"):
        sharding.mesh_shape(with_mesh(cfg, 1, 1, 8), 8)
    # MLA splits its query heads (its keys and values come from one shared latent).
    cfg.model.d_ff, cfg.model.attention, cfg.model.n_heads = 768, "mla", 12
    with pytest.raises(UserError, match=r"model\.n_heads=12 is not divisible by mesh\.tensor=8"):
        sharding.mesh_shape(with_mesh(cfg, 1, 1, 8), 8)
    # Fixed sizes are checked by config validation already, before any device is counted.
    with pytest.raises(UserError, match=r"model\.n_kv_heads=4 is not divisible by mesh\.tensor=8"):
        config.validate(with_mesh(config.defaults(), -1, 1, 8))


def test_a_run_on_a_mesh_this_machine_lacks_stops_before_writing(corpus_dir, tmp_path):
    cfg = with_mesh(small_config(corpus_dir), 2, 2, 1)
    with pytest.raises(UserError, match=rf"= 4 devices, but there are {jax.device_count()}"):
        train.run(cfg, str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------- the rules


def spec_of(tree, *path):
    for key in path:
        tree = tree[key]
    return tuple(tree.spec)


def test_rules_split_megatron_pairs_fsdp_on_d_model_and_never_the_block_axis():
    cfg = config.defaults()
    layout = sharding.abstract_layout({"data": 2, "fsdp": 2, "tensor": 2})
    phase = phases.stage(cfg, 1)
    trainable = resident.abstract_trainable(cfg, phase)
    specs = layout.shardings(trainable)
    blocks = ("stacks", 0, "blocks")
    for name in ("q_proj", "k_proj", "v_proj"):  # (block, d_model, heads): columns
        assert spec_of(specs, *blocks, "attn", name, "kernel") == (None, "fsdp", "tensor")
    assert spec_of(specs, *blocks, "attn", "o_proj", "kernel") == (None, "tensor", "fsdp")
    assert spec_of(specs, *blocks, "mlp", "up_proj", "kernel") == (None, "fsdp", "tensor")
    assert spec_of(specs, *blocks, "mlp", "down_proj", "kernel") == (None, "tensor", "fsdp")
    assert spec_of(specs, *blocks, "input_norm", "weight") == ()
    assert spec_of(specs, "head", "kernel") == ("fsdp", "tensor")
    assert spec_of(layout.shardings(resident.abstract_top(cfg)), "embed", "embedding") == (
        "tensor", "fsdp")
    # Adam's moments are laid out as their parameters; its step count is replicated.
    tx = optim.make_optimizer(cfg.training, 10)
    opt = jax.eval_shape(tx.init, trainable)
    opt_specs = [tuple(s.spec) for s in jax.tree.leaves(layout.shardings(opt))]
    param_specs = [tuple(s.spec) for s in jax.tree.leaves(specs)]
    assert opt_specs.count((None, "fsdp", "tensor")) == 2 * param_specs.count(
        (None, "fsdp", "tensor"))
    # Each device holds 1/(fsdp x tensor) = 1/4 of a stack's matrices (data replicates
    # them) and the whole of its two norms per block.
    stack = trainable["stacks"][0]
    norms = 2 * cfg.model.architecture.blocks_per_stack * cfg.model.d_model * 4
    total = sum(x.size * 4 for x in jax.tree.leaves(stack))
    assert layout.shard_bytes(stack) == (total - norms) // 4 + norms


def test_quantised_trunks_are_split_where_their_codes_allow():
    cfg = config.defaults()
    layout = sharding.abstract_layout({"data": 1, "fsdp": 2, "tensor": 4})
    fp8 = layout.shardings(resident.abstract_trunk(cfg, 2, "fp8"))["attn"]["o_proj"]["kernel"]
    assert tuple(fp8.data.spec) == (None, "tensor", "fsdp")
    assert tuple(fp8.scale.spec) == (None, None, "fsdp")  # per output column
    nf4 = layout.shardings(resident.abstract_trunk(cfg, 2, "nf4"))["attn"]["q_proj"]["kernel"]
    assert tuple(nf4.data.spec) == tuple(nf4.scale.spec) == (None, ("fsdp", "tensor"))
    # 64 x 3 = 192 weights: three nf4 blocks do not split over 8 devices: replicated.
    small = defaults_with(d_model=64, n_heads=1, n_kv_heads=1, d_ff=3)
    odd = layout.shardings(resident.abstract_trunk(small, 1, "nf4"))["mlp"]["up_proj"]["kernel"]
    assert tuple(odd.data.spec) == (None, None)


def test_batches_split_by_rows_and_short_batches_replicate():
    layout = sharding.abstract_layout({"data": 2, "fsdp": 2, "tensor": 2})
    assert tuple(layout.batch_sharding(8, 2).spec) == (("data", "fsdp"),)
    assert tuple(layout.batch_sharding(6, 2).spec) == ()  # the last, short eval batch


# ----------------------------------------------------------------------- exactness


def test_progressive_runs_on_8_devices_match_one_device(tmp_path):
    """one device, data 2 x fsdp 2 x tensor 2, fsdp 8, data 8, and a run stopped in stage 2
    on data 2 x fsdp 2 x tensor 2 and resumed on data 8. Two processes share the work (2
    cores); the second runs the resumed run last, reusing the programs its two meshes
    compiled (XLA's persistent cache)."""
    # Eight simulated CPU devices. LLVM at -O0 halves the compile time that dominates
    # these runs: it changes how XLA's kernels are compiled, not the SPMD partitioning
    # (an HLO pass before code generation) whose exactness this checks, and every run
    # here uses it. docs/scale_out.md has the same numbers at the default level.
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                         "--xla_backend_optimization_level=0")
    script = os.path.join(ROOT, "tests", "mesh_exactness.py")
    groups = [("one_device", "fsdp8"), ("data2_fsdp2_tensor2", "data8", "resumed")]
    procs = [subprocess.Popen([sys.executable, script, str(tmp_path), *g], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for g in groups]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["devices"] == 8 for r in results)
    runs = {k: v for r in results for k, v in r["runs"].items()}
    ref = runs.pop("one_device")
    for name, got in runs.items():  # the bound on held-out losses
        for key in ("heldout_loss", "heldout_causal_loss"):
            assert abs(got[key] - ref[key]) < 1e-4, (name, key, got[key], ref[key])
        np.testing.assert_allclose(got["stage_losses"], ref["stage_losses"], rtol=0, atol=1e-4)

    # Parameters. A mesh changes only the order of float32 sums (batch shards' partial
    # losses and gradients combined by all-reduce; contractions over a split d_model,
    # heads or d_ff dimension summed across devices; the global gradient norm): each sum
    # moves by a few 2^-24 relative. Adam's update lr * m / (sqrt(v) + eps) is invariant
    # to the gradient's scale, so it moves by the same relative amount: about 1e-6 x lr
    # (lr <= 3e-3) = 3e-9, far below one ulp of the weights. What remains is the final
    # rounding of each update, which can land one float32 ulp apart per step: at most 8
    # steps per parameter (the head trains in both 4-step stages), and every parameter
    # is below 2 in magnitude (checked), where an ulp is 2^-23. Tolerance: 8 x 2^-23.
    # (The exception, an element whose gradient cancels to near Adam's eps, matters most
    # on the first step of fresh moments, which here runs at learning rate 0: warmup.
    # docs/scale_out.md measures a phase where it does not: block fusion's later turns.)
    reference = mesh_exactness.final_params(str(tmp_path / "one_device"), 2)
    assert max(float(np.abs(v).max()) for v in reference.values()) < 2.0
    tolerance = 8 * 2.0**-23
    diffs = mesh_exactness.param_diffs(str(tmp_path), list(runs))
    print("max |parameter difference| from one device:", diffs)
    assert all(d <= tolerance for d in diffs.values()), diffs

    # The state really was split as the rules say, in both stages (trunk included).
    shard = {(tuple(r["mesh"].values()), r["phase"]): r for res in results
             for r in res["layouts"]}
    assert shard[((1, 8, 1), 1)]["q_proj_shard"] == [2, 4, 32]  # d_model 32 over fsdp 8
    assert shard[((2, 2, 2), 1)]["q_proj_shard"] == [2, 16, 16]
    assert shard[((2, 2, 2), 1)]["trunk_q_proj"] == "P(None, 'fsdp', 'tensor')"
    assert shard[((2, 2, 2), 1)]["down_proj"] == "P(None, 'tensor', 'fsdp')"
    assert shard[((8, 1, 1), 0)]["q_proj_shard"] == [2, 32, 32]  # data only: replicated


# ----------------------------------------------------------------------- the FSDP program


def test_fsdp_step_gathers_weights_and_keeps_batch_rows_split(tmp_path):
    """The end-to-end step of a tiny model (2 one-layer stacks) compiled on fsdp 8
    (scripts/fsdp_memory.py in a subprocess: 8 simulated devices): every float array
    gathered is a whole parameter matrix and each of a block's kernels is gathered; no
    all-reduce or reduce-scatter carries a sequence axis (no partial activations summed
    across devices). Token ids may be gathered (the embedding lookup's, a few bytes a
    token). The program given only the arguments' shardings instead kept the weights in
    place, gathered logits and all-reduced partial activations (docs/plan.md)."""
    D, F, V, L = 64, 128, 256, 24  # L appears in no parameter's shape
    out = tmp_path / "fsdp.json"
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    overrides = {"model.d_model": D, "model.d_ff": F, "model.vocab_size": V,
                 "model.n_heads": 4, "model.n_kv_heads": 4, "data.seq_len": L,
                 "training.loss_chunk_size": 12, "model.architecture.n_stacks": 2}
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "fsdp_memory.py"),
                    "--meshes", "1,8,1", f"--json={out}"]
                   + [f"--config.{k}={v}" for k, v in overrides.items()],
                   env=env, cwd=ROOT, check=True, capture_output=True, timeout=600)
    ops = json.loads(out.read_text())["meshes"]["1,8,1"]["collectives"]

    def arrays(shape: str) -> list[tuple]:  # (dtype, dims) of every array of a result,
        # without axes of size 1 (a layer's slice of its stack may keep the block axis)
        return [(dtype, tuple(int(d) for d in dims.split(",") if d and d != "1"))
                for dtype, dims in re.findall(r"([a-z0-9]+)\[([\d,]*)\]", shape)]

    gathered = {dims for shape in ops.get("all-gather", {}) for dtype, dims in arrays(shape)
                if dtype.startswith(("f", "bf"))}
    params = {(D, D), (D, F), (F, D), (D, V)}  # q/k/v/o, gate/up, down, head
    assert gathered <= params, gathered  # only weights are gathered
    assert {(D, D), (D, F), (F, D)} <= gathered, gathered  # every block kernel is
    summed = [(op, shape) for op in ("all-reduce", "reduce-scatter")
              for shape in ops.get(op, {}) if any(L in dims for _, dims in arrays(shape))]
    assert not summed, summed
