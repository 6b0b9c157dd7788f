// The per-plane pieces shared by the fused norm ops' drivers (bn_act.cpp: BatchNorm,
// scaleinv::bn_act_pool; gn_act.cpp: GroupNorm, scaleinv::gn_act_pool): argument checks,
// a plane's statistics, its forward (window_kernels.h) and its backward sums and dx
// (norm_windows.h for the pooled float32 windows, plain loops otherwise).
//
// Each per-plane function takes the vector lane count W of the build it is compiled into
// (SCALEINV_ISA_CLONES_W in cpu_isa.h); float64 keeps plain loops for the vectoriser.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu_isa.h"
#include "norm_windows.h"
#include "vec.h"
#include "window_kernels.h"

namespace scaleinv {
namespace norm {

#define NA_INLINE SCALEINV_INLINE

// ---- forward ---------------------------------------------------------------------

// Shifted sums of one plane, added into s[0] (sum(x - shift)) and s[1] (sum((x - shift)^2)).
template <typename T>
NA_INLINE void plane_stats(const T* __restrict__ p, int64_t HW, double shift, double* s) {
  double a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t i = 0; i < HW; ++i) {
    const double d = static_cast<double>(p[i]) - shift;
    a += d;
    b += d * d;
  }
  s[0] += a;
  s[1] += b;
}

template <typename T, int W>
NA_INLINE void plane_forward(const T* x, T* out, uint8_t* ind, const Geo& g, int64_t n,
                             int64_t c, T alpha, T beta) {
  const int64_t plane = n * g.C + c;
  plane_forward_at<W>(x + plane * g.HW, out + plane * g.HWo, ind ? ind + plane * g.HWo : nullptr, g,
                   alpha, beta);
}

// ---- backward --------------------------------------------------------------------

template <typename T>
struct BwdArgs {
  const T* gout;
  const T* x;
  const T* w;  // nullable
  const T* mean;
  const T* invstd;
  const T* out;
  const uint8_t* ind;
  T* dx;
  double* sums;  // [C, 2]: sum(g), sum(g * xhat)
  bool training, need_sums;
  const uint8_t* from_out;  // [C] see XhatSource
  const T* shift;           // [C]
  const double* post;       // [C]
  Geo g;
  double* part;  // [K, C, 2] per-chunk sum(g), sum(g * (x - mean))
  int64_t per;   // planes per chunk
  bool stream = false;     // dx via a staging run and non-temporal stores (see below)
  int64_t dx_plane0 = 0;   // plane p's dx is at dx + (p - dx_plane0) * HW
  int64_t gn_groups = 0;   // GroupNorm mode: G; mean/invstd are [N, G] (0: BatchNorm, [C])
};

// Index of plane's statistics in mean/invstd: its channel (BatchNorm) or its (sample,
// group) (GroupNorm).
template <typename T>
NA_INLINE int64_t stat_index(const BwdArgs<T>& a, int64_t plane) {
  const int64_t c = plane % a.g.C;
  if (a.gn_groups == 0) return c;
  return (plane / a.g.C) * a.gn_groups + c / (a.g.C / a.gn_groups);
}

// sum(g) and sum(g * (v - shift)) of channel c (post[c] turns the second into sum(g *
// xhat)), g = grad_out routed to the argmax (masked by out > 0 with relu); only the pooled
// positions carry a gradient. v is the output there (from_out[c]) or x at the argmax.
// float32 runs the window kernels (norm_windows.h): the AVX-512 twins or W lanes.
template <typename T, int W>
NA_INLINE void plane_sums(const BwdArgs<T>& a, int64_t plane, double* out) {
  const Geo& g = a.g;
  const int64_t c = plane % g.C;
  // GroupNorm (from_out == nullptr): x at the argmax, shifted by the plane's group mean
  const bool from_out = a.from_out && a.from_out[c];
  const T shift = a.from_out ? a.shift[c] : a.mean[stat_index(a, plane)];
  double s1 = 0, s2 = 0;
  {
    const T* __restrict__ x = a.x + plane * g.HW;
    if constexpr (std::is_same_v<T, float>) {
      if (g.pool == 2) {
        const float *go = a.gout + plane * g.HWo, *o = a.out + plane * g.HWo;
        const uint8_t* k = a.ind + plane * g.HWo;
#ifdef NA_HAVE_AVX512_KERNELS
        if (use_avx512_kernels())
          return pool_sums_plane_f32(x, go, o, k, g.W, g.Ho, g.Wo, shift, from_out, g.relu,
                                     out, out + 1);
#endif
        return pool_sums_plane_vec<W>(x, go, o, k, g.W, g.Ho, g.Wo, shift, from_out, g.relu,
                                      out, out + 1);
      }
      const float *go = a.gout + plane * g.HW, *o = a.out + plane * g.HW;
#ifdef NA_HAVE_AVX512_KERNELS
      if (use_avx512_kernels())
        return plain_sums_plane_f32(from_out ? o : x, go, o, g.HW, shift, g.relu, out, out + 1);
#endif
      return plain_sums_plane_vec<W>(from_out ? o : x, go, o, g.HW, shift, g.relu, out,
                                     out + 1);
    }
    const double sh = static_cast<double>(shift);
    if (g.pool == 2) {
      const T* __restrict__ go = a.gout + plane * g.HWo;
      const T* __restrict__ o = a.out + plane * g.HWo;
      const uint8_t* __restrict__ k = a.ind + plane * g.HWo;
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        if (from_out) {  // contiguous: no gather from x
#pragma omp simd reduction(+ : s1, s2)
          for (int64_t ow = 0; ow < g.Wo; ++ow) {
            const int64_t j = oh * g.Wo + ow;
            double gv = static_cast<double>(go[j]);
            if (g.relu) gv = o[j] > T(0) ? gv : 0.0;
            s1 += gv;
            s2 += gv * (static_cast<double>(o[j]) - sh);
          }
          continue;
        }
#pragma omp simd reduction(+ : s1, s2)
        for (int64_t ow = 0; ow < g.Wo; ++ow) {
          const int64_t j = oh * g.Wo + ow;
          double gv = static_cast<double>(go[j]);
          if (g.relu) gv = o[j] > T(0) ? gv : 0.0;
          const int kk = k[j];
          const double xv = x[(2 * oh + (kk >> 1)) * g.W + 2 * ow + (kk & 1)];
          s1 += gv;
          s2 += gv * (xv - sh);
        }
      }
    } else {
      const T* __restrict__ go = a.gout + plane * g.HW;
      const T* __restrict__ o = a.out + plane * g.HW;
      const T* __restrict__ v = from_out ? o : x;
#pragma omp simd reduction(+ : s1, s2)
      for (int64_t i = 0; i < g.HW; ++i) {
        double gv = static_cast<double>(go[i]);
        if (g.relu) gv = o[i] > T(0) ? gv : 0.0;
        s1 += gv;
        s2 += gv * (static_cast<double>(v[i]) - sh);
      }
    }
  }
  out[0] += s1;
  out[1] += s2;
}

