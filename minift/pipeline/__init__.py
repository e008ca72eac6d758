"""Pipelines: any recipes, in any order, from one YAML file (``recipes/pipeline.py``)."""

from minift.pipeline.record import Previous

__all__ = ["Previous"]
