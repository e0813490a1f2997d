"""Evaluations of trained models: needle retrieval over a grid of context lengths and depths."""

from lsys.eval.needle import EvalError, NeedleGrid, SampleResult, evaluate_needle

__all__ = ["EvalError", "NeedleGrid", "SampleResult", "evaluate_needle"]
