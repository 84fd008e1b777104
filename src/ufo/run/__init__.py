"""`ufo run`: the pipeline from All-in-One training to exported task models and a report."""

from ufo.run.pipeline import STAGE_NAMES, STAGES, run_pipeline
from ufo.run.state import PipelineError

__all__ = ["STAGES", "STAGE_NAMES", "PipelineError", "run_pipeline"]
