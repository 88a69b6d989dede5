// CUDA kernels of the toolkit's custom ops, registered for the CUDA dispatch key of torch.ops.toolkit_ops.*.
// One thread per output element; the per-element math is the same header code the CPU kernels run.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "bias_act_math.h"
#include "ops.h"
#include "upfirdn2d_math.h"

namespace toolkit_ops {
namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n)
{
    const int64_t max_blocks = 65535;  // Grid-stride loops cover the rest.
    return (int)std::min<int64_t>(max_blocks, std::max<int64_t>(1, (n + kThreads - 1) / kThreads));
}

//----------------------------------------------------------------------------------------------------------------
// bias_act

template <typename scalar_t, int A, int MODE>
__global__ void bias_act_kernel(scalar_t* out, const scalar_t* x, const scalar_t* b, const scalar_t* dy,
                                const scalar_t* ddx, BiasActShape s, at::opmath_type<scalar_t> alpha,
                                at::opmath_type<scalar_t> gain, at::opmath_type<scalar_t> clamp)
{
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < s.numel; i += (int64_t)blockDim.x * gridDim.x) {
        const acc_t bias = b ? (acc_t)b[(i / s.channel_stride) % s.channels] : acc_t(0);
        out[i] = (scalar_t)bias_act_element<A, MODE, acc_t>((acc_t)x[i], bias, dy ? (acc_t)dy[i] : acc_t(0),
                                                             ddx ? (acc_t)ddx[i] : acc_t(0), alpha, gain, clamp);
    }
}

template <typename scalar_t, int A>
void launch_bias_act(int64_t mode, scalar_t* out, const scalar_t* x, const scalar_t* b, const scalar_t* dy,
                     const scalar_t* ddx, BiasActShape s, double alpha, double gain, double clamp)
{
    using acc_t = at::opmath_type<scalar_t>;
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const int blocks = blocks_for(s.numel);
    if (mode == kForward)
        bias_act_kernel<scalar_t, A, kForward><<<blocks, kThreads, 0, stream>>>(out, x, b, dy, ddx, s, (acc_t)alpha, (acc_t)gain, (acc_t)clamp);
    else if (mode == kGrad)
        bias_act_kernel<scalar_t, A, kGrad><<<blocks, kThreads, 0, stream>>>(out, x, b, dy, ddx, s, (acc_t)alpha, (acc_t)gain, (acc_t)clamp);
    else
        bias_act_kernel<scalar_t, A, kGrad2><<<blocks, kThreads, 0, stream>>>(out, x, b, dy, ddx, s, (acc_t)alpha, (acc_t)gain, (acc_t)clamp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor bias_act_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& dy,
                         const c10::optional<at::Tensor>& ddx, int64_t mode, int64_t dim, int64_t act,
                         double alpha, double gain, double clamp)
{
    BiasActShape s = check_bias_act(x, b, dy, ddx, mode, dim);
    const c10::cuda::CUDAGuard device_guard(x.device());
    at::Tensor out = at::empty_like(x);
    if (s.numel == 0)
        return out;
    AT_DISPATCH_FLOATING_TYPES_AND_HALF(x.scalar_type(), "toolkit_ops::bias_act_cuda", [&] {
        scalar_t* o = out.data_ptr<scalar_t>();
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        const scalar_t* bp = b.has_value() ? b->const_data_ptr<scalar_t>() : nullptr;
        const scalar_t* dyp = dy.has_value() ? dy->const_data_ptr<scalar_t>() : nullptr;
        const scalar_t* ddxp = ddx.has_value() ? ddx->const_data_ptr<scalar_t>() : nullptr;
        dispatch_activation(act, [&](auto A) {
            launch_bias_act<scalar_t, decltype(A)::value>(mode, o, xp, bp, dyp, ddxp, s, alpha, gain, clamp);
        });
    });
    return out;
}

//----------------------------------------------------------------------------------------------------------------
// upfirdn2d

template <typename scalar_t>
__global__ void upfirdn2d_kernel(scalar_t* out, const scalar_t* x, const at::opmath_type<scalar_t>* g,
                                 Upfirdn2dShape s, int upx, int upy, int downx, int downy, int padx0, int pady0)
{
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t total = s.planes * s.out_h * (int64_t)s.out_w;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)blockDim.x * gridDim.x) {
        const int ox = (int)(i % s.out_w);
        const int oy = (int)((i / s.out_w) % s.out_h);
        const int64_t plane = i / ((int64_t)s.out_w * s.out_h);
        const TapRange ry = tap_range(oy, upy, downy, pady0, s.in_h, s.taps_y);
        const TapRange rx = tap_range(ox, upx, downx, padx0, s.in_w, s.taps_x);
        out[i] = (scalar_t)upfirdn2d_sample<acc_t>(x + plane * s.in_h * (int64_t)s.in_w, s.in_w, g, s.taps_x,
                                                   upx, upy, ry, rx);
    }
}

at::Tensor upfirdn2d_cuda(const at::Tensor& x, const at::Tensor& g, int64_t upx, int64_t upy, int64_t downx,
                          int64_t downy, int64_t padx0, int64_t padx1, int64_t pady0, int64_t pady1)
{
    Upfirdn2dShape s = check_upfirdn2d(x, g, upx, upy, downx, downy, padx0, padx1, pady0, pady1);
    const c10::cuda::CUDAGuard device_guard(x.device());
    at::Tensor out = at::empty({x.size(0), x.size(1), s.out_h, s.out_w}, x.options());
    if (out.numel() == 0)
        return out;
    AT_DISPATCH_FLOATING_TYPES_AND_HALF(x.scalar_type(), "toolkit_ops::upfirdn2d_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        upfirdn2d_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            out.data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), g.const_data_ptr<acc_t>(), s, (int)upx, (int)upy,
            (int)downx, (int)downy, (int)padx0, (int)pady0);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
}

}  // namespace
}  // namespace toolkit_ops

TORCH_LIBRARY_IMPL(toolkit_ops, CUDA, m)
{
    m.impl("bias_act", &toolkit_ops::bias_act_cuda);
    m.impl("upfirdn2d", &toolkit_ops::upfirdn2d_cuda);
}
