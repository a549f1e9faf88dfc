"""The kernel benchmarks: each op's benchmark problem (`problems`: shapes, work model), the
correctness gate every implementation passes before it is timed (`correctness`), the
suite of every op x implementation x shape x dtype (`suite`), the GPU headline benchmarks
(`headline`) and the fused lm_head + loss memory measurement
(`linear_cross_entropy_memory`)."""
