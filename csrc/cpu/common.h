// Shared plumbing for the CPU kernels: 16-bit float storage types, scalar conversions and the
// parallel-for hook.
//
// The kernel sources under csrc/cpu/ include no ATen or torch header. That lets CMake build and
// test them as a standalone library (csrc/tests/), and keeps the torch coupling in one thin layer:
// csrc/bindings/ passes at::parallel_for in as a ParallelFor and reinterprets c10::BFloat16 /
// c10::Half storage as the layout-compatible structs below.
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>

namespace sparsekernels::cpu {

// Bit-exact storage of bfloat16 and IEEE binary16 values (same layout as c10::BFloat16 / c10::Half).
struct bfloat16 {
  uint16_t bits;
};
struct float16 {
  uint16_t bits;
};

inline float to_float(float value) { return value; }

inline float to_float(bfloat16 value) {
  const uint32_t word = static_cast<uint32_t>(value.bits) << 16;
  float result;
  std::memcpy(&result, &word, sizeof(result));
  return result;
}

inline float to_float(float16 value) {
  const uint32_t sign = static_cast<uint32_t>(value.bits & 0x8000u) << 16;
  const uint32_t exponent = (value.bits >> 10) & 0x1fu;
  const uint32_t mantissa = value.bits & 0x3ffu;
  uint32_t word;
  if (exponent == 0) {
    // Zero or subnormal: the value is mantissa * 2^-24, exact in float.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    return sign ? -magnitude : magnitude;
  } else if (exponent == 0x1f) {
    word = sign | 0x7f800000u | (mantissa << 13);  // inf / nan (payload kept)
  } else {
    word = sign | ((exponent + (127 - 15)) << 23) | (mantissa << 13);
  }
  float result;
  std::memcpy(&result, &word, sizeof(result));
  return result;
}

template <typename T>
T from_float(float value);

template <>
inline float from_float<float>(float value) {
  return value;
}

// Round to nearest even, as torch does; NaN stays a quiet NaN.
template <>
inline bfloat16 from_float<bfloat16>(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  if ((word & 0x7fffffffu) > 0x7f800000u) return bfloat16{static_cast<uint16_t>((word >> 16) | 0x0040u)};
  word += 0x7fffu + ((word >> 16) & 1u);
  return bfloat16{static_cast<uint16_t>(word >> 16)};
}

// Round to nearest even; overflow goes to inf, tiny values to subnormals or signed zero.
template <>
inline float16 from_float<float16>(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  const uint16_t sign = static_cast<uint16_t>((word >> 16) & 0x8000u);
  word &= 0x7fffffffu;
  if (word >= 0x7f800000u) {  // inf or nan
    return float16{static_cast<uint16_t>(sign | (word > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  }
  if (word >= 0x477ff000u) {  // |value| >= 65520 rounds to inf
    return float16{static_cast<uint16_t>(sign | 0x7c00u)};
  }
  if (word < 0x38800000u) {
    // Below the smallest normal half (2^-14). Adding 0.5f puts the value in a binade whose ulp
    // is 2^-24, so the float adder performs the round-to-nearest-even to a half subnormal for us.
    float magnitude;
    std::memcpy(&magnitude, &word, sizeof(magnitude));
    magnitude += 0.5f;
    uint32_t rounded;
    std::memcpy(&rounded, &magnitude, sizeof(rounded));
    return float16{static_cast<uint16_t>(sign | (rounded - 0x3f000000u))};
  }
  const uint32_t odd = (word >> 13) & 1u;
  word += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + odd;
  return float16{static_cast<uint16_t>(sign | (word >> 13))};
}

// parallel_for(begin, end, grain_size, body): runs body(chunk_begin, chunk_end) over disjoint chunks
// covering [begin, end), possibly on several threads. Chunks hold at least grain_size items where
// the range allows. The bindings pass at::parallel_for; standalone tests pass serial_for.
using ParallelBody = std::function<void(int64_t, int64_t)>;
using ParallelFor = std::function<void(int64_t, int64_t, int64_t, const ParallelBody&)>;

inline void serial_for(int64_t begin, int64_t end, int64_t /*grain_size*/, const ParallelBody& body) {
  if (begin < end) body(begin, end);
}

}  // namespace sparsekernels::cpu
