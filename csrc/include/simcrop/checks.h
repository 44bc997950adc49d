// Host-side argument checks and geometry shared by the CPU and CUDA entry points (ATen, host code only).
// Python validates first with friendlier messages (simcrop/ops/patchify.py); these TORCH_CHECKs guard direct
// torch.ops.simcrop.* calls.
#pragma once

// Light headers on purpose (Tensor methods + the few ops used): <ATen/ATen.h> triples the compile time, and nvcc
// parses every header several times.
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>

#include <limits>
#include <vector>

#include "simcrop/patch_index.h"

namespace simcrop {

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", s);
}

// Calls f(T{}) with an unsigned integer type of t's element size (patch copies do not care about the value type).
template <typename F>
void dispatch_by_size(const at::Tensor& t, F&& f) {
  switch (t.element_size()) {
    case 2: return f(uint16_t{});
    case 4: return f(uint32_t{});
    case 8: return f(uint64_t{});
    default: TORCH_CHECK(false, "simcrop: unsupported element size ", t.element_size());
  }
}

// Patch sides from an int[] argument; each must be positive and divide the spatial size.
inline void check_patch(at::IntArrayRef patch, at::IntArrayRef spatial, const char* op) {
  TORCH_CHECK(patch.size() == 3, op, ": patch must have 3 sides (px, py, pz), got ", patch);
  TORCH_CHECK(spatial.size() == 3, op, ": spatial size must be (X, Y, Z), got ", spatial);
  for (int a = 0; a < 3; ++a) {
    TORCH_CHECK(patch[a] > 0 && spatial[a] % patch[a] == 0, op, ": patch size ", patch,
                " does not divide volume size ", spatial, " (axis ", "xyz"[a], ")");
  }
}

// Geometry of a volume of shape [B, C, X, Y, Z] cut into patches.
template <typename index_t>
inline PatchGeom<index_t> geom_of(int64_t C, at::IntArrayRef spatial, at::IntArrayRef patch) {
  return make_geom<index_t>(C, spatial[0], spatial[1], spatial[2], patch[0], patch[1], patch[2]);
}

inline void check_volume(const at::Tensor& x, at::IntArrayRef patch, const char* op) {
  TORCH_CHECK(x.dim() == 5, op, ": x must be [B, C, X, Y, Z], got shape ", x.sizes());
  check_float_dtype(x, op, "x");
  check_patch(patch, x.sizes().slice(2), op);
}

// ids_keep [B, K] int64 on x's device, 1 <= K <= N.
inline void check_ids_keep(const at::Tensor& ids, int64_t B, int64_t N, const at::Tensor& like, const char* op) {
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": ids_keep must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == B && ids.size(1) >= 1 && ids.size(1) <= N, op,
              ": ids_keep must be [B, K] with B = ", B, " and 1 <= K <= N = ", N, ", got ", ids.sizes());
  TORCH_CHECK(ids.device() == like.device(), op, ": ids_keep is on ", ids.device(), " but the data on ",
              like.device());
}

// slot[b, n] = k where ids_keep[b, k] == n, else -1 (hidden patch): turns the scatter of visible patches into a
// gather over patches (each output voxel written once, no atomics). [B, N] int64, on ids' device, no sync.
inline at::Tensor slots_of(const at::Tensor& ids_keep, int64_t N) {
  const int64_t B = ids_keep.size(0), K = ids_keep.size(1);
  auto slot = at::full({B, N}, -1, ids_keep.options());
  auto ranks = at::arange(K, ids_keep.options()).expand({B, K});
  return slot.scatter_(1, ids_keep, ranks);
}

// Arguments of a whole-patch gather (patchify3d, masked_patchify): out[b, k] = patch(x, b, ids[b, k] or k).
struct GatherArgs {
  at::Tensor x, ids;  // contiguous; ids undefined for patchify3d (identity, K = N)
  PatchGeom<int64_t> g;
  int64_t B, K;
};

inline GatherArgs prepare_gather(const at::Tensor& x, at::IntArrayRef patch, const at::Tensor* ids_keep,
                                 const char* op) {
  check_volume(x, patch, op);
  GatherArgs a;
  a.x = x.contiguous();
  a.B = x.size(0);
  a.g = geom_of<int64_t>(x.size(1), x.sizes().slice(2), patch);
  a.K = a.g.N;
  if (ids_keep != nullptr) {
    check_ids_keep(*ids_keep, a.B, a.g.N, x, op);
    a.ids = ids_keep->contiguous();
    a.K = a.ids.size(1);
  }
  return a;
}

// Arguments of a whole-patch scatter (unpatchify3d, masked_unpatchify): patch(out, b, n) = src[b, slot[b, n]]
// where 0 <= slot < K, zeros elsewhere.
struct ScatterArgs {
  at::Tensor src, slot;  // contiguous [B, K, P]; slot [B, N] int64, undefined for unpatchify3d (identity)
  PatchGeom<int64_t> g;
  int64_t B, K;
  std::vector<int64_t> shape;  // [B, C, X, Y, Z] of the output
};

