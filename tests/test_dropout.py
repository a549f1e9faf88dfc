"""Attention dropout: the mask's definition (kernels/philox.py), the kernels computing
exactly it, and its statistics.

The conformance suite judges every backend's dropout calls against the reference with the
same mask (cases with a dropout_seed). Here: Philox4x32-10 against Random123's known
answers; the Triton kernels' mask tiles against the reference mask bit for bit; the keep
rate, the 1 / (1 - p) scale and the independence of the mask across heads, positions and
calls, measured on the reference mask and on each backend's outputs (seeded and fresh);
fresh seeds follow torch.manual_seed. With 5-sigma bounds the statistical tests fail by
chance about once in 3.5 million runs, and they are deterministic under the fixed seeds.
"""
import math

import pytest
import torch

import kernels
from kernels import philox

BACKENDS = [b for b in kernels.BACKENDS if kernels.available_backends()[b].available]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIGMAS = 5.0


def assert_rate(hits: torch.Tensor, expected: float, what: str):
    """The mean of the bool tensor `hits` is `expected` within SIGMAS binomial sigmas."""
    n = hits.numel()
    sigma = math.sqrt(expected * (1 - expected) / n)
    rate = hits.float().mean().item()
    assert abs(rate - expected) <= SIGMAS * sigma, \
        f"{what}: rate {rate:.5f} over {n} draws, expected {expected:.5f} +- {SIGMAS * sigma:.5f}"


# ----------------------------------------------------------------------------- definition

