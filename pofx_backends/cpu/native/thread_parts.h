// Work split over XLA:CPU's intra-op thread pool, shared by the native kernels that take
// ffi::ThreadPool (conv3x3.cc, group_norm.cc).
#ifndef POFX_NATIVE_THREAD_PARTS_H_
#define POFX_NATIVE_THREAD_PARTS_H_

#include <atomic>
#include <memory>
#include <thread>
#include "xla/ffi/api/ffi.h"

namespace pofx {

// Runs part(0) ... part(parts - 1) on XLA's pool. Parts are claimed from a shared counter, and the
// calling thread claims them too, so it never waits on a task queued behind it; it returns when
// every part is done. A task that starts after the last part was claimed touches only the counter.
template <typename Part>
void RunParts(xla::ffi::ThreadPool& pool, int parts, const Part& part) {
  if (parts <= 1) {
    part(0);
    return;
  }
  struct State {
    std::atomic<int> next{0}, done{0};
  };
  auto st = std::make_shared<State>();
  auto work = [st, &part, parts] {
    for (int p; (p = st->next.fetch_add(1)) < parts;) {
      part(p);
      st->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int p = 1; p < parts; ++p) {
    auto w = work;
    pool.Schedule(std::move(w));
  }
  work();
  while (st->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
}

}  // namespace pofx

#endif  // POFX_NATIVE_THREAD_PARTS_H_
