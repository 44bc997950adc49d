"""Session set-up shared by every test.

Without a GPU, Triton kernels run only in Triton's interpreter, and TRITON_INTERPRET must be set before any
@triton.jit decorator runs (torch.compile imports Triton too), so it is set here, at session start. The
`auto` kernel backend never picks interpreted Triton for CPU tensors, so other tests still use the reference
on CPU; the Triton tests ask for `fused` explicitly.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
