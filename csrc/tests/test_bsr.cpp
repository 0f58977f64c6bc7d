// Standalone tests for the block-sparse CPU kernels (csrc/cpu/bsr.cpp), without torch or a test
// framework: prints every failed check and exits non-zero if there was one.
//
// Each kernel is compared with a naive double-precision computation on the dense masked weight
// (zeros outside the kept blocks), over block sizes 16/32/64/128, M in {0, 1, 7, 13, 29, 64, 300}
// plus one 1100-row batch, sparsity patterns with uneven rows, empty block rows and columns, fully
// dense block rows and no kept block at all, with and without bias, for float32 / bfloat16 /
// float16 storage and int32 / int64 indices. Inputs are generated already representable in the
// storage type, so the reference sees exactly the kernel's operands and the only expected error
// is float32 accumulation plus the final rounding to the storage type.
//
// Every case also runs under multi-threaded ParallelFor hooks built on std::thread (one that
// splits the range like at::parallel_for, one that hands out single work units to racing
// threads), and their outputs must match the serial_for output bit for bit: the kernels promise
// deterministic results, so a race shows up as a difference (and a skipped task as a NaN).
// Outputs are pre-filled with NaN and padded with guard values, so unwritten elements and
// out-of-bounds writes are caught as well.
//
// The kernels choose their instruction set once per process, so the program re-executes itself
// to cover each path: with SPARSEKERNELS_CPU_ISA unset (AMX where available), then "avx512_bf16",
// "avx512", "avx2", then "generic" (the portable C++ path). Setting the variable runs that path and the ones
// after it; a level the CPU lacks runs the highest one it has (csrc/cpu/isa.h).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__unix__)
#include <unistd.h>
#endif

#include "cpu/bsr.h"

namespace {

using sparsekernels::cpu::bfloat16;
using sparsekernels::cpu::BsrIndex;
using sparsekernels::cpu::float16;
using sparsekernels::cpu::ParallelBody;
using sparsekernels::cpu::ParallelFor;
using sparsekernels::cpu::from_float;
using sparsekernels::cpu::to_float;

int g_failures = 0;
int g_checks = 0;

// ---------------------------------------------------------------------------------------------
// Parallel-for hooks.

struct NamedParallelFor {
  const char* name;
  ParallelFor run;
};

// Like at::parallel_for: one contiguous piece per thread, pieces of at least grain_size items.
ParallelFor make_split_parallel_for(int threads) {
  return [threads](int64_t begin, int64_t end, int64_t grain_size, const ParallelBody& body) {
    if (begin >= end) return;
    const int64_t range = end - begin;
    const int64_t piece = std::max<int64_t>(std::max<int64_t>(grain_size, 1), (range + threads - 1) / threads);
    std::vector<std::thread> workers;
    for (int64_t start = begin; start < end; start += piece) {
      workers.emplace_back([&body, start, end, piece] { body(start, std::min(end, start + piece)); });
    }
    for (std::thread& worker : workers) worker.join();
  };
}

// Threads race for single items, so neighbouring work units run concurrently in every order.
ParallelFor make_racing_parallel_for(int threads) {
  return [threads](int64_t begin, int64_t end, int64_t /*grain_size*/, const ParallelBody& body) {
    if (begin >= end) return;
    std::atomic<int64_t> next{begin};
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&] {
        for (int64_t item = next.fetch_add(1); item < end; item = next.fetch_add(1)) body(item, item + 1);
      });
    }
    for (std::thread& worker : workers) worker.join();
  };
}

// ---------------------------------------------------------------------------------------------
// Storage types.

template <typename scalar_t>
const char* dtype_name() {
  if constexpr (std::is_same_v<scalar_t, float>) return "float32";
  if constexpr (std::is_same_v<scalar_t, bfloat16>) return "bfloat16";
  return "float16";
}

// Relative error allowed by the final rounding to the storage type (one unit in the last place,
// twice the worst case of round-to-nearest).
template <typename scalar_t>
double rounding_tolerance() {
  if constexpr (std::is_same_v<scalar_t, float>) return 1.2e-7;
  if constexpr (std::is_same_v<scalar_t, bfloat16>) return 1.0 / 128;
  return 1.0 / 1024;
}