// dx = a*g + k0 + k2*(x - mean) over one plane (k0 = k2 = 0 in eval mode).
template <typename T, int W>
NA_INLINE void plane_dx(const BwdArgs<T>& a, int64_t n, int64_t c, T scale, T k0, T k2) {
  const Geo& g = a.g;
  const int64_t plane = n * g.C + c;
  const T* __restrict__ x = a.x + plane * g.HW;
  T* __restrict__ dx = a.dx + (plane - a.dx_plane0) * g.HW;
  const T mean = a.mean[stat_index(a, plane)];
  if constexpr (std::is_same_v<T, float>) {
    if (g.pool == 2) {
      const float *go = a.gout + plane * g.HWo, *o = a.out + plane * g.HWo;
      const uint8_t* k = a.ind + plane * g.HWo;
#ifdef NA_HAVE_AVX512_KERNELS
      if (use_avx512_kernels())
        return pool_dx_plane_f32(x, dx, go, o, k, g.H, g.W, g.Ho, g.Wo, mean, scale, k0, k2,
                                 g.relu, a.training);
#endif
      return pool_dx_plane_vec<W>(x, dx, go, o, k, g.H, g.W, g.Ho, g.Wo, mean, scale, k0, k2,
                                  g.relu, a.training);
    }
  }
  if (a.training) {
#pragma omp simd
    for (int64_t i = 0; i < g.HW; ++i) dx[i] = k0 + k2 * (x[i] - mean);
  } else {
    std::fill(dx, dx + g.HW, T(0));
  }
  if (g.pool == 2) {
    const T* __restrict__ go = a.gout + plane * g.HWo;
    const T* __restrict__ o = a.out + plane * g.HWo;
    const uint8_t* __restrict__ k = a.ind + plane * g.HWo;
    for (int64_t oh = 0; oh < g.Ho; ++oh) {
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        const int64_t j = oh * g.Wo + ow;
        T gv = go[j];
        if (g.relu) gv = o[j] > T(0) ? gv : T(0);
        const int kk = k[j];
        dx[(2 * oh + (kk >> 1)) * g.W + 2 * ow + (kk & 1)] += scale * gv;
      }
    }
  } else {
    const T* __restrict__ go = a.gout + plane * g.HW;
    const T* __restrict__ o = a.out + plane * g.HW;
#pragma omp simd
    for (int64_t i = 0; i < g.HW; ++i) {
      T gv = go[i];
      if (g.relu) gv = o[i] > T(0) ? gv : T(0);
      dx[i] += scale * gv;
    }
  }
}

