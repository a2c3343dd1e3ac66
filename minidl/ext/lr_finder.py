"""The learning-rate range test (L. N. Smith, 2017): which rate to train with.

Train for up to ``steps`` batches while the rate grows geometrically,

    lr_k = start_lr * (end_lr / start_lr) ** (k / (steps - 1)),

record an exponential moving average of the loss (bias-corrected, as Adam's moments),

    avg_k = beta * avg_{k-1} + (1 - beta) * loss_k,   smoothed_k = avg_k / (1 - beta ** (k + 1)),

and stop once it exceeds ``diverge`` times its lowest value (or the loss is not
finite). The model and the optimizer are put back as they were, so the test
changes nothing. A good rate sits where the loss falls fastest against log(lr),
below where it turns up: ``suggest_lr`` returns that point.
"""
import math

from .. import backend
from ..checks import check_int, check_real


def lr_find(trainer, train, start_lr=1e-7, end_lr=10.0, steps=100, beta=0.98, diverge=4.0):
    """Run the range test with ``trainer``'s model, loss and optimizer on the DataLoader
    ``train`` (cycled if it is shorter than ``steps``); returns (lrs, smoothed losses)."""
    start_lr = check_real(start_lr, "start_lr", "lr_find", above=0)
    end_lr = check_real(end_lr, "end_lr", "lr_find", above=start_lr)
    steps = check_int(steps, "steps", "lr_find", minimum=2)
    if len(train) == 0:
        raise ValueError("lr_find: the DataLoader yields no batches")
    model_state, optimizer_state = trainer.model.state_dict(), trainer.optimizer.state_dict()
    lrs, losses = [], []
    avg, best = 0.0, math.inf
    trainer.model.train()
    try:
        while True:
            for x, y in train:
                k = len(lrs)
                trainer.optimizer.lr = start_lr * (end_lr / start_lr) ** (k / (steps - 1))
                try:
                    loss, _ = trainer.train_step(x, y)
                except FloatingPointError as exc:   # the loss blew up: the test is over,
                    _check_finite(x, k)             # unless the data or model is at fault
                    if not lrs:
                        raise ValueError(f"lr_find: the loss is not finite from the first step "
                                         f"on, at the lowest rate {start_lr:g}: the model or "
                                         f"the data is at fault, not the rate ({exc})") from None
                    return lrs, losses
                avg = beta * avg + (1 - beta) * loss
                smoothed = avg / (1 - beta ** (k + 1))
                lrs.append(trainer.optimizer.lr)
                losses.append(smoothed)
                best = min(best, smoothed)
                if smoothed > diverge * best or len(lrs) == steps:
                    return lrs, losses
    finally:
        trainer.model.load_state_dict(model_state)
        trainer.optimizer.load_state_dict(optimizer_state)


def _check_finite(x, k):
    """ValueError when batch ``k`` holds NaN or inf: no rate is to blame for that."""
    if not bool(backend.get_array_module(x).isfinite(x).all()):
        raise ValueError(f"lr_find: batch {k + 1} of the data holds NaN or inf: the data, "
                         f"not the learning rate, is at fault")


def suggest_lr(lrs, losses):
    """The rate where the smoothed loss falls fastest against log(lr), before its
    minimum and past the first tenth of the points (where the average is still
    settling); None when that leaves too few points."""
    start, stop = len(lrs) // 10, losses.index(min(losses))
    if stop - start < 2:
        return None
    slopes = [(losses[k + 1] - losses[k]) / (math.log(lrs[k + 1]) - math.log(lrs[k]))
              for k in range(start, stop)]
    return lrs[start + slopes.index(min(slopes))]
