// Element-wise math of bias_act, shared verbatim by the CPU and CUDA kernels.
//
// y = clamp(gain * f(x + b), -clamp, clamp). The three kernel modes compute, per element with v = x + b:
//   forward:  y
//   grad:     dx  = dy * gain * f'(v)           (0 where the clamp is active: |gain * f(v)| >= clamp)
//   grad2:    dv  = ddx * dy * gain * f''(v)    (the part of the second derivative that flows back to x and b;
//                                               the part flowing to dy is `grad` applied to ddx)
// Activation codes follow bias_act.activation_funcs[...].cuda_idx.
#pragma once

#include <cmath>

#include "common.h"

namespace toolkit_ops {

#if !defined(__CUDACC__)
// Host: pick the float/double overloads of <cmath>. CUDA's math headers provide both overloads globally.
using std::exp;
using std::expm1;
using std::log1p;
using std::tanh;
#endif

enum Activation { kLinear = 1, kRelu = 2, kLrelu = 3, kTanh = 4, kSigmoid = 5, kElu = 6, kSelu = 7, kSoftplus = 8, kSwish = 9 };
enum BiasActMode { kForward = 0, kGrad = 1, kGrad2 = 2 };

// Parameters of PyTorch's selu and softplus (beta = 1, threshold = 20), so results match torch.nn.functional.
template <typename T> TK_HOST_DEVICE T selu_scale() { return T(1.0507009873554804934193349852946); }
template <typename T> TK_HOST_DEVICE T selu_alpha() { return T(1.6732632423543772848170429916717); }
template <typename T> TK_HOST_DEVICE T softplus_threshold() { return T(20); }

template <typename T> TK_HOST_DEVICE T sigmoid_of(T v) { return T(1) / (T(1) + exp(-v)); }

// f(v), f'(v), f''(v) for activation A.
template <int A, typename T> TK_HOST_DEVICE T activation(T v, T alpha)
{
    if (A == kRelu)     return v > T(0) ? v : T(0);
    if (A == kLrelu)    return v > T(0) ? v : v * alpha;
    if (A == kTanh)     return tanh(v);
    if (A == kSigmoid)  return sigmoid_of(v);
    if (A == kElu)      return v > T(0) ? v : expm1(v);
    if (A == kSelu)     return v > T(0) ? selu_scale<T>() * v : selu_scale<T>() * selu_alpha<T>() * expm1(v);
    if (A == kSoftplus) return v > softplus_threshold<T>() ? v : log1p(exp(v));
    if (A == kSwish)    return v * sigmoid_of(v);
    return v;  // kLinear
}

template <int A, typename T> TK_HOST_DEVICE T activation_deriv(T v, T alpha)
{
    if (A == kRelu)     return v > T(0) ? T(1) : T(0);
    if (A == kLrelu)    return v > T(0) ? T(1) : alpha;
    if (A == kTanh)     { T t = tanh(v); return T(1) - t * t; }
    if (A == kSigmoid)  { T s = sigmoid_of(v); return s * (T(1) - s); }
    if (A == kElu)      return v > T(0) ? T(1) : exp(v);
    if (A == kSelu)     return v > T(0) ? selu_scale<T>() : selu_scale<T>() * selu_alpha<T>() * exp(v);
    if (A == kSoftplus) return v > softplus_threshold<T>() ? T(1) : sigmoid_of(v);
    if (A == kSwish)    { T s = sigmoid_of(v); return s * (T(1) + v * (T(1) - s)); }
    return T(1);  // kLinear
}

template <int A, typename T> TK_HOST_DEVICE T activation_deriv2(T v, T alpha)
{
    if (A == kTanh)     { T t = tanh(v); return T(-2) * t * (T(1) - t * t); }
    if (A == kSigmoid)  { T s = sigmoid_of(v); return s * (T(1) - s) * (T(1) - T(2) * s); }
    if (A == kElu)      return v > T(0) ? T(0) : exp(v);
    if (A == kSelu)     return v > T(0) ? T(0) : selu_scale<T>() * selu_alpha<T>() * exp(v);
    if (A == kSoftplus) { if (v > softplus_threshold<T>()) return T(0); T s = sigmoid_of(v); return s * (T(1) - s); }
    if (A == kSwish)    { T s = sigmoid_of(v); return s * (T(1) - s) * (T(2) + v * (T(1) - T(2) * s)); }
    return T(0);  // Piecewise linear: kLinear, kRelu, kLrelu.
}

// One element. `clamp < 0` disables clamping. Unused inputs (dy in forward, ddx outside grad2) are ignored.
template <int A, int MODE, typename T>
TK_HOST_DEVICE T bias_act_element(T x, T b, T dy, T ddx, T alpha, T gain, T clamp)
{
    T v = x + b;
    if (MODE == kForward) {
        T y = activation<A>(v, alpha) * gain;
        if (clamp >= T(0))
            y = y > clamp ? clamp : (y < -clamp ? -clamp : y);
        return y;
    }
    if (clamp >= T(0)) {
        T y = activation<A>(v, alpha) * gain;
        if (y >= clamp || y <= -clamp)
            return T(0);
    }
    if (MODE == kGrad)
        return dy * gain * activation_deriv<A>(v, alpha);
    return ddx * dy * gain * activation_deriv2<A>(v, alpha);
}

}  // namespace toolkit_ops
