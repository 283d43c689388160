// Replacements of operator new and delete and, with glibc, of the malloc
// family, each counting successful allocation calls (see
// allocation_counter.hpp). Kept in its own translation unit so the compiler
// never pairs an inlined replacement with a call site.
#include "allocation_counter.hpp"

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <new>

namespace kvevict_bench {
namespace {

std::atomic<std::uint64_t> heap_allocations{0};

void count_allocation() { heap_allocations.fetch_add(1, std::memory_order_relaxed); }

}  // namespace

std::uint64_t allocation_count() { return heap_allocations.load(std::memory_order_relaxed); }

}  // namespace kvevict_bench

#if defined(__SANITIZE_ADDRESS__)
#define KVEVICT_BENCH_COUNT_MALLOC 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KVEVICT_BENCH_COUNT_MALLOC 0
#endif
#endif
#if !defined(KVEVICT_BENCH_COUNT_MALLOC)
#if defined(__GLIBC__)
#define KVEVICT_BENCH_COUNT_MALLOC 1
#else
#define KVEVICT_BENCH_COUNT_MALLOC 0
#endif
#endif

#if KVEVICT_BENCH_COUNT_MALLOC
// glibc exports its allocator under these names as well, so the replacements
// below can reach it without recursion.
extern "C" {
void* __libc_malloc(std::size_t size);
void* __libc_calloc(std::size_t count, std::size_t size);
void* __libc_realloc(void* pointer, std::size_t size);
void* __libc_memalign(std::size_t alignment, std::size_t size);

void* malloc(std::size_t size) noexcept {
  void* pointer = __libc_malloc(size);
  if (pointer != nullptr) kvevict_bench::count_allocation();
  return pointer;
}

void* calloc(std::size_t count, std::size_t size) noexcept {
  void* pointer = __libc_calloc(count, size);
  if (pointer != nullptr) kvevict_bench::count_allocation();
  return pointer;
}

// realloc to a new size counts as an allocation (it may move the block);
// realloc(p, 0) frees and is not counted.
void* realloc(void* pointer, std::size_t size) noexcept {
  void* result = __libc_realloc(pointer, size);
  if (result != nullptr && size != 0) kvevict_bench::count_allocation();
  return result;
}

void* memalign(std::size_t alignment, std::size_t size) noexcept {
  void* pointer = __libc_memalign(alignment, size);
  if (pointer != nullptr) kvevict_bench::count_allocation();
  return pointer;
}

void* aligned_alloc(std::size_t alignment, std::size_t size) noexcept {
  void* pointer = __libc_memalign(alignment, size);
  if (pointer != nullptr) kvevict_bench::count_allocation();
  return pointer;
}

int posix_memalign(void** out, std::size_t alignment, std::size_t size) noexcept {
  if (alignment < sizeof(void*) || (alignment & (alignment - 1)) != 0) return EINVAL;
  void* pointer = __libc_memalign(alignment, size);
  if (pointer == nullptr) return ENOMEM;
  kvevict_bench::count_allocation();
  *out = pointer;
  return 0;
}
}  // extern "C"
#endif

namespace kvevict_bench::detail {

// operator new goes through std::malloc; with the malloc family replaced,
// malloc already counts the call.
inline void* allocate(std::size_t size) {
  void* pointer = std::malloc(size == 0 ? 1 : size);
#if !KVEVICT_BENCH_COUNT_MALLOC
  if (pointer != nullptr) count_allocation();
#endif
  return pointer;
}

inline void* allocate_aligned(std::size_t size, std::align_val_t alignment) {
  const auto align = static_cast<std::size_t>(alignment);
  const std::size_t rounded = ((size == 0 ? 1 : size) + align - 1) / align * align;
  void* pointer = std::aligned_alloc(align, rounded);
#if !KVEVICT_BENCH_COUNT_MALLOC
  if (pointer != nullptr) count_allocation();
#endif
  return pointer;
}

}  // namespace kvevict_bench::detail

void* operator new(std::size_t size) {
  if (void* pointer = kvevict_bench::detail::allocate(size)) return pointer;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) {
  if (void* pointer = kvevict_bench::detail::allocate(size)) return pointer;
  throw std::bad_alloc();
}
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  return kvevict_bench::detail::allocate(size);
}
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept {
  return kvevict_bench::detail::allocate(size);
}
void* operator new(std::size_t size, std::align_val_t alignment) {
  if (void* pointer = kvevict_bench::detail::allocate_aligned(size, alignment)) return pointer;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size, std::align_val_t alignment) {
  if (void* pointer = kvevict_bench::detail::allocate_aligned(size, alignment)) return pointer;
  throw std::bad_alloc();
}
void* operator new(std::size_t size, std::align_val_t alignment, const std::nothrow_t&) noexcept {
  return kvevict_bench::detail::allocate_aligned(size, alignment);
}
void* operator new[](std::size_t size, std::align_val_t alignment, const std::nothrow_t&) noexcept {
  return kvevict_bench::detail::allocate_aligned(size, alignment);
}

void operator delete(void* pointer) noexcept { std::free(pointer); }
void operator delete[](void* pointer) noexcept { std::free(pointer); }
void operator delete(void* pointer, std::size_t) noexcept { std::free(pointer); }
void operator delete[](void* pointer, std::size_t) noexcept { std::free(pointer); }
void operator delete(void* pointer, const std::nothrow_t&) noexcept { std::free(pointer); }
void operator delete[](void* pointer, const std::nothrow_t&) noexcept { std::free(pointer); }
void operator delete(void* pointer, std::align_val_t) noexcept { std::free(pointer); }
void operator delete[](void* pointer, std::align_val_t) noexcept { std::free(pointer); }
void operator delete(void* pointer, std::size_t, std::align_val_t) noexcept { std::free(pointer); }
void operator delete[](void* pointer, std::size_t, std::align_val_t) noexcept { std::free(pointer); }
void operator delete(void* pointer, std::align_val_t, const std::nothrow_t&) noexcept { std::free(pointer); }
void operator delete[](void* pointer, std::align_val_t, const std::nothrow_t&) noexcept { std::free(pointer); }
