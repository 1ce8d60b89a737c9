// The CUDA twins of kernels.rs's two fused CPU ops (the `cuda` feature):
// causal softmax over attention scores and SwiGLU, in f32 arithmetic for
// f32, f16 and bf16 tensors. Compiled to PTX by build.rs (nvcc), loaded and
// launched by kernels.rs, checked against the CPU kernels by its
// `cuda_kernels_match_the_cpu_kernels` test on a GPU. Each replaces about
// eight of candle's kernels (dtype casts, a mask built per call, a strided
// where, the softmax) with one pass.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Reduces over a block of SOFTMAX_THREADS threads; every thread gets the result.
#define SOFTMAX_THREADS 256
template <bool IS_MAX>
__device__ __forceinline__ float block_reduce(float value, float* shared) {
    for (int offset = 16; offset > 0; offset /= 2) {
        float other = __shfl_xor_sync(0xffffffff, value, offset);
        value = IS_MAX ? fmaxf(value, other) : value + other;
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) shared[warp] = value;
    __syncthreads();
    value = lane < SOFTMAX_THREADS / 32 ? shared[lane] : (IS_MAX ? -INFINITY : 0.0f);
    for (int offset = 16; offset > 0; offset /= 2) {
        float other = __shfl_xor_sync(0xffffffff, value, offset);
        value = IS_MAX ? fmaxf(value, other) : value + other;
    }
    __syncthreads();
    return value;
}

// One block per score row. The row is row `r = row % rows` of its
// [rows, keys] matrix and sees keys 0..=first_key + r; the rest come out 0.
template <typename T>
__device__ void causal_softmax(const T* scores, T* out, uint32_t rows, uint32_t keys, uint32_t first_key) {
    __shared__ float shared[SOFTMAX_THREADS / 32];
    const size_t row = blockIdx.x;
    const uint32_t r = row % rows;
    const uint32_t visible = min(first_key + r + 1, keys);
    const T* x = scores + row * keys;
    T* y = out + row * keys;
    float max = -INFINITY;
    for (uint32_t j = threadIdx.x; j < visible; j += SOFTMAX_THREADS) max = fmaxf(max, to_float(x[j]));
    max = block_reduce<true>(max, shared);
    float sum = 0.0f;
    for (uint32_t j = threadIdx.x; j < visible; j += SOFTMAX_THREADS) sum += __expf(to_float(x[j]) - max);
    const float inverse = 1.0f / block_reduce<false>(sum, shared);
    for (uint32_t j = threadIdx.x; j < keys; j += SOFTMAX_THREADS) {
        y[j] = from_float<T>(j < visible ? __expf(to_float(x[j]) - max) * inverse : 0.0f);
    }
}

// gate_up: [n_rows, 2 * width], gate first; out: [n_rows, width].
template <typename T>
__device__ void swiglu(const T* gate_up, T* out, uint32_t width, size_t total) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)blockDim.x * gridDim.x) {
        const size_t row = i / width, column = i % width;
        const float gate = to_float(gate_up[row * 2 * width + column]);
        const float up = to_float(gate_up[row * 2 * width + width + column]);
        out[i] = from_float<T>(gate / (1.0f + __expf(-gate)) * up);
    }
}

#define INSTANTIATE(SUFFIX, T)                                                                      \
    extern "C" __global__ void causal_softmax_##SUFFIX(const T* scores, T* out, uint32_t rows,      \
                                                       uint32_t keys, uint32_t first_key) {         \
        causal_softmax<T>(scores, out, rows, keys, first_key);                                      \
    }                                                                                               \
    extern "C" __global__ void swiglu_##SUFFIX(const T* gate_up, T* out, uint32_t width, size_t total) { \
        swiglu<T>(gate_up, out, width, total);                                                      \
    }
INSTANTIATE(f32, float)
INSTANTIATE(f16, __half)
INSTANTIATE(bf16, __nv_bfloat16)
