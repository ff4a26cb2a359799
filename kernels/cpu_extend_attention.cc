// Extend attention on a CPU: each row's Q new tokens against its past in the paged KV cache and, causally,
// against each other, called from XLA through its FFI (kernels/cpu_kernels.py builds it into one library
// with the other kernels). It computes what kernels/attention.py's `prefix_extend_attention` does for a
// step of more than one token per row: prefill chunks, scoring's packed items, speculative verify steps.
//
//   q [B, Q, H, D] float32, already scaled; k_new, v_new [B, Q, KVH, D] float32
//   new_lens [B] int32 (the row's real new tokens; the rest, and a row of 0, give zeros)
//   segment_ids [B, Q] int32: new token i sees new token j <= i only when both carry the same id; ids
//       label contiguous runs (scoring's packed items; all zeros for a plain extension)
//   k_cache, v_cache [L, P, S, KVH, D]: float32, float16, or bfloat16 kept as its 16-bit patterns (uint16)
//   page_table [B, NP] int32; past_lens [B] int32; layer [] int32  ->  out [B, Q, H, D] float32
//
// Two passes, each shared with XLA's intra-op pool (cpu_parallel.h):
//   1. per (row, KV head): its keys, the past's then the new ones, transposed into a scratch buffer
//      [D, past + Q] as float32, so that 16 consecutive keys of one dimension are one vector;
//   2. per (row, KV head, block of query tokens): the block's M = tokens x G query rows (M <= kMaxRows)
//      walk the keys they see in blocks of kKeys: the past, then the new keys from the start of the block's
//      first segment to its last token. Per key block: scores S = Q K^T in 6 x 64 register tiles, the mask
//      (the past's tail; causality and segments among new keys), an online softmax (running max and sum,
//      a vector exp), and acc += P V in 6 x 64 tiles, reading each value row straight from its page
//      (bfloat16 widened in registers) or from v_new. Finally out = acc / sum.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_parallel.h"
#include "cpu_simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using kvloom::Exp;
using kvloom::Load16;

constexpr int kKeys = 64;       // keys per block: 4 vectors
constexpr int kTile = 6;        // query rows per register tile
constexpr int kMaxRows = 48;    // query rows per unit of work (tokens x G, padded to kTile)
constexpr int kMaxD = 128;
constexpr int64_t kMaxGroup = 16;
constexpr float kNegInf = -1e30f;
constexpr int64_t kKeptScratch = int64_t{16} << 20;  // floats of transposed keys kept between calls (64 MiB)

template <typename E>
struct Step {
  int64_t B, Q, H, KVH, G, pages, page_size, table_width, layer;
  const float *q, *k_new, *v_new;
  const int32_t *new_lens, *seg, *table, *past_lens;
  const E *k_cache, *v_cache;
  float* out;
  float* keys_t;              // pass 1's transposed keys
  const int64_t* keys_t_at;   // per (row, KV head): offset into keys_t; its row stride is stride[b]
  const int64_t* stride;

  template <int D>
  const E* CacheRow(const E* cache, int64_t b, int64_t h, int64_t t) const {
    int64_t page = table[b * table_width + t / page_size];
    return cache + (((layer * pages + page) * page_size + t % page_size) * KVH + h) * D;
  }
};

template <int D, typename E>
void TransposeKeys(const Step<E>& st, int64_t b, int64_t h) {
  const int64_t past = st.past_lens[b], n = std::min<int64_t>(st.new_lens[b], st.Q), stride = st.stride[b];
  float* kt = st.keys_t + st.keys_t_at[b * st.KVH + h];
  for (int64_t t = 0; t < past; ++t) {
    alignas(64) float row[D];
    const E* k = st.template CacheRow<D>(st.k_cache, b, h, t);
    for (int c = 0; c < D / 16; ++c) _mm512_store_ps(row + 16 * c, Load16(k + 16 * c));
    for (int d = 0; d < D; ++d) kt[d * stride + t] = row[d];
  }
  for (int64_t j = 0; j < stride - past; ++j) {
    const float* k = st.k_new + ((b * st.Q + j) * st.KVH + h) * D;
    for (int d = 0; d < D; ++d) kt[d * stride + past + j] = j < n ? k[d] : 0.0f;
  }
}

// The online softmax state of one unit's query rows.
template <int D>
struct Rows {
  alignas(64) float q[kMaxRows][D];
  alignas(64) float acc[kMaxRows][D];
  alignas(64) float s[kMaxRows][kKeys];  // a block's scores, then its probabilities
  float max[kMaxRows], sum[kMaxRows], corr[kMaxRows];
  int32_t token[kMaxRows];
  int rows, padded;  // M, and M rounded up to kTile
};