// Absolute error allowed by rounding into the subnormal range: one subnormal step for float16
// (2^-24); the other types' subnormals are far below anything these tests produce.
template <typename scalar_t>
double subnormal_tolerance() {
  return std::is_same_v<scalar_t, float16> ? 5.9604644775390625e-08 : 0.0;
}

// Error allowed by float32 accumulation, relative to sum |a_i * b_i| of the exact dot product.
constexpr double kAccumulationTolerance = 2e-6;

template <typename scalar_t>
bool same_bits(scalar_t a, scalar_t b) {
  return std::memcmp(&a, &b, sizeof(scalar_t)) == 0;
}

template <typename scalar_t>
scalar_t nan_value() {
  return from_float<scalar_t>(std::numeric_limits<float>::quiet_NaN());
}

// ---------------------------------------------------------------------------------------------
// Sparsity patterns and their BSR / CSC indexes.

struct Pattern {
  std::string name;
  int64_t n_block_rows;
  int64_t n_block_cols;
  std::vector<char> kept;  // [n_block_rows][n_block_cols]

  bool is_kept(int64_t row, int64_t col) const { return kept[row * n_block_cols + col] != 0; }
};

// Three patterns per grid: "uneven" (random rows of different lengths, one empty block row, one
// empty block column), "dense-row" (one block row fully kept, another empty) and "empty".
std::vector<Pattern> make_patterns(int64_t n_block_rows, int64_t n_block_cols, std::mt19937& rng) {
  std::bernoulli_distribution coin(0.45);
  Pattern uneven{"uneven", n_block_rows, n_block_cols, std::vector<char>(n_block_rows * n_block_cols)};
  for (int64_t row = 0; row < n_block_rows; ++row) {
    for (int64_t col = 0; col < n_block_cols; ++col) {
      const bool empty_row = row == 1;
      const bool empty_col = col == n_block_cols - 2;
      uneven.kept[row * n_block_cols + col] = !empty_row && !empty_col && (row == col || coin(rng));
    }
  }
  Pattern dense_row{"dense-row", n_block_rows, n_block_cols, std::vector<char>(n_block_rows * n_block_cols)};
  for (int64_t row = 0; row < n_block_rows; ++row) {
    for (int64_t col = 0; col < n_block_cols; ++col) {
      const bool kept = row == n_block_rows - 1 || (row != 0 && coin(rng));
      dense_row.kept[row * n_block_cols + col] = kept;
    }
  }
  Pattern empty{"empty", n_block_rows, n_block_cols, std::vector<char>(n_block_rows * n_block_cols, 0)};
  return {uneven, dense_row, empty};
}

template <typename index_t>
struct OwnedIndex {
  std::vector<index_t> row_offsets, col_indices, col_offsets, row_indices, value_indices;
  BsrIndex<index_t> view;
};

template <typename index_t>
OwnedIndex<index_t> build_index(const Pattern& pattern, int64_t block_size) {
  OwnedIndex<index_t> index;
  std::vector<int64_t> value_of(pattern.kept.size(), -1);  // (row, col) -> position in BSR order
  index.row_offsets.push_back(0);
  for (int64_t row = 0; row < pattern.n_block_rows; ++row) {
    for (int64_t col = 0; col < pattern.n_block_cols; ++col) {
      if (!pattern.is_kept(row, col)) continue;
      value_of[row * pattern.n_block_cols + col] = static_cast<int64_t>(index.col_indices.size());
      index.col_indices.push_back(static_cast<index_t>(col));
    }
    index.row_offsets.push_back(static_cast<index_t>(index.col_indices.size()));
  }
  index.col_offsets.push_back(0);
  for (int64_t col = 0; col < pattern.n_block_cols; ++col) {
    for (int64_t row = 0; row < pattern.n_block_rows; ++row) {
      if (!pattern.is_kept(row, col)) continue;
      index.row_indices.push_back(static_cast<index_t>(row));
      index.value_indices.push_back(static_cast<index_t>(value_of[row * pattern.n_block_cols + col]));
    }
    index.col_offsets.push_back(static_cast<index_t>(index.row_indices.size()));
  }
  index.view = BsrIndex<index_t>{index.row_offsets.data(),
                                 index.col_indices.data(),
                                 index.col_offsets.data(),
                                 index.row_indices.data(),
                                 index.value_indices.data(),
                                 pattern.n_block_rows,
                                 pattern.n_block_cols,
                                 block_size,
                                 static_cast<int64_t>(index.col_indices.size())};
  return index;
}

