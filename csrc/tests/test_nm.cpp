// Standalone test of the N:M-structured CPU linear kernels (csrc/cpu/nm.cpp), without torch.
//
// Every kernel output is compared with a naive double-precision product on the dense masked
// weight, built from the same (already rounded) inputs, so the only admissible differences are
// fp32 accumulation error and the final rounding to the storage type; both are bounded per
// element (see Tolerance). A wrong column, a lost kept value or an unwritten element is orders of
// magnitude above that bound. Outputs are pre-filled with NaN and followed by guard elements to
// catch elements that are never written or written out of bounds.
//
// Coverage: several n:m patterns (including n that do not divide 16 and in_features whose last
// positions byte is partial), batch sizes that hit every code path (M = 0, the gather path for
// tiny M, one and several batch blocks of 128 with ragged tails), bias or none, float32 /
// bfloat16 / float16, and three parallel-for flavours: serial, std::thread honouring the grain,
// and std::thread splitting into small uneven chunks. The packed position format gets a pack /
// unpack round trip, and the kernels themselves are used to read the dense weight back (identity
// activations), which checks their position decoding bit for bit.
//
// The kernels choose their ISA once per process. The program therefore runs the suite with the
// default choice (AVX-512 where available) and then re-runs itself with
// SPARSEKERNELS_CPU_ISA=generic to cover the portable code. Exit status 0 means all passed.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cpu/isa.h"
#include "cpu/nm.h"

