// Shared by the CPU (C++) and CUDA kernels: the qualifiers that let one function body compile for both.
#pragma once

#if defined(__CUDACC__)
#define TK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TK_HOST_DEVICE inline
#endif
