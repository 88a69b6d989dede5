"""Bilinear `grid_sample` with a second derivative with respect to the input image.

ADA augmentation warps images with grid_sample, and the R1 penalty differentiates the discriminator's gradient, so
grid_sample needs double backward with respect to its input. PyTorch's own grid_sampler_2d lacked that for years
(`derivative for aten::grid_sampler_2d_backward is not implemented`). With `enabled = True` (the training loop sets
it) the op below provides it on any torch >= 1.11: the input gradient is linear in the output gradient, with the
same interpolation weights as the forward pass, so its derivative is grid_sample itself.
"""

import torch
import torch.nn.functional as F

enabled = False  # Use the op with a guaranteed double backward (else plain F.grid_sample).

_MODE_BILINEAR, _PADDING_ZEROS, _ALIGN_CORNERS = 0, 0, False


def grid_sample(input, grid):
    """`F.grid_sample(input, grid, mode='bilinear', padding_mode='zeros', align_corners=False)` for 4-D input."""
    if enabled:
        return _GridSample.apply(input, grid)
    return F.grid_sample(input, grid, mode='bilinear', padding_mode='zeros', align_corners=_ALIGN_CORNERS)


class _GridSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, grid):
        if input.ndim != 4 or grid.ndim != 4:
            raise ValueError('grid_sample_gradfix: only 2-D sampling (4-D input and grid) is supported')
        ctx.save_for_backward(input, grid)
        return F.grid_sample(input, grid, mode='bilinear', padding_mode='zeros', align_corners=_ALIGN_CORNERS)

    @staticmethod
    def backward(ctx, grad_output):
        input, grid = ctx.saved_tensors
        output_mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return _GridSampleBackward.apply(grad_output, input, grid, output_mask)


class _GridSampleBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad_output, input, grid, output_mask):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grid)
        grad_input, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
            grad_output, input, grid, _MODE_BILINEAR, _PADDING_ZEROS, _ALIGN_CORNERS, output_mask=list(output_mask))
        return (grad_input if output_mask[0] else None), (grad_grid if output_mask[1] else None)

    @staticmethod
    def backward(ctx, grad2_grad_input, grad2_grad_grid):
        if grad2_grad_grid is not None or ctx.needs_input_grad[2]:
            raise NotImplementedError('grid_sample_gradfix: second derivatives involving the grid are not supported')
        grid, = ctx.saved_tensors
        grad2_grad_output = None
        if ctx.needs_input_grad[0] and grad2_grad_input is not None:
            grad2_grad_output = _GridSample.apply(grad2_grad_input, grid)
        return grad2_grad_output, None, None, None