namespace {

using namespace sparsekernels::cpu;

int failure_count = 0;

void fail(const std::string& message) {
  if (failure_count < 50) std::fprintf(stderr, "FAIL: %s\n", message.c_str());
  ++failure_count;
}

// ------------------------------------------------------------------------------------------------
// Storage types.

template <typename T>
struct Dtype;
template <>
struct Dtype<float> {
  static constexpr const char* name = "float32";
  static constexpr double output_relative = 0.0;  // no final rounding
  static constexpr double output_absolute = 0.0;
  static float quiet_nan() { return std::nanf(""); }
};
template <>
struct Dtype<bfloat16> {
  static constexpr const char* name = "bfloat16";
  static constexpr double output_relative = 1.0 / 256;  // one ulp (8 significant bits)
  static constexpr double output_absolute = 1e-38;
  static bfloat16 quiet_nan() { return bfloat16{0x7fc1}; }
};
template <>
struct Dtype<float16> {
  static constexpr const char* name = "float16";
  static constexpr double output_relative = 1.0 / 1024;  // one ulp (11 significant bits)
  static constexpr double output_absolute = 6.0e-8;      // the subnormal step 2^-24
  static float16 quiet_nan() { return float16{0x7e01}; }
};

template <typename T>
uint32_t bits_of(T value) {
  uint32_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

// Admissible |kernel - reference| for one element: the storage rounding of the result plus fp32
// accumulation error relative to the sum of |terms| (about sqrt(count) ulps in practice; the bound
// leaves a wide margin below the error of a single misplaced term, about sum_abs / count).
template <typename T>
double tolerance(double reference, double sum_abs) {
  return Dtype<T>::output_relative * std::fabs(reference) + Dtype<T>::output_absolute + 1e-5 * sum_abs + 1e-30;
}

// Values uniform in [-1, 1], rounded to the storage type; `exact` keeps what was stored.
template <typename T>
std::vector<T> random_values(std::mt19937_64& rng, int64_t count, std::vector<double>* exact) {
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<T> stored(static_cast<size_t>(count));
  exact->resize(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    stored[i] = from_float<T>(uniform(rng));
    (*exact)[i] = to_float(stored[i]);
  }
  return stored;
}

// An output buffer pre-filled with NaN, followed by guard elements that must stay untouched.
template <typename T>
struct GuardedOutput {
  static constexpr int64_t kGuard = 37;
  std::vector<T> storage;
  int64_t size;
  explicit GuardedOutput(int64_t count) : storage(static_cast<size_t>(count + kGuard), Dtype<T>::quiet_nan()), size(count) {}
  T* data() { return storage.data(); }
  bool guards_intact() const {
    for (int64_t i = size; i < size + kGuard; ++i) {
      if (bits_of(storage[i]) != bits_of(Dtype<T>::quiet_nan())) return false;
    }
    return true;
  }
};

// ------------------------------------------------------------------------------------------------
// The packed position format (independent of the kernels).

// mask[o * in_features + k] != 0 where weight (o, k) is kept: n of every m consecutive entries.
std::vector<uint8_t> random_mask(std::mt19937_64& rng, const NMShape& shape) {
  std::vector<uint8_t> mask(static_cast<size_t>(shape.out_features * shape.in_features), 0);
  std::vector<int> members(static_cast<size_t>(shape.m));
  for (int64_t o = 0; o < shape.out_features; ++o) {
    for (int64_t group = 0; group < shape.in_features / shape.m; ++group) {
      for (int i = 0; i < shape.m; ++i) members[i] = i;
      std::shuffle(members.begin(), members.end(), rng);
      for (int i = 0; i < shape.n; ++i) mask[o * shape.in_features + group * shape.m + members[i]] = 1;
    }
  }
  return mask;
}

std::vector<uint8_t> pack_positions(const std::vector<uint8_t>& mask, const NMShape& shape) {
  const int bits = bits_per_position(shape.m);
  const int per_byte = positions_per_byte(shape.m);
  std::vector<uint8_t> packed(static_cast<size_t>(shape.out_features * shape.position_bytes()), 0);
  for (int64_t o = 0; o < shape.out_features; ++o) {
    uint8_t* row = packed.data() + o * shape.position_bytes();
    int64_t j = 0;
    for (int64_t k = 0; k < shape.in_features; ++k) {
      if (!mask[o * shape.in_features + k]) continue;
      row[j / per_byte] |= static_cast<uint8_t>((k % shape.m) << ((j % per_byte) * bits));
      ++j;
    }
  }
  return packed;
}

// Rebuilds the mask from packed positions; reports malformed rows (offsets not increasing inside
// a group, nonzero padding bits in a row's last byte).
std::vector<uint8_t> unpack_positions(const std::vector<uint8_t>& packed, const NMShape& shape, bool* well_formed) {
  const int bits = bits_per_position(shape.m);
  const int per_byte = positions_per_byte(shape.m);
  std::vector<uint8_t> mask(static_cast<size_t>(shape.out_features * shape.in_features), 0);
  *well_formed = true;
  for (int64_t o = 0; o < shape.out_features; ++o) {
    const uint8_t* row = packed.data() + o * shape.position_bytes();
    int previous = -1;
    for (int64_t j = 0; j < shape.kept_per_row(); ++j) {
      const int offset = (row[j / per_byte] >> ((j % per_byte) * bits)) & ((1 << bits) - 1);
      if (j % shape.n == 0) previous = -1;
      if (offset <= previous || offset >= shape.m) *well_formed = false;
      previous = offset;
      mask[o * shape.in_features + j / shape.n * shape.m + offset] = 1;
    }
    const int64_t used_bits = shape.kept_per_row() * bits;
    if (used_bits % 8 != 0 && (row[used_bits / 8] >> (used_bits % 8)) != 0) *well_formed = false;
  }
  return mask;
}

// ------------------------------------------------------------------------------------------------
// Parallel-for flavours.

// Splits [begin, end) into up to `threads` chunks, each on its own std::thread (the first on the
// caller). With honour_grain the chunks keep at least grain_size items, as at::parallel_for does;
// without it the range is cut into `threads` small uneven pieces regardless.
ParallelFor threaded_for(int threads, bool honour_grain) {
  return [threads, honour_grain](int64_t begin, int64_t end, int64_t grain_size, const ParallelBody& body) {
    if (begin >= end) return;
    const int64_t range = end - begin;
    int64_t chunks = std::min<int64_t>(threads, range);
    if (honour_grain) chunks = std::min(chunks, (range + std::max<int64_t>(grain_size, 1) - 1) / std::max<int64_t>(grain_size, 1));
    chunks = std::max<int64_t>(chunks, 1);
    // Uneven boundaries: chunk c ends at begin + range * (c + 1)^2 / chunks^2 (rounded), so the
    // pieces grow and rarely line up with the kernels' own row or panel blocks.
    std::vector<int64_t> bounds(static_cast<size_t>(chunks + 1));
    for (int64_t c = 0; c <= chunks; ++c) bounds[c] = begin + range * c * c / (chunks * chunks);
    std::vector<std::thread> workers;
    for (int64_t c = 1; c < chunks; ++c) {
      if (bounds[c] < bounds[c + 1]) workers.emplace_back(body, bounds[c], bounds[c + 1]);
    }
    if (bounds[0] < bounds[1]) body(bounds[0], bounds[1]);
    for (std::thread& worker : workers) worker.join();
  };
}

struct NamedParallelFor {
  const char* name;
  ParallelFor parallel_for;
};

const std::vector<NamedParallelFor>& parallel_flavours() {
  static const std::vector<NamedParallelFor> flavours = {
      {"serial_for", serial_for},
      {"threads(3, grain)", threaded_for(3, true)},
      {"threads(5, uneven)", threaded_for(5, false)},
  };
  return flavours;
}

// ------------------------------------------------------------------------------------------------
// Naive references on the dense masked weight, in double. Each also returns sum |terms|.

// One reference element: its exact value and the sum of |terms| that make it up.
struct TermSum {
  double value = 0.0;
  double sum_abs = 0.0;

  void add(double term) {
    value += term;
    sum_abs += std::fabs(term);
  }
};
using Reference = std::vector<TermSum>;

// y[m][o] = sum_k x[m][k] W[o][k] + bias[o]
Reference reference_forward(const std::vector<double>& x, int64_t M, const std::vector<double>& dense,
                            const NMShape& shape, const std::vector<double>* bias) {
  const int64_t N = shape.out_features, K = shape.in_features;
  Reference ref(static_cast<size_t>(M * N));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t o = 0; o < N; ++o) {
      TermSum sum;  // a local, so that the loop keeps it in registers
      if (bias) sum.add((*bias)[o]);
      for (int64_t k = 0; k < K; ++k) sum.add(x[m * K + k] * dense[o * K + k]);
      ref[m * N + o] = sum;
    }
  }
  return ref;
}