// ---------------------------------------------------------------------------------------------
// Output buffers with guard values on both sides.

constexpr int64_t kGuard = 64;

template <typename scalar_t>
struct GuardedOutput {
  std::vector<scalar_t> storage;
  int64_t size;

  explicit GuardedOutput(int64_t count) : storage(count + 2 * kGuard, nan_value<scalar_t>()), size(count) {
    for (int64_t i = 0; i < kGuard; ++i) {
      storage[i] = from_float<scalar_t>(12345.0f);
      storage[kGuard + count + i] = from_float<scalar_t>(12345.0f);
    }
  }
  scalar_t* data() { return storage.data() + kGuard; }
  const scalar_t* data() const { return storage.data() + kGuard; }
  bool guards_intact() const {
    for (int64_t i = 0; i < kGuard; ++i) {
      if (!same_bits(storage[i], from_float<scalar_t>(12345.0f))) return false;
      if (!same_bits(storage[kGuard + size + i], from_float<scalar_t>(12345.0f))) return false;
    }
    return true;
  }
};

// ---------------------------------------------------------------------------------------------
// Reference results (double precision, dense masked weight) and comparison.

struct Expected {
  std::vector<double> value;      // exact result
  std::vector<double> magnitude;  // sum of |products| that make it up, for the accumulation bound

  Expected() = default;
  explicit Expected(int64_t count) : value(count, 0.0), magnitude(count, 0.0) {}
  // Adds one product to element i.
  void add(int64_t i, double product) {
    value[i] += product;
    magnitude[i] += std::fabs(product);
  }
};

void check(bool condition, const std::string& what) {
  ++g_checks;
  if (!condition) {
    ++g_failures;
    if (g_failures <= 50) std::printf("FAIL: %s\n", what.c_str());
  }
}

// Compares got with expected within the tolerances; reports the first mismatching element.
template <typename scalar_t>
void check_close(const scalar_t* got, const Expected& expected, const std::string& what) {
  const double rounding = rounding_tolerance<scalar_t>();
  for (size_t i = 0; i < expected.value.size(); ++i) {
    const double value = to_float(got[i]);
    const double tolerance = rounding * std::fabs(expected.value[i]) + kAccumulationTolerance * expected.magnitude[i] +
                             subnormal_tolerance<scalar_t>();
    if (!(std::fabs(value - expected.value[i]) <= tolerance)) {
      char detail[160];
      std::snprintf(detail, sizeof(detail), " (element %zu: got %.9g, expected %.9g, tolerance %.3g)", i, value,
                    expected.value[i], tolerance);
      check(false, what + detail);
      return;
    }
  }
  check(true, what);
}

template <typename scalar_t>
void check_identical(const GuardedOutput<scalar_t>& got, const GuardedOutput<scalar_t>& serial,
                     const std::string& what) {
  for (int64_t i = 0; i < got.size; ++i) {
    if (!same_bits(got.data()[i], serial.data()[i])) {
      check(false, what + " differs from serial_for at element " + std::to_string(i));
      return;
    }
  }
  check(true, what);
}

struct Problem {
  int64_t block_size;
  int64_t M;
  int64_t out_features;
  int64_t in_features;
};

