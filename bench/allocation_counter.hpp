// Counts heap allocations made by the benchmark program, so a benchmark can
// report how many allocations one decode step or one selection makes.
//
// The global operator new and delete (every form) are replaced, and with
// glibc the malloc family too: Eigen allocates its dynamic matrices with
// std::malloc, not operator new, so counting operator new alone would miss
// them. The malloc replacements forward to glibc's own entry points
// (__libc_malloc and friends), so the allocator itself is unchanged. Every
// successful allocation call adds one to `allocation_count()`; frees are not
// counted.
//
// The replacements live in allocation_counter.cpp, which CMake links into
// every benchmark program. Under AddressSanitizer only operator new is
// counted, because the sanitizer owns malloc.
#pragma once

#include <cstdint>

namespace kvevict_bench {

// Heap allocations since the program started (malloc family and operator new).
std::uint64_t allocation_count();

}  // namespace kvevict_bench

