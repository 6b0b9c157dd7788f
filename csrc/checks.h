// Shared by the ops' argument checks (anonymous namespaces of the kernel files): the
// pieces of their error messages and the check of a per-channel vector argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>

namespace scaleinv {

// "[2, 3, 4]": a shape as error messages print it.
inline std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << sizes;
  return os.str();
}

inline std::string shape_str(const at::Tensor& t) { return shape_str(t.sizes()); }

// A per-channel vector (weight, bias, mean, invstd) of an op on x: [C], x's dtype, dense,
// on x's device. Absent optionals pass.
inline void check_channel_vec(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& x, int64_t C) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C, op, name, " must have shape [C] = [", C,
                    "], got ", shape_str(t));
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, name, " must have x's dtype ",
                   x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device() && t.layout() == at::kStrided, op, name,
                    " must be a dense tensor on x's device");
}

inline void check_channel_vec(const char* op, const char* name,
                              const std::optional<at::Tensor>& t, const at::Tensor& x,
                              int64_t C) {
  if (t.has_value()) check_channel_vec(op, name, *t, x, C);
}

// The optional vector checked as above, as a contiguous tensor (an absent one stays absent).
inline std::optional<at::Tensor> contiguous_channel_vec(const char* op, const char* name,
                                                        const std::optional<at::Tensor>& t,
                                                        const at::Tensor& x, int64_t C) {
  check_channel_vec(op, name, t, x, C);
  if (!t.has_value()) return std::nullopt;
  return t->contiguous();
}

}  // namespace scaleinv