// Dense masked weight [out][in] from the stored blocks.
template <typename scalar_t>
std::vector<double> dense_weight(const Pattern& pattern, const Problem& problem, const std::vector<scalar_t>& values) {
  const int64_t b = problem.block_size;
  std::vector<double> weight(problem.out_features * problem.in_features, 0.0);
  int64_t block = 0;
  for (int64_t row = 0; row < pattern.n_block_rows; ++row) {
    for (int64_t col = 0; col < pattern.n_block_cols; ++col) {
      if (!pattern.is_kept(row, col)) continue;
      for (int64_t n = 0; n < b; ++n) {
        for (int64_t k = 0; k < b; ++k) {
          weight[(row * b + n) * problem.in_features + col * b + k] = to_float(values[(block * b + n) * b + k]);
        }
      }
      ++block;
    }
  }
  return weight;
}

template <typename scalar_t>
std::vector<double> widen(const std::vector<scalar_t>& values) {
  std::vector<double> result(values.size());
  for (size_t i = 0; i < values.size(); ++i) result[i] = to_float(values[i]);
  return result;
}

// ---------------------------------------------------------------------------------------------
// One (pattern, block size, M, dtype) case.

template <typename scalar_t>
std::vector<scalar_t> random_values(int64_t count, std::mt19937& rng) {
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<scalar_t> values(count);
  for (scalar_t& value : values) value = from_float<scalar_t>(uniform(rng));
  return values;
}

template <typename scalar_t>
struct CaseData {
  Problem problem;
  std::vector<scalar_t> x, values, bias, grad_out;
  Expected forward, forward_bias, grad_input, grad_values;
};

template <typename scalar_t>
CaseData<scalar_t> make_case(const Pattern& pattern, int64_t block_size, int64_t M, std::mt19937& rng) {
  CaseData<scalar_t> data;
  Problem& p = data.problem;
  p = Problem{block_size, M, pattern.n_block_rows * block_size, pattern.n_block_cols * block_size};
  int64_t nnz = 0;
  for (char kept : pattern.kept) nnz += kept != 0;
  data.x = random_values<scalar_t>(M * p.in_features, rng);
  data.values = random_values<scalar_t>(nnz * block_size * block_size, rng);
  data.bias = random_values<scalar_t>(p.out_features, rng);
  data.grad_out = random_values<scalar_t>(M * p.out_features, rng);

  const std::vector<double> weight = dense_weight(pattern, p, data.values);
  const std::vector<double> x = widen(data.x), grad_out = widen(data.grad_out), bias = widen(data.bias);

  // Calls visit(i) for every input column i of the kept blocks of output row o, in increasing
  // order. The references skip whole masked-out blocks of W: they hold exact zeros and only cost time.
  const int64_t b = block_size;
  const auto for_each_kept_column = [&](int64_t o, const auto& visit) {
    for (int64_t col = 0; col < pattern.n_block_cols; ++col) {
      if (!pattern.is_kept(o / b, col)) continue;
      for (int64_t i = col * b; i < (col + 1) * b; ++i) visit(i);
    }
  };

  // forward: y[m][o] = sum_i x[m][i] W[o][i] (+ bias[o])
  data.forward = Expected(M * p.out_features);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t o = 0; o < p.out_features; ++o) {
      double sum = 0.0, magnitude = 0.0;  // locals, so that the loop keeps them in registers
      for_each_kept_column(o, [&](int64_t i) {
        const double product = x[m * p.in_features + i] * weight[o * p.in_features + i];
        sum += product;
        magnitude += std::fabs(product);
      });
      data.forward.value[m * p.out_features + o] = sum;
      data.forward.magnitude[m * p.out_features + o] = magnitude;
    }
  }
  data.forward_bias = data.forward;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t o = 0; o < p.out_features; ++o) data.forward_bias.add(m * p.out_features + o, bias[o]);
  }

  // grad_input: dx[m][i] = sum_o dy[m][o] W[o][i]
  data.grad_input = Expected(M * p.in_features);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t o = 0; o < p.out_features; ++o) {
      const double dy = grad_out[m * p.out_features + o];
      for_each_kept_column(o, [&](int64_t i) {
        data.grad_input.add(m * p.in_features + i, dy * weight[o * p.in_features + i]);
      });
    }
  }

  // grad_values: the weight gradient dW[o][i] = sum_m dy[m][o] x[m][i], read at kept blocks.
  Expected dense_grad(p.out_features * p.in_features);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t o = 0; o < p.out_features; ++o) {
      const double dy = grad_out[m * p.out_features + o];
      for_each_kept_column(o, [&](int64_t i) { dense_grad.add(o * p.in_features + i, dy * x[m * p.in_features + i]); });
    }
  }
  for (int64_t row = 0; row < pattern.n_block_rows; ++row) {
    for (int64_t col = 0; col < pattern.n_block_cols; ++col) {
      if (!pattern.is_kept(row, col)) continue;
      for (int64_t n = 0; n < b; ++n) {
        for (int64_t k = 0; k < b; ++k) {
          const int64_t dense = (row * b + n) * p.in_features + col * b + k;
          data.grad_values.value.push_back(dense_grad.value[dense]);
          data.grad_values.magnitude.push_back(dense_grad.magnitude[dense]);
        }
      }
    }
  }
  return data;
}

