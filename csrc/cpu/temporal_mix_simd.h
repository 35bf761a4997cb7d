// The temporal mix of the DSNO layer in explicit SIMD (float32 accumulation; float32, bfloat16 or float16
// storage; unit pixel stride), for AVX-512 and for AVX2, chosen at run time. Included by fourier_conv_cpu.cpp
// only.
//
// One task is one (b, c) of the call: for each block of pixels the n_in source values are loaded once (scaled by
// the mask's slope where a source mask is given) and every output t is summed from them in registers and finished
// there (activation, residual, store, mask). The portable tile path instead adds each source into a tile in L1, a
// load and a store per multiply-add, and runs each part of the output stage as its own pass; here a source
// element is read from memory once and an output written once.
//
// The loop (temporal_mix_rows.inc) is written once against a small `Simd` struct of vector operations and
// compiled twice, once per ISA in a namespace of its own, with every function of that copy (the loop and the
// helpers inlined into it) carrying the ISA's target attribute: the AVX2 copy never contains an AVX-512
// instruction, and neither reaches a CPU without its ISA (supported()). GCC's target_clones cannot do this: the
// vector width has to differ per ISA, and a 64-byte GCC vector type compiled for AVX2 spilled and ran slower than
// the tile path (bench/RESULTS.md).
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define ADJOINTDEIS_HAVE_SIMD_MIX 1

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../fourier_conv.h"

// GCC 12 flags the self-initialised placeholder inside the unmasked AVX-512 intrinsics (`__m512 __Y = __Y;`) as
// maybe uninitialised once they are inlined into these loops; it is the documented "undefined" operand.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace adjointdeis {
namespace simd_mix {

// All output rows of one (b, c): y[t][p] = addend[t][p] + act(sum_s mix[t][s] src'[s][p]) for t < n_out,
// src'[s][p] = src[s][p] scaled by mask_slope where src_mask[s][p] is set; mask[t][p] = pre-activation <= 0.
// Rows are the given strides apart (in elements); mix[t][s] = mix[t * mix_t + s * mix_s].
struct RowsOfOneChannel {
  int64_t n_out, n_in, pixels;
  const void* src;
  int64_t src_s, src_c;  // the source's time and channel strides
  const bool* src_mask;
  int64_t src_mask_s;
  float mask_slope;
  const float* mix;
  int64_t mix_t, mix_s;
  const void* addend;
  int64_t addend_t;
  void* y;
  int64_t y_t;
  bool* mask;
  int64_t mask_t;
  float slope;
};

using MixRows = void (*)(const RowsOfOneChannel&);

// The source rows of the channel this many ahead are prefetched: a row is a few cache lines at DSNO's shapes
// (H = W = 8: 64 pixels), too short for the hardware prefetcher to pick up the streams.
constexpr int64_t kPrefetchChannels = 2;

}  // namespace simd_mix
}  // namespace adjointdeis

#define ADJOINTDEIS_SIMD_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,fma")))
namespace adjointdeis {
namespace simd_mix {
namespace avx512 {

inline bool supported() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}

// 16 float32 lanes; a tail is a lane mask.
struct Simd {
  using Vec = __m512;
  using Lanes = __mmask16;
  static constexpr int64_t kLanes = 16;
  // Vectors per block: a sum over s is a chain of dependent multiply-adds, so each output t runs this many
  // independent chains, enough to keep the FMA unit busy (with n_in = 4, 16 of the 32 registers hold sources).
  static constexpr int64_t kBlocks = 4;

  ADJOINTDEIS_SIMD_TARGET static Lanes lanes(int64_t left) {
    return left >= kLanes ? Lanes(0xFFFF) : left <= 0 ? Lanes(0) : Lanes((1u << left) - 1u);
  }
  ADJOINTDEIS_SIMD_TARGET static Vec broadcast(float v) { return _mm512_set1_ps(v); }
  ADJOINTDEIS_SIMD_TARGET static Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  ADJOINTDEIS_SIMD_TARGET static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  ADJOINTDEIS_SIMD_TARGET static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }

