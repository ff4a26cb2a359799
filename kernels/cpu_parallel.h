// Work shared between the calling thread and XLA's intra-op thread pool, for kernels/cpu_*.cc.
//
// ParallelFor(pool, n, body) runs body(i) for i in [0, n): items are claimed from an atomic counter by the
// calling thread and by tasks scheduled on the pool. The caller claims items until none are left, then
// waits only for items already running on another thread, so it never waits for a task that has not
// started (no deadlock when the pool is busy); a task that starts late finds nothing to do (the shared
// state outlives the call).

#ifndef KVLOOM_KERNELS_CPU_PARALLEL_H_
#define KVLOOM_KERNELS_CPU_PARALLEL_H_

#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace kvloom {

struct ParallelWork {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t items = 0;
};

template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, F body) {
  auto work = std::make_shared<ParallelWork>();
  work->items = n;
  auto run = [work, body]() {
    int64_t i;
    while ((i = work->next.fetch_add(1, std::memory_order_relaxed)) < work->items) {
      body(i);
      work->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = pool.num_threads() - 1;
  if (helpers > n - 1) helpers = n - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([run]() { run(); });
  run();
  while (work->done.load(std::memory_order_acquire) < work->items) _mm_pause();
}

}  // namespace kvloom

#endif  // KVLOOM_KERNELS_CPU_PARALLEL_H_
