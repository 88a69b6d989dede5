// CPU kernels of the toolkit's custom ops and their registration as torch.ops.toolkit_ops.*.
// The element/sample math lives in bias_act_math.h and upfirdn2d_math.h, shared with ops_cuda.cu.

#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bias_act_math.h"
#include "ops.h"
#include "upfirdn2d_math.h"

namespace toolkit_ops {
namespace {

//----------------------------------------------------------------------------------------------------------------
// bias_act

// One run of elements sharing a bias value. Plain arrays, values by copy and __restrict__ pointers, so the
// compiler can vectorise the loop (nothing written through `out` can change the loop's inputs).
template <typename scalar_t, typename acc_t, int A, int MODE>
void bias_act_run(scalar_t* __restrict__ out, const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                  const scalar_t* __restrict__ ddx, int64_t n, acc_t bias, acc_t alpha, acc_t gain, acc_t clamp)
{
    for (int64_t i = 0; i < n; i++) {
        const acc_t dy_i = MODE == kForward ? acc_t(0) : (acc_t)dy[i];
        const acc_t ddx_i = MODE == kGrad2 ? (acc_t)ddx[i] : acc_t(0);
        out[i] = (scalar_t)bias_act_element<A, MODE, acc_t>((acc_t)x[i], bias, dy_i, ddx_i, alpha, gain, clamp);
    }
}

template <typename scalar_t, int A, int MODE>
void bias_act_cpu_loop(scalar_t* out, const scalar_t* x, const scalar_t* b, const scalar_t* dy,
                       const scalar_t* ddx, BiasActShape s, double alpha_, double gain_, double clamp_)
{
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t alpha = (acc_t)alpha_, gain = (acc_t)gain_, clamp = (acc_t)clamp_;
    const int64_t stride = s.channel_stride, channels = s.channels;
    at::parallel_for(0, s.numel, at::internal::GRAIN_SIZE, [=](int64_t begin, int64_t end) {
        if (stride == 1 && channels > 1) {  // The bias changes every element (e.g. channels_last).
            int64_t c = begin % channels;
            for (int64_t i = begin; i < end; i++) {
                bias_act_run<scalar_t, acc_t, A, MODE>(out + i, x + i, dy ? dy + i : nullptr, ddx ? ddx + i : nullptr,
                                                       1, (acc_t)b[c], alpha, gain, clamp);
                if (++c == channels)
                    c = 0;
            }
            return;
        }
        for (int64_t run_start = begin; run_start < end;) {  // Runs of `stride` elements share one bias value.
            const int64_t run = run_start / stride;
            const int64_t run_end = std::min(end, (run + 1) * stride);
            const acc_t bias = b ? (acc_t)b[run % channels] : acc_t(0);
            bias_act_run<scalar_t, acc_t, A, MODE>(out + run_start, x + run_start, dy ? dy + run_start : nullptr,
                                                   ddx ? ddx + run_start : nullptr, run_end - run_start, bias,
                                                   alpha, gain, clamp);
            run_start = run_end;
        }
    });
}

template <typename scalar_t, int A>
void bias_act_cpu_mode(int64_t mode, scalar_t* out, const scalar_t* x, const scalar_t* b, const scalar_t* dy,
                       const scalar_t* ddx, BiasActShape s, double alpha, double gain, double clamp)
{
    if (mode == kForward) bias_act_cpu_loop<scalar_t, A, kForward>(out, x, b, dy, ddx, s, alpha, gain, clamp);
    else if (mode == kGrad) bias_act_cpu_loop<scalar_t, A, kGrad>(out, x, b, dy, ddx, s, alpha, gain, clamp);
    else bias_act_cpu_loop<scalar_t, A, kGrad2>(out, x, b, dy, ddx, s, alpha, gain, clamp);
}

at::Tensor bias_act_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& dy,
                        const c10::optional<at::Tensor>& ddx, int64_t mode, int64_t dim, int64_t act,
                        double alpha, double gain, double clamp)
{
    BiasActShape s = check_bias_act(x, b, dy, ddx, mode, dim);
    at::Tensor out = at::empty_like(x);
    if (s.numel == 0)
        return out;
    AT_DISPATCH_FLOATING_TYPES_AND_HALF(x.scalar_type(), "toolkit_ops::bias_act", [&] {
        scalar_t* o = out.data_ptr<scalar_t>();
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        const scalar_t* bp = b.has_value() ? b->const_data_ptr<scalar_t>() : nullptr;
        const scalar_t* dyp = dy.has_value() ? dy->const_data_ptr<scalar_t>() : nullptr;
        const scalar_t* ddxp = ddx.has_value() ? ddx->const_data_ptr<scalar_t>() : nullptr;
        dispatch_activation(act, [&](auto A) {
            bias_act_cpu_mode<scalar_t, decltype(A)::value>(mode, o, xp, bp, dyp, ddxp, s, alpha, gain, clamp);
        });
    });
    return out;
}

//----------------------------------------------------------------------------------------------------------------
// upfirdn2d

// One call's rows [begin, end) of output planes; samples whose tap counts equal (COUNT_Y, COUNT_X) take the
// unrolled path (COUNT_Y = 0 disables it), the rest (image borders, other filters) the general one.
template <int COUNT_Y, int COUNT_X, typename scalar_t, typename acc_t>
void upfirdn2d_cpu_rows(scalar_t* out, const scalar_t* x, const acc_t* g, const TapRange* cols, Upfirdn2dShape s,
                        int upy, int downy, int pady0, int upx, int64_t begin, int64_t end)
{
    for (int64_t r = begin; r < end; r++) {
        const int64_t plane = r / s.out_h;
        const TapRange ry = tap_range((int)(r % s.out_h), upy, downy, pady0, s.in_h, s.taps_y);
        const scalar_t* in_plane = x + plane * s.in_h * (int64_t)s.in_w;
        scalar_t* out_row = out + r * s.out_w;
        for (int ox = 0; ox < s.out_w; ox++) {
            const TapRange rx = cols[ox];
            acc_t v;
            if (COUNT_Y > 0 && ry.count == COUNT_Y && rx.count == COUNT_X)
                v = upfirdn2d_sample_fixed<(COUNT_Y > 0 ? COUNT_Y : 1), COUNT_X, acc_t>(in_plane, s.in_w, g, s.taps_x,
                                                                                       upx, upy, ry, rx);
            else
                v = upfirdn2d_sample<acc_t>(in_plane, s.in_w, g, s.taps_x, upx, upy, ry, rx);
            out_row[ox] = (scalar_t)v;
        }
    }
}

template <typename scalar_t, typename acc_t>
void upfirdn2d_cpu_rows_any(int count_y, int count_x, scalar_t* out, const scalar_t* x, const acc_t* g,
                            const TapRange* cols, Upfirdn2dShape s, int upy, int downy, int pady0, int upx,
                            int64_t begin, int64_t end)
{
    using F = void (*)(scalar_t*, const scalar_t*, const acc_t*, const TapRange*, Upfirdn2dShape, int, int, int, int,
                       int64_t, int64_t);
    F rows = &upfirdn2d_cpu_rows<0, 0, scalar_t, acc_t>;
    if (count_y == 1 && count_x == 2) rows = &upfirdn2d_cpu_rows<1, 2, scalar_t, acc_t>;
    if (count_y == 2 && count_x == 1) rows = &upfirdn2d_cpu_rows<2, 1, scalar_t, acc_t>;
    if (count_y == 2 && count_x == 2) rows = &upfirdn2d_cpu_rows<2, 2, scalar_t, acc_t>;
    if (count_y == 1 && count_x == 4) rows = &upfirdn2d_cpu_rows<1, 4, scalar_t, acc_t>;
    if (count_y == 4 && count_x == 1) rows = &upfirdn2d_cpu_rows<4, 1, scalar_t, acc_t>;
    if (count_y == 4 && count_x == 4) rows = &upfirdn2d_cpu_rows<4, 4, scalar_t, acc_t>;
    rows(out, x, g, cols, s, upy, downy, pady0, upx, begin, end);
}

at::Tensor upfirdn2d_cpu(const at::Tensor& x, const at::Tensor& g, int64_t upx, int64_t upy, int64_t downx,
                         int64_t downy, int64_t padx0, int64_t padx1, int64_t pady0, int64_t pady1)
{
    Upfirdn2dShape s = check_upfirdn2d(x, g, upx, upy, downx, downy, padx0, padx1, pady0, pady1);
    at::Tensor out = at::empty({x.size(0), x.size(1), s.out_h, s.out_w}, x.options());
    if (out.numel() == 0)
        return out;
    // Horizontal tap ranges are the same for every row and plane: compute them once.
    std::vector<TapRange> cols(s.out_w);
    for (int ox = 0; ox < s.out_w; ox++)
        cols[ox] = tap_range(ox, (int)upx, (int)downx, (int)padx0, s.in_w, s.taps_x);
    const int count_y = (s.taps_y + (int)upy - 1) / (int)upy;  // taps per sample away from the borders
    const int count_x = (s.taps_x + (int)upx - 1) / (int)upx;
    const int64_t rows = s.planes * s.out_h;
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, s.out_w * s.taps_x));
    AT_DISPATCH_FLOATING_TYPES_AND_HALF(x.scalar_type(), "toolkit_ops::upfirdn2d", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        const acc_t* gp = g.const_data_ptr<acc_t>();
        scalar_t* op = out.data_ptr<scalar_t>();
        const TapRange* cp = cols.data();
        const int uy = (int)upy, dy = (int)downy, py = (int)pady0, ux = (int)upx;
        at::parallel_for(0, rows, grain, [=](int64_t begin, int64_t end) {  // By copy: no aliasing with outputs.
            upfirdn2d_cpu_rows_any<scalar_t, acc_t>(count_y, count_x, op, xp, gp, cp, s, uy, dy, py, ux, begin, end);
        });
    });
    return out;
}

}  // namespace
}  // namespace toolkit_ops

TORCH_LIBRARY(toolkit_ops, m)
{
    m.def("bias_act(Tensor x, Tensor? b, Tensor? dy, Tensor? ddx, int mode, int dim, int act, float alpha, "
          "float gain, float clamp) -> Tensor");
    m.def("upfirdn2d(Tensor x, Tensor g, int upx, int upy, int downx, int downy, int padx0, int padx1, "
          "int pady0, int pady1) -> Tensor");
}

TORCH_LIBRARY_IMPL(toolkit_ops, CPU, m)
{
    m.impl("bias_act", &toolkit_ops::bias_act_cpu);
    m.impl("upfirdn2d", &toolkit_ops::upfirdn2d_cpu);
}
