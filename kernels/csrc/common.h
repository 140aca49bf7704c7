// Includes and helpers shared by the CPU kernels (kernels/csrc/*.h). The kernels are one
// translation unit, bindings.cpp, built by kernels/cpu_ext.py with -O3 -march=native.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cfloat>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

// t as a contiguous tensor of type st: t itself, without a dispatcher call, when it already is
// one (the usual case; each call costs microseconds on the per-layer path).
static inline torch::Tensor as_contig(const torch::Tensor& t, at::ScalarType st) {
  if (t.scalar_type() == st && t.is_contiguous()) return t;
  return t.to(st).contiguous();
}

// Loads as float; bf16 is widened by a shift so the loops around it vectorize.
template <typename T> static inline float ld(const T* p) { return static_cast<float>(*p); }
template <> inline float ld<c10::BFloat16>(const c10::BFloat16* p) {
  const uint32_t u = static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(p)) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline void prefetch_span(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
  __builtin_prefetch(c + bytes - 1, 0, 3);
}

// 16 fp32 lanes as GCC vector extensions: one zmm register with AVX-512, a pair of ymm with
// AVX2.
// AVX2 builds without AVX-512 (AVX2-only hosts): GCC keeps arrays of these vectors on the
// stack there and moves them through general registers in 8-byte pieces, so the hot loops
// have ymm-intrinsic versions under `#if PS_AVX2_ONLY` (docs/cpu-kernels.md).
#if defined(__AVX2__) && !defined(__AVX512F__)
#define PS_AVX2_ONLY 1
#else
#define PS_AVX2_ONLY 0
#endif
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

template <typename T> static inline v16f load16(const T* p) {
  float t[16];
  for (int i = 0; i < 16; ++i) t[i] = static_cast<float>(p[i]);
  v16f x;
  std::memcpy(&x, t, 64);
  return x;
}
template <> inline v16f load16<float>(const float* p) {
  v16f x;
  std::memcpy(&x, p, 64);
  return x;
}
template <> inline v16f load16<c10::BFloat16>(const c10::BFloat16* p) {
  v16h h;
  std::memcpy(&h, p, 32);
  const v16u u = __builtin_convertvector(h, v16u) << 16;
  v16f x;
  std::memcpy(&x, &u, 64);
  return x;
}

#ifdef __AVX512F__
#include <immintrin.h>
static inline float hmax(v16f x) { __m512 y; std::memcpy(&y, &x, 64); return _mm512_reduce_max_ps(y); }
static inline float hsum(v16f x) { __m512 y; std::memcpy(&y, &x, 64); return _mm512_reduce_add_ps(y); }
#elif defined(__AVX2__)
#include <immintrin.h>
static inline float hmax(v16f x) {
  __m256 a, b;
  std::memcpy(&a, &x, 32);
  std::memcpy(&b, reinterpret_cast<const char*>(&x) + 32, 32);
  const __m256 m = _mm256_max_ps(a, b);
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}
static inline float hsum(v16f x) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += x[i];
  return s;
}
// 8 elements as fp32 lanes of a ymm register, for the AVX2 loops that keep their sums in ymm
// registers: GCC keeps arrays of v16f (two ymm each without AVX-512) on the stack and moves
// them through general registers in 8-byte pieces (docs/cpu-kernels.md).
template <typename T> static inline __m256 load8(const T* p) {
  float t[8];
  for (int i = 0; i < 8; ++i) t[i] = static_cast<float>(p[i]);
  return _mm256_loadu_ps(t);
}
template <> inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline __m256 load8<c10::BFloat16>(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#else
static inline float hmax(v16f x) {
  float m = x[0];
  for (int i = 1; i < 16; ++i) m = std::max(m, x[i]);
  return m;
}
static inline float hsum(v16f x) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += x[i];
  return s;
}
#endif

// vLLM's packed "amx" layout (bf16). Per (block, head), K: 16-token chunks of D/2
// 64-byte lines, line p = {token i: (dim 2p, dim 2p+1)} for i < 16; V: 16-dim chunks of B/2
// lines, line j = {dim c: (token 2j, token 2j+1)} for c < 16. In each 32-bit lane the first
// element is the low half: widened to fp32 by `<< 16`, the second by masking the low half.
static inline void split_pairs(const c10::BFloat16* p, v16f& lo, v16f& hi) {
  v16u u;
  std::memcpy(&u, p, 64);
  const v16u a = u << 16, b = u & 0xFFFF0000u;
  std::memcpy(&lo, &a, 64);
  std::memcpy(&hi, &b, 64);
}

// Calls f(std::integral_constant<int, m>{}) with m = min(max(n, 1), N): a runtime count made a
// compile-time one for the vector loops (group sizes, head dim / 16).
template <int N, typename F> static inline void with_const(int64_t n, F&& f) {
  if constexpr (N > 1) {
    if (n < N) return with_const<N - 1>(n, f);
  }
  f(std::integral_constant<int, N>{});
}

