"""Negative samplers as pure state machines (the blackjax shape).

Each sampler is a module with ``init(num_examples, ...) -> State`` and
``step(key, state, ...) -> (State, Outputs, Info)``; State, Outputs and Info
are NamedTuples of arrays, no key is stored in a state, everything is
jit/vmap-compatible and free of host syncs, and bad input raises ValueError
at trace time. Scores are passed in as log-scores ``beta * s`` (stop-gradient
is applied inside); the caller encodes and owns the gradients.

- :mod:`~emc2jax.samplers.emc2`: EMC², the per-example adaptive
  Metropolis–Hastings chain (Yau et al. 2024).
- :mod:`~emc2jax.samplers.sogclr`: SogCLR's per-example moving average of the
  negative partition function (Yuan et al. 2022).
- :mod:`~emc2jax.samplers.cache`: a stale embedding table sampled by
  Gumbel-top-k.
- :mod:`~emc2jax.samplers.exact`: the exact softmax over a finite negative
  set, and the exact global contrastive loss (the oracle).

Data parallelism (all samplers): the state is replicated on every device;
inside ``shard_map``/``pmap`` pass ``axis_name``, and the batch's updates are
all-gathered so every replica applies the same write.
"""

from emc2jax.samplers import cache, emc2, exact, sogclr

__all__ = ["cache", "emc2", "exact", "sogclr"]
