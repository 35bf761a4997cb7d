// Keeps the binary within manylinux_2_28 (glibc 2.28) when it is built on a newer glibc.
//
// libstdc++'s shared_ptr reference counting (torch::stable::Tensor holds one) reads glibc's
// __libc_single_threaded flag, a symbol of glibc 2.32, whenever the building system has it. This
// hidden definition satisfies those reads inside _C instead, with the value glibc gives a process that
// may run threads (0: always use atomic reference counts), so _C asks nothing newer than glibc 2.28.
#if defined(__linux__)
#include <features.h>
#endif
#if defined(__GLIBC__) && defined(__has_include)
#if __has_include(<sys/single_threaded.h>)
extern "C" __attribute__((visibility("hidden"))) char __libc_single_threaded = 0;
#endif
#endif
