// Replaces the global operator new and delete with malloc and free and counts
// every allocation, so a test can show that a loop does not allocate.
//
// Include this header in exactly one translation unit of a test program (each
// tests/test_*.cpp is its own program). Every replaceable form except the
// aligned ones is replaced, so allocation and release always pair up, also
// under AddressSanitizer. Eigen allocates through malloc directly and is not
// counted; the library's scratch storage is std::vector, which is.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <new>

namespace kvevict::test {

inline std::atomic<long> allocation_count{0};

inline void* counted_allocate(std::size_t size) noexcept {
  ++allocation_count;
  return std::malloc(size == 0 ? 1 : size);
}

}  // namespace kvevict::test

// GCC pairs the replaced operators with malloc and free and warns about a
// mismatch it infers after inlining them; the pairing here is consistent.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

void* operator new(std::size_t size) {
  if (void* memory = kvevict::test::counted_allocate(size)) return memory;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) {
  if (void* memory = kvevict::test::counted_allocate(size)) return memory;
  throw std::bad_alloc();
}
void* operator new(std::size_t size, const std::nothrow_t&) noexcept { return kvevict::test::counted_allocate(size); }
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept {
  return kvevict::test::counted_allocate(size);
}
void operator delete(void* memory) noexcept { std::free(memory); }
void operator delete[](void* memory) noexcept { std::free(memory); }
void operator delete(void* memory, std::size_t) noexcept { std::free(memory); }
void operator delete[](void* memory, std::size_t) noexcept { std::free(memory); }
void operator delete(void* memory, const std::nothrow_t&) noexcept { std::free(memory); }
void operator delete[](void* memory, const std::nothrow_t&) noexcept { std::free(memory); }
