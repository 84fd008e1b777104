"""Quality flags: findings a user should see beside a result, because the result is weaker than it looks.

- A metric predictor whose cross-validated Kendall tau is low ranks subnets little better than
  chance, so the search's choice rests on the few subnets it measured for real.
- An INT8 model slower than its FP32 export is a regression, not a speed-up: on CPUs without
  fast int8 kernels (no VNNI), or for models too small for the quantize/dequantize overhead to
  pay off, ONNX Runtime can run the QDQ graph slower than the float one.

`ufo search`, the pipeline's search and export stages and the run report all print these
messages; the search keeps them in `SearchResult.warnings` and the export in its JSON rows.
"""

from __future__ import annotations

# Below this cross-validated Kendall tau a metric predictor orders subnets poorly: of two random
# subnets it ranks about one pair in four the wrong way round.
LOW_PREDICTOR_TAU = 0.5


def predictor_flag(task: str, cv_tau: float | None, n: int | None) -> str | None:
    """A warning when `task`'s metric predictor has a low cross-validated Kendall tau; None when it is fine."""
    if cv_tau is None or cv_tau >= LOW_PREDICTOR_TAU:
        return None
    return (
        f"{task}: the metric predictor ranks subnets poorly (cross-validated Kendall tau {cv_tau:.2f} < "
        f"{LOW_PREDICTOR_TAU} on {n} subnets); the choice rests on the measured candidates. Evaluate more "
        "subnets for it (metric_samples / --metric-samples) or measure more candidates (top_k / --top-k); "
        "a test split too small to separate subnets caps the tau as well"
    )


def int8_flag(task: str, fp32_ms: float | None, int8_ms: float | None) -> str | None:
    """A warning when `task`'s INT8 model measured slower than its FP32 one; None otherwise."""
    if fp32_ms is None or int8_ms is None or int8_ms <= fp32_ms:
        return None
    return (
        f"{task}: the INT8 model is slower than FP32 ({int8_ms:.3f} vs {fp32_ms:.3f} ms, batch 1, 1 thread): "
        "this CPU or this model size gains nothing from int8; ship the FP32 model, or try --int8 dynamic"
    )
