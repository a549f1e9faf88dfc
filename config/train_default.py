# `make train`: a small character-level GPT on the embedded corpus (the documentation that
# ships with Python, see gpt/corpus.py), so it runs offline on whatever machine is present.
# With a CUDA GPU: nanoGPT's baby Shakespeare model, bf16, the fastest kernels per op.
# Without one: a 0.8M-parameter model on the CPU that trains in about two minutes on
# two cores, with the torch backend. Either way it saves out-default/ckpt.pt for gpt.sample.
import torch

out_dir = 'out-default'
dataset = 'default'
tokenizer = 'char'
always_save_checkpoint = False  # save when the val loss improves
eval_interval = 250
log_interval = 50
gradient_accumulation_steps = 1
learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
compile = False  # compiling would cost more time than it saves on a run this short

if torch.cuda.is_available():
    device = 'cuda'
    backend = 'auto'
    dtype = 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    eval_iters = 100
    batch_size = 64
    block_size = 256
    n_layer = 6
    n_head = 6
    n_embd = 384
    dropout = 0.2
else:
    device = 'cpu'
    backend = 'torch'
    dtype = 'float32'
    eval_iters = 20
    batch_size = 12
    block_size = 64
    n_layer = 4
    n_head = 4
    n_embd = 128
    dropout = 0.0
