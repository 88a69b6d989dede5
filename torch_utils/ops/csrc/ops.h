// Argument checks and output allocation shared by the CPU and CUDA entry points (host code only).
#pragma once

#include <cstdlib>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "bias_act_math.h"
#include "upfirdn2d_math.h"

namespace toolkit_ops {

// Calls fn(std::integral_constant<int, A>{}) for the activation code `act`, so each kernel is compiled once per
// activation with the activation known at compile time. The CPU and CUDA entry points share this switch.
template <typename Fn>
inline void dispatch_activation(int64_t act, Fn&& fn)
{
    switch (act) {
        case kLinear:   fn(std::integral_constant<int, kLinear>{}); break;
        case kRelu:     fn(std::integral_constant<int, kRelu>{}); break;
        case kLrelu:    fn(std::integral_constant<int, kLrelu>{}); break;
        case kTanh:     fn(std::integral_constant<int, kTanh>{}); break;
        case kSigmoid:  fn(std::integral_constant<int, kSigmoid>{}); break;
        case kElu:      fn(std::integral_constant<int, kElu>{}); break;
        case kSelu:     fn(std::integral_constant<int, kSelu>{}); break;
        case kSoftplus: fn(std::integral_constant<int, kSoftplus>{}); break;
        case kSwish:    fn(std::integral_constant<int, kSwish>{}); break;
        default: TORCH_CHECK(false, "bias_act: unknown activation code ", act);
    }
}

struct BiasActShape {
    int64_t numel;
    int64_t channel_stride;  // memory distance between consecutive entries of x along `dim`
    int64_t channels;        // length of b (1 when there is no bias)
};

// x must be dense (its layout, e.g. channels_last, is kept); dy/ddx must share x's strides; b is 1-D contiguous.
inline BiasActShape check_bias_act(const at::Tensor& x, const c10::optional<at::Tensor>& b,
                                   const c10::optional<at::Tensor>& dy, const c10::optional<at::Tensor>& ddx,
                                   int64_t mode, int64_t dim)
{
    TORCH_CHECK(x.is_non_overlapping_and_dense(), "bias_act: x must be non-overlapping and dense");
    TORCH_CHECK(x.numel() <= INT64_C(0x7fffffffffff), "bias_act: x is too large");
    for (const auto* t : {&dy, &ddx}) {
        if (t->has_value()) {
            TORCH_CHECK((*t)->sizes() == x.sizes() && (*t)->strides() == x.strides(),
                        "bias_act: gradient tensors must have the shape and strides of x");
            TORCH_CHECK((*t)->scalar_type() == x.scalar_type() && (*t)->device() == x.device(),
                        "bias_act: gradient tensors must have the dtype and device of x");
        }
    }
    TORCH_CHECK(mode == 0 || (mode == 1 && dy.has_value()) || (mode == 2 && dy.has_value() && ddx.has_value()),
                "bias_act: mode 0 (forward), 1 (needs dy) or 2 (needs dy and ddx)");
    BiasActShape s = {x.numel(), x.numel() > 0 ? x.numel() : 1, 1};
    if (b.has_value()) {
        TORCH_CHECK(dim >= 0 && dim < x.dim(), "bias_act: dim out of range");
        TORCH_CHECK(b->dim() == 1 && b->is_contiguous() && b->size(0) == x.size(dim),
                    "bias_act: b must be 1-D, contiguous, with x.shape[dim] entries");
        TORCH_CHECK(b->scalar_type() == x.scalar_type() && b->device() == x.device(),
                    "bias_act: b must have the dtype and device of x");
        s.channel_stride = x.stride(dim);
        s.channels = x.size(dim);
    }
    return s;
}

struct Upfirdn2dShape {
    int64_t planes;
    int in_h, in_w, out_h, out_w, taps_y, taps_x;
};

inline Upfirdn2dShape check_upfirdn2d(const at::Tensor& x, const at::Tensor& g, int64_t upx, int64_t upy,
                                      int64_t downx, int64_t downy, int64_t padx0, int64_t padx1,
                                      int64_t pady0, int64_t pady1)
{
    TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "upfirdn2d: x must be a contiguous 4-D NCHW tensor");
    TORCH_CHECK(g.dim() == 2 && g.is_contiguous() && g.device() == x.device(),
                "upfirdn2d: g must be a contiguous 2-D filter on x's device");
    TORCH_CHECK(g.scalar_type() == at::toOpMathType(x.scalar_type()),
                "upfirdn2d: g must have the accumulation dtype of x");
    TORCH_CHECK(upx >= 1 && upy >= 1 && downx >= 1 && downy >= 1, "upfirdn2d: scaling factors must be >= 1");
    TORCH_CHECK(x.size(2) * upy + std::abs(pady0) + std::abs(pady1) < INT32_MAX &&
                x.size(3) * upx + std::abs(padx0) + std::abs(padx1) < INT32_MAX, "upfirdn2d: image too large");
    Upfirdn2dShape s;
    s.planes = x.size(0) * x.size(1);
    s.in_h = (int)x.size(2);
    s.in_w = (int)x.size(3);
    s.taps_y = (int)g.size(0);
    s.taps_x = (int)g.size(1);
    s.out_h = (int)((s.in_h * upy + pady0 + pady1 - s.taps_y + downy) / downy);
    s.out_w = (int)((s.in_w * upx + padx0 + padx1 - s.taps_x + downx) / downx);
    TORCH_CHECK(s.out_h >= 1 && s.out_w >= 1, "upfirdn2d: empty output");
    return s;
}

}  // namespace toolkit_ops
