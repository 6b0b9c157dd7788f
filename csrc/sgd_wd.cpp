// Fused SGD + coupled weight decay on CPU, with per-segment statistics gathered in
// the same pass over memory.
//
// Bitwise contract (fp32/fp64): the update equals torch.optim.SGD(foreach=False).
// Torch's vectorised CPU `add(a, b, alpha)` is `fma(b, alpha, a)` whenever ATen runs
// with an AVX2/AVX512 kernel set and `a + alpha * b` (two roundings) with the DEFAULT
// set, so we ask ATen which set it uses and pick the same arithmetic. This file is
// compiled with -ffp-contract=off so that the compiler never fuses on its own.
//
// Parallel layout: the tensors are cut into chunks of at most kChunk elements that
// never straddle a segment; one at::parallel_for covers every chunk of every tensor
// (many small tensors cost no launch each). Each chunk writes its partial sums to its
// own slot and the slots are added into `stats` afterwards in chunk order, so the
// statistics are deterministic whatever the thread count.
//
// Per-segment hyper-parameters: every chunk carries the (lr, weight_decay) of its segment
// (the scalars, or a row of `segment_hparams`), rounded to the math type when the chunk
// runs exactly as the scalars are, so a call with a table equals, segment by segment,
// separate calls on the segments' slices with scalar lr/weight_decay.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/List.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <vector>

#include "checks.h"
#include "cpu_isa.h"

