// The Python module `kernels._C`: one function per kernel entry point (declared in
// kernels.h). kernels/cuda/ wraps each in a torch.library custom op with autograd.
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gpt-kernels: hand-written CUDA kernels for the hot paths of a GPT";
  m.def("layer_norm_forward", &gptk::layer_norm_forward, "LayerNorm: -> (y, mean, rstd)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("add_layer_norm_forward", &gptk::add_layer_norm_forward,
        "s = x + residual, LayerNorm(s): -> (s, y, mean, rstd)", py::arg("x"), py::arg("residual"),
        py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("layer_norm_backward", &gptk::layer_norm_backward,
        "LayerNorm backward (+ ds for the residual-fused variant): -> (dx, dweight, dbias)",
        py::arg("dy"), py::arg("ds"), py::arg("x"), py::arg("weight"), py::arg("mean"),
        py::arg("rstd"));
  m.def("bias_gelu_forward", &gptk::bias_gelu_forward,
        "gelu(pre + bias), tanh-approximated or exact", py::arg("pre"), py::arg("bias"),
        py::arg("approximate_tanh"));
  m.def("bias_gelu_backward", &gptk::bias_gelu_backward, "dout * gelu'(pre + bias)",
        py::arg("dout"), py::arg("pre"), py::arg("bias"), py::arg("approximate_tanh"));
  m.def("cross_entropy_forward", &gptk::cross_entropy_forward,
        "per-row cross-entropy (loss variants: 0 = off): -> (losses, lse)", py::arg("logits"),
        py::arg("targets"), py::arg("ignore_index"), py::arg("smoothing"), py::arg("z_loss"),
        py::arg("softcap"));
  m.def("cross_entropy_backward", &gptk::cross_entropy_backward,
        "d logits from per-row loss gradients", py::arg("dlosses"), py::arg("logits"),
        py::arg("targets"), py::arg("lse"), py::arg("ignore_index"), py::arg("smoothing"),
        py::arg("z_loss"), py::arg("softcap"));
  m.def("cross_entropy_forward_backward_", &gptk::cross_entropy_forward_backward_,
        "per-row (losses, lse); logits overwritten with row_weight * d loss / d logits",
        py::arg("logits"), py::arg("targets"), py::arg("row_weight"), py::arg("ignore_index"),
        py::arg("smoothing"), py::arg("z_loss"), py::arg("softcap"));
  m.def("attention_forward", &gptk::attention_forward,
        "causal attention, keys >= queries, dropout by (seed, offset) (bf16 kernels: version 1 "
        "or 2): -> (out, lse in log2 units)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"), py::arg("version"),
        py::arg("dropout_p"), py::arg("seed"), py::arg("offset"));
  m.def("attention_backward", &gptk::attention_backward,
        "causal attention backward (deterministic: version 2 without atomics): -> (dq, dk, dv)",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("scale"), py::arg("version"), py::arg("deterministic"), py::arg("dropout_p"),
        py::arg("seed"), py::arg("offset"));
}