// dx[m][k] = sum_o dy[m][o] W[o][k]
Reference reference_grad_input(const std::vector<double>& dy, int64_t M, const std::vector<double>& dense,
                               const NMShape& shape) {
  const int64_t N = shape.out_features, K = shape.in_features;
  Reference ref(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t o = 0; o < N; ++o) {
      for (int64_t k = 0; k < K; ++k) ref[m * K + k].add(dy[m * N + o] * dense[o * K + k]);
    }
  }
  return ref;
}

// g[o][j] = sum_m dy[m][o] x[m][column of kept value j of row o], from the dense product
// dy^T x sampled at the mask.
Reference reference_grad_values(const std::vector<double>& dy, const std::vector<double>& x, int64_t M,
                                const std::vector<uint8_t>& mask, const NMShape& shape) {
  const int64_t N = shape.out_features, K = shape.in_features, kept = shape.kept_per_row();
  Reference ref(static_cast<size_t>(N * kept));
  for (int64_t o = 0; o < N; ++o) {
    int64_t j = 0;
    for (int64_t k = 0; k < K; ++k) {
      if (!mask[o * K + k]) continue;
      TermSum sum;
      for (int64_t m = 0; m < M; ++m) sum.add(dy[m * N + o] * x[m * K + k]);
      ref[o * kept + j++] = sum;
    }
  }
  return ref;
}

template <typename T>
void compare(const std::string& what, const GuardedOutput<T>& got, const Reference& ref) {
  if (!got.guards_intact()) fail(what + ": wrote past the end of the output");
  int mismatches = 0;
  for (int64_t i = 0; i < got.size; ++i) {
    const double value = to_float(got.storage[i]);
    const double error = std::fabs(value - ref[i].value);
    if (!(error <= tolerance<T>(ref[i].value, ref[i].sum_abs))) {  // also catches NaN
      if (mismatches++ == 0) {
        char detail[160];
        std::snprintf(detail, sizeof(detail), ": element %lld is %.9g, expected %.9g (tolerance %.3g)",
                      static_cast<long long>(i), value, ref[i].value, tolerance<T>(ref[i].value, ref[i].sum_abs));
        fail(what + detail);
      }
    }
  }
  if (mismatches > 1) fail(what + ": " + std::to_string(mismatches) + " mismatching elements in all");
}

// ------------------------------------------------------------------------------------------------
// Test cases.

