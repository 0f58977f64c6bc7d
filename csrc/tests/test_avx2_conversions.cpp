// Standalone test of the AVX2 conversions shared by the CPU kernels (csrc/cpu/avx2.h).
//
// The kernels' results are only checked against a tolerance (test_bsr, test_nm), which a store
// that truncates instead of rounding to nearest even would pass. Here every vector conversion is
// compared bit for bit with the scalar to_float / from_float of common.h:
//   * loads: all 65536 bfloat16 and float16 bit patterns;
//   * stores: every float whose top 16 bits take any of the 65536 values, each with low halves
//     that hit exact ties, just below and just above them, zero and all ones (so every rounding
//     boundary, the carry into the exponent and into inf, NaNs and subnormals), plus a million
//     random floats; float16 NaNs need only be quiet NaNs of the same sign (see avx2.h);
//   * to_float_array / from_float_array over lengths that leave every tail size.
// Runs only where cpu_isa() is at least avx2 (SPARSEKERNELS_CPU_ISA caps it; exit 0 otherwise,
// after saying so). Exit status 0 means all passed.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "cpu/isa.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include "cpu/avx2.h"

namespace {

using namespace sparsekernels::cpu;

int failure_count = 0;

void fail(const char* what, uint32_t input, uint32_t got, uint32_t expected) {
  if (failure_count < 20) {
    std::fprintf(stderr, "FAIL: %s of 0x%08x: got 0x%08x, expected 0x%08x\n", what, input, got, expected);
  }
  ++failure_count;
}

float float_from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

uint32_t bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

bool is_float16_nan(uint16_t bits) { return (bits & 0x7c00u) == 0x7c00u && (bits & 0x3ffu) != 0; }

// Bit-equal, except that two float16 NaNs of the same sign that are both quiet count as equal.
template <typename scalar_t>
bool same_result(uint16_t got, uint16_t expected) {
  if (got == expected) return true;
  if constexpr (std::is_same_v<scalar_t, float16>) {
    return is_float16_nan(got) && is_float16_nan(expected) && (got & 0x8200u) == (expected & 0x8200u);
  }
  return false;
}

template <typename scalar_t>
SPARSEKERNELS_AVX2 void check_loads(const char* name) {
  std::vector<scalar_t> patterns(65536);
  for (uint32_t i = 0; i < 65536; ++i) patterns[i].bits = static_cast<uint16_t>(i);
  for (uint32_t i = 0; i < 65536; i += 8) {
    alignas(32) float loaded[8];
    _mm256_store_ps(loaded, avx2_simd::load8(patterns.data() + i));
    for (uint32_t lane = 0; lane < 8; ++lane) {
      const float expected = to_float(patterns[i + lane]);
      const bool both_nan = std::isnan(loaded[lane]) && std::isnan(expected) &&
                            std::signbit(loaded[lane]) == std::signbit(expected);
      if (!both_nan && bits_of(loaded[lane]) != bits_of(expected)) {
        fail(name, i + lane, bits_of(loaded[lane]), bits_of(expected));
      }
    }
  }
}

template <typename scalar_t>
SPARSEKERNELS_AVX2 void check_stores(const char* name, const std::vector<float>& inputs) {
  for (size_t i = 0; i + 8 <= inputs.size(); i += 8) {
    scalar_t stored[8];
    avx2_simd::store8(stored, _mm256_loadu_ps(inputs.data() + i));
    for (size_t lane = 0; lane < 8; ++lane) {
      const scalar_t expected = from_float<scalar_t>(inputs[i + lane]);
      if (!same_result<scalar_t>(stored[lane].bits, expected.bits)) {
        fail(name, bits_of(inputs[i + lane]), stored[lane].bits, expected.bits);
      }
    }
  }
}

void check_store_float32(const std::vector<float>& inputs) {
  std::vector<float> stored(inputs.size());
  avx2_simd::from_float_array(inputs.data(), stored.data(), static_cast<int64_t>(inputs.size()));
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (bits_of(stored[i]) != bits_of(inputs[i])) fail("float32 store", bits_of(inputs[i]), bits_of(stored[i]), bits_of(inputs[i]));
  }
}