// S = Q K^T for keys [k0, k0 + kKeys) of the transposed buffer.
template <int D>
void Scores(Rows<D>& r, const float* kt, int64_t stride, int64_t k0) {
  for (int r0 = 0; r0 < r.padded; r0 += kTile) {
    __m512 a[kTile][4];
    for (int i = 0; i < kTile; ++i)
      for (int c = 0; c < 4; ++c) a[i][c] = _mm512_setzero_ps();
    for (int d = 0; d < D; ++d) {
      const float* k = kt + d * stride + k0;
      __m512 kv[4] = {_mm512_loadu_ps(k), _mm512_loadu_ps(k + 16), _mm512_loadu_ps(k + 32),
                      _mm512_loadu_ps(k + 48)};
      for (int i = 0; i < kTile; ++i) {
        __m512 qb = _mm512_set1_ps(r.q[r0 + i][d]);
        for (int c = 0; c < 4; ++c) a[i][c] = _mm512_fmadd_ps(qb, kv[c], a[i][c]);
      }
    }
    for (int i = 0; i < kTile; ++i)
      for (int c = 0; c < 4; ++c) _mm512_store_ps(&r.s[r0 + i][16 * c], a[i][c]);
  }
}

// Folds the block's scores into the running max and sum; leaves each row's probabilities in r.s and the
// factor its accumulator is to be scaled by in r.corr. mask(i, c): the visible lanes of vector c of row i.
template <int D, typename Mask>
void Softmax(Rows<D>& r, Mask mask) {
  for (int i = 0; i < r.rows; ++i) {
    __mmask16 m[4];
    __m512 s[4];
    __m512 best = _mm512_set1_ps(kNegInf);
    for (int c = 0; c < 4; ++c) {
      m[c] = mask(i, c);
      s[c] = _mm512_load_ps(&r.s[i][16 * c]);
      best = _mm512_mask_max_ps(best, m[c], best, s[c]);
    }
    const float old = r.max[i], now = std::max(old, _mm512_reduce_max_ps(best));
    const float corr = now > kNegInf ? std::exp(old - now) : 1.0f;
    __m512 total = _mm512_setzero_ps(), top = _mm512_set1_ps(now);
    for (int c = 0; c < 4; ++c) {
      __m512 p = _mm512_maskz_mov_ps(m[c], Exp(_mm512_sub_ps(s[c], top)));
      total = _mm512_add_ps(total, p);
      _mm512_store_ps(&r.s[i][16 * c], p);
    }
    r.max[i] = now;
    r.sum[i] = r.sum[i] * corr + _mm512_reduce_add_ps(total);
    r.corr[i] = corr;
  }
  for (int i = r.rows; i < r.padded; ++i) {
    std::memset(r.s[i], 0, sizeof(r.s[i]));
    r.corr[i] = 0.0f;
  }
}

// acc = acc * corr + P V for nk keys whose value rows are values[0..nk).
template <int D, typename V>
void Accumulate(Rows<D>& r, const V* const* values, int nk) {
  constexpr int W = D / 16 < 4 ? D / 16 : 4;  // vectors of D per pass
  for (int r0 = 0; r0 < r.padded; r0 += kTile) {
    for (int c0 = 0; c0 < D / 16; c0 += W) {
      __m512 a[kTile][W];
      for (int i = 0; i < kTile; ++i) {
        __m512 corr = _mm512_set1_ps(r.corr[r0 + i]);
        for (int c = 0; c < W; ++c) a[i][c] = _mm512_mul_ps(_mm512_load_ps(&r.acc[r0 + i][16 * (c0 + c)]), corr);
      }
      for (int k = 0; k < nk; ++k) {
        __m512 v[W];
        for (int c = 0; c < W; ++c) v[c] = Load16(values[k] + 16 * (c0 + c));
        for (int i = 0; i < kTile; ++i) {
          __m512 p = _mm512_set1_ps(r.s[r0 + i][k]);
          for (int c = 0; c < W; ++c) a[i][c] = _mm512_fmadd_ps(p, v[c], a[i][c]);
        }
      }
      for (int i = 0; i < kTile; ++i)
        for (int c = 0; c < W; ++c) _mm512_store_ps(&r.acc[r0 + i][16 * (c0 + c)], a[i][c]);
    }
  }
}

