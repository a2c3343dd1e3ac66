"""Loss functions (docs/layers.md, "Losses"): the scalar a model is trained to lower.

    loss = loss_fn(logits, labels)      # a Python float
    dlogits = loss_fn.backward()        # dL/dlogits: what the model's backward starts from

A loss has no parameters; its target lives on the prediction's device (numpy or cupy).
"""
import math

from . import backend
from .checks import check_real


class Loss:
    """Base class: ``forward(prediction, target)`` -> float, ``backward()`` -> dL/dprediction."""

    def __init__(self):
        self.cache = None

    def forward(self, prediction, target):
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def value(self, prediction, target):
        """The loss as a 0-d array on the prediction's device (a GPU step need not wait
        for it), cached for ``backward``; NaN where ``forward`` would raise. By default
        ``forward``'s float."""
        return self.forward(prediction, target)

    def backward(self):
        raise NotImplementedError(f"{type(self).__name__} must implement backward")

    def __call__(self, prediction, target):
        return self.forward(prediction, target)

    def _require_cache(self):
        if self.cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        return self.cache

    def _check_arrays(self, prediction, target, prediction_name, target_name):
        """TypeError unless both are arrays on one device; ValueError unless the
        prediction is a float array."""
        name = type(self).__name__
        device = backend.device_of(prediction)
        backend.check_input(f"{name} ({prediction_name})", prediction, device)
        if backend.is_array(target) and backend.device_of(target) != device:
            raise TypeError(f"{name}: expected {prediction_name} and {target_name} on one "
                            f"device, got {prediction_name} on the {device} and "
                            f"{target_name} on the {backend.device_of(target)} "
                            f"(move one with minidl.to_device)")
        backend.check_input(f"{name} ({target_name})", target, device)
        if prediction.dtype.kind != "f":
            raise ValueError(f"{name}: expected float {prediction_name}, "
                             f"got dtype {prediction.dtype}")

    def _check_finite(self, array, what, hint=""):
        """ValueError saying how many entries of ``array`` are NaN or inf, if any."""
        xp = backend.get_array_module(array)
        bad = int((~xp.isfinite(array)).sum()) if array.dtype.kind in "fc" else 0
        if bad:
            raise ValueError(f"{type(self).__name__}: expected {what}, got {bad} NaN/inf "
                             f"values{hint}")

    def __repr__(self):
        return f"{type(self).__name__}()"


class SoftmaxCrossEntropy(Loss):
    """Softmax and cross-entropy fused, for logits z (N, K) and integer labels (N,).

    log p = (z - max) - log sum exp(z - max) stays finite for logits of any size;
    q = (1 - eps) onehot(label) + eps / K with eps = ``label_smoothing`` (as PyTorch):

        L = 1/N sum_n  - sum_k q[n, k] log p[n, k]
        dL/dz = (p - q) / N

    ValueError for non-finite logits or labels outside [0, K) (``value`` gives NaN
    instead: finding which is a device reduction, and saying which would wait for it).
    """

    def __init__(self, label_smoothing=0.0):
        super().__init__()
        self.label_smoothing = check_real(label_smoothing, "label_smoothing",
                                          "SoftmaxCrossEntropy", minimum=0, maximum=1)

    def forward(self, logits, labels):
        loss = float(self.value(logits, labels))
        if math.isnan(loss):            # bad logits or labels: say which
            self._check_finite(logits, "finite logits",
                               " (a diverging model? try a lower learning rate)")
            k = logits.shape[1]
            raise ValueError(f"SoftmaxCrossEntropy: expected labels in [0, {k}) for {k} "
                             f"classes, got values from {int(labels.min())} to "
                             f"{int(labels.max())}")
        return loss

    def value(self, logits, labels):
        self._check_arrays(logits, labels, "logits", "labels")
        if logits.ndim != 2 or 0 in logits.shape:
            raise ValueError(f"SoftmaxCrossEntropy: expected logits of shape (N, num_classes) "
                             f"with N, num_classes >= 1, got shape {tuple(logits.shape)}")
        n, k = logits.shape
        if labels.ndim != 1 or labels.shape[0] != n or labels.dtype.kind not in "iu":
            raise ValueError(f"SoftmaxCrossEntropy: expected integer labels of shape ({n},), "
                             f"got {labels.dtype} labels of shape {tuple(labels.shape)}")
        xp, eps = backend.get_array_module(logits), self.label_smoothing
        ok = xp.isfinite(logits).all() & ((labels >= 0) & (labels < k)).all()
        labels = xp.clip(labels, 0, k - 1)    # in range, so indexing cannot fail first
        # inf - inf is the NaN that `ok` reports: no numpy warning for it (cupy warns not)
        with backend.get_module("cpu").errstate(invalid="ignore"):
            shifted = logits - logits.max(axis=1, keepdims=True)   # <= 0: exp cannot overflow
        e = xp.exp(shifted)
        sum_e = e.sum(axis=1, keepdims=True)                  # >= 1: log is finite
        log_p = shifted - xp.log(sum_e)
        loss_n = -log_p[xp.arange(n), labels]                 # -log p[label]
        if eps:
            loss_n = (1.0 - eps) * loss_n - (eps / k) * log_p.sum(axis=1)
        self.cache = {"p": e / sum_e, "labels": labels}
        return xp.where(ok, loss_n.mean(), xp.nan)

    def backward(self):
        """dL/dz = (p - q) / N"""
        cache, eps = self._require_cache(), self.label_smoothing
        p, labels = cache["p"], cache["labels"]
        n, k = p.shape
        dz = p - eps / k if eps else p.copy()
        dz[backend.get_array_module(p).arange(n), labels] -= 1.0 - eps
        dz *= 1.0 / n
        return dz

    def __repr__(self):
        return f"SoftmaxCrossEntropy(label_smoothing={self.label_smoothing})"


class MSE(Loss):
    """Mean squared error over all M elements, as torch.nn.MSELoss():

        L = 1/M sum_i (y_i - t_i)^2,     dL/dy = 2 (y - t) / M

    ``target`` must have the prediction's shape (no broadcasting); it is cast to
    the prediction's dtype.
    """

    def forward(self, prediction, target):
        loss = float(self.value(prediction, target))
        if not math.isfinite(loss):   # float() synced already: this check is free
            self._check_finite(prediction, "a finite prediction")
            self._check_finite(target, "a finite target")
            raise ValueError(f"MSE: the loss overflowed to inf in {prediction.dtype} "
                             f"(prediction and target are finite but too far apart)")
        return loss

    def value(self, prediction, target):
        self._check_arrays(prediction, target, "prediction", "target")
        if tuple(target.shape) != tuple(prediction.shape) or prediction.size == 0:
            raise ValueError(f"MSE: expected a non-empty target of the prediction's shape "
                             f"{tuple(prediction.shape)}, got shape {tuple(target.shape)}")
        diff = prediction - target.astype(prediction.dtype, copy=False)
        self.cache = {"diff": diff}
        return (diff * diff).mean()

    def backward(self):
        diff = self._require_cache()["diff"]
        return diff * (2.0 / diff.size)
