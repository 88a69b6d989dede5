// Index and accumulation math of upfirdn2d, shared verbatim by the CPU and CUDA kernels.
//
// Along one axis, output o reads the zero-upsampled, padded input u at positions o*down + t (t = filter tap):
//   out[o] = sum_t u[o*down + t - pad0] * g[t],   u[q] = x[q / up] if q % up == 0, else 0,
// with g the filter in correlation orientation (already flipped and scaled by the gain on the Python side).
// Only every up-th tap meets a real sample, so each output visits ceil(taps / up) taps at most (polyphase).
#pragma once

#include <cstdint>

#include "common.h"

namespace toolkit_ops {

struct TapRange {
    int first_input;  // index into x of the first contributing sample
    int first_tap;    // filter tap that multiplies it; later ones are first_tap + k*up with inputs first_input + k
    int count;        // number of contributing samples (may be 0)
};

TK_HOST_DEVICE TapRange tap_range(int o, int up, int down, int pad0, int in_size, int taps)
{
    int origin = o * down - pad0;                 // position in u of tap 0
    int first_tap = ((-origin) % up + up) % up;   // first tap landing on a multiple of up
    int first_input = (origin + first_tap) / up;  // exact division
    if (first_input < 0) {                        // skip samples left of the image (zero padding)
        first_tap += -first_input * up;
        first_input = 0;
    }
    int count = first_tap < taps ? (taps - first_tap + up - 1) / up : 0;
    if (count > in_size - first_input)            // and samples right of it
        count = in_size - first_input;
    if (count < 0)
        count = 0;
    TapRange r = {first_input, first_tap, count};
    return r;
}

// One output sample of one channel plane. `g` is the [taps_y, taps_x] filter (row-major) in the accumulation type.
template <typename acc_t, typename scalar_t>
TK_HOST_DEVICE acc_t upfirdn2d_sample(const scalar_t* plane, int64_t in_w, const acc_t* g, int taps_x,
                                      int upx, int upy, TapRange ry, TapRange rx)
{
    acc_t sum = acc_t(0);
    for (int ky = 0; ky < ry.count; ky++) {
        const scalar_t* row = plane + (int64_t)(ry.first_input + ky) * in_w + rx.first_input;
        const acc_t* taps = g + (int64_t)(ry.first_tap + ky * upy) * taps_x + rx.first_tap;
        for (int kx = 0; kx < rx.count; kx++)
            sum += static_cast<acc_t>(row[kx]) * taps[kx * upx];
    }
    return sum;
}

// The same sum with compile-time tap counts (loops fully unrolled), for the interior samples of the common small
// filters; the summation order is that of upfirdn2d_sample, so both give identical results.
template <int COUNT_Y, int COUNT_X, typename acc_t, typename scalar_t>
TK_HOST_DEVICE acc_t upfirdn2d_sample_fixed(const scalar_t* plane, int64_t in_w, const acc_t* g, int taps_x,
                                            int upx, int upy, TapRange ry, TapRange rx)
{
    acc_t sum = acc_t(0);
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int ky = 0; ky < COUNT_Y; ky++) {
        const scalar_t* row = plane + (int64_t)(ry.first_input + ky) * in_w + rx.first_input;
        const acc_t* taps = g + (int64_t)(ry.first_tap + ky * upy) * taps_x + rx.first_tap;
#if defined(__CUDACC__)
#pragma unroll
#endif
        for (int kx = 0; kx < COUNT_X; kx++)
            sum += static_cast<acc_t>(row[kx]) * taps[kx * upx];
    }
    return sum;
}

}  // namespace toolkit_ops