struct Pattern {
  int64_t n, m;
};

// in_features for a pattern: about 600 (several panels for every batch width), and where the
// format allows, kept_per_row not a multiple of positions_per_byte so the last byte is partial.
int64_t pick_in_features(const Pattern& pattern) {
  const int per_byte = positions_per_byte(pattern.m);
  int64_t groups = 600 / pattern.m;
  for (int64_t candidate = groups; candidate < groups + per_byte; ++candidate) {
    if (candidate * pattern.n % per_byte != 0) return candidate * pattern.m;
  }
  return groups * pattern.m;  // n a multiple of positions_per_byte: every row ends on a full byte
}

std::string describe(const char* kernel, const char* dtype, const NMShape& shape, int64_t M, const char* flavour,
                     const char* extra = "") {
  char text[200];
  std::snprintf(text, sizeof(text), "%s %s %lld:%lld out=%lld in=%lld M=%lld %s%s", kernel, dtype,
                static_cast<long long>(shape.n), static_cast<long long>(shape.m),
                static_cast<long long>(shape.out_features), static_cast<long long>(shape.in_features),
                static_cast<long long>(M), flavour, extra);
  return text;
}

// in_features = 0 picks one (pick_in_features); a wide layer (about 8192 inputs) makes each batch
// block of the forward's transposed activations large enough to need a pass of its own.
template <typename T>
void test_pattern(const Pattern& pattern, const std::vector<int64_t>& batch_sizes, uint64_t seed,
                  int64_t in_features = 0, int64_t out_features = 70) {
  // 70 rows by default: ragged row chunks
  const NMShape shape{out_features, in_features > 0 ? in_features : pick_in_features(pattern), pattern.n, pattern.m};
  const int64_t N = shape.out_features, K = shape.in_features, kept = shape.kept_per_row();
  std::mt19937_64 rng(seed);

  const std::vector<uint8_t> mask = random_mask(rng, shape);
  const std::vector<uint8_t> positions = pack_positions(mask, shape);
  std::vector<double> values_exact, bias_exact;
  const std::vector<T> values = random_values<T>(rng, N * kept, &values_exact);
  const std::vector<T> bias = random_values<T>(rng, N, &bias_exact);
  std::vector<double> dense(static_cast<size_t>(N * K), 0.0);
  for (int64_t o = 0, j = 0; o < N; ++o) {
    for (int64_t k = 0; k < K; ++k) {
      if (mask[o * K + k]) dense[o * K + k] = values_exact[j++];
    }
  }

  for (const int64_t M : batch_sizes) {
    std::vector<double> x_exact, dy_exact;
    const std::vector<T> x = random_values<T>(rng, M * K, &x_exact);
    const std::vector<T> dy = random_values<T>(rng, M * N, &dy_exact);
    const Reference forward_plain = reference_forward(x_exact, M, dense, shape, nullptr);
    const Reference forward_bias = reference_forward(x_exact, M, dense, shape, &bias_exact);
    const Reference grad_input = reference_grad_input(dy_exact, M, dense, shape);
    const Reference grad_values = reference_grad_values(dy_exact, x_exact, M, mask, shape);

    for (const NamedParallelFor& flavour : parallel_flavours()) {
      for (const bool with_bias : {false, true}) {
        GuardedOutput<T> y(M * N);
        nm_linear_forward<T>(x.data(), M, values.data(), positions.data(), shape, with_bias ? bias.data() : nullptr,
                             y.data(), flavour.parallel_for);
        compare(describe("forward", Dtype<T>::name, shape, M, flavour.name, with_bias ? " bias" : ""), y,
                with_bias ? forward_bias : forward_plain);
      }
      GuardedOutput<T> dx(M * K);
      nm_linear_grad_input<T>(dy.data(), M, values.data(), positions.data(), shape, dx.data(), flavour.parallel_for);
      compare(describe("grad_input", Dtype<T>::name, shape, M, flavour.name), dx, grad_input);

      GuardedOutput<T> dvalues(N * kept);
      nm_linear_grad_values<T>(dy.data(), x.data(), M, positions.data(), shape, dvalues.data(), flavour.parallel_for);
      compare(describe("grad_values", Dtype<T>::name, shape, M, flavour.name), dvalues, grad_values);
    }
  }
}

