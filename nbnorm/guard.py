"""``on_nonfinite``: what a training step does with a batch whose statistics are not finite.

One bad batch (a NaN or inf in ``x``, or float64 data so large that its variance
overflows) would otherwise poison the running statistics for good, as it does in
PyTorch.  The decision is taken per channel from the float64 batch ``mean`` and
``M2`` (sum of squared deviations) that the statistics kernel returns, before any
output is written: O(C) on the host, never another pass over ``x``.

- ``"propagate"``: PyTorch's behaviour, NaN/inf flow into outputs and running stats.
- ``"skip"``: outputs as for propagate; running stats keep their old value in every
  channel whose batch mean or variance is not finite.
- ``"raise"``: ``FloatingPointError``, raised before anything is written.
"""

import numpy as np

POLICIES = ("propagate", "skip", "raise")


def check_policy(value):
    """``value`` if it names a policy, else ``ValueError`` (api's validation)."""
    if not isinstance(value, str) or value not in POLICIES:
        raise ValueError(f"on_nonfinite must be one of {', '.join(map(repr, POLICIES))}, "
                         f"got {value!r}")
    return value


def running_update_mask(mean, m2, policy):
    """Which channels' running statistics a training step may update.

    Parameters
    ----------
    mean, m2 : float64 ndarray of shape ``(C,)``
        The batch mean and sum of squared deviations, on the host.  The variance
        ``m2 / n`` (or ``m2 / (n - 1)``) is finite exactly when ``m2`` is.
    policy : one of ``POLICIES``

    Returns
    -------
    None (update every channel) or a bool array, True where the update happens.

    Raises
    ------
    FloatingPointError
        ``policy == "raise"`` and some channel's mean or variance is not finite.
        The caller has written nothing yet.
    """
    if policy == "propagate":
        return None
    ok = np.isfinite(mean) & np.isfinite(m2)
    if ok.all():
        return None
    if policy == "raise":
        bad = np.flatnonzero(~ok)
        raise FloatingPointError(
            f"batch statistics are not finite in {bad.size} channel(s), first {bad[:8].tolist()}"
            " (on_nonfinite='raise'); nothing was written")
    return ok
