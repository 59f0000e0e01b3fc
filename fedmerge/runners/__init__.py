"""Runners: scenario execution over the in-process engine or Flower's simulation engine (one code path)."""

from fedmerge.runners.simulation import run_scenario

__all__ = ["run_scenario"]