// Pack -> unpack round trip, and the kernels reading the weight back: forward with x = identity
// (M = in_features) yields y[k][o] = W[o][k], grad_input with dy = identity (M = out_features)
// yields dx[o][k] = W[o][k]; both exact, since each output is one product with 1.
void test_position_format(const Pattern& pattern, uint64_t seed) {
  const NMShape shape{45, pick_in_features(pattern), pattern.n, pattern.m};
  const int64_t N = shape.out_features, K = shape.in_features;
  std::mt19937_64 rng(seed);
  const std::vector<uint8_t> mask = random_mask(rng, shape);
  const std::vector<uint8_t> positions = pack_positions(mask, shape);
  const std::string name = std::to_string(pattern.n) + ":" + std::to_string(pattern.m);

  bool well_formed = false;
  if (positions.size() != static_cast<size_t>(N * shape.position_bytes())) fail("packed size " + name);
  if (unpack_positions(positions, shape, &well_formed) != mask) fail("pack/unpack round trip " + name);
  if (!well_formed) fail("packed positions malformed " + name);

  std::vector<double> values_exact;
  const std::vector<float> values = random_values<float>(rng, N * shape.kept_per_row(), &values_exact);
  std::vector<float> dense(static_cast<size_t>(N * K), 0.0f);
  for (int64_t o = 0, j = 0; o < N; ++o) {
    for (int64_t k = 0; k < K; ++k) {
      if (mask[o * K + k]) dense[o * K + k] = values[j++];
    }
  }
  std::vector<float> identity_k(static_cast<size_t>(K * K), 0.0f), identity_n(static_cast<size_t>(N * N), 0.0f);
  for (int64_t k = 0; k < K; ++k) identity_k[k * K + k] = 1.0f;
  for (int64_t o = 0; o < N; ++o) identity_n[o * N + o] = 1.0f;

  for (const NamedParallelFor& flavour : parallel_flavours()) {
    std::vector<float> y(static_cast<size_t>(K * N));
    nm_linear_forward<float>(identity_k.data(), K, values.data(), positions.data(), shape, nullptr, y.data(),
                             flavour.parallel_for);
    bool exact = true;
    for (int64_t o = 0; o < N; ++o) {
      for (int64_t k = 0; k < K; ++k) exact = exact && y[k * N + o] == dense[o * K + k];
    }
    if (!exact) fail("forward(identity) does not reproduce the dense weight " + name + " " + flavour.name);

    // The gather path (M = 1) reads one column at a time: spot-check a few columns.
    for (const int64_t k : {int64_t{0}, K / 3, K - 1}) {
      std::vector<float> y_column(static_cast<size_t>(N));
      nm_linear_forward<float>(identity_k.data() + k * K, 1, values.data(), positions.data(), shape, nullptr,
                               y_column.data(), flavour.parallel_for);
      for (int64_t o = 0; o < N; ++o) exact = exact && y_column[o] == dense[o * K + k];
    }
    if (!exact) fail("forward(unit row, M=1) does not reproduce the dense weight " + name + " " + flavour.name);

    std::vector<float> dx(static_cast<size_t>(N * K));
    nm_linear_grad_input<float>(identity_n.data(), N, values.data(), positions.data(), shape, dx.data(),
                                flavour.parallel_for);
    if (dx != dense) fail("grad_input(identity) does not reproduce the dense weight " + name + " " + flavour.name);
  }
}

