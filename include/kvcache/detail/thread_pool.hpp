// A small persistent thread pool for the CPU kernels. We use our own rather
// than OpenMP so that including the headers never imposes -fopenmp or an
// OpenMP runtime on the user's build. The calling thread works too, so a pool
// of n threads starts n - 1 workers. Tasks are claimed from an atomic counter,
// which balances uneven work (ragged batches) without a scheduler.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <thread>
#include <vector>

namespace kvcache {
inline namespace v0 {
namespace detail {

class thread_pool {
 public:
  //! threads == 0 takes std::thread::hardware_concurrency().
  explicit thread_pool(std::size_t threads = 0) {
    if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
    size_ = threads;
    workers_.reserve(threads - 1);
    for (std::size_t w = 1; w < threads; ++w) workers_.emplace_back([this, w] { work(w); });
  }
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;
  ~thread_pool() {
    {
      std::lock_guard lock(mutex_);
      stop_.store(true, std::memory_order_release);
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  std::size_t size() const noexcept { return size_; }

  //! Calls f(task, worker) for every task in [0, tasks), worker in [0, size()).
  //! f must not throw. Returns when all tasks are done.
  template <class F>
  void run(std::size_t tasks, F&& f) {
    if (tasks == 0) return;
    if (size_ == 1 || tasks == 1) {
      for (std::size_t t = 0; t < tasks; ++t) f(t, std::size_t{0});
      return;
    }
    using Fn = std::remove_reference_t<F>;
    {
      std::lock_guard lock(mutex_);
      job_ = [](void* ctx, std::size_t t, std::size_t w) { (*static_cast<Fn*>(ctx))(t, w); };
      ctx_ = const_cast<void*>(static_cast<const void*>(&f));
      tasks_ = tasks;
      next_.store(0, std::memory_order_relaxed);
      busy_.store(workers_.size(), std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    drain(0);
    for (std::size_t i = 0; i < spin_rounds; ++i) {
      if (busy_.load(std::memory_order_acquire) == 0) return;
      pause();
    }
    std::unique_lock lock(mutex_);
    done_.wait(lock, [&] { return busy_.load(std::memory_order_acquire) == 0; });
  }

 private:
  // Workers spin this many pause rounds (tens of microseconds) for the next
  // job before they sleep: a decode step runs several short jobs back to
  // back, and waking a sleeping thread cost ~80 us on a virtual machine,
  // more than a whole one-token write.
  static constexpr std::size_t spin_rounds = 4096;

  static void pause() noexcept {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  void drain(std::size_t worker) {
    for (std::size_t t; (t = next_.fetch_add(1, std::memory_order_relaxed)) < tasks_;)
      job_(ctx_, t, worker);
  }

  void work(std::size_t worker) {
    std::size_t seen = 0;
    for (;;) {
      bool ready = false;
      for (std::size_t i = 0; i < spin_rounds && !ready; ++i) {
        ready = generation_.load(std::memory_order_acquire) != seen ||
                stop_.load(std::memory_order_acquire);
        if (!ready) pause();
      }
      if (!ready) {
        std::unique_lock lock(mutex_);
        wake_.wait(lock, [&] {
          return stop_.load(std::memory_order_relaxed) ||
                 generation_.load(std::memory_order_relaxed) != seen;
        });
      }
      if (stop_.load(std::memory_order_acquire)) return;
      seen = generation_.load(std::memory_order_acquire);
      drain(worker);
      if (busy_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard lock(mutex_);  // pairs with the predicate check in run()
        done_.notify_one();
      }
    }
  }

  std::size_t size_ = 1;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  void (*job_)(void*, std::size_t, std::size_t) = nullptr;
  void* ctx_ = nullptr;
  std::size_t tasks_ = 0;
  std::atomic<std::size_t> next_{0};
  std::atomic<std::size_t> busy_{0};
  std::atomic<std::size_t> generation_{0};
  std::atomic<bool> stop_{false};
};

}  // namespace detail
}  // namespace v0
}  // namespace kvcache
