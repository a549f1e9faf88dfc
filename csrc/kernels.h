// The host entry points of every kernel, as bindings.cpp exposes them to Python
// (`kernels._C`). Each validates its inputs (device, dtype, shape, layout) with an error that
// names the problem, allocates its outputs and launches on the current CUDA stream.
// Activations are float32 or bfloat16; saved statistics are float32.
#pragma once

#include <optional>
#include <vector>

#include <ATen/ATen.h>

namespace gptk {

// LayerNorm over the last dim of a contiguous x: returns {y, mean, rstd} (mean/rstd fp32 per row).
std::vector<at::Tensor> layer_norm_forward(const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, double eps);

// s = x + residual, y = LayerNorm(s): returns {s, y, mean, rstd}.
std::vector<at::Tensor> add_layer_norm_forward(const at::Tensor& x, const at::Tensor& residual,
                                               const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias,
                                               double eps);

// Gradients of LayerNorm(x) given dy; with ds (the gradient reaching s = x + residual
// directly) the result is the fused variant's gradient of s. Returns {dx, dweight, dbias}
// (dbias is the bias gradient should there be a bias: the sum of dy over rows).
std::vector<at::Tensor> layer_norm_backward(const at::Tensor& dy,
                                            const std::optional<at::Tensor>& ds,
                                            const at::Tensor& x, const at::Tensor& weight,
                                            const at::Tensor& mean, const at::Tensor& rstd);

// gelu_tanh(pre + bias) for pre (..., H) and bias (H,).
at::Tensor bias_gelu_forward(const at::Tensor& pre, const std::optional<at::Tensor>& bias);

// d pre = d out * gelu_tanh'(pre + bias).
at::Tensor bias_gelu_backward(const at::Tensor& dout, const at::Tensor& pre,
                              const std::optional<at::Tensor>& bias);

// Per-row cross-entropy of logits (N, V) against targets (N,): returns {losses, lse} (fp32;
// 0 loss for ignored rows).
std::vector<at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& targets,
                                              int64_t ignore_index);

// d logits for per-row loss gradients dlosses (N,) fp32, from the saved lse.
at::Tensor cross_entropy_backward(const at::Tensor& dlosses, const at::Tensor& logits,
                                  const at::Tensor& targets, const at::Tensor& lse,
                                  int64_t ignore_index);

// The fused pass: returns the per-row losses and overwrites logits with
// grad_scale * d(loss_row)/d(logits) (grad_scale: a 1-element fp32 tensor on the device).
at::Tensor cross_entropy_forward_backward_(at::Tensor& logits, const at::Tensor& targets,
                                           const at::Tensor& grad_scale, int64_t ignore_index);

// Causal attention on (B, H, T, D) q, k, v: returns {o (B, H, T, D), lse (B, H, T) fp32, in
// log2 units}.
std::vector<at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, double scale);

// Returns {dq, dk, dv}.
std::vector<at::Tensor> attention_backward(const at::Tensor& dout, const at::Tensor& q,
                                           const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& out, const at::Tensor& lse,
                                           double scale);

}  // namespace gptk
