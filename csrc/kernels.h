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

// gelu(pre + bias) for pre (..., H) and bias (H,): GPT-2's tanh approximation when
// approximate_tanh, else the exact erf form.
at::Tensor bias_gelu_forward(const at::Tensor& pre, const std::optional<at::Tensor>& bias,
                             bool approximate_tanh);

// d pre = d out * gelu'(pre + bias), in the same flavour.
at::Tensor bias_gelu_backward(const at::Tensor& dout, const at::Tensor& pre,
                              const std::optional<at::Tensor>& bias, bool approximate_tanh);

// Per-row cross-entropy of logits (N, V) against targets (N,): returns {losses, lse} (fp32;
// 0 loss for ignored rows). The loss variants (0: off): label smoothing, the z-loss
// coefficient, the logit soft cap (lse is then that of the capped logits).
std::vector<at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& targets,
                                              int64_t ignore_index, double smoothing,
                                              double z_loss, double softcap);

// d logits for per-row loss gradients dlosses (N,) fp32, from the saved lse.
at::Tensor cross_entropy_backward(const at::Tensor& dlosses, const at::Tensor& logits,
                                  const at::Tensor& targets, const at::Tensor& lse,
                                  int64_t ignore_index, double smoothing, double z_loss,
                                  double softcap);

// The fused pass: returns {losses, lse} per row and overwrites logits with
// row_weight[row] * d(loss_row)/d(logits) (row_weight: fp32 (rows,) on the device, any
// stride: an expanded scalar weighs every row alike).
std::vector<at::Tensor> cross_entropy_forward_backward_(at::Tensor& logits,
                                                        const at::Tensor& targets,
                                                        const at::Tensor& row_weight,
                                                        int64_t ignore_index, double smoothing,
                                                        double z_loss, double softcap);

// Causal attention on (B, H, T, D) q and (B, H, T_K, D) k, v, T_K >= T (the mask aligned to
// the bottom-right): returns {o (B, H, T, D), lse (B, H, T) fp32, in log2 units}. `version`
// (1 or 2) picks the bf16 kernels (attention.cu); fp32 has one. With dropout_p > 0 the
// probabilities are dropped by the mask of (seed, offset) (philox.cuh).
std::vector<at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, double scale, int64_t version,
                                          double dropout_p, int64_t seed, int64_t offset);

// Returns {dq, dk, dv}. `deterministic` gives version 2 a dQ without atomics (run-to-run
// identical); version 1 and fp32 are deterministic anyway. The dropout arguments must be
// the forward's: the mask is regenerated, not stored.
std::vector<at::Tensor> attention_backward(const at::Tensor& dout, const at::Tensor& q,
                                           const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& out, const at::Tensor& lse,
                                           double scale, int64_t version, bool deterministic,
                                           double dropout_p, int64_t seed, int64_t offset);

}  // namespace gptk
