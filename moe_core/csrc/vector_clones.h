// Portable attributes for the CPU kernels.
//
// VECTOR_CLONES: compile a function twice on x86-64, for the x86-64-v3 level (AVX2, FMA) and for the
// baseline, and pick the copy at load time by the CPU's features. Elsewhere it compiles once.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

// ALWAYS_INLINE: a helper called inside a VECTOR_CLONES function must be inlined into each copy, or the
// copy calls the baseline helper once per element and the loop does not vectorise.
#if defined(__GNUC__) || defined(__clang__)
#define ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define ALWAYS_INLINE inline
#endif
