// The temporal mix of the DSNO layer in AVX-512 (float32 accumulation; float32, bfloat16 or float16
// storage), chosen at run time on CPUs that have AVX-512F/BW/VL. Included by fourier_conv_cpu.cpp only.
//
// One task is one (b, c) of the call: for each block of 64 pixels (four vectors) the n_in source values are
// loaded once (scaled by the mask's slope where a source mask is given) and every output t is summed from
// them in registers and finished there (activation, residual, store, mask). The portable tile path instead adds
// each source into a tile in L1, a load and a store per multiply-add, and runs each part of the output
// stage as its own pass; here a source element is read from memory once and an output written once.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__)
#define ADJOINTDEIS_HAVE_AVX512_MIX 1

#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "../fourier_conv.h"

#define ADJOINTDEIS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))

namespace adjointdeis {
namespace avx512 {

inline bool supported() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}

// 16 elements of a storage type as float32 (lanes not in `lanes`: zero, not read).
template <typename T>
ADJOINTDEIS_AVX512 inline __m512 load(const T* p, __mmask16 lanes) {
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
ADJOINTDEIS_AVX512 inline void store(T* p, __m512 v, __mmask16 lanes) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, lanes, v);
  } else if constexpr (std::is_same_v<T, BFloat16>) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_mask_storeu_epi16(p, lanes, _mm512_cvtepi32_epi16(rounded));
  } else {
    _mm256_mask_storeu_epi16(p, lanes, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

// The bytes of a bool row as a lane mask (nonzero: set).
ADJOINTDEIS_AVX512 inline __mmask16 load_mask(const bool* p, __mmask16 lanes) {
  const __m128i bytes = _mm_maskz_loadu_epi8(lanes, p);
  return _mm_test_epi8_mask(bytes, bytes);
}

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

// Pixels are taken kBlocks vectors at a time: a sum over s is a chain of dependent multiply-adds, so each
// output t runs kBlocks independent chains, enough to keep the FMA unit busy.
constexpr int64_t kBlocks = 4;
// The source rows of the channel this many ahead are prefetched: a row is a few cache lines at DSNO's
// shapes (H = W = 8: 64 pixels), too short for the hardware prefetcher to pick up the streams.
constexpr int64_t kPrefetchChannels = 2;

template <typename src_t, typename y_t, bool HasSrcMask, bool HasAddend, bool Activation, bool SaveMask>
ADJOINTDEIS_AVX512 void mix_rows(const RowsOfOneChannel& a) {
  const src_t* src = static_cast<const src_t*>(a.src);
  const y_t* addend = static_cast<const y_t*>(a.addend);
  y_t* y = static_cast<y_t*>(a.y);
  const __m512 zero = _mm512_setzero_ps(), slope = _mm512_set1_ps(a.slope), masked = _mm512_set1_ps(a.mask_slope);
  __m512 v[kMaxTimes][kBlocks];
  for (int64_t p0 = 0; p0 < a.pixels; p0 += 16 * kBlocks) {
    __mmask16 lanes[kBlocks];
    for (int64_t j = 0; j < kBlocks; ++j) {
      const int64_t left = a.pixels - p0 - 16 * j;
      lanes[j] = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1u);
    }
    for (int64_t s = 0; s < a.n_in; ++s) {
      for (int64_t j = 0; j < kBlocks; ++j) {
        const int64_t p = p0 + 16 * j;
        const src_t* at = src + s * a.src_s + p;
        _mm_prefetch(reinterpret_cast<const char*>(at + kPrefetchChannels * a.src_c), _MM_HINT_T0);
        v[s][j] = load(at, lanes[j]);
        if constexpr (HasSrcMask) {
          v[s][j] = _mm512_mask_mul_ps(v[s][j], load_mask(a.src_mask + s * a.src_mask_s + p, lanes[j]), v[s][j],
                                       masked);
        }
      }
    }
    for (int64_t t = 0; t < a.n_out; ++t) {
      const float* w = a.mix + t * a.mix_t;
      __m512 z[kBlocks];
      const __m512 w0 = _mm512_set1_ps(w[0]);
      for (int64_t j = 0; j < kBlocks; ++j) z[j] = _mm512_mul_ps(w0, v[0][j]);
      for (int64_t s = 1; s < a.n_in; ++s) {
        const __m512 ws = _mm512_set1_ps(w[s * a.mix_s]);
        for (int64_t j = 0; j < kBlocks; ++j) z[j] = _mm512_fmadd_ps(ws, v[s][j], z[j]);
      }
      for (int64_t j = 0; j < kBlocks; ++j) {
        const int64_t p = p0 + 16 * j;
        if constexpr (Activation) {
          const __mmask16 negative = _mm512_cmp_ps_mask(z[j], zero, _CMP_NGT_UQ);  // !(z > 0), as the epilogue
          if constexpr (SaveMask) {
            _mm_mask_storeu_epi8(a.mask + t * a.mask_t + p, lanes[j], _mm_maskz_set1_epi8(negative, 1));
          }
          z[j] = _mm512_mask_mul_ps(z[j], negative, z[j], slope);
        }
        if constexpr (HasAddend) z[j] = _mm512_add_ps(z[j], load(addend + t * a.addend_t + p, lanes[j]));
        store(y + t * a.y_t + p, z[j], lanes[j]);
      }
    }
  }
}

using MixRows = void (*)(const RowsOfOneChannel&);

// The compile-time variant of mix_rows for a call's element types and output stage.
template <typename src_t, typename y_t>
MixRows select(bool has_src_mask, bool has_addend, bool activation, bool save_mask) {
  MixRows fn = nullptr;
  dispatch_bool(has_src_mask, [&](auto masked) {
    dispatch_output_stage(has_addend, activation, save_mask, [&](auto add, auto act, auto save) {
      fn = &mix_rows<src_t, y_t, decltype(masked)::value, decltype(add)::value, decltype(act)::value,
                     decltype(save)::value>;
    });
  });
  return fn;
}

}  // namespace avx512
}  // namespace adjointdeis

#endif
