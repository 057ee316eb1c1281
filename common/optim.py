"""The optimisers both parts train with, assembled from optax pieces.

The learning rate is always an injected hyperparameter (``optax.inject_hyperparams``: a leaf of
the optimiser state), so a learning-rate sweep stacks states and vmaps one step
(:func:`common.training.stack`). A schedule is a multiplier of the update, s(t) in [0, 1] of the
step count t, applied after the optimiser (``optax.scale_by_schedule``): the update is then
-lr s(t) d_t, the same as scheduling the learning rate itself, and it leaves the lr leaf alone.

    constant:  s(t) = 1
    cosine:    s(t) = t / w for t < w (linear warm-up over w steps), then
               (1 + cos(pi (t - w) / (T - w))) / 2 down to 0 at T steps (Loshchilov & Hutter 2017)

Weight decay is on kernels only (leaves of two or more dimensions; not biases or BatchNorm
scales): added to the gradient before SGD's momentum (L2, as PyTorch's SGD), decoupled for Adam
(AdamW, Loshchilov & Hutter 2019).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import optax

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine")


def kernels(params):
    """The weight-decay mask: True for leaves of two or more dimensions."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def multiplier(schedule: str, total_steps: int, warmup_steps: int = 0) -> optax.Schedule | None:
    """s(t) of the module docstring, or None for a constant schedule without warm-up. Raises
    ``ValueError`` for an unknown ``schedule`` or warm-up not shorter than ``total_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if warmup_steps and warmup_steps >= total_steps:
        raise ValueError(f"warm-up of {warmup_steps} steps does not fit in {total_steps} steps")
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps, total_steps, end_value=0.0)
    if warmup_steps:
        return optax.linear_schedule(0.0, 1.0, warmup_steps)
    return None


@dataclass(frozen=True)
class Optimizer:
    """How a run optimises: ``name`` ("sgd" or "adam"), SGD's ``momentum`` (0: none) and
    ``nesterov``, ``weight_decay`` (kernels only), and the update's ``schedule`` over
    ``total_steps`` steps with ``warmup_steps`` of linear warm-up. The defaults are plain SGD at a
    constant rate (the CNN homework's); ``Optimizer("adam")`` is the P2G homework's Adam."""

    name: str = "sgd"
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    total_steps: int = 1
    warmup_steps: int = 0

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; expected one of {OPTIMIZERS}")
        if self.name == "adam" and (self.momentum or self.nesterov):
            raise ValueError("momentum and nesterov are SGD's; Adam keeps its own moments")
        multiplier(self.schedule, self.total_steps, self.warmup_steps)  # raises on a bad schedule

    def __call__(self, lr: float) -> optax.GradientTransformation:
        """The optax transformation at learning rate ``lr`` (injected)."""
        if self.name == "adam":
            if self.weight_decay:
                tx = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
                    learning_rate=lr, weight_decay=self.weight_decay, mask=kernels)
            else:
                tx = optax.inject_hyperparams(optax.adam)(learning_rate=lr)
        else:
            momentum = {"momentum": self.momentum, "nesterov": self.nesterov} if self.momentum else {}
            tx = optax.inject_hyperparams(optax.sgd)(learning_rate=lr, **momentum)
            if self.weight_decay:
                tx = optax.chain(optax.add_decayed_weights(self.weight_decay, mask=kernels), tx)
        schedule = multiplier(self.schedule, self.total_steps, self.warmup_steps)
        return tx if schedule is None else optax.chain(tx, optax.scale_by_schedule(schedule))
