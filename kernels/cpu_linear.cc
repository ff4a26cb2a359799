// Decode-step matmuls on a CPU: y[T, N] = x[T, K] w[N, K]^T, for a few rows T (a decode step's tokens)
// and a weight in HF's [out, in] layout, called from XLA through its FFI (kernels/cpu_kernels.py builds,
// loads and registers this file).
//
// XLA's CPU dot packs the weight into its own tiles on every call, which for a few rows costs more than
// the product itself. Here each weight row is read once, straight from memory, and multiplied with every
// row of x while it is in registers: tiles of 6 rows of x by 4 rows of w (24 accumulators of 16 floats,
// AVX-512), the weight rows ahead prefetched, the four sums of a row of a tile reduced together.
// bfloat16 weights take AVX512-BF16's dot product of bfloat16 pairs with float32 accumulation, x rounded
// to bfloat16 (round to nearest even), as XLA's own bfloat16 x bfloat16 -> float32 product does; float16
// weights are widened to float32 as they are loaded (x stays float32).
//
// The output rows are split into chunks of kChunkRows, shared with XLA's intra-op thread pool
// (cpu_parallel.h).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunkRows = 32;  // weight rows per unit of work
constexpr int kTileRows = 6;        // rows of x per register tile
constexpr int kTileCols = 4;        // weight rows per register tile
// Weight rows ahead that each k-step prefetches into L2: two chunks, about where this thread's next chunk
// starts when two threads take turns. Measured over the default model's weights (30 layers + LM head, 2
// cores), 8 rows of x: the next tile prefetched into L1, 32 ms per pass (float32) and 20 ms (bfloat16);
// 64 rows ahead into L2, 20 ms and 10-13 ms; 16 or 24 rows ahead fell between.
constexpr int64_t kPrefetchRows = 64;

// The sums of a, b, c and d, stored to y[0..3].
inline void Reduce4(__m512 a, __m512 b, __m512 c, __m512 d, float* y) {
  __m512 s0 = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  __m512 s1 = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(s0, s1, 0x88), _mm512_shuffle_f32x4(s0, s1, 0xDD));
  t = _mm512_add_ps(t, _mm512_shuffle_ps(t, t, 0xB1));
  t = _mm512_add_ps(t, _mm512_shuffle_ps(t, t, 0x4E));
  _mm_storeu_ps(y, _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, t)));
}

template <int TT, int NN>
inline void Store(__m512 (&acc)[TT][NN], float* y, int64_t ldy) {
  for (int t = 0; t < TT; ++t) {
    if constexpr (NN == 4) {
      Reduce4(acc[t][0], acc[t][1], acc[t][2], acc[t][3], y + t * ldy);
    } else {
      for (int n = 0; n < NN; ++n) y[t * ldy + n] = _mm512_reduce_add_ps(acc[t][n]);
    }
  }
}

// float32: 16 values of K per step.
struct F32 {
  using XElem = float;
  using WElem = float;
  using XVec = __m512;
  static constexpr int64_t kLanes = 16;
  static XVec LoadX(const float* p) { return _mm512_loadu_ps(p); }
  static XVec LoadXPart(const float* p, int64_t n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
  static __m512 LoadW(const float* p) { return LoadX(p); }
  static __m512 LoadWPart(const float* p, int64_t n) { return LoadXPart(p, n); }
  static __m512 Fma(__m512 acc, XVec x, __m512 w) { return _mm512_fmadd_ps(x, w, acc); }
};

// float16 weights, widened to float32 as they are loaded (exact); x and the products stay float32.
struct F16 : F32 {
  using WElem = uint16_t;
  static __m512 LoadW(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static __m512 LoadWPart(const uint16_t* p, int64_t n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p));
  }
};

// bfloat16: 32 values of K per step, products of pairs summed into 16 float32 lanes.
struct BF16 {
  using XElem = uint16_t;
  using WElem = uint16_t;
  using XVec = __m512bh;
  static constexpr int64_t kLanes = 32;
  static XVec LoadX(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static XVec LoadXPart(const uint16_t* p, int64_t n) {
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p);
  }
  static XVec LoadW(const uint16_t* p) { return LoadX(p); }
  static XVec LoadWPart(const uint16_t* p, int64_t n) { return LoadXPart(p, n); }
  static __m512 Fma(__m512 acc, XVec x, XVec w) { return _mm512_dpbf16_ps(acc, x, w); }
};