inline __mmask16 Below(int64_t n) {  // lanes [0, n) of a vector, n clamped to [0, 16]
  return n <= 0 ? 0 : n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
}

// One unit: row b, KV head h, query tokens [t0, t0 + tokens) (all below new_lens[b]).
template <int D, typename E>
void Unit(const Step<E>& st, int64_t b, int64_t h, int64_t t0, int64_t tokens) {
  thread_local Rows<D> r;
  const int64_t G = st.G, past = st.past_lens[b], stride = st.stride[b];
  const float* kt = st.keys_t + st.keys_t_at[b * st.KVH + h];
  const int32_t* seg = st.seg + b * st.Q;
  r.rows = static_cast<int>(tokens * G);
  r.padded = (r.rows + kTile - 1) / kTile * kTile;
  for (int i = 0; i < r.padded; ++i) {
    if (i < r.rows) {
      r.token[i] = static_cast<int32_t>(t0 + i / G);
      std::memcpy(r.q[i], st.q + ((b * st.Q + r.token[i]) * st.H + h * G + i % G) * D, sizeof(float) * D);
    } else {
      std::memset(r.q[i], 0, sizeof(r.q[i]));
    }
    std::memset(r.acc[i], 0, sizeof(r.acc[i]));
    r.max[i] = kNegInf;
    r.sum[i] = 0.0f;
  }
  const E* values[kKeys];
  for (int64_t k0 = 0; k0 < past; k0 += kKeys) {  // the past: every row sees it all
    const int nk = static_cast<int>(std::min<int64_t>(kKeys, past - k0));
    Scores(r, kt, stride, k0);
    Softmax(r, [&](int, int c) { return Below(nk - 16 * c); });
    for (int k = 0; k < nk; ++k) values[k] = st.template CacheRow<D>(st.v_cache, b, h, k0 + k);
    Accumulate(r, values, nk);
  }
  int64_t first = t0;  // new keys from the start of the first token's segment
  while (first > 0 && seg[first - 1] == seg[t0]) --first;
  const int64_t last = t0 + tokens;  // new keys [first, last)
  const float* new_values[kKeys];
  for (int64_t j0 = first; j0 < last; j0 += kKeys) {
    const int nk = static_cast<int>(std::min<int64_t>(kKeys, last - j0));
    Scores(r, kt, stride, past + j0);
    Softmax(r, [&](int i, int c) {
      const int64_t j = j0 + 16 * c, t = r.token[i];
      __mmask16 m = Below(std::min<int64_t>(nk - 16 * c, t - j + 1));  // j <= t, within the block
      __m512i ids = _mm512_maskz_loadu_epi32(m, seg + j);
      return _mm512_mask_cmpeq_epi32_mask(m, ids, _mm512_set1_epi32(seg[t]));
    });
    for (int k = 0; k < nk; ++k) new_values[k] = st.v_new + ((b * st.Q + j0 + k) * st.KVH + h) * D;
    Accumulate(r, new_values, nk);
  }
  for (int i = 0; i < r.rows; ++i) {
    float* o = st.out + ((b * st.Q + r.token[i]) * st.H + h * G + i % G) * D;
    __m512 inv = _mm512_set1_ps(r.sum[i] > 0.0f ? 1.0f / r.sum[i] : 0.0f);
    for (int c = 0; c < D / 16; ++c) _mm512_storeu_ps(o + 16 * c, _mm512_mul_ps(_mm512_load_ps(&r.acc[i][16 * c]), inv));
  }
}