  // The `lanes` of a storage type as float32 (others zero, not read).
  template <typename T>
  ADJOINTDEIS_SIMD_TARGET static Vec load(const T* p, Lanes lanes) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm512_maskz_loadu_ps(lanes, p);
    } else {
      const __m256i half_words = _mm256_maskz_loadu_epi16(lanes, p);
      if constexpr (std::is_same_v<T, BFloat16>) {
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half_words), 16));
      } else {
        return _mm512_cvtph_ps(half_words);
      }
    }
  }

  // Stores the `lanes` of v in a storage type, rounding to nearest even (bfloat16: a NaN stays a NaN, as
  // to_storage; float16: the conversion instruction's rounding, as c10::Half's).
  template <typename T>
  ADJOINTDEIS_SIMD_TARGET static void store(T* p, Vec v, Lanes lanes) {
    if constexpr (std::is_same_v<T, float>) {
      _mm512_mask_storeu_ps(p, lanes, v);
    } else if constexpr (std::is_same_v<T, BFloat16>) {
      const __m512i bits = _mm512_castps_si512(v);
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
      __m512i rounded =
          _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
      rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
      _mm256_mask_storeu_epi16(p, lanes, _mm512_cvtepi32_epi16(rounded));
    } else {
      _mm256_mask_storeu_epi16(p, lanes, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }

  // Where v <= 0 or NaN (!(v > 0), as the epilogue).
  using Flags = __mmask16;  // a set of lanes
  ADJOINTDEIS_SIMD_TARGET static Flags not_positive(Vec v) {
    return _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NGT_UQ);
  }
  // v * scale in the lanes of `where`, else v.
  ADJOINTDEIS_SIMD_TARGET static Vec scale_where(Flags where, Vec v, Vec scale) {
    return _mm512_mask_mul_ps(v, where, v, scale);
  }
  // The bytes of a bool row (nonzero: set) as lanes.
  ADJOINTDEIS_SIMD_TARGET static Flags load_flags(const bool* p, Lanes lanes) {
    const __m128i bytes = _mm_maskz_loadu_epi8(lanes, p);
    return _mm_test_epi8_mask(bytes, bytes);
  }
  // Writes 1 or 0 per lane of `flags` as bool bytes.
  ADJOINTDEIS_SIMD_TARGET static void store_flags(bool* p, Flags flags, Lanes lanes) {
    _mm_mask_storeu_epi8(p, lanes, _mm_maskz_set1_epi8(flags, 1));
  }
};

#include "temporal_mix_rows.inc"

}  // namespace avx512
}  // namespace simd_mix
}  // namespace adjointdeis
#undef ADJOINTDEIS_SIMD_TARGET

#define ADJOINTDEIS_SIMD_TARGET __attribute__((target("avx2,fma,f16c")))
namespace adjointdeis {
namespace simd_mix {
namespace avx2 {

inline bool supported() {
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
}

// 8 float32 lanes. AVX2 has masked loads and stores for 32-bit lanes only, so a tail of a 16-bit or bool row
// goes through a small buffer on the stack; a tail is its length.
struct Simd {
  using Vec = __m256;
  using Lanes = int64_t;
  static constexpr int64_t kLanes = 8;
  // Two vectors per block: with n_in = 4 the sources take 8 of the 16 registers; consecutive outputs t are
  // independent chains the core overlaps.
  static constexpr int64_t kBlocks = 2;

  ADJOINTDEIS_SIMD_TARGET static Lanes lanes(int64_t left) { return std::clamp<int64_t>(left, 0, kLanes); }
  ADJOINTDEIS_SIMD_TARGET static Vec broadcast(float v) { return _mm256_set1_ps(v); }
  ADJOINTDEIS_SIMD_TARGET static Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  ADJOINTDEIS_SIMD_TARGET static Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  ADJOINTDEIS_SIMD_TARGET static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }

