// Decode attention on a CPU: one new token per row against its past in the paged KV cache, called from
// XLA through its FFI (kernels/cpu_kernels.py builds it into one library with cpu_linear.cc). It computes
// what kernels/attention.py's `_decode_attention` does, for a head size that is a multiple of 16.
//
//   q [B, H, D] float32, already scaled; k_own, v_own [B, KVH, D] float32: the row's own new key and value
//   new_lens [B] int32 (0: a padding row, whose output is zeros); past_lens [B] int32
//   k_cache, v_cache [L, P, S, KVH, D]: float32, float16, or bfloat16 kept as its 16-bit patterns (uint16)
//   page_table [B, NP] int32; layer [] int32  ->  out [B, H, D] float32
//
// Each (row, KV head) is one unit of work: the G query heads that read that KV head share every key and
// value row loaded (gathered straight from its page, widened to float32 in registers), scores go to a
// buffer, then an exact softmax (max, a vector exp, sum) and the probability-weighted sum of the values.
// XLA runs the same as a loop over blocks of gathered pages with an online softmax; this reads each key and
// value once, with no gathered copy. Work is shared with XLA's intra-op pool (cpu_parallel.h).

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <tuple>
#include <vector>

#include "cpu_parallel.h"
#include "cpu_simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using kvloom::Exp;
using kvloom::Load16;

constexpr int64_t kMaxGroup = 16;  // query heads per KV head

struct Shape {
  int64_t pages, page_size, kv_heads, group, table_width;
};

// One row's G query heads against KV head `kvh`: C vectors of 16 per head (D = 16 C).
template <int C, typename E>
void RowHead(const float* q, const float* k_own, const float* v_own, const E* k_cache, const E* v_cache,
             const int32_t* table, int64_t past, int64_t layer, const Shape& sh, float* out,
             std::vector<float>& scores) {
  constexpr int64_t D = 16 * C;
  const int64_t G = sh.group, n = past + 1;
  scores.resize(G * n);
  float* s = scores.data();
  auto at = [&](const E* cache, int64_t t) {  // token t's row of this KV head
    int64_t page = table[t / sh.page_size];
    return cache + ((layer * sh.pages + page) * sh.page_size + t % sh.page_size) * sh.kv_heads * D;
  };
  __m512 qv[kMaxGroup][C];
  for (int64_t g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) qv[g][c] = _mm512_loadu_ps(q + g * D + c * 16);
  auto score = [&](const __m512 (&kv)[C], int64_t t) {
    for (int64_t g = 0; g < G; ++g) {
      __m512 a = _mm512_mul_ps(qv[g][0], kv[0]);
      for (int c = 1; c < C; ++c) a = _mm512_fmadd_ps(qv[g][c], kv[c], a);
      s[g * n + t] = _mm512_reduce_add_ps(a);
    }
  };
  __m512 row[C];
  for (int64_t t = 0; t < past; ++t) {
    const E* k = at(k_cache, t);
    for (int c = 0; c < C; ++c) row[c] = Load16(k + c * 16);
    score(row, t);
  }
  for (int c = 0; c < C; ++c) row[c] = _mm512_loadu_ps(k_own + c * 16);
  score(row, past);
  float sums[kMaxGroup];
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * n;
    float m = sg[0];
    for (int64_t t = 1; t < n; ++t) m = sg[t] > m ? sg[t] : m;
    const __m512 top = _mm512_set1_ps(m);
    __m512 total = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t += 16) {  // the exp, 16 at a time (the tail masked)
      const __mmask16 lanes = n - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - t)) - 1);
      __m512 p = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, sg + t), top));
      total = _mm512_add_ps(total, _mm512_maskz_mov_ps(lanes, p));
      _mm512_mask_storeu_ps(sg + t, lanes, p);
    }
    sums[g] = _mm512_reduce_add_ps(total);
  }
  __m512 acc[kMaxGroup][C];
  for (int64_t g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    if (t < past) {
      const E* v = at(v_cache, t);
      for (int c = 0; c < C; ++c) row[c] = Load16(v + c * 16);
    } else {
      for (int c = 0; c < C; ++c) row[c] = _mm512_loadu_ps(v_own + c * 16);
    }
    for (int64_t g = 0; g < G; ++g) {
      __m512 p = _mm512_set1_ps(s[g * n + t]);
      for (int c = 0; c < C; ++c) acc[g][c] = _mm512_fmadd_ps(p, row[c], acc[g][c]);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    __m512 inv = _mm512_set1_ps(1.0f / sums[g]);
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + g * D + c * 16, _mm512_mul_ps(acc[g][c], inv));
  }
}