template <int D, typename E>
void Run(ffi::ThreadPool& pool, Step<E> st) {
  const int64_t B = st.B, KVH = st.KVH, Q = st.Q, H = st.H;
  // scratch for the transposed keys: each (row, KV head) D rows of past + Q keys, padded by a block
  std::vector<int64_t> at(B * KVH), stride(B);
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) {
    stride[b] = (st.new_lens[b] > 0 ? st.past_lens[b] : 0) + Q + kKeys;
    for (int64_t h = 0; h < KVH; ++h, total += D * stride[b]) at[b * KVH + h] = total;
  }
  // kept for the calling thread's next call up to kKeptScratch floats; a larger one is freed on return
  thread_local std::vector<float> kept;
  std::vector<float> once;
  std::vector<float>& keys_t = total <= kKeptScratch ? kept : once;
  if (static_cast<int64_t>(keys_t.size()) < total) keys_t.resize(total);
  st.keys_t = keys_t.data();
  st.keys_t_at = at.data();
  st.stride = stride.data();
  kvloom::ParallelFor(pool, B * KVH, [&st, KVH](int64_t item) {
    int64_t b = item / KVH;
    if (st.new_lens[b] > 0) TransposeKeys<D, E>(st, b, item % KVH);
  });
  const int64_t per_unit = std::max<int64_t>(1, kMaxRows / st.G);  // query tokens per unit
  const int64_t blocks = (Q + per_unit - 1) / per_unit;
  kvloom::ParallelFor(pool, B * KVH * blocks, [&st, KVH, Q, H, blocks, per_unit](int64_t item) {
    const int64_t b = item / (KVH * blocks), h = item / blocks % KVH, t0 = item % blocks * per_unit;
    const int64_t n = std::min<int64_t>(st.new_lens[b], Q);
    const int64_t tokens = std::max<int64_t>(0, std::min(per_unit, n - t0));
    if (tokens > 0) Unit<D, E>(st, b, h, t0, tokens);
    for (int64_t t = std::max(t0, n); t < std::min(t0 + per_unit, Q); ++t)  // padding tokens: zeros
      std::memset(st.out + ((b * Q + t) * H + h * st.G) * D, 0, sizeof(float) * st.G * D);
  });
}

template <typename E>
ffi::Error Dispatch(ffi::ThreadPool& pool, int64_t D, Step<E> st) {
  switch (D) {
    case 16: Run<16, E>(pool, st); break;
    case 32: Run<32, E>(pool, st); break;
    case 64: Run<64, E>(pool, st); break;
    case 128: Run<128, E>(pool, st); break;
    default: return ffi::Error::InvalidArgument("kvloom extend attention: head size must be 16, 32, 64 or 128");
  }
  return ffi::Error::Success();
}

ffi::Error ExtendAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new,
                           ffi::Buffer<ffi::F32> v_new, ffi::Buffer<ffi::S32> new_lens,
                           ffi::Buffer<ffi::S32> segment_ids, ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                           ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> past_lens,
                           ffi::Buffer<ffi::S32> layer, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  auto qd = q.dimensions();
  auto kd = k_new.dimensions();
  auto cd = k_cache.dimensions();
  auto td = page_table.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || cd.size() != 5 || td.size() != 2 || qd[3] != cd[4] ||
      kd[2] != cd[3] || qd[2] % cd[3] != 0 || qd[2] / cd[3] > kMaxGroup || qd[3] > kMaxD ||
      k_cache.element_type() != v_cache.element_type())
    return ffi::Error::InvalidArgument("kvloom extend attention: unexpected shapes");
  const int64_t D = qd[3];
  auto make = [&](auto* cache_type) {
    using E = std::remove_const_t<std::remove_pointer_t<decltype(cache_type)>>;
    Step<E> st{};
    st.B = qd[0], st.Q = qd[1], st.H = qd[2], st.KVH = cd[3], st.G = qd[2] / cd[3];
    st.pages = cd[1], st.page_size = cd[2], st.table_width = td[1], st.layer = layer.typed_data()[0];
    st.q = q.typed_data(), st.k_new = k_new.typed_data(), st.v_new = v_new.typed_data();
    st.new_lens = new_lens.typed_data(), st.seg = segment_ids.typed_data();
    st.table = page_table.typed_data(), st.past_lens = past_lens.typed_data();
    st.k_cache = static_cast<const E*>(k_cache.untyped_data());
    st.v_cache = static_cast<const E*>(v_cache.untyped_data());
    st.out = out->typed_data();
    return Dispatch<E>(pool, D, st);
  };
  switch (k_cache.element_type()) {
    case ffi::DataType::F32: return make(static_cast<float*>(nullptr));
    case ffi::DataType::U16: return make(static_cast<uint16_t*>(nullptr));
    case ffi::DataType::F16: return make(static_cast<kvloom::Half*>(nullptr));
    default: return ffi::Error::InvalidArgument("kvloom extend attention: a float32, float16 or bfloat16-bits cache only");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KvloomExtendAttention, ExtendAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_new
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_new
                                  .Arg<ffi::Buffer<ffi::S32>>()   // new_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()   // segment_ids
                                  .Arg<ffi::AnyBuffer>()          // k_cache
                                  .Arg<ffi::AnyBuffer>()          // v_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()   // page_table
                                  .Arg<ffi::Buffer<ffi::S32>>()   // past_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer
                                  .Ret<ffi::Buffer<ffi::F32>>());