// Degenerate shapes: no input features (forward yields the bias), no output features (grad_input
// is an empty sum, i.e. zeros), and M = 0 grad_values on a real shape (zeros).
void test_degenerate_shapes() {
  for (const NamedParallelFor& flavour : parallel_flavours()) {
    const NMShape no_inputs{5, 0, 2, 4};
    const std::vector<float> x(6 * 0), bias = {1, 2, 3, 4, 5};
    std::vector<float> y(6 * 5, -1.0f);
    nm_linear_forward<float>(x.data(), 6, nullptr, nullptr, no_inputs, bias.data(), y.data(), flavour.parallel_for);
    for (int64_t m = 0; m < 6; ++m) {
      for (int64_t o = 0; o < 5; ++o) {
        if (y[m * 5 + o] != bias[o]) fail(std::string("forward with in_features = 0 ") + flavour.name);
      }
    }

    const NMShape no_outputs{0, 8, 2, 4};
    const std::vector<float> dy;
    std::vector<float> dx(20 * 8, -1.0f);
    nm_linear_grad_input<float>(dy.data(), 20, nullptr, nullptr, no_outputs, dx.data(), flavour.parallel_for);
    if (std::any_of(dx.begin(), dx.end(), [](float v) { return v != 0.0f; })) {
      fail(std::string("grad_input with out_features = 0 is not zero ") + flavour.name);
    }

    const NMShape shape{3, 16, 2, 4};
    const std::vector<uint8_t> positions(static_cast<size_t>(3 * shape.position_bytes()), 0x4);  // offsets 0, 1
    std::vector<bfloat16> grad_values(static_cast<size_t>(3 * shape.kept_per_row()), bfloat16{0x3f80});
    nm_linear_grad_values<bfloat16>(nullptr, nullptr, 0, positions.data(), shape, grad_values.data(),
                                    flavour.parallel_for);
    for (const bfloat16 value : grad_values) {
      if (value.bits != 0) fail(std::string("grad_values with M = 0 is not zero ") + flavour.name);
    }
  }
}

// 2:4 codes whose offsets do not increase (a broken contract: the formats reject them, the raw ops
// do not check). No kernel may read outside its operands, and the pair-row forward of the
// avx512_bf16 level reads such a group as offsets (0, 1), as documented in nm.cpp.
void test_non_increasing_24_codes() {
  const NMShape shape{5, 64, 2, 4};  // 16 groups: one whole decode run
  const int64_t M = 16, K = shape.in_features, kept = shape.kept_per_row();
  // 0x44: two groups with offsets (0, 1) each.
  std::vector<uint8_t> positions(static_cast<size_t>(shape.out_features * shape.position_bytes()), 0x44);
  positions[0] = 0x00;  // row 0, groups 0 and 1: offsets (0, 0)
  positions[shape.position_bytes() - 1] = 0xFF;  // row 0, groups 14 and 15: offsets (3, 3)
  positions[shape.position_bytes()] = 0x36;  // row 1, group 0: offsets (2, 1); group 1: (3, 0)
  std::vector<bfloat16> x(static_cast<size_t>(M * K)), values(static_cast<size_t>(shape.out_features * kept));
  for (size_t i = 0; i < x.size(); ++i) x[i] = from_float<bfloat16>(static_cast<float>(i % 7) - 3.0f);
  for (size_t i = 0; i < values.size(); ++i) values[i] = from_float<bfloat16>(static_cast<float>(i % 5) - 2.0f);
  std::vector<bfloat16> y(static_cast<size_t>(M * shape.out_features));
  nm_linear_forward<bfloat16>(x.data(), M, values.data(), positions.data(), shape, nullptr, y.data(), serial_for);
  if (sparsekernels::cpu::cpu_isa() != sparsekernels::cpu::CpuIsa::avx512_bf16) return;
  // Every group read as offsets (0, 1): exact in float32 (small integers), then rounded.
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t o = 0; o < shape.out_features; ++o) {
      float expected = 0.0f;
      for (int64_t g = 0; g < K / 4; ++g) {
        expected += to_float(values[o * kept + 2 * g]) * to_float(x[m * K + 4 * g]) +
                    to_float(values[o * kept + 2 * g + 1]) * to_float(x[m * K + 4 * g + 1]);
      }
      if (to_float(y[m * shape.out_features + o]) != to_float(from_float<bfloat16>(expected))) {
        fail("forward bfloat16 2:4 with non-increasing codes: element (" + std::to_string(m) + ", " +
             std::to_string(o) + ") is not the (0, 1) reading");
        return;
      }
    }
  }
  // grad_input reads them the same way: dx[m][4g + c] = sum_o dy[m][o] * value (o, 2g + c), c < 2.
  const NMShape even_rows{6, 64, 2, 4};  // grad_input's pair path needs even out_features
  positions.resize(static_cast<size_t>(even_rows.out_features * even_rows.position_bytes()), 0x44);
  values.resize(static_cast<size_t>(even_rows.out_features * kept), from_float<bfloat16>(1.0f));
  std::vector<bfloat16> dy(static_cast<size_t>(M * even_rows.out_features));
  for (size_t i = 0; i < dy.size(); ++i) dy[i] = from_float<bfloat16>(static_cast<float>(i % 3) - 1.0f);
  std::vector<bfloat16> dx(static_cast<size_t>(M * K));
  nm_linear_grad_input<bfloat16>(dy.data(), M, values.data(), positions.data(), even_rows, dx.data(), serial_for);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) {
      float expected = 0.0f;
      if (k % 4 < 2) {
        for (int64_t o = 0; o < even_rows.out_features; ++o) {
          expected += to_float(dy[m * even_rows.out_features + o]) * to_float(values[o * kept + k / 4 * 2 + k % 4]);
        }
      }
      if (to_float(dx[m * K + k]) != to_float(from_float<bfloat16>(expected))) {
        fail("grad_input bfloat16 2:4 with non-increasing codes: element (" + std::to_string(m) + ", " +
             std::to_string(k) + ") is not the (0, 1) reading");
        return;
      }
    }
  }
}