template <int C, typename E>
void Run(ffi::ThreadPool& pool, int64_t B, int64_t H, const float* q, const float* k_own, const float* v_own,
         const int32_t* new_lens, const E* k_cache, const E* v_cache, const int32_t* table,
         const int32_t* past_lens, int64_t layer, Shape sh, float* out) {
  constexpr int64_t D = 16 * C;
  const int64_t KVH = sh.kv_heads, G = sh.group;
  kvloom::ParallelFor(pool, B * KVH, [=](int64_t item) {
    int64_t b = item / KVH, h = item % KVH;
    float* o = out + (b * H + h * G) * D;
    if (new_lens[b] <= 0) {
      std::memset(o, 0, sizeof(float) * G * D);
      return;
    }
    thread_local std::vector<float> scores;
    RowHead<C, E>(q + (b * H + h * G) * D, k_own + (b * KVH + h) * D, v_own + (b * KVH + h) * D,
                  k_cache + h * D, v_cache + h * D, table + b * sh.table_width, past_lens[b], layer, sh, o,
                  scores);
  });
}

template <typename E>
ffi::Error Dispatch(ffi::ThreadPool& pool, int64_t C, int64_t B, int64_t H, const float* q, const float* k_own,
                    const float* v_own, const int32_t* new_lens, const void* k_cache, const void* v_cache,
                    const int32_t* table, const int32_t* past_lens, int64_t layer, Shape sh, float* out) {
  auto kc = static_cast<const E*>(k_cache);
  auto vc = static_cast<const E*>(v_cache);
  switch (C) {
    case 1: Run<1, E>(pool, B, H, q, k_own, v_own, new_lens, kc, vc, table, past_lens, layer, sh, out); break;
    case 2: Run<2, E>(pool, B, H, q, k_own, v_own, new_lens, kc, vc, table, past_lens, layer, sh, out); break;
    case 4: Run<4, E>(pool, B, H, q, k_own, v_own, new_lens, kc, vc, table, past_lens, layer, sh, out); break;
    case 8: Run<8, E>(pool, B, H, q, k_own, v_own, new_lens, kc, vc, table, past_lens, layer, sh, out); break;
    default: return ffi::Error::InvalidArgument("kvloom decode attention: head size must be 16, 32, 64 or 128");
  }
  return ffi::Error::Success();
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_own,
                           ffi::Buffer<ffi::F32> v_own, ffi::Buffer<ffi::S32> new_lens, ffi::AnyBuffer k_cache,
                           ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> page_table,
                           ffi::Buffer<ffi::S32> past_lens, ffi::Buffer<ffi::S32> layer,
                           ffi::Result<ffi::Buffer<ffi::F32>> out) {
  auto qd = q.dimensions();
  auto cd = k_cache.dimensions();
  auto td = page_table.dimensions();
  if (qd.size() != 3 || cd.size() != 5 || td.size() != 2 || qd[2] != cd[4] || qd[1] % cd[3] != 0 ||
      qd[1] / cd[3] > kMaxGroup || k_cache.element_type() != v_cache.element_type())
    return ffi::Error::InvalidArgument("kvloom decode attention: unexpected shapes");
  int64_t B = qd[0], H = qd[1], D = qd[2];
  Shape sh{cd[1], cd[2], cd[3], H / cd[3], td[1]};
  int64_t lay = layer.typed_data()[0];
  auto args = std::make_tuple(D / 16, B, H, q.typed_data(), k_own.typed_data(), v_own.typed_data(),
                              new_lens.typed_data(), k_cache.untyped_data(), v_cache.untyped_data(),
                              page_table.typed_data(), past_lens.typed_data(), lay, sh, out->typed_data());
  if (D % 16 != 0) return ffi::Error::InvalidArgument("kvloom decode attention: head size not a multiple of 16");
  switch (k_cache.element_type()) {
    case ffi::DataType::F32:
      return std::apply([&](auto... a) { return Dispatch<float>(pool, a...); }, args);
    case ffi::DataType::U16:
      return std::apply([&](auto... a) { return Dispatch<uint16_t>(pool, a...); }, args);
    case ffi::DataType::F16:
      return std::apply([&](auto... a) { return Dispatch<kvloom::Half>(pool, a...); }, args);
    default:
      return ffi::Error::InvalidArgument("kvloom decode attention: a float32, float16 or bfloat16-bits cache only");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KvloomDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_own
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_own
                                  .Arg<ffi::Buffer<ffi::S32>>()   // new_lens
                                  .Arg<ffi::AnyBuffer>()          // k_cache
                                  .Arg<ffi::AnyBuffer>()          // v_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()   // page_table
                                  .Arg<ffi::Buffer<ffi::S32>>()   // past_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer
                                  .Ret<ffi::Buffer<ffi::F32>>());
