"""Evaluating a model or a subnet on its tasks' eval splits, in one place for training (validation),
search (metric datasets), deploy (task models, ONNX, students) and `ufo eval`.

- `predict`: a split batched through the eval transform; predict functions for a torch module and
  for a batch -> array callable (an ONNX Runtime session);
- `protocol`: each task's protocol on those outputs (`evaluate_task`, `evaluate_tasks`,
  `evaluate_predict` for a deployed head), `recalibrate_bn` for a subnet, `rng_preserved`;
- `subnets`: many subnets with inherited weights, as rows with parameters and FLOPs, a table, a plot;
- `run`: `ufo eval RUN_DIR` (`evaluate_run`).
"""
