// N:M-structured linear kernels for CPU: forward, input gradient and kept-value weight gradient.
//
// The weight W [out_features x in_features] keeps n of every m consecutive weights along the input
// dimension. Per output row it stores kept = in_features * n / m values, group after group:
//   values[out_features][kept]        kept value j belongs to group j / n
//   positions[out_features][position_bytes_per_row]
// where positions packs, for each kept value j, its offset inside its group (0..m-1) in
// bits_per_position(m) bits: value j sits in byte j / positions_per_byte at bit offset
// (j % positions_per_byte) * bits. m = 8 uses 4 bits (not 3) so that no offset straddles a byte.
// Within a group offsets are strictly increasing. The hardware 2:4 metadata layout of the sparse
// tensor cores is a separate encoding derived from this one (csrc/cuda/).
//
// Dense operands are contiguous row-major. Accumulation is always float32.
#pragma once

#include <cstdint>

#include "common.h"

namespace sparsekernels::cpu {

constexpr int bits_per_position(int64_t m) { return m <= 2 ? 1 : (m <= 4 ? 2 : 4); }
constexpr int positions_per_byte(int64_t m) { return 8 / bits_per_position(m); }
constexpr int64_t position_bytes_per_row(int64_t kept_per_row, int64_t m) {
  return (kept_per_row + positions_per_byte(m) - 1) / positions_per_byte(m);
}

struct NMShape {
  int64_t out_features;
  int64_t in_features;  // divisible by m
  int64_t n;            // kept per group, 1 <= n < m
  int64_t m;            // group size: 2, 4, 8 or 16
  int64_t kept_per_row() const { return in_features / m * n; }
  int64_t position_bytes() const { return position_bytes_per_row(kept_per_row(), m); }
};

// y[M, out_features] = x[M, in_features] @ W^T (+ bias when not null).
template <typename scalar_t>
void nm_linear_forward(const scalar_t* x, int64_t M, const scalar_t* values, const uint8_t* positions,
                       const NMShape& shape, const scalar_t* bias, scalar_t* y, const ParallelFor& parallel_for);

// grad_input[M, in_features] = grad_out[M, out_features] @ W.
template <typename scalar_t>
void nm_linear_grad_input(const scalar_t* grad_out, int64_t M, const scalar_t* values, const uint8_t* positions,
                          const NMShape& shape, scalar_t* grad_input, const ParallelFor& parallel_for);

// grad_values[o][j] = sum_m grad_out[m, o] * x[m, column of kept value j of row o]; kept positions
// only, deterministic (each output reduced over all of M by one task).
template <typename scalar_t>
void nm_linear_grad_values(const scalar_t* grad_out, const scalar_t* x, int64_t M, const uint8_t* positions,
                           const NMShape& shape, scalar_t* grad_values, const ParallelFor& parallel_for);

}  // namespace sparsekernels::cpu
