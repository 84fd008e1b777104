"""Predictor features of a subnet: the space's encoding plus its exact analytic cost.

`SearchSpace.encode` describes an arch block by block; a GP on it alone must learn how widths
multiply into cost. Appending log parameters and log FLOPs (exact, from the space) gives the GP
those products directly, so latency (and, through capacity, accuracy) is close to linear in a few
features and the kernel only models what they miss. Predictors are fitted and used through this
one function, and `FEATURES` names the layout in every predictor file's manifest.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ufo.arch import Arch, SearchSpace

FEATURES = "encode+log_params+log_flops"
LOG_PARAMS, LOG_FLOPS = -2, -1  # their columns


def arch_features(space: SearchSpace, archs: Sequence[Arch], task: str) -> np.ndarray:
    """(N, d + 2) rows: `space.encode(arch, [task])`, log(params of task's path), log(FLOPs)."""
    rows = []
    for a in archs:
        cost = [np.log(space.num_params(a, task)), np.log(space.flops(a, task))]
        rows.append(np.concatenate([space.encode(a, [task]), cost]))
    return np.stack(rows).astype(np.float64) if rows else np.zeros((0, 0))
