// Argument checks shared by the CPU and CUDA wrappers of the CSQ ops (csq_weight and its
// backward). Every message starts with the op name and names the argument. Metadata only: no
// device values are read, so the CUDA wrappers never sync.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "quant_range.h"

namespace rfq {

// p, q: [N, *shape] of one float dtype (fp32 or fp64), N in kCsqMinPlanes..kCsqMaxPlanes; m: [N];
// scale and beta: one value each; all of p's dtype, on p's device.
inline void check_csq_args(const char* op, const at::Tensor& p, const at::Tensor& q,
                           const at::Tensor& m, const at::Tensor& scale, const at::Tensor& beta) {
  const auto dt = p.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, op, ": p must be float32 or float64, got ",
              dt);
  TORCH_CHECK(p.dim() >= 1, op, ": p must be [N, *shape] with N bit planes, got a 0-dim tensor");
  const int64_t n = p.size(0);
  TORCH_CHECK(n >= kCsqMinPlanes && n <= kCsqMaxPlanes, op, ": p must have N in ", kCsqMinPlanes,
              "..", kCsqMaxPlanes, " bit planes (dim 0), got ", n);
  TORCH_CHECK(q.sizes() == p.sizes(), op, ": q must have p's shape ", p.sizes(), ", got ",
              q.sizes());
  TORCH_CHECK(m.dim() == 1 && m.size(0) == n, op, ": m must be [N] = [", n,
              "] (one selection logit per bit plane), got shape ", m.sizes());
  TORCH_CHECK(scale.numel() == 1, op, ": scale must hold one value, got shape ", scale.sizes());
  TORCH_CHECK(beta.numel() == 1, op, ": beta must hold one value, got shape ", beta.sizes());
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"q", &q}, {"m", &m}, {"scale", &scale}, {"beta", &beta}};
  for (const auto& [name, t] : others) {
    TORCH_CHECK(t->scalar_type() == dt, op, ": ", name, " must have p's dtype (", dt, "), got ",
                t->scalar_type());
    TORCH_CHECK(t->device() == p.device(), op, ": ", name, " must be on p's device (",
                p.device(), "), got ", t->device());
  }
}

// grad_w: the weight's shape (p's without its plane dim), p's dtype and device.
inline void check_csq_grad(const char* op, const at::Tensor& grad_w, const at::Tensor& p) {
  TORCH_CHECK(grad_w.device() == p.device(), op, ": grad_w must be on p's device (", p.device(),
              "), got ", grad_w.device());
  TORCH_CHECK(grad_w.scalar_type() == p.scalar_type(), op, ": grad_w must have p's dtype (",
              p.scalar_type(), "), got ", grad_w.scalar_type());
  TORCH_CHECK(grad_w.sizes() == p.sizes().slice(1), op, ": grad_w must have shape ",
              p.sizes().slice(1), ", got ", grad_w.sizes());
}

}  // namespace rfq