// The input gradient at the AVX-512 levels builds kept-column masks for every dtype (float32
// here), on the tile path (M = 16) and without a tile (M = 1): it reads non-increasing 2:4 codes as
// offsets (0, 1) too.
void test_non_increasing_24_codes_grad_input_masks() {
  if (sparsekernels::cpu::cpu_isa() < sparsekernels::cpu::CpuIsa::avx512) return;
  const NMShape shape{5, 64, 2, 4};
  const int64_t K = shape.in_features, kept = shape.kept_per_row();
  std::vector<uint8_t> positions(static_cast<size_t>(shape.out_features * shape.position_bytes()), 0x44);
  positions[0] = 0x00;                           // row 0, groups 0 and 1: offsets (0, 0)
  positions[shape.position_bytes() - 1] = 0xFF;  // row 0, groups 14 and 15: offsets (3, 3)
  positions[shape.position_bytes()] = 0x36;      // row 1, group 0: offsets (2, 1); group 1: (3, 0)
  std::vector<float> values(static_cast<size_t>(shape.out_features * kept));
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i % 5) - 2.0f;
  for (const int64_t M : {int64_t{1}, int64_t{16}}) {
    std::vector<float> dy(static_cast<size_t>(M * shape.out_features));
    for (size_t i = 0; i < dy.size(); ++i) dy[i] = static_cast<float>(i % 3) - 1.0f;
    std::vector<float> dx(static_cast<size_t>(M * K));
    nm_linear_grad_input<float>(dy.data(), M, values.data(), positions.data(), shape, dx.data(), serial_for);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t k = 0; k < K; ++k) {
        float expected = 0.0f;  // exact: small integers
        if (k % 4 < 2) {
          for (int64_t o = 0; o < shape.out_features; ++o) {
            expected += dy[m * shape.out_features + o] * values[o * kept + k / 4 * 2 + k % 4];
          }
        }
        if (dx[m * K + k] != expected) {
          fail("grad_input float32 2:4 with non-increasing codes, M = " + std::to_string(M) + ": element (" +
               std::to_string(m) + ", " + std::to_string(k) + ") is not the (0, 1) reading");
          return;
        }
      }
    }
  }
}

