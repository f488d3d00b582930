"""Offline evaluation: ``anomaly-inspect eval`` and ``anomaly-inspect make-demo-dataset``.

No HTTP here: detectors are built with ``models.load_detector*`` and run directly;
the metrics and the calibration maths are pure functions in ``models.metrics`` and
``models.calibration``. See docs/evaluation.md.
"""

from service.evaluation.datasets import Category, DatasetError, Sample, read_dataset
from service.evaluation.demo_data import DEMO_CATEGORIES, make_demo_dataset
from service.evaluation.runner import EvalConfig, EvaluationError, run_evaluation, split_category

__all__ = [
    "DEMO_CATEGORIES",
    "Category",
    "DatasetError",
    "EvalConfig",
    "EvaluationError",
    "Sample",
    "make_demo_dataset",
    "read_dataset",
    "run_evaluation",
    "split_category",
]