// y[t, n] (row stride ldy) for TT rows of x and NN rows of w, both K long.
template <typename D, int TT, int NN>
inline void Tile(const typename D::XElem* x, const typename D::WElem* w, int64_t K, float* y, int64_t ldy) {
  __m512 acc[TT][NN];
  for (int t = 0; t < TT; ++t)
    for (int n = 0; n < NN; ++n) acc[t][n] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + D::kLanes <= K; k += D::kLanes) {
    decltype(D::LoadW(w)) wv[NN];
    for (int n = 0; n < NN; ++n) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (n + kPrefetchRows) * K + k), _MM_HINT_T1);
      wv[n] = D::LoadW(w + n * K + k);
    }
    for (int t = 0; t < TT; ++t) {
      typename D::XVec xv = D::LoadX(x + t * K + k);
      for (int n = 0; n < NN; ++n) acc[t][n] = D::Fma(acc[t][n], xv, wv[n]);
    }
  }
  if (k < K) {
    decltype(D::LoadW(w)) wv[NN];
    for (int n = 0; n < NN; ++n) wv[n] = D::LoadWPart(w + n * K + k, K - k);
    for (int t = 0; t < TT; ++t) {
      typename D::XVec xv = D::LoadXPart(x + t * K + k, K - k);
      for (int n = 0; n < NN; ++n) acc[t][n] = D::Fma(acc[t][n], xv, wv[n]);
    }
  }
  Store<TT, NN>(acc, y, ldy);
}

// Rows n0..n1 of w against all T rows of x.
template <typename D>
void Rows(const typename D::XElem* x, int64_t T, int64_t K, const typename D::WElem* w, int64_t n0, int64_t n1,
          float* y, int64_t N) {
  int64_t n = n0;
  for (; n + kTileCols <= n1; n += kTileCols) {
    const typename D::WElem* wn = w + n * K;
    int64_t t = 0;
    for (; t + kTileRows <= T; t += kTileRows) Tile<D, kTileRows, kTileCols>(x + t * K, wn, K, y + t * N + n, N);
    const typename D::XElem* xt = x + t * K;
    float* yt = y + t * N + n;
    switch (T - t) {
      case 5: Tile<D, 5, kTileCols>(xt, wn, K, yt, N); break;
      case 4: Tile<D, 4, kTileCols>(xt, wn, K, yt, N); break;
      case 3: Tile<D, 3, kTileCols>(xt, wn, K, yt, N); break;
      case 2: Tile<D, 2, kTileCols>(xt, wn, K, yt, N); break;
      case 1: Tile<D, 1, kTileCols>(xt, wn, K, yt, N); break;
      default: break;
    }
  }
  for (; n < n1; ++n)
    for (int64_t t = 0; t < T; ++t) Tile<D, 1, 1>(x + t * K, w + n * K, K, y + t * N + n, N);
}

inline uint16_t RoundToBF16(float f) {  // round to nearest even, NaN kept NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

ffi::Error Check(ffi::Buffer<ffi::F32>& x, ffi::AnyBuffer::Dimensions wdims, ffi::Result<ffi::Buffer<ffi::F32>>& y) {
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || wdims.size() != 2 || yd.size() != 2 || xd[1] != wdims[1] || yd[0] != xd[0] ||
      yd[1] != wdims[0])
    return ffi::Error::InvalidArgument("kvloom linear: expected x [T, K], w [N, K], y [T, N]");
  return ffi::Error::Success();
}

// y = x w^T on the pool, in 32-row chunks of w; W: the weight buffer's dtype. x comes as float32 and is
// rounded to bfloat16 first where D multiplies bfloat16 pairs.
template <typename D, ffi::DataType W>
ffi::Error Linear(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<W> w,
                  ffi::Result<ffi::Buffer<ffi::F32>> y) {
  if (ffi::Error e = Check(x, w.dimensions(), y); e.failure()) return e;
  int64_t T = x.dimensions()[0], K = x.dimensions()[1], N = w.dimensions()[0];
  const float* xf = x.typed_data();
  std::vector<uint16_t> rounded;
  const typename D::XElem* xp;
  if constexpr (std::is_same_v<typename D::XElem, float>) {
    xp = xf;
  } else {
    rounded.resize(T * K);
    for (int64_t i = 0; i < T * K; ++i) rounded[i] = RoundToBF16(xf[i]);
    xp = rounded.data();
  }
  const auto* wp = static_cast<const typename D::WElem*>(w.untyped_data());
  float* yp = y->typed_data();
  kvloom::ParallelFor(pool, (N + kChunkRows - 1) / kChunkRows, [=](int64_t c) {
    Rows<D>(xp, T, K, wp, c * kChunkRows, std::min(N, (c + 1) * kChunkRows), yp, N);
  });
  return ffi::Error::Success();
}

ffi::Error LinearF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::Result<ffi::Buffer<ffi::F32>> y) {
  return Linear<F32>(pool, x, w, y);
}

ffi::Error LinearF16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F16> w,
                     ffi::Result<ffi::Buffer<ffi::F32>> y) {
  return Linear<F16>(pool, x, w, y);
}

ffi::Error LinearBF16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                      ffi::Result<ffi::Buffer<ffi::F32>> y) {
  return Linear<BF16>(pool, x, w, y);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KvloomLinearF32, LinearF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KvloomLinearBF16, LinearBF16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KvloomLinearF16, LinearF16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
