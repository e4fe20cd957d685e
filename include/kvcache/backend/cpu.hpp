// The CPU backend: host memory from aligned operator new, and a thread pool
// that the kernels split work over (see detail/thread_pool.hpp for why not
// OpenMP).
#pragma once

#include <concepts>
#include <cstddef>
#include <new>
#include <string_view>

#include "../concepts.hpp"
#include "../detail/thread_pool.hpp"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kvcache {
inline namespace v0 {

struct cpu {
  using axis = backend_tag;
  static constexpr std::string_view name = "cpu";
  static constexpr std::size_t alignment = 64;

  //! Regions of at least this many bytes are aligned to it and, on Linux,
  //! asked for transparent huge pages: decode walks up to 2 x kv_heads
  //! sequential streams per thread, and with 4 KiB pages each stream needs a
  //! page walk every 4 KiB.
  static constexpr std::size_t huge_page = std::size_t{2} << 20;

  static void* allocate(std::size_t bytes) {
    if (bytes < huge_page)
      return ::operator new (bytes == 0 ? 1 : bytes, std::align_val_t{alignment});
    void* p = ::operator new (bytes, std::align_val_t{huge_page});
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    ::madvise(p, bytes, MADV_HUGEPAGE);  // advice only: failure changes nothing
#endif
    return p;
  }
  static void deallocate(void* p, std::size_t bytes) noexcept {
    ::operator delete (p, std::align_val_t{bytes < huge_page ? alignment : huge_page});
  }

  struct context {
    explicit context(std::size_t threads) : pool(threads) {}
    detail::thread_pool pool;
  };
};

static_assert(backend_policy<cpu>);

//! host_backend<B>: a backend the CPU kernels run on.
//!  1. B satisfies backend_policy.
//!  2. B::context is, or derives from, cpu::context: the kernels split their
//!     work over its thread pool.
//!  3. B::allocate returns memory the host reads and writes (not checkable
//!     here; a device allocator belongs to a backend with its own kernels).
//! A custom host backend changes where memory comes from (a counting or
//! pinned allocator, an arena, a NUMA node) and keeps the kernels.
template <class B>
concept host_backend = backend_policy<B> && std::derived_from<typename B::context, cpu::context>;

static_assert(host_backend<cpu>);

}  // namespace v0
}  // namespace kvcache