int run_suite(const char* label) {
  const std::vector<Pattern> required = {{1, 2}, {2, 4}, {1, 4}, {2, 8}, {4, 8}, {1, 16}, {8, 16}};
  // n that do not divide 16 or positions_per_byte, n = m - 1.
  const std::vector<Pattern> other = {{3, 4}, {1, 8}, {3, 8}, {7, 8}, {5, 16}, {15, 16}};
  const std::vector<int64_t> required_batches = {0, 1, 7, 64, 300};
  // Every batch-size code path: 2 and 3 (gather path), 4 (smallest panel path), 17, 129 (a second
  // batch block of one row); 17 and 24 also take the small-batch grad_values over two panels of
  // input columns (the last one partial); 40 and 41, 48 and 49 are either side of its thresholds
  // (float32 lanes, bfloat16 batch pairs).
  const std::vector<int64_t> extra_batches = {2, 3, 4, 17, 24, 40, 41, 48, 49, 129};

  uint64_t seed = 1;
  for (const Pattern& pattern : required) {
    test_position_format(pattern, seed++);
    test_pattern<float>(pattern, required_batches, seed++);
    test_pattern<bfloat16>(pattern, required_batches, seed++);
    test_pattern<float16>(pattern, required_batches, seed++);
  }
  test_pattern<float>({2, 4}, extra_batches, seed++);
  test_pattern<bfloat16>({1, 16}, extra_batches, seed++);
  test_pattern<float16>({3, 8}, extra_batches, seed++);
  // The small-batch grad_values over two panels with 64-column windows (16 kept values of 1:4 and
  // 2:8 span 64 columns; the extra batches above cover 32-column windows and gathers).
  test_pattern<float>({1, 4}, {17, 24}, seed++);
  test_pattern<bfloat16>({2, 8}, {24}, seed++);
  // The tile-free grad_input (M <= 2, patterns with kept-column masks) over 576 columns: register
  // blocks of 256 (M = 1) and 128 (M = 2) columns and a 64-column rest, two column chunks of tasks
  // (the second 56 columns wide), float32 / bfloat16 / float16 values.
  test_pattern<float>({4, 8}, {1, 2}, seed++, /*in_features=*/568);
  test_pattern<float>({1, 2}, {2}, seed++, /*in_features=*/568);
  test_pattern<bfloat16>({1, 4}, {1, 2}, seed++, /*in_features=*/568);
  test_pattern<float16>({2, 8}, {2}, seed++, /*in_features=*/568);
  test_pattern<float>({2, 4}, {300}, seed++, /*in_features=*/8196);  // three batch blocks, one per pass
  // The 2:4 bfloat16 forward on pair rows (avx512_bf16 level): one group, whole 16-group decode
  // runs, panels of 16 and 80 groups, the batches on either side of its threshold (6 takes the
  // GEMV, 7 the pair rows), a second batch block, and batch blocks of about 6 MiB of pair rows
  // each, one per pass. For the bfloat16 grad_values of that level M = 48 takes the small-batch
  // kernel on batch pairs over four panels of columns, M = 80 a batch block of 3 batch-pair
  // vectors (129 and 300 bring blocks of 1, 2 and 4).
  test_pattern<bfloat16>({2, 4}, {6, 7, 17, 129}, seed++, /*in_features=*/4);
  test_pattern<bfloat16>({2, 4}, {8, 16, 48, 80, 129}, seed++, /*in_features=*/1024);
  test_pattern<bfloat16>({2, 4}, {300}, seed++, /*in_features=*/8196);
  // 600 output rows: the pair-row forward's 256-row blocks (two whole, one partial) over spans of
  // the 256 groups, two batch blocks open across the spans.
  test_pattern<bfloat16>({2, 4}, {16, 129}, seed++, /*in_features=*/1024, /*out_features=*/600);
  for (const Pattern& pattern : other) {
    test_position_format(pattern, seed++);
    test_pattern<float>(pattern, {1, 3, 64, 140}, seed++);
    test_pattern<bfloat16>(pattern, {2, 33}, seed++);
  }
  test_degenerate_shapes();
  test_non_increasing_24_codes();
  test_non_increasing_24_codes_grad_input_masks();

  if (failure_count == 0) {
    std::printf("test_nm [%s]: all checks passed\n", label);
    return 0;
  }
  std::printf("test_nm [%s]: %d failures\n", label, failure_count);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  constexpr const char* kGenericFlag = "--generic-only";
  if (argc > 1 && std::strcmp(argv[1], kGenericFlag) == 0) return run_suite("SPARSEKERNELS_CPU_ISA=generic");

  const int status = run_suite("default ISA");

  // The ISA is fixed at the first kernel call, so the portable path needs a fresh process.
  if (setenv("SPARSEKERNELS_CPU_ISA", "generic", 1) != 0) {
    std::printf("test_nm: cannot set SPARSEKERNELS_CPU_ISA\n");
    return 1;
  }
  std::string command = "'";
  for (const char* c = argv[0]; *c != '\0'; ++c) command += (*c == '\'') ? std::string("'\\''") : std::string(1, *c);
  command += std::string("' ") + kGenericFlag;
  std::fflush(stdout);
  const int child_status = std::system(command.c_str());
  if (child_status != 0) std::printf("test_nm: the generic-ISA run failed (status %d)\n", child_status);
  return (status == 0 && child_status == 0) ? 0 : 1;
}
