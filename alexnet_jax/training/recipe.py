"""The two training recipes: torchvision's reference (StepLR) and the 2012 paper's (lr / 10 on a plateau).

tx = make_optimizer(lr_for_recipe("paper", 0.01, steps_per_epoch), rule=RECIPE_RULES["paper"], ...)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from alexnet_jax.steps import LR_STEP_EPOCHS, WEIGHT_DECAY, step_schedule

# The 2012 paper (Krizhevsky et al., section 5): wd 5e-4, lr divided by 10 whenever the
# validation error stopped improving at the current rate.
PAPER_WEIGHT_DECAY = 5e-4
PAPER_LR_FACTOR = 0.1

# Recipe -> momentum rule (`steps.UPDATE_RULES`). The paper's recipe divides the rate by 10
# mid-run, where torch's formulation and the paper's part ways (`steps.sgd_paper`), so it
# runs the paper's own rule.
RECIPE_RULES = {"torchvision": "torch", "paper": "paper"}
RECIPES = tuple(RECIPE_RULES)


@dataclasses.dataclass
class Plateau:
    """The paper's rule: scale the rate by `factor` when the watched metric stopped improving.

    `update(value)` takes a validation metric where larger is better (top-1) and
    returns True when the rate should drop: `patience` evaluations in a row without
    a new best. Plain data, so the loop checkpoints it as JSON.
    """

    patience: int = 1
    factor: float = PAPER_LR_FACTOR
    best: float = -math.inf
    bad_evals: int = 0

    def update(self, value: float) -> bool:
        if value > self.best:
            self.best, self.bad_evals = value, 0
            return False
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            self.bad_evals = 0
            return True
        return False


def lr_for_recipe(
    recipe: str,
    lr: float,
    steps_per_epoch: int,
    *,
    step_epochs: int = LR_STEP_EPOCHS,
    epoch_base: tuple[int, int] = (0, 0),
) -> float | Callable:
    """The learning rate argument for `make_optimizer`: a StepLR schedule (torchvision) or a constant (paper).

    `epoch_base`: see `steps.step_schedule`."""
    if recipe == "torchvision":
        return step_schedule(lr, steps_per_epoch, step_epochs=step_epochs, epoch_base=epoch_base)
    if recipe == "paper":
        return lr
    raise ValueError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")


def default_weight_decay(recipe: str) -> float:
    """1e-4 for torchvision's recipe, 5e-4 for the paper's."""
    return PAPER_WEIGHT_DECAY if recipe == "paper" else WEIGHT_DECAY
