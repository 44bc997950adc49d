"""Downstream protocols for pre-trained SimCroP checkpoints (`python -m simcrop.eval <task>`, docs/eval.md):
linear probe, zero-shot classification, report <-> volume retrieval, sentence grounding (with pictures),
UNETR segmentation, the per-patch probe (can the encoder see a lesion?) and region -> sentence retrieval, as functions of an EvalSession (simcrop.eval.tasks). The ablation that runs them over
pre-training variants is simcrop.experiments.ablation."""
from simcrop.eval.errors import EvalError
from simcrop.eval.session import EvalSession, load_pretrained

__all__ = ["EvalError", "EvalSession", "load_pretrained"]
