"""Inference pipelines, evaluation and the `vqgen` command line."""

from .pipeline import VQPipeline, VQPipelineOutput

__all__ = ["VQPipeline", "VQPipelineOutput"]