@pytest.mark.parametrize("counter, key, words", [
    # Random123's kat_vectors for philox4x32 with 10 rounds.
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((2 ** 32 - 1,) * 4, (2 ** 32 - 1,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_gives_random123s_known_answers(counter, key, words):
    assert tuple(int(w) for w in philox.philox4x32(counter, key)) == words


def test_mask_layout_is_the_documented_one():
    """(i, j) of head bh reads the 16-bit half j mod 2 of word (i div 8 mod 2) * 2 +
    (j div 8 mod 2) of counter (i div 16 * 8 + i mod 8, j div 16 * 4 + (j mod 8) div 2, bh,
    offset), and is kept iff that number >= threshold."""
    seed, offset, p = 2 ** 63 + 99, 5, 0.4
    mask = philox.keep_mask((seed, offset), p, 2, 3, 40, 40)
    for bh, i, j in ((0, 0, 0), (4, 26, 39), (5, 3, 17), (2, 9, 9), (1, 39, 24)):
        words = philox.philox4x32((i // 16 * 8 + i % 8, j // 16 * 4 + j % 8 // 2, bh, offset),
                                  (seed % 2 ** 32, seed >> 32))
        number = int(words[i // 8 % 2 * 2 + j // 8 % 2]) >> (16 * (j % 2)) & 0xFFFF
        assert mask[bh // 3, bh % 3, i, j].item() == (number >= philox.threshold(p))


def test_threshold_and_seed_checks():
    assert philox.threshold(0.0) == 0 and philox.threshold(0.5) == 2 ** 15
    assert philox.threshold(1 - 2 ** -40) == 2 ** 16 - 1  # p < 1 always keeps something
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        philox.threshold(1.0)
    with pytest.raises(TypeError, match="pair of ints"):
        philox.check_seed((1, 2.0))
    with pytest.raises(ValueError, match="seed < 2\\^64"):
        philox.check_seed((2 ** 64, 0))
    seed, offset = philox.draw_seed().tolist()
    assert 0 <= seed < 2 ** 62 and 0 <= offset < 2 ** 32
    assert philox.kernel_words(philox.seed_tensor((2 ** 64 - 1, 2 ** 32 - 1)), 0.5) == \
        (-1, -1, -1, 2 ** 15)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable")
@pytest.mark.parametrize("dropout_seed, p, shape", [
    ((0, 0), 0.1, (1, 2, 33, 70)),
    ((2 ** 64 - 7, 2 ** 32 - 1), 0.5, (2, 1, 5, 17)),
    ((123456789, 42), 0.9, (1, 1, 64, 64)),
])
def test_triton_tiles_compute_the_reference_mask(dropout_seed, p, shape):
    from kernels.triton.dropout import keep_mask

    expected = philox.keep_mask(dropout_seed, p, *shape)
    assert torch.equal(keep_mask(dropout_seed, p, *shape, DEVICE).cpu(), expected)


# ----------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mask_keep_rate_and_independence(p):
    """Over 2 x 4 heads of 256 x 256: the keep rate, and the joint keep rate (1 - p)^2 of
    pairs that must be independent: two heads, neighbouring queries, the 8 elements one
    Philox call decides ((i, i + 8) x (j, j + 1, j + 8, j + 9)), neighbouring counters,
    and two calls."""
    keep = philox.keep_mask((2024, 0), p, 2, 4, 256, 256)
    both = (1 - p) ** 2
    assert_rate(keep, 1 - p, "keep rate")
    assert_rate(keep[:, 0] & keep[:, 1], both, "two heads")
    assert_rate(keep[:, :, :-1] & keep[:, :, 1:], both, "neighbouring queries")
    assert_rate(keep[:, :, :-8] & keep[:, :, 8:], both, "queries 8 apart (one counter)")
    assert_rate(keep[:, :, :-8, :-9] & keep[:, :, 8:, 9:], both, "one counter's corners")
    assert_rate(keep[..., :-1] & keep[..., 1:], both, "neighbouring keys (one counter)")
    assert_rate(keep[..., :-8] & keep[..., 8:], both, "keys 8 apart (one counter)")
    assert_rate(keep[..., :-16] & keep[..., 16:], both, "keys 16 apart (next counter)")
    other_call = philox.keep_mask((2024, 1), p, 2, 4, 256, 256)
    assert_rate(keep & other_call, both, "two offsets of one seed")
    other_seed = philox.keep_mask((2025, 0), p, 2, 4, 256, 256)
    assert_rate(keep & other_seed, both, "two seeds")


def dropped_probabilities(backend, p, dropout_seed=None, b=2, h=4, t=64):
    """Each backend's attention with dropout on q = k = 0 (so P_ij = 1 / (i + 1) over the
    causal row) and V = the identity: the output is the dropped probabilities themselves,
    P Z, whose nonzero entries are P / (1 - p)."""
    q = torch.zeros(b, h, t, t, device=DEVICE)
    eye = torch.eye(t, device=DEVICE).expand(b, h, t, t)
    out = kernels.causal_attention(q, q, eye, None, p, dropout_seed, backend=backend)
    return out.cpu().double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "fresh"])
def test_each_backend_keeps_1_minus_p_and_scales_by_1_over_1_minus_p(backend, seeded):
    """A seeded call drops exactly the reference mask's elements; a fresh one (the
    backend's own draws: SDPA's or the CPU path's on `torch`) keeps them at rate 1 - p.
    Every kept probability is scaled by 1 / (1 - p), so the mean over masks is P."""
    p, t = 0.3, 64
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    probs = causal / torch.arange(1, t + 1, dtype=torch.float64)[:, None]
    torch.manual_seed(0)
    outs = [dropped_probabilities(backend, p, (7, i) if seeded else None) for i in range(6)]
    for i, out in enumerate(outs):
        kept = out != 0
        assert not (kept & ~causal).any()
        torch.testing.assert_close(out[kept], (probs / (1 - p)).expand_as(out)[kept], rtol=1e-5,
                                   atol=0)
        if seeded:
            assert torch.equal(kept, philox.keep_mask((7, i), p, *out.shape) & causal)
    kept = torch.stack([out != 0 for out in outs])[..., causal]
    assert_rate(kept, 1 - p, f"{backend} keep rate")
    assert not torch.equal(kept[0], kept[1])  # calls are independent...
    assert_rate(kept[0] & kept[1], (1 - p) ** 2, f"{backend}: two calls")
    mean = torch.stack(outs).mean(dim=(0, 1, 2))
    n = len(outs) * outs[0].shape[0] * outs[0].shape[1]
    # ...and unbiased: each entry's mean is P within 5 standard errors (P sqrt(p / (1 - p) / n)).
    bound = SIGMAS * probs * math.sqrt(p / (1 - p) / n)
    assert ((mean - probs).abs() <= bound + 1e-12).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_masks_replay_under_torch_manual_seed(backend):
    torch.manual_seed(3)
    first = dropped_probabilities(backend, 0.2, b=1, h=2, t=32)
    second = dropped_probabilities(backend, 0.2, b=1, h=2, t=32)
    torch.manual_seed(3)
    assert torch.equal(dropped_probabilities(backend, 0.2, b=1, h=2, t=32), first)
    assert not torch.equal(first, second)
