// Function multiversioning for the CPU loops. Each loop marked ADJOINTDEIS_CPU_LOOP is compiled
// for AVX-512, AVX2 and the x86-64 baseline, and the dynamic loader picks one for the machine
// (GCC's target_clones, an ifunc): a wheel built for any x86-64 still uses the widest vectors
// the CPU has, without global -m flags that would break older CPUs. Elsewhere the plain loop is
// compiled once. The loops are written as simple indexed loops over __restrict pointers so the
// compiler vectorises each clone, or, where an output may be an input itself, marked ADJOINTDEIS_NO_CARRIED:
// no iteration reads what another writes (element i is read, then written, by iteration i alone), so the
// loop vectorises without __restrict and without a run-time overlap check.
#pragma once

#if defined(__clang__)
#define ADJOINTDEIS_NO_CARRIED _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define ADJOINTDEIS_NO_CARRIED _Pragma("GCC ivdep")
#else
#define ADJOINTDEIS_NO_CARRIED
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define ADJOINTDEIS_CPU_LOOP __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ADJOINTDEIS_CPU_LOOP
#endif
