"""Optimizers and learning-rate schedules from the ``optimizer.*`` config.

:func:`make_optimizer` returns an ``optax.GradientTransformation`` and the schedule
it follows (so the train step can log the learning rate of step t as
``schedule(t)``). Weight decay never touches biases or normalisation scales/offsets:
the mask keeps only leaves with ``ndim > 1`` (dense and conv kernels), the usual
rule of SimCLR/BYOL-style training (LARS excludes the same leaves from its trust
ratio).

Weight decay semantics follow the optimizer each name refers to:
  - ``sgd``, ``adam``: L2 regularisation added to the gradient before the update
    (as ``torch.optim.SGD/Adam(weight_decay=...)``);
  - ``adamw``: decoupled decay (Loshchilov & Hutter 2019);
  - ``lars``: You et al. 2017, decay inside the layer-wise trust ratio.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

OPTIMIZERS = ("sgd", "adam", "adamw", "lars")
SCHEDULES = ("cosine", "constant")

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "decay_mask",
    "default_optimizer_config",
    "make_optimizer",
    "make_schedule",
    "warmup_steps",
]


def default_optimizer_config() -> ml_collections.ConfigDict:
    """Default ``optimizer.*`` config (Adam 1e-3, constant schedule).

    Keys:
      name: one of ``OPTIMIZERS``.
      learning_rate: peak learning rate.
      schedule: ``"cosine"`` (linear warm-up from 0, cosine decay to 0 at
        ``total_steps``) or ``"constant"`` (linear warm-up, then constant).
      warmup_steps: warm-up length in steps (0: none); or
      warmup_fraction: warm-up length as a fraction of ``total_steps`` (only one of
        the two may be non-zero).
      weight_decay: decay coefficient on kernels (ndim > 1); 0 disables it.
      grad_clip_norm: clip the gradient to this global L2 norm first; 0 disables it.
      momentum: SGD/LARS momentum (0 = plain SGD).
      nesterov: Nesterov momentum for SGD/LARS.
      b1, b2, eps: Adam/AdamW moments and epsilon.
      trust_coefficient: LARS trust coefficient (eta).
    """
    config = ml_collections.ConfigDict()
    config.name = "adam"
    config.learning_rate = 1e-3
    config.schedule = "constant"
    config.warmup_steps = 0
    config.warmup_fraction = 0.0
    config.weight_decay = 0.0
    config.grad_clip_norm = 0.0
    config.momentum = 0.9
    config.nesterov = False
    config.b1 = 0.9
    config.b2 = 0.999
    config.eps = 1e-8
    config.trust_coefficient = 1e-3
    return config


def decay_mask(params: Any) -> Any:
    """True on the leaves that get weight decay: kernels (ndim > 1), not biases
    or normalisation scales (ndim <= 1). Works on arrays and ShapeDtypeStructs."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    # Configs may omit keys a given optimizer does not use: fall back to defaults.
    return config.get(key, default_optimizer_config()[key])


def warmup_steps(config: ml_collections.ConfigDict, *, total_steps: int) -> int:
    """The warm-up length in steps from ``warmup_steps`` or ``warmup_fraction``."""
    steps, fraction = int(_get(config, "warmup_steps")), float(_get(config, "warmup_fraction"))
    if steps and fraction:
        raise ValueError(
            f"set only one of optimizer.warmup_steps={steps} and "
            f"optimizer.warmup_fraction={fraction}"
        )
    if steps < 0 or not 0.0 <= fraction <= 1.0:
        raise ValueError(
            f"optimizer.warmup_steps={steps} must be >= 0 and "
            f"optimizer.warmup_fraction={fraction} in [0, 1]"
        )
    steps = steps or round(fraction * total_steps)
    if steps > total_steps:
        raise ValueError(
            f"optimizer warm-up of {steps} steps is longer than total_steps={total_steps}"
        )
    return steps


def make_schedule(config: ml_collections.ConfigDict, *, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the step: linear warm-up from 0 to
    ``learning_rate``, then cosine decay to 0 at ``total_steps`` or constant."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    lr = float(config.learning_rate)
    if lr <= 0:
        raise ValueError(f"optimizer.learning_rate must be positive, got {lr}")
    schedule = _get(config, "schedule")
    warmup = warmup_steps(config, total_steps=total_steps)
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=total_steps
        )
    if schedule == "constant":
        if not warmup:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    raise ValueError(f"optimizer.schedule={schedule!r} is not one of {SCHEDULES}")


def make_optimizer(
    optimizer_config: ml_collections.ConfigDict, *, total_steps: int
) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
    """Builds the optimizer described by ``optimizer_config``.

    Args:
      optimizer_config: the ``optimizer.*`` ConfigDict (keys in
        :func:`default_optimizer_config`).
      total_steps: training length, the horizon of the cosine schedule.

    Returns:
      ``(tx, schedule)``: the optax transformation (gradient clipping, weight decay
      and the update rule chained) and ``schedule(step) -> learning rate``.

    Raises:
      ValueError: unknown name or schedule, inconsistent warm-up, bad values.
    """
    name = optimizer_config.name
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={name!r} is not one of {OPTIMIZERS}")
    schedule = make_schedule(optimizer_config, total_steps=total_steps)
    wd = float(_get(optimizer_config, "weight_decay"))
    clip = float(_get(optimizer_config, "grad_clip_norm"))
    if wd < 0 or clip < 0:
        raise ValueError(
            f"optimizer.weight_decay={wd} and optimizer.grad_clip_norm={clip} must be >= 0"
        )
    momentum = float(_get(optimizer_config, "momentum"))
    nesterov = bool(_get(optimizer_config, "nesterov"))
    adam_kwargs = {k: float(_get(optimizer_config, k)) for k in ("b1", "b2", "eps")}
    # L2 regularisation: the decay term joins the gradient before the update rule.
    l2 = [optax.add_decayed_weights(wd, mask=decay_mask)] if wd else []

    if name == "sgd":
        rule = optax.chain(*l2, optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
    elif name == "adam":
        rule = optax.chain(*l2, optax.adam(schedule, **adam_kwargs))
    elif name == "adamw":
        rule = optax.adamw(schedule, weight_decay=wd, mask=decay_mask, **adam_kwargs)
    else:
        rule = optax.lars(
            schedule,
            weight_decay=wd,
            weight_decay_mask=decay_mask,
            trust_coefficient=float(_get(optimizer_config, "trust_coefficient")),
            trust_ratio_mask=decay_mask,
            momentum=momentum,
            nesterov=nesterov,
        )
    if clip:
        rule = optax.chain(optax.clip_by_global_norm(clip), rule)
    return rule, schedule