// Channel c's dx = scale * g + k0 + k2 * (x - mean), from a.sums (s1, sum(g * xhat)):

// Grain sizes: enough work per task that a task is not dominated by scheduling.
inline int64_t grain(int64_t per_item, int64_t items) {
  return std::max<int64_t>(1, std::min<int64_t>(items, (1 << 16) / std::max<int64_t>(1, per_item)));
}

// ---- validation ------------------------------------------------------------------

inline Geo check_x(const char* op, const at::Tensor& x, int64_t pool, bool relu) {
  TORCH_CHECK_VALUE(pool == 0 || pool == 2, op, "pool must be 0 (none) or 2 (2x2 max pool), got ",
                    pool);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                   "x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.layout() == at::kStrided && x.device().is_cpu(), op,
                    "x must be a dense CPU tensor");
  if (pool == 2) {
    TORCH_CHECK_VALUE(x.dim() == 4, op, "pool=2 needs a 4-D x [N, C, H, W], got shape ",
                      shape_str(x));
  } else {
    TORCH_CHECK_VALUE(x.dim() >= 2 && x.dim() <= 4, op,
                      "x must be [N, C], [N, C, L] or [N, C, H, W], got shape ", shape_str(x));
  }
  Geo g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.dim() == 4 ? x.size(2) : 1;
  g.W = x.dim() >= 3 ? x.size(-1) : 1;
  g.HW = g.H * g.W;
  g.pool = static_cast<int>(pool);
  g.relu = relu;
  if (pool == 2) {
    g.Ho = g.H / 2;
    g.Wo = g.W / 2;
    TORCH_CHECK_VALUE(g.Ho > 0 && g.Wo > 0, op, "pool=2 needs H >= 2 and W >= 2, got shape ",
                      shape_str(x));
  } else {
    g.Ho = g.H;
    g.Wo = g.W;
  }
  g.HWo = g.Ho * g.Wo;
  return g;
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// out's shape: x's, with H and W halved (floor) by the pool.
inline std::vector<int64_t> output_shape(const at::Tensor& x, const Geo& g) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  if (g.pool == 2) {
    shape[2] = g.Ho;
    shape[3] = g.Wo;
  }
  return shape;
}

// The forward's out and index (uint8, [0]-shaped without pool), uninitialised.
inline std::pair<at::Tensor, at::Tensor> empty_outputs(const at::Tensor& x, const Geo& g) {
  const std::vector<int64_t> shape = output_shape(x, g);
  return {at::empty(shape, x.options()),
          at::empty(g.pool == 2 ? shape : std::vector<int64_t>{0},
                    x.options().dtype(at::kByte))};
}

// The tensors of a backward call, as both norm modes pass them to their kernels; the
// caller sets the mode's own fields (sums/part, training, x̂ source, grouping).
template <typename T>
BwdArgs<T> backward_args(const at::Tensor& gout, const at::Tensor& x,
                         const std::optional<at::Tensor>& w, const at::Tensor& mean,
                         const at::Tensor& invstd, const at::Tensor& out,
                         const at::Tensor& index, at::Tensor& dx, const Geo& g) {
  BwdArgs<T> a{};
  a.gout = gout.const_data_ptr<T>();
  a.x = x.const_data_ptr<T>();
  a.w = ptr_or_null<T>(w);
  a.mean = mean.const_data_ptr<T>();
  a.invstd = invstd.const_data_ptr<T>();
  a.out = out.const_data_ptr<T>();
  a.ind = g.pool == 2 ? index.const_data_ptr<uint8_t>() : nullptr;
  a.dx = dx.data_ptr<T>();
  a.g = g;
  return a;
}

// grad_out, out and index of a backward call: the forward's output shape and x's dtype
// (index: uint8).
inline void check_backward_inputs(const char* op, const Geo& g, const at::Tensor& x,
                           const at::Tensor& grad_out, const at::Tensor& out,
                           const at::Tensor& index) {
  const std::vector<int64_t> shape = output_shape(x, g);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(shape) &&
                        out.sizes() == at::IntArrayRef(shape),
                    op, "grad_out and out must have the output's shape ", at::IntArrayRef(shape),
                    ", got ", shape_str(grad_out), " and ", shape_str(out));
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type() &&
                       out.scalar_type() == x.scalar_type(),
                   op, "grad_out and out must have x's dtype ", x.scalar_type());
  if (g.pool == 2) {
    TORCH_CHECK_VALUE(index.sizes() == at::IntArrayRef(shape) &&
                          index.scalar_type() == at::kByte,
                      op, "index must be uint8 of the output's shape ", at::IntArrayRef(shape),
                      ", got ", index.scalar_type(), " ", shape_str(index));
  }
}

}  // namespace norm
}  // namespace scaleinv
