// What the CUDA part of the build was compiled with: the CUDA translation units record it at load
// time (a CPU-only build never does), the op cuda_build reports it.
#pragma once

#include <cstdint>

namespace adjointdeis {

void register_cuda_build(int64_t cuda_version, const char* arch_list);

}  // namespace adjointdeis