inline ScatterArgs prepare_scatter(const at::Tensor& src, at::IntArrayRef patch, at::IntArrayRef spatial,
                                   int64_t channels, const char* op) {
  TORCH_CHECK(src.dim() == 3, op, ": patches must be [B, N, P], got shape ", src.sizes());
  check_float_dtype(src, op, "patches");
  check_patch(patch, spatial, op);
  TORCH_CHECK(channels >= 1, op, ": channels must be >= 1, got ", channels);
  ScatterArgs a;
  a.src = src.contiguous();
  a.B = src.size(0);
  a.K = src.size(1);
  a.g = geom_of<int64_t>(channels, spatial, patch);
  a.shape = {a.B, channels, spatial[0], spatial[1], spatial[2]};
  TORCH_CHECK(src.size(2) == a.g.P, op, ": patches have P = ", src.size(2), ", expected ", a.g.P, " for patch ",
              patch, " and ", channels, " channel(s)");
  return a;
}

inline ScatterArgs prepare_unpatchify(const at::Tensor& patches, at::IntArrayRef patch, at::IntArrayRef spatial,
                                      int64_t channels) {
  auto a = prepare_scatter(patches, patch, spatial, channels, "unpatchify3d");
  TORCH_CHECK(a.K == a.g.N, "unpatchify3d: got ", a.K, " patches, volume ", spatial, " cut by patch ", patch,
              " has N = ", a.g.N);
  return a;
}

inline ScatterArgs prepare_masked_unpatchify(const at::Tensor& visible, at::IntArrayRef patch,
                                             const at::Tensor& ids_keep, at::IntArrayRef spatial) {
  const char* op = "masked_unpatchify";
  TORCH_CHECK(visible.dim() == 3, op, ": visible must be [B, K, P], got shape ", visible.sizes());
  TORCH_CHECK(patch.size() == 3 && patch[0] > 0 && patch[1] > 0 && patch[2] > 0, op, ": bad patch ", patch);
  const int64_t cell = patch[0] * patch[1] * patch[2];
  TORCH_CHECK(visible.size(2) % cell == 0 && visible.size(2) > 0, op, ": P = ", visible.size(2),
              " is not a multiple of the patch volume ", cell);
  auto a = prepare_scatter(visible, patch, spatial, visible.size(2) / cell, op);
  check_ids_keep(ids_keep, a.B, a.g.N, visible, op);
  TORCH_CHECK(ids_keep.size(1) == a.K, op, ": ids_keep has K = ", ids_keep.size(1), " but visible has ", a.K,
              " patches");
  a.slot = slots_of(ids_keep, a.g.N);
  return a;
}

// True when every offset of these tensors fits in int32 (cheaper index math on the GPU).
inline bool fits_int32(std::initializer_list<int64_t> numels) {
  for (auto n : numels) {
    if (n > std::numeric_limits<int32_t>::max()) return false;
  }
  return true;
}

// masked_mse: the normalisation flag, validated ("masked": sum(mask), "all": B * N).
inline bool by_masked(c10::string_view normalization) {
  TORCH_CHECK(normalization == "masked" || normalization == "all",
              "masked_mse: normalization must be 'masked' or 'all', got '", normalization, "'");
  return normalization == "masked";
}

// Checks and shared preparation of masked_mse and its backward.
struct MseArgs {
  at::Tensor pred, x, mask;  // contiguous; x in pred's dtype or float32; mask in the accumulation dtype
  PatchGeom<int64_t> g;
  int64_t B;
};

inline MseArgs prepare_mse(const at::Tensor& pred, const at::Tensor& x, const at::Tensor& mask,
                           at::IntArrayRef patch, const char* op) {
  check_volume(x, patch, op);
  check_float_dtype(pred, op, "pred");
  MseArgs a;
  a.B = x.size(0);
  a.g = geom_of<int64_t>(x.size(1), x.sizes().slice(2), patch);
  TORCH_CHECK(pred.dim() == 3 && pred.size(0) == a.B && pred.size(1) == a.g.N && pred.size(2) == a.g.P, op,
              ": pred must be [B, N, P] = [", a.B, ", ", a.g.N, ", ", a.g.P, "], got ", pred.sizes());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == a.B && mask.size(1) == a.g.N, op, ": mask must be [B, N] = [",
              a.B, ", ", a.g.N, "], got ", mask.sizes());
  TORCH_CHECK(x.device() == pred.device() && mask.device() == pred.device(), op,
              ": pred, x and mask must be on one device, got ", pred.device(), ", ", x.device(), ", ",
              mask.device());
  const auto acc = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  a.pred = pred.contiguous();
  // the reference compares with patchify(x).float(): x in float32 unless it already has pred's dtype
  a.x = (x.scalar_type() == pred.scalar_type() ? x : x.to(at::kFloat)).contiguous();
  a.mask = mask.to(acc).contiguous();
  return a;
}

// t / D for the loss's denominator, without a host sync: D = max(sum mask, 1) ('masked') or B * N ('all').
inline at::Tensor divide_by_denominator(const at::Tensor& t, const at::Tensor& mask_acc, bool masked) {
  if (masked) return t.div(mask_acc.sum().clamp_min(1.0));
  return t.div(static_cast<double>(mask_acc.numel()));
}

}  // namespace simcrop