template <typename scalar_t>
struct KernelOutputs {
  GuardedOutput<scalar_t> forward, grad_input, grad_values;

  bool guards_intact() const {
    return forward.guards_intact() && grad_input.guards_intact() && grad_values.guards_intact();
  }
};

template <typename scalar_t, typename index_t>
KernelOutputs<scalar_t> run_kernels(const CaseData<scalar_t>& data, const BsrIndex<index_t>& index,
                                           bool with_bias, const ParallelFor& parallel_for) {
  const Problem& p = data.problem;
  KernelOutputs<scalar_t> out{GuardedOutput<scalar_t>(p.M * p.out_features),
                              GuardedOutput<scalar_t>(p.M * p.in_features),
                              GuardedOutput<scalar_t>(static_cast<int64_t>(data.values.size()))};
  sparsekernels::cpu::bsr_linear_forward<scalar_t, index_t>(data.x.data(), p.M, data.values.data(), index,
                                                             with_bias ? data.bias.data() : nullptr,
                                                             out.forward.data(), parallel_for);
  sparsekernels::cpu::bsr_linear_grad_input<scalar_t, index_t>(data.grad_out.data(), p.M, data.values.data(), index,
                                                                out.grad_input.data(), parallel_for);
  sparsekernels::cpu::bsr_linear_grad_values<scalar_t, index_t>(data.grad_out.data(), data.x.data(), p.M, index,
                                                                 out.grad_values.data(), parallel_for);
  return out;
}

template <typename scalar_t, typename index_t>
void check_case(const Pattern& pattern, const CaseData<scalar_t>& data, const std::vector<NamedParallelFor>& hooks) {
  const Problem& p = data.problem;
  const OwnedIndex<index_t> owned = build_index<index_t>(pattern, p.block_size);
  for (bool with_bias : {false, true}) {
    char label[160];
    std::snprintf(label, sizeof(label), "%s b=%lld M=%lld int%d pattern=%s bias=%d", dtype_name<scalar_t>(),
                  static_cast<long long>(p.block_size), static_cast<long long>(p.M),
                  static_cast<int>(8 * sizeof(index_t)), pattern.name.c_str(), with_bias ? 1 : 0);
    const std::string base(label);
    const auto serial = run_kernels(data, owned.view, with_bias, hooks[0].run);
    check_close(serial.forward.data(), with_bias ? data.forward_bias : data.forward, base + " forward");
    check_close(serial.grad_input.data(), data.grad_input, base + " grad_input");
    check_close(serial.grad_values.data(), data.grad_values, base + " grad_values");
    check(serial.guards_intact(), base + " writes stay inside the outputs");
    for (size_t h = 1; h < hooks.size(); ++h) {
      const std::string name = base + " [" + hooks[h].name + "]";
      const auto threaded = run_kernels(data, owned.view, with_bias, hooks[h].run);
      check_identical(threaded.forward, serial.forward, name + " forward");
      check_identical(threaded.grad_input, serial.grad_input, name + " grad_input");
      check_identical(threaded.grad_values, serial.grad_values, name + " grad_values");
      check(threaded.guards_intact(), name + " writes stay inside the outputs");
    }
  }
}