  ADJOINTDEIS_SIMD_TARGET static __m256i first(Lanes n) {  // the first n 32-bit lanes set
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  // The first n 16-bit or 8-bit elements of p as a 16-byte vector, the rest zero.
  template <typename T>
  ADJOINTDEIS_SIMD_TARGET static __m128i load_short(const T* p, Lanes n) {
    if (n == kLanes) {
      if constexpr (sizeof(T) == 2) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      else return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    }
    alignas(16) unsigned char buffer[16] = {};
    std::memcpy(buffer, p, static_cast<size_t>(n) * sizeof(T));
    return _mm_load_si128(reinterpret_cast<const __m128i*>(buffer));
  }
  template <typename T>
  ADJOINTDEIS_SIMD_TARGET static void store_short(T* p, __m128i v, Lanes n) {
    if (n == kLanes) {
      if constexpr (sizeof(T) == 2) _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v);
      else _mm_storel_epi64(reinterpret_cast<__m128i*>(p), v);
      return;
    }
    alignas(16) unsigned char buffer[16];
    _mm_store_si128(reinterpret_cast<__m128i*>(buffer), v);
    std::memcpy(p, buffer, static_cast<size_t>(n) * sizeof(T));
  }

  template <typename T>
  ADJOINTDEIS_SIMD_TARGET static Vec load(const T* p, Lanes n) {
    if constexpr (std::is_same_v<T, float>) {
      return n == kLanes ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first(n));
    } else if constexpr (std::is_same_v<T, BFloat16>) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load_short(p, n)), 16));
    } else {
      return _mm256_cvtph_ps(load_short(p, n));
    }
  }

  template <typename T>
  ADJOINTDEIS_SIMD_TARGET static void store(T* p, Vec v, Lanes n) {
    if constexpr (std::is_same_v<T, float>) {
      if (n == kLanes) _mm256_storeu_ps(p, v);
      else _mm256_maskstore_ps(p, first(n), v);
    } else if constexpr (std::is_same_v<T, BFloat16>) {
      const __m256i bits = _mm256_castps_si256(v);
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
      __m256i rounded =
          _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
      const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
      // The 32-bit lanes (each < 2^16) narrowed to 16 bits: packus works within 128-bit halves.
      const __m128i narrow = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
      store_short(p, narrow, n);
    } else {
      store_short(p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), n);
    }
  }

  using Flags = __m256;  // a set of lanes: all ones where set
  ADJOINTDEIS_SIMD_TARGET static Flags not_positive(Vec v) {
    return _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NGT_UQ);
  }
  ADJOINTDEIS_SIMD_TARGET static Vec scale_where(Flags where, Vec v, Vec scale) {
    return _mm256_blendv_ps(v, _mm256_mul_ps(v, scale), where);
  }
  ADJOINTDEIS_SIMD_TARGET static Flags load_flags(const bool* p, Lanes n) {
    const __m256i flags = _mm256_cvtepu8_epi32(load_short(reinterpret_cast<const uint8_t*>(p), n));
    return _mm256_castsi256_ps(_mm256_xor_si256(_mm256_cmpeq_epi32(flags, _mm256_setzero_si256()),
                                                _mm256_set1_epi32(-1)));
  }
  ADJOINTDEIS_SIMD_TARGET static void store_flags(bool* p, Flags flags, Lanes n) {
    const __m256i ones = _mm256_srli_epi32(_mm256_castps_si256(flags), 31);
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(ones), _mm256_extracti128_si256(ones, 1));
    store_short(reinterpret_cast<uint8_t*>(p), _mm_packus_epi16(words, words), n);
  }
};

#include "temporal_mix_rows.inc"

}  // namespace avx2
}  // namespace simd_mix
}  // namespace adjointdeis
#undef ADJOINTDEIS_SIMD_TARGET

#pragma GCC diagnostic pop

#endif