namespace scaleinv {
namespace {


constexpr int64_t kChunk = 1 << 15;  // elements per work item
constexpr int kStatCols = 6;

template <typename T>
using math_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename M>
struct Hyper {
  M neg_lr, weight_decay, momentum, one_minus_dampening;
  bool has_wd, nesterov, maximize;
};

// madd<FUSED>(a, b, c) (cpu_isa.h): a*b + c, fused or not, exactly as ATen's
// add(c, a, alpha=b) computes it.

template <typename M>
SCALEINV_INLINE M nonfinite(M g) {
  // !(|g| <= max): 1 for +-inf and NaN.
  return std::abs(g) <= std::numeric_limits<M>::max() ? M(0) : M(1);
}

// One contiguous range of one tensor. `out` receives the 6 sums of the range.
//
// The range is walked in blocks of kBlock elements: first the update loop (which keeps
// the old weights in a stack buffer), then the statistics loop over the same block while
// it is still in L1. Two simple loops vectorise reliably where one loop mixing the
// update's selects with six fp64 reductions did not; main-memory traffic is unchanged.
constexpr int64_t kBlock = 512;

template <typename T, bool FUSED, bool MOM, bool STATS>
SCALEINV_INLINE void update_range(T* __restrict__ p, const T* __restrict__ g,
                                  T* __restrict__ b, int64_t n, const Hyper<math_t<T>>& h,
                                  bool fresh, double* out) {
  using M = math_t<T>;
  // Statistics: products and sums in fp64. The products of fp32 values are then exact;
  // with fp32 products the sin^2 term of the angular update, |w|^2|D|^2 - <w,D>^2,
  // would cancel down to rounding noise for small angles.
  double ww = 0, gg = 0, wg = 0, dd = 0, wdl = 0, nf = 0;
  M w_old[kBlock];
  const M gsign = h.maximize ? M(-1) : M(1);  // exact: flips the sign or nothing
  for (int64_t base = 0; base < n; base += kBlock) {
    const int64_t len = std::min(kBlock, n - base);
    T* __restrict__ pb = p + base;
    const T* __restrict__ gb = g + base;
    T* __restrict__ bb = MOM ? b + base : nullptr;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const M w = static_cast<M>(pb[i]);
      M d = static_cast<M>(gb[i]) * gsign;
      if (h.has_wd) d = madd<FUSED>(w, h.weight_decay, d);
      if constexpr (MOM) {
        // Load unconditionally (an uninitialised fresh buffer is read, not used) so the
        // choice is a vector select, not a branch.
        const M b_old = static_cast<M>(bb[i]);
        const M bv = fresh ? d : madd<FUSED>(d, h.one_minus_dampening, b_old * h.momentum);
        bb[i] = static_cast<T>(bv);
        d = h.nesterov ? madd<FUSED>(bv, h.momentum, d) : bv;
      }
      if constexpr (STATS) w_old[i] = w;
      pb[i] = static_cast<T>(madd<FUSED>(d, h.neg_lr, w));
    }
    if constexpr (STATS) {
#pragma omp simd reduction(+ : ww, gg, wg, dd, wdl)
      for (int64_t i = 0; i < len; ++i) {
        const double w = w_old[i];
        const double gd = static_cast<M>(gb[i]);
        const double delta = static_cast<double>(static_cast<M>(pb[i])) - w;
        // Fused multiply-adds where the ISA has them: only the statistics, never the
        // update, so bitwise equality with torch is untouched; halves the fp64 work.
        ww = madd<FUSED>(w, w, ww);
        gg = madd<FUSED>(gd, gd, gg);
        wg = madd<FUSED>(w, gd, wg);
        dd = madd<FUSED>(delta, delta, dd);
        wdl = madd<FUSED>(w, delta, wdl);
      }
    }
  }
  if constexpr (STATS) {
    // Σg² is finite when every g is (fp64 squares of fp32 values cannot overflow), so the
    // non-finite entries are counted in a second pass only when Σg² is not.
    if (!std::isfinite(gg)) {
      for (int64_t i = 0; i < n; ++i) nf += nonfinite(static_cast<double>(static_cast<M>(g[i])));
    }
    out[0] = ww;
    out[1] = gg;
    out[2] = wg;
    out[3] = dd;
    out[4] = wdl;
    out[5] = nf;
  }
}

struct Chunk {
  int64_t tensor;  // index into the tensor lists
  int64_t begin;   // element range [begin, end) of that tensor
  int64_t end;
  int64_t row;     // stats row this chunk adds into
  double lr;       // learning rate and weight decay of the chunk's segment
  double wd;
};

struct Work {
  std::vector<at::Tensor> params, grads, bufs;  // contiguous (possibly temporaries)
  std::vector<bool> fresh;
  std::vector<Chunk> chunks;
};

template <typename T, bool FUSED, bool MOM, bool STATS>
SCALEINV_INLINE void chunks_body(const Work& w, const Hyper<math_t<T>>& h, double* partial,
                                 int64_t lo, int64_t hi) {
  for (int64_t c = lo; c < hi; ++c) {
    const Chunk& ch = w.chunks[c];
    // The segment's own lr/wd, rounded to the math type as ATen rounds `alpha` Scalars;
    // a zero weight decay skips the add, as torch does.
    Hyper<math_t<T>> hc = h;
    hc.neg_lr = static_cast<math_t<T>>(-ch.lr);
    hc.weight_decay = static_cast<math_t<T>>(ch.wd);
    hc.has_wd = ch.wd != 0.0;
    T* p = w.params[ch.tensor].data_ptr<T>() + ch.begin;
    const T* g = w.grads[ch.tensor].const_data_ptr<T>() + ch.begin;
    T* b = MOM ? w.bufs[ch.tensor].data_ptr<T>() + ch.begin : nullptr;
    update_range<T, FUSED, MOM, STATS>(p, g, b, ch.end - ch.begin, hc, w.fresh[ch.tensor],
                                       partial + c * kStatCols);
  }
}

// Instruction-set builds of the same loops. They must be whole functions with a target
// attribute (a lambda inside one would be compiled for the baseline ISA, and std::fma
// would become a libm call). Which one runs follows ATen's choice of kernels (see the
// top of the file), so results stay bitwise equal to torch's.
template <typename T>
using ChunkFn = void (*)(const Work&, const Hyper<math_t<T>>&, double*, int64_t, int64_t);

template <typename T, bool FUSED, bool MOM, bool STATS>
void chunks_default(const Work& w, const Hyper<math_t<T>>& h, double* partial, int64_t lo,
                    int64_t hi) {
  chunks_body<T, FUSED, MOM, STATS>(w, h, partial, lo, hi);
}

#ifdef SCALEINV_X86_BUILDS
template <typename T, bool MOM, bool STATS>
SCALEINV_TARGET_AVX512 void chunks_avx512(const Work& w, const Hyper<math_t<T>>& h,
                                          double* partial, int64_t lo, int64_t hi) {
  chunks_body<T, true, MOM, STATS>(w, h, partial, lo, hi);
}
template <typename T, bool MOM, bool STATS>
SCALEINV_TARGET_AVX2 void chunks_avx2(const Work& w, const Hyper<math_t<T>>& h,
                                      double* partial, int64_t lo, int64_t hi) {
  chunks_body<T, true, MOM, STATS>(w, h, partial, lo, hi);
}
#endif

template <typename T, bool MOM, bool STATS>
void run_isa(const Work& w, const Hyper<math_t<T>>& h, std::vector<double>& partial) {
#ifdef SCALEINV_X86_BUILDS
  ChunkFn<T> fn = isa_level() == 2   ? &chunks_avx512<T, MOM, STATS>
                  : isa_level() == 1 ? &chunks_avx2<T, MOM, STATS>
                                     : &chunks_default<T, false, MOM, STATS>;
#else
  // Outside x86 ATen's vector kernels use fused multiply-add (NEON/SVE fmadd).
  ChunkFn<T> fn = &chunks_default<T, true, MOM, STATS>;
#endif
  double* out = partial.data();
  at::parallel_for(0, static_cast<int64_t>(w.chunks.size()), 1,
                   [&](int64_t lo, int64_t hi) { fn(w, h, out, lo, hi); });
}

template <typename T>
void run_typed(const Work& w, double momentum, double dampening, bool nesterov, bool maximize,
               bool stats, std::vector<double>& partial) {
  using M = math_t<T>;
  // Scalars are rounded to the math type exactly as ATen rounds its `alpha` Scalars; lr
  // and weight decay come with each chunk (see chunks_body).
  Hyper<M> h{M(0), M(0), static_cast<M>(momentum), static_cast<M>(1.0 - dampening), false,
             nesterov, maximize};
  const bool mom = momentum != 0.0;
  if (mom && stats) return run_isa<T, true, true>(w, h, partial);
  if (mom) return run_isa<T, true, false>(w, h, partial);
  if (stats) return run_isa<T, false, true>(w, h, partial);
  return run_isa<T, false, false>(w, h, partial);
}

void sgd_wd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                const c10::List<bool>& fresh_buffers, const at::Tensor& stats,
                c10::IntArrayRef stats_rows, c10::IntArrayRef segments,
                const std::optional<at::Tensor>& lr_tensor,
                const std::optional<at::Tensor>& segment_hparams, double lr, double weight_decay,
                double momentum, double dampening, bool nesterov, bool maximize) {
  // ---- validate everything before anything is written ---------------------------
  const size_t n = params.size();
  const char* op = "scaleinv::sgd_wd_: ";
  TORCH_CHECK_VALUE(grads.size() == n, op, "got ", n, " params but ", grads.size(), " grads");
  TORCH_CHECK_VALUE(stats_rows.size() == n && segments.size() == n, op,
                    "stats_rows and segments need one entry per param (", n, ")");
  TORCH_CHECK_VALUE(weight_decay >= 0 && momentum >= 0 && dampening >= 0, op,
                    "weight_decay, momentum and dampening must be >= 0");
  TORCH_CHECK_VALUE(!nesterov || (momentum > 0 && dampening == 0), op,
                    "nesterov needs momentum > 0 and dampening == 0");
  const bool mom = momentum != 0.0;
  TORCH_CHECK_VALUE(!mom || (momentum_buffers.size() == n && fresh_buffers.size() == n), op,
                    "momentum != 0 needs one momentum buffer and one fresh flag per param");
  const bool track = stats.defined() && stats.numel() > 0;
  if (track) {
    TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(1) == kStatCols &&
                          stats.scalar_type() == at::kDouble && stats.is_contiguous() &&
                          stats.device().is_cpu(),
                      op, "stats must be a contiguous float64 CPU tensor of shape [rows, 6], got ",
                      stats.scalar_type(), " ", shape_str(stats));
  }
  if (lr_tensor.has_value()) {
    TORCH_CHECK_VALUE(lr_tensor->numel() == 1 && lr_tensor->device().is_cpu(), op,
                      "lr_tensor must be a one-element CPU tensor");
    lr = lr_tensor->item<double>();
  }
  TORCH_CHECK_VALUE(lr >= 0, op, "lr must be >= 0, got ", lr);
  at::ScalarType dtype = n ? params[0].scalar_type() : at::kFloat;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK_TYPE(p.scalar_type() == dtype, op, "param ", i, " is ", p.scalar_type(),
                     " but param 0 is ", dtype, "; call once per dtype");
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                         dtype == at::kHalf,
                     op, "param ", i, " has dtype ", dtype,
                     "; only float32/float64/bfloat16/float16 params are supported");
    TORCH_CHECK_VALUE(p.layout() == at::kStrided && p.device().is_cpu(), op, "param ", i,
                      " must be a dense CPU tensor");
    TORCH_CHECK_VALUE(g.layout() == at::kStrided, op, "param ", i,
                      " has a sparse gradient; sparse gradients are not supported");
    TORCH_CHECK_VALUE(g.sizes() == p.sizes() && g.scalar_type() == dtype &&
                          g.device() == p.device(),
                      op, "param ", i, " has shape ", shape_str(p), " ", dtype, " on ", p.device(),
                      " but its grad has shape ", shape_str(g), " ", g.scalar_type(), " on ",
                      g.device(), "; a grad must match its param");
    TORCH_CHECK_VALUE(segments[i] >= 1 && p.numel() % segments[i] == 0, op, "param ", i,
                      " with ", p.numel(), " elements cannot be cut into ", segments[i],
                      " equal segments");
    if (mom) {
      const at::Tensor& b = momentum_buffers[i];
      TORCH_CHECK_VALUE(b.sizes() == p.sizes() && b.scalar_type() == dtype &&
                            b.device() == p.device() && b.layout() == at::kStrided,
                        op, "momentum buffer ", i, " must match its param (", shape_str(p), " ",
                        dtype, ")");
    }
    if (track) {
      TORCH_CHECK_VALUE(stats_rows[i] >= 0 && stats_rows[i] + segments[i] <= stats.size(0), op,
                        "stats rows of param ", i, " fall outside stats (", stats.size(0),
                        " rows)");
    }
  }

  // Per-segment (lr, weight_decay): row offset_i + s for segment s of param i.
  at::Tensor hparams;
  if (segment_hparams.has_value()) {
    const at::Tensor& t = *segment_hparams;
    int64_t n_seg = 0;
    for (size_t i = 0; i < n; ++i) n_seg += segments[i];
    TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, op, "segment_hparams must be float64, got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == n_seg && t.size(1) == 2, op,
                      "segment_hparams must have shape [sum(segments), 2] = [", n_seg,
                      ", 2] (one (lr, weight_decay) row per segment), got ", shape_str(t));
    TORCH_CHECK_VALUE(t.layout() == at::kStrided && t.device().is_cpu(), op,
                      "segment_hparams is on ", t.device(),
                      " but the params are on cpu; it must be a dense tensor on their device");
    hparams = t.contiguous();
    const double* hp = hparams.const_data_ptr<double>();
    int64_t r = 0;
    for (size_t i = 0; i < n; ++i) {
      for (int64_t s = 0; s < segments[i]; ++s, ++r) {
        const double slr = hp[2 * r], swd = hp[2 * r + 1];
        TORCH_CHECK_VALUE(std::isfinite(slr) && std::isfinite(swd) && slr >= 0 && swd >= 0, op,
                          "segment_hparams row ", r, " (param ", i, ", segment ", s,
                          ") is (lr=", slr, ", weight_decay=", swd,
                          "); every lr and weight_decay must be finite and >= 0");
      }
    }
  }

  // ---- lay out the work ----------------------------------------------------------
  Work w;
  w.params.reserve(n);
  w.grads.reserve(n);
  w.fresh.assign(n, false);
  int64_t hp_offset = 0;  // first segment_hparams row of param i
  for (size_t i = 0; i < n; ++i) {
    w.params.push_back(params[i].contiguous());
    w.grads.push_back(grads[i].contiguous());
    if (mom) {
      w.bufs.push_back(momentum_buffers[i].contiguous());
      w.fresh[i] = fresh_buffers.get(i);
    }
    const int64_t numel = params[i].numel();
    const int64_t seg_len = numel / segments[i];
    for (int64_t s = 0; s < segments[i] && numel > 0; ++s) {
      double slr = lr, swd = weight_decay;
      if (hparams.defined()) {
        slr = hparams.const_data_ptr<double>()[2 * (hp_offset + s)];
        swd = hparams.const_data_ptr<double>()[2 * (hp_offset + s) + 1];
      }
      for (int64_t b = 0; b < seg_len; b += kChunk) {
        w.chunks.push_back({static_cast<int64_t>(i), s * seg_len + b,
                            s * seg_len + std::min(seg_len, b + kChunk), stats_rows[i] + s, slr,
                            swd});
      }
    }
    hp_offset += segments[i];  // zero-numel params keep their (unused) rows
  }

  std::vector<double> partial(track ? w.chunks.size() * kStatCols : 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "scaleinv::sgd_wd_", [&] {
    run_typed<scalar_t>(w, momentum, dampening, nesterov, maximize, track, partial);
  });

  for (size_t i = 0; i < n; ++i) {
    if (!w.params[i].is_same(params[i])) params[i].copy_(w.params[i]);
    if (mom && !w.bufs[i].is_same(momentum_buffers[i])) momentum_buffers[i].copy_(w.bufs[i]);
  }
  if (track) {
    double* out = stats.data_ptr<double>();
    for (size_t c = 0; c < w.chunks.size(); ++c) {
      double* row = out + w.chunks[c].row * kStatCols;
      for (int k = 0; k < kStatCols; ++k) row[k] += partial[c * kStatCols + k];
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(scaleinv, CPU, m) { m.impl("sgd_wd_", &sgd_wd_cpu); }

}  // namespace scaleinv
