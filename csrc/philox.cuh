// Attention dropout's mask, as kernels/philox.py defines it (the definition every backend
// applies and the reference rebuilds): for head bh, query row i (0 <= i < T_q) and key j,
//     counter = (i / 16 * 8 + i % 8,  j / 16 * 4 + (j % 8) / 2,  bh,  offset)
//     words   = Philox4x32-10(counter, key = (seed_lo, seed_hi))
//     number  = 16-bit half (j % 2) of word (i / 8 % 2) * 2 + (j / 8 % 2)
//     kept   <=> number >= threshold = round(p * 2^16)
// so one Philox call decides the 8 elements (i, i + 8) x (j, j + 1, j + 8, j + 9) of a
// 16 x 16 tile: exactly what one lane of an mma.sync accumulator holds of it (rows g, g + 8,
// columns 2c, 2c + 1, 8 + 2c, 9 + 2c). Kept elements are scaled by 1 / (1 - p) (`scale`).
#pragma once

#include <cstdint>

namespace gptk {

// A call's dropout: enabled iff p > 0 (then scale = 1 / (1 - p)).
struct Dropout {
  uint32_t seed_lo, seed_hi, offset, threshold;  // threshold: 16 bits
  float scale;
  bool enabled;
};

// Philox4x32-10 with Random123's constants: the 4 random words of counter c under key k.
__device__ __forceinline__ uint4 philox4x32(uint4 c, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
    c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// The words of the counter holding query row `row` and key `key` (any of its 8 elements).
__device__ __forceinline__ uint4 dropout_words(const Dropout& d, int bh, int row, int key) {
  const uint32_t counter_row = uint32_t(row / 16 * 8 + row % 8);
  const uint32_t counter_key = uint32_t(key / 16 * 4 + key % 8 / 2);
  return philox4x32(make_uint4(counter_row, counter_key, uint32_t(bh), d.offset), d.seed_lo,
                    d.seed_hi);
}

// Whether element (row, key) is kept, from its counter's words: its number is half
// (key % 2) of word (row / 8 % 2) * 2 + (key / 8 % 2).
__device__ __forceinline__ bool keeps(const Dropout& d, const uint4& w, int row, int key) {
  const int index = row / 8 % 2 * 2 + key / 8 % 2;
  const uint32_t word = index == 0 ? w.x : index == 1 ? w.y : index == 2 ? w.z : w.w;
  return (word >> (16 * (key % 2)) & 0xFFFFu) >= d.threshold;
}

// One element, one Philox call (the fp32 kernels, whose lanes hold one key each).
__device__ __forceinline__ bool dropout_keeps(const Dropout& d, int bh, int row, int key) {
  return keeps(d, dropout_words(d, bh, row, key), row, key);
}

}  // namespace gptk
