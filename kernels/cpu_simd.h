// Vector helpers shared by kernels/cpu_*attention.cc (AVX-512).
//
//   Half       a float16 value's 16 bits (a type of its own: uint16_t holds bfloat16 bits)
//   Load16(p)  16 float32 values from p, or 16 bfloat16 (uint16_t bits) or float16 (Half) values widened
//              to float32, exactly
//   Exp(x)     e^x of 16 float32 values (Cephes' expf: a degree-5 polynomial after reducing by ln 2,
//              within 2 ulp for x in [-87, 88]; below about -104 it returns 0, above 88.7 the clamp's value)

#ifndef KVLOOM_KERNELS_CPU_SIMD_H_
#define KVLOOM_KERNELS_CPU_SIMD_H_

#include <immintrin.h>

#include <cstdint>

namespace kvloom {

struct Half {
  uint16_t bits;
};

inline __m512 Load16(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 Load16(const Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline __m512 Load16(const uint16_t* p) {  // bfloat16 bits: the high half of a float32
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

inline __m512 Exp(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);  // p * 2^n: 0 when n is far below the exponent's range
}

}  // namespace kvloom

#endif  // KVLOOM_KERNELS_CPU_SIMD_H_
