"""The phases of a run, each described once: the loop, the planner and the preflight read it.

A run is a sequence of phases: one stage per stack in a progressive run (one stage for
end-to-end), then fusion when `training.fusion.steps > 0`. A `Phase` says

- what trains: `trained_stacks` (global indices, presented to the step as stacks 0..n-1
  of a Rack of that many stacks, so every stage of the same shape compiles once),
  `train_top` (embed / final_norm / head), or, for fusion, LoRA `adapters`;
- what it holds resident and in which format: `trunk_stacks`, frozen stacks run before
  the trained ones as one scan, and `upper_stacks`, frozen stacks run after them (block
  fusion; gradients cross them), both stored in `trunk_format` (fp32/bf16/fp8/nf4) and
  read stack by stack from the per-stack stores; `frozen_top`, frozen top groups kept in
  the compute dtype;
- where its batches come from: `inputs` = "tokens" (the packed corpus, masks drawn each
  step) or "cache" (hidden states entering the first trained stack, activation cache);
- what it stores when it ends: `stores`, the groups written to RUN_DIR/params
  (store.py) as version index + 1.

Parameters are born when the phase that first trains them starts (resident.py), from a
key derived from (training.seed, group), so a run's weights do not depend on the order of
creation or on where it resumed.
"""

from __future__ import annotations

import dataclasses

from stackwise_jax import config as config_lib
from stackwise_jax import objective
from stackwise_jax.store import TOP_GROUPS, stack_group


@dataclasses.dataclass(frozen=True)
class Phase:
    index: int  # position in the run; stores it writes get version index + 1
    name: str  # "stage 3/80" or "fusion", for logs
    kind: str  # "stage", "fusion" (LoRA) or "block" (a turn of block fusion)
    n_steps: int
    inputs: str  # "tokens" or "cache"
    trained_stacks: tuple[int, ...]
    trunk_stacks: tuple[int, ...]
    trunk_format: str
    train_top: frozenset
    frozen_top: frozenset
    adapters: bool  # fusion: LoRA adapters on every trunk layer are what trains
    objective: str  # masked_diffusion or causal
    mask_range: tuple[float, float]
    remat: str  # what each trunk layer keeps for backward when gradients cross the trunk
    stores: tuple[str, ...]  # groups written when the phase ends
    upper_stacks: tuple[int, ...] = ()  # frozen stacks above the trained ones (block fusion)

    @property
    def n_local_stacks(self) -> int:
        return len(self.trained_stacks)

    @property
    def stop_gradient(self) -> bool:
        """Nothing below the trained stacks trains: the trunk's output is a constant."""
        return bool(self.trunk_stacks) and "embed" not in self.train_top and not self.adapters

    @property
    def needs_embedding(self) -> bool:
        return self.inputs == "tokens" or "head" not in self.train_top | self.frozen_top

    @property
    def trained_groups(self) -> tuple[str, ...]:
        return tuple(stack_group(k) for k in self.trained_stacks) + tuple(
            g for g in TOP_GROUPS if g in self.train_top)

    @property
    def n_stacks_run(self) -> int:
        """Stacks 0..n-1 whose output this phase trains on (a stage from the activation
        cache too, whose trunk ran when the cache was built): the end-of-phase evaluation
        runs as many."""
        return max(self.trunk_stacks + self.trained_stacks + self.upper_stacks) + 1

    def describe(self) -> str:
        what = ("LoRA adapters on every stack" if self.adapters else
                ", ".join([f"stack{'s' if len(self.trained_stacks) > 1 else ''} "
                           + _ranges(self.trained_stacks)] + sorted(self.train_top)))
        src = "from the activation cache" if self.inputs == "cache" else "from tokens"
        n_frozen = len(self.trunk_stacks) + len(self.upper_stacks)
        trunk = (f"; {n_frozen} frozen stack(s) resident in {self.trunk_format}"
                 if n_frozen else "")
        return f"{self.name}: trains {what}, {src}{trunk}"


def _ranges(ks) -> str:
    ks = list(ks)
    if len(ks) > 2 and ks == list(range(ks[0], ks[-1] + 1)):
        return f"{ks[0]}..{ks[-1]}"
    return ", ".join(map(str, ks))


def _trains(policy: str, stage: int) -> bool:
    return policy == "every_stage" or (policy == "first_stage" and stage == 0)


def uses_cache(cfg, stage: int) -> bool:
    p = cfg.training.progressive
    return p.cache_activations and p.enabled and p.trunk_strategy == "frozen" and stage >= 1


