"""Training benchmarks: the CLI's own step timed in-process (`loop`), end-to-end training
and sampling (`e2e`), the design sweep (`sweep`), nanoGPT's model re-implemented as an
in-process baseline (`nanogpt_baseline`) and whole processes of ours and nanoGPT's
train.py side by side (`side_by_side`)."""
