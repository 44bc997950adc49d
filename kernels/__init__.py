"""simcrop.kernels: Triton @triton.jit code only, one file per operator (installed as `simcrop.kernels`).

The launch code, validation, torch.library registration and autograd live in simcrop/ops/<op>.py. Importing a
module here imports Triton and decorates its kernels: set TRITON_INTERPRET=1 BEFORE that import to get the
interpreter (CPU tensors); simcrop/ops/<op>.py imports its module lazily, with a plain
`from simcrop.kernels import <op>` inside the launching function, on the first Triton launch.
"""
