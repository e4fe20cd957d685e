// The CPU backend: host memory from aligned operator new, and a thread pool
// that the kernels split work over (see detail/thread_pool.hpp for why not
// OpenMP).
#pragma once

#include <cstddef>
#include <new>
#include <string_view>

#include "../concepts.hpp"
#include "../detail/thread_pool.hpp"

namespace kvcache {
inline namespace v0 {

struct cpu {
  using axis = backend_tag;
  static constexpr std::string_view name = "cpu";
  static constexpr std::size_t alignment = 64;

  static void* allocate(std::size_t bytes) {
    return ::operator new (bytes == 0 ? 1 : bytes, std::align_val_t{alignment});
  }
  static void deallocate(void* p, std::size_t) noexcept {
    ::operator delete (p, std::align_val_t{alignment});
  }

  struct context {
    explicit context(std::size_t threads) : pool(threads) {}
    detail::thread_pool pool;
  };
};

static_assert(backend_policy<cpu>);

}  // namespace v0
}  // namespace kvcache