def stage(cfg, k: int) -> Phase:
    """Stage k: progressive (stack k on a frozen trunk), growing (stacks 0..k) or end-to-end."""
    t, p = cfg.training, cfg.training.progressive
    n = cfg.model.architecture.n_stacks
    n_stages = config_lib.n_stages(cfg)
    if not p.enabled:
        trained, trunk = tuple(range(n)), ()
    elif p.trunk_strategy == "trainable":
        trained, trunk = tuple(range(k + 1)), ()
    else:
        trained, trunk = (k,), tuple(range(k))
    cached = uses_cache(cfg, k)
    if cached:
        trunk = ()  # the trunk's outputs come from disk
    top = {g: _trains(getattr(t, f"train_{'embedding' if g == 'embed' else g}"), k)
           for g in TOP_GROUPS}
    if cfg.model.tie_embeddings:  # one matrix: validation keeps the two policies equal
        top.pop("head")
    train_top = frozenset(g for g, on in top.items() if on)
    frozen_top = frozenset(g for g in top if g not in train_top)
    if cached and "embed" in frozen_top and not cfg.model.tie_embeddings:
        frozen_top -= {"embed"}  # inputs are hidden states: no lookup, no tied head
    phase = Phase(index=k, name=f"stage {k + 1}/{n_stages}" if n_stages > 1 else "stage 1/1",
                  kind="stage", n_steps=config_lib.steps_in_stage(cfg, k),
                  inputs="cache" if cached else "tokens", trained_stacks=trained,
                  trunk_stacks=trunk, trunk_format=p.frozen_precision, train_top=train_top,
                  frozen_top=frozen_top, adapters=False, objective=t.objective,
                  mask_range=objective.stage_mask_range(t, k, n), remat=cfg.model.remat,
                  stores=())
    # Stage 0 also stores the top groups it holds frozen (born with it, never trained).
    born_frozen = tuple(g for g in TOP_GROUPS if g in frozen_top) if k == 0 else ()
    return dataclasses.replace(phase, stores=phase.trained_groups + born_frozen)


def fusion(cfg) -> Phase:
    """Adapters on every stack over a frozen base in fusion.base_precision; the merged stacks
    are stored when it ends."""
    f, t = cfg.training.fusion, cfg.training
    n = cfg.model.architecture.n_stacks
    top = frozenset(g for g in TOP_GROUPS if not (g == "head" and cfg.model.tie_embeddings))
    return Phase(index=config_lib.n_stages(cfg), name="fusion", kind="fusion", n_steps=f.steps,
                 inputs="tokens", trained_stacks=(), trunk_stacks=tuple(range(n)),
                 trunk_format=f.base_precision, train_top=frozenset(), frozen_top=top,
                 adapters=True, objective=f.objective,
                 mask_range=(t.min_mask_fraction, t.max_mask_fraction), remat=f.remat,
                 stores=tuple(stack_group(k) for k in range(n)))


def block_turns(cfg) -> list[Phase]:
    """Block fusion: block_cycles passes over the stacks, bottom to top. In its turn stack
    j trains at full precision with the final norm and head (unless their policy is
    'never'); stacks below it are a frozen trunk, stacks above it are frozen too and
    gradients cross them to stack j. The embedding stays as the stages left it: training
    it would add its Adam state to a turn that already holds every other stack, more than
    any stage holds."""
    f, t = cfg.training.fusion, cfg.training
    n, first = cfg.model.architecture.n_stacks, config_lib.n_stages(cfg)
    steps = f.steps // (f.block_cycles * n)
    turns = []
    for i in range(f.block_cycles * n):
        j = i % n
        top = {g: g != "embed" and getattr(t, f"train_{g}") != "never" for g in TOP_GROUPS}
        if cfg.model.tie_embeddings:  # the head is the embedding
            top.pop("head")
        train_top = frozenset(g for g, on in top.items() if on)
        phase = Phase(index=first + i, name=f"block fusion {i + 1}/{f.block_cycles * n} "
                      f"(stack {j})", kind="block", n_steps=steps, inputs="tokens",
                      trained_stacks=(j,), trunk_stacks=tuple(range(j)),
                      trunk_format=f.base_precision, train_top=train_top,
                      frozen_top=frozenset(top) - train_top, adapters=False,
                      objective=f.objective,
                      mask_range=(t.min_mask_fraction, t.max_mask_fraction), remat=f.remat,
                      stores=(), upper_stacks=tuple(range(j + 1, n)))
        turns.append(dataclasses.replace(phase, stores=phase.trained_groups))
    return turns


def all_phases(cfg) -> list[Phase]:
    phases = [stage(cfg, k) for k in range(config_lib.n_stages(cfg))]
    if cfg.training.fusion.steps > 0:
        phases += block_turns(cfg) if cfg.training.fusion.mode == "block" else [fusion(cfg)]
    return phases


def eval_format(cfg) -> str:
    """The format stacks are held in when the run is evaluated stack by stack: the frozen
    trunk's format in a progressive run with a frozen trunk (what the next stage sees),
    the stored weights as they are otherwise."""
    p = cfg.training.progressive
    return p.frozen_precision if p.enabled and p.trunk_strategy == "frozen" else "fp32"
