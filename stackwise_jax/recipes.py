"""Named recipes: config overrides that belong together, for sweeps and comparisons.

A recipe is applied on top of a config file, like `--config.KEY=VALUE` flags, and keeps the
config's token budget: `steps_per_stage * n_stacks` optimizer steps in all, every phase
counted (end-to-end trains them in its one stage; a recipe with a fusion phase takes
fusion's steps out of the stages'). `python -m stackwise_jax.sweep --grid=recipe=e2e,
progressive` compares them; `python -m stackwise_jax.train --config=... --recipe=progressive`
runs one; `overrides(name, cfg)` gives the flags a recipe sets.
"""

from __future__ import annotations

from stackwise_jax import config as config_lib
from stackwise_jax.errors import UserError


def _budget(cfg) -> int:
    return cfg.training.steps_per_stage * cfg.model.architecture.n_stacks


def _with_block_fusion(cfg, fusion_share: float, cycles: int) -> dict[str, str]:
    """Stages get (1 - fusion_share) of the budget, block fusion the rest, in `cycles`
    passes over the stacks (turns of equal length)."""
    n = cfg.model.architecture.n_stacks
    turns = cycles * n
    fusion = int(_budget(cfg) * fusion_share) // turns * turns
    per_stage = (_budget(cfg) - fusion) // n
    return {"training.progressive.enabled": "True",
            "training.progressive.trunk_strategy": "frozen",
            "training.steps_per_stage": str(per_stage),
            "training.fusion.mode": "block", "training.fusion.steps": str(fusion),
            "training.fusion.block_cycles": str(cycles),
            "training.fusion.base_precision": cfg.training.progressive.frozen_precision,
            "training.fusion.learning_rate": repr(cfg.training.learning_rate)}


def _progressive() -> dict[str, str]:
    """Plain progressive: frozen trunk, new stacks from their own keys, equal stages."""
    return {"training.progressive.enabled": "True",
            "training.progressive.trunk_strategy": "frozen", "training.fusion.steps": "0",
            "training.progressive.new_stack_init": "random",
            "training.progressive.step_split": "equal"}


def _end_to_end() -> dict[str, str]:
    """The progressive-only keys at their defaults, so a config that sets them (tiny's
    new_stack_init='copy') gives the same end-to-end run as one that does not."""
    return {"training.progressive.enabled": "False", "training.fusion.steps": "0",
            "training.progressive.new_stack_init": "random",
            "training.progressive.step_split": "equal"}


def _with_lora_fusion(cfg, fusion_share: float) -> dict[str, str]:
    """Stages get (1 - fusion_share) of the budget, QLoRA fusion the rest."""
    n = cfg.model.architecture.n_stacks
    fusion = int(_budget(cfg) * fusion_share)
    per_stage = (_budget(cfg) - fusion) // n
    return {**_progressive(), "training.steps_per_stage": str(per_stage),
            "training.fusion.mode": "lora",
            "training.fusion.steps": str(_budget(cfg) - per_stage * n)}


RECIPES = {
    # Baselines, end to end, at the whole budget.
    "e2e": lambda cfg: _end_to_end(),  # masked diffusion
    "bert": lambda cfg: {**_end_to_end(), "training.min_mask_fraction": "0.15",
                         "training.max_mask_fraction": "0.15"},  # fixed 15% masking
    "gpt": lambda cfg: {**_end_to_end(), "training.objective": "causal"},
    # Stack-wise.
    "progressive": lambda cfg: _progressive(),
    "growing": lambda cfg: {"training.progressive.enabled": "True",
                            "training.progressive.trunk_strategy": "trainable",
                            "training.fusion.steps": "0"},
    "copy": lambda cfg: {**_progressive(), "training.progressive.new_stack_init": "copy"},
    "copy_decreasing": lambda cfg: {**_progressive(), "training.progressive.new_stack_init": "copy",
                                    "training.progressive.step_split": "decreasing"},
    "block": lambda cfg: _with_block_fusion(cfg, 0.5, 1),
    "block3": lambda cfg: _with_block_fusion(cfg, 0.75, 3),
    "lora": lambda cfg: _with_lora_fusion(cfg, 0.25),
    # One lever each on top of plain progressive.
    "split_decreasing": lambda cfg: {**_progressive(), "training.progressive.step_split": "decreasing"},
    "split_increasing": lambda cfg: {**_progressive(), "training.progressive.step_split": "increasing"},
    "mask_increasing": lambda cfg: {**_progressive(), "training.mask_schedule_type": "linear",
                                    "training.mask_schedule_direction": "increasing"},
    "mask_decreasing": lambda cfg: {**_progressive(), "training.mask_schedule_type": "linear",
                                    "training.mask_schedule_direction": "decreasing"},
    "embed_every_stage": lambda cfg: {**_progressive(), "training.train_embedding": "every_stage"},
    "lr_x3": lambda cfg: {**_progressive(),
                          "training.learning_rate": repr(3 * cfg.training.learning_rate)},
    "lr_div3": lambda cfg: {**_progressive(),
                            "training.learning_rate": repr(cfg.training.learning_rate / 3)},
}


def overrides(name: str, cfg) -> dict[str, str]:
    """The `--config.KEY=VALUE` overrides of recipe `name` for config `cfg`."""
    if name not in RECIPES:
        raise UserError(f"recipe '{name}' is unknown; choose one of {', '.join(RECIPES)}")
    return RECIPES[name](cfg)


def apply(cfg, name: str):
    """`cfg` with recipe `name` applied last (computed from `cfg`, so it keeps the token
    budget the file and flags set) and validated."""
    for key, raw in overrides(name, cfg).items():
        config_lib.set_override(cfg, key, raw)
    config_lib.validate(cfg)
    return cfg