// The array forms, over every tail length (count % 8), against the scalar conversions.
template <typename scalar_t>
void check_arrays(const char* name, std::mt19937& rng) {
  std::uniform_real_distribution<float> values(-1000.0f, 1000.0f);
  for (int64_t count = 0; count <= 40; ++count) {
    std::vector<float> source(count);
    for (auto& value : source) value = values(rng);
    std::vector<scalar_t> narrowed(count + 1);
    narrowed[count].bits = 0xabcd;  // guard: nothing past count is written
    avx2_simd::from_float_array(source.data(), narrowed.data(), count);
    std::vector<float> widened(count + 1, 12345.0f);
    avx2_simd::to_float_array(narrowed.data(), widened.data(), count);
    for (int64_t i = 0; i < count; ++i) {
      const scalar_t expected = from_float<scalar_t>(source[i]);
      if (narrowed[i].bits != expected.bits) fail(name, bits_of(source[i]), narrowed[i].bits, expected.bits);
      if (bits_of(widened[i]) != bits_of(to_float(expected))) {
        fail(name, expected.bits, bits_of(widened[i]), bits_of(to_float(expected)));
      }
    }
    if (narrowed[count].bits != 0xabcd) fail(name, static_cast<uint32_t>(count), narrowed[count].bits, 0xabcd);
    if (widened[count] != 12345.0f) fail(name, static_cast<uint32_t>(count), bits_of(widened[count]), bits_of(12345.0f));
  }
}

}  // namespace

int main() {
  if (cpu_isa() < CpuIsa::avx2) {
    std::printf("test_avx2_conversions [%s]: no AVX2 at this ISA level, nothing to test\n", cpu_isa_name(cpu_isa()));
    return 0;
  }
  check_loads<bfloat16>("bfloat16 load");
  check_loads<float16>("float16 load");

  std::vector<float> inputs;
  const uint32_t low_halves[] = {0x0000u, 0x0001u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu, 0x1000u, 0x0fffu};
  for (uint32_t high = 0; high < 65536; ++high) {
    for (uint32_t low : low_halves) inputs.push_back(float_from_bits(high << 16 | low));
  }
  std::mt19937 rng(20261207);
  for (int i = 0; i < (1 << 20); ++i) inputs.push_back(float_from_bits(static_cast<uint32_t>(rng())));
  // float16's rounding boundaries fall inside the low 16 bits of a float: half-way points and
  // their neighbours for every float16 value, normal and subnormal.
  for (uint32_t half = 0; half < 65536; ++half) {
    const float value = to_float(float16{static_cast<uint16_t>(half)});
    const float next = to_float(float16{static_cast<uint16_t>(half + 1)});
    if (!std::isfinite(value) || !std::isfinite(next) || std::signbit(value) != std::signbit(next)) continue;
    const uint32_t midpoint = bits_of(0.5f * (value + next));
    for (uint32_t delta : {0u, 1u}) {
      inputs.push_back(float_from_bits(midpoint + delta));
      inputs.push_back(float_from_bits(midpoint - delta));
    }
  }
  while (inputs.size() % 8 != 0) inputs.push_back(0.0f);

  check_stores<bfloat16>("bfloat16 store", inputs);
  check_stores<float16>("float16 store", inputs);
  check_store_float32(inputs);
  check_arrays<bfloat16>("bfloat16 array", rng);
  check_arrays<float16>("float16 array", rng);

  std::printf("test_avx2_conversions [%s]: %zu stores per dtype, %d failed\n", cpu_isa_name(cpu_isa()), inputs.size(),
              failure_count);
  return failure_count == 0 ? 0 : 1;
}

#else
int main() {
  std::printf("test_avx2_conversions: not an x86-64 build, nothing to test\n");
  return 0;
}
#endif