template <typename scalar_t>
void run_dtype(const Pattern& pattern, int64_t block_size, int64_t M, std::mt19937& rng,
               const std::vector<NamedParallelFor>& hooks) {
  const CaseData<scalar_t> data = make_case<scalar_t>(pattern, block_size, M, rng);
  check_case<scalar_t, int32_t>(pattern, data, hooks);
  check_case<scalar_t, int64_t>(pattern, data, hooks);
}

// Grid of blocks per block size: small blocks get more of them, so that lines hold several
// kept blocks and the parallel split has work to cut.
struct Grid {
  int64_t block_size, n_block_rows, n_block_cols;
};

void run_all() {
  const std::vector<NamedParallelFor> hooks = {
      {"serial_for", sparsekernels::cpu::serial_for},
      {"3 threads, split", make_split_parallel_for(3)},
      {"4 threads, racing", make_racing_parallel_for(4)},
  };
  const Grid grids[] = {{16, 9, 8}, {32, 6, 7}, {64, 5, 4}, {128, 4, 3}};
  // 13 and 29 reach the AMX path with less than one full 16-row tile and with a full tile plus a
  // partial one, and the float32 micro-kernel's remainder strips.
  const int64_t batch_sizes[] = {0, 1, 7, 13, 29, 64, 300};
  std::mt19937 rng(20240611);
  for (const Grid& grid : grids) {
    for (const Pattern& pattern : make_patterns(grid.n_block_rows, grid.n_block_cols, rng)) {
      for (int64_t M : batch_sizes) {
        run_dtype<float>(pattern, grid.block_size, M, rng, hooks);
        run_dtype<bfloat16>(pattern, grid.block_size, M, rng, hooks);
        run_dtype<float16>(pattern, grid.block_size, M, rng, hooks);
      }
    }
  }
  // A long batch, so that every kernel also splits M into several chunks / slices (the AMX
  // grad_values slices are 1024 rows).
  const Pattern long_batch = make_patterns(5, 4, rng)[0];
  run_dtype<float>(long_batch, 32, 1100, rng, hooks);
  run_dtype<bfloat16>(long_batch, 32, 1100, rng, hooks);
  run_dtype<float16>(long_batch, 32, 1100, rng, hooks);
}

}  // namespace

int main(int argc, char** argv) {
  (void)argc;
  const char* isa = std::getenv("SPARSEKERNELS_CPU_ISA");
  run_all();
  std::printf("test_bsr [SPARSEKERNELS_CPU_ISA=%s]: %d checks, %d failed\n", isa != nullptr ? isa : "(auto)", g_checks,
              g_failures);
  if (g_failures > 0) return 1;

  // Next instruction-set path: auto -> avx512_bf16 -> avx512 -> avx2 -> generic. The choice is
  // made once per process. (Where auto is avx512_bf16 that level runs twice; the cost is seconds.)
  const char* next = nullptr;
  if (isa == nullptr) {
    next = "avx512_bf16";
  } else if (std::strcmp(isa, "avx512_bf16") == 0) {
    next = "avx512";
  } else if (std::strcmp(isa, "avx512") == 0) {
    next = "avx2";
  } else if (std::strcmp(isa, "avx2") == 0) {
    next = "generic";
  }
  if (next == nullptr) return 0;
#if defined(__unix__)
  setenv("SPARSEKERNELS_CPU_ISA", next, 1);
  std::fflush(stdout);
#if defined(__linux__)
  execv("/proc/self/exe", argv);
#endif
  execv(argv[0], argv);
  std::perror("test_bsr: re-executing for the next instruction set failed");
  return 1;
#else
  (void)argv;
  std::printf("test_bsr: re-execution unsupported here; set SPARSEKERNELS_CPU_ISA to test the other paths\n");
  return 0;
#endif
}
