// Schemas of every C++/CUDA operator of simcrop (the one TORCH_LIBRARY block of the project).
//
// Kernels: csrc/cpu/<op>.cpp (TORCH_LIBRARY_IMPL(simcrop, CPU)) and csrc/cuda/<op>.cu (... CUDA).
// Fake (meta) kernels and autograd are registered from Python: simcrop/ops/patchify.py, simcrop/ops/masked_mse.py.
// Triton ops are registered from Python under other names (simcrop::topk_align*, cross_granularity_attention*):
// torch.library.custom_op adds them to the same namespace through a separate fragment, so names must not clash.
//
// Shapes (reference semantics: simcrop/ops/reference.py):
//   x [B, C, X, Y, Z]; patches [B, N, P]; N = prod(spatial / patch); P = px * py * pz * C, ordered (dx, dy, dz, c).
#include <torch/library.h>

TORCH_LIBRARY(simcrop, m) {
  // [B, C, X, Y, Z] -> [B, N, P]
  m.def("patchify3d(Tensor x, int[] patch) -> Tensor");
  // [B, N, P] -> [B, C, X, Y, Z], C = channels; inverse of patchify3d
  m.def("unpatchify3d(Tensor patches, int[] patch, int[] spatial, int channels) -> Tensor");
  // [B, C, X, Y, Z], ids_keep [B, K] int64 (distinct per row) -> [B, K, P] = patchify3d(x)[b, ids_keep[b, k]]
  m.def("masked_patchify(Tensor x, int[] patch, Tensor ids_keep) -> Tensor");
  // [B, K, P], ids_keep [B, K] -> [B, C, X, Y, Z]: visible patches put back in place, zeros in hidden patches.
  // The backward of masked_patchify w.r.t. x (and masked_patchify is its backward).
  m.def("masked_unpatchify(Tensor visible, int[] patch, Tensor ids_keep, int[] spatial) -> Tensor");
  // MIM loss: pred [B, N, P], x [B, C, X, Y, Z], mask [B, N] (1 = hidden) -> 0-d float32 (float64 for float64 pred)
  m.def(
      "masked_mse(Tensor pred, Tensor x, Tensor mask, int[] patch, bool norm_pix, str normalization, "
      "float eps) -> Tensor");
  // d loss / d pred: grad 0-d -> [B, N, P] in pred's dtype (the volume is the target: no gradient)
  m.def(
      "masked_mse_backward(Tensor grad, Tensor pred, Tensor x, Tensor mask, int[] patch, bool norm_pix, "
      "str normalization, float eps) -> Tensor");
}
