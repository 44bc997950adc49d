"""Downstream protocols for pre-trained SimCroP checkpoints (`python -m simcrop.eval <task>`, docs/eval.md):
linear probe, zero-shot classification, report <-> volume retrieval, sentence grounding (with pictures),
UNETR segmentation, and the project's ablation table (docs/ablation.md)."""
from simcrop.eval.loader import EvalError, load_pretrained

__all__ = ["EvalError", "load_pretrained"]
