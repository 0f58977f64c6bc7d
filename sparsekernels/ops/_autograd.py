"""The backward formulas of the linear ops, shared by every backend that registers them.

A sparse linear ``y = x @ W.T + b`` has the same gradients whichever kernels run it; only the ops
that compute them differ (the C++ ``torch.ops.sparsekernels.*`` or the Triton
``torch.ops.sparsekernels_triton.*``). Each factory takes those ops and returns the
``(setup_context, backward)`` pair for ``register_autograd``:

    grad_input  = grad_input_op(grad_output, values, *pattern)      # dy @ W
    grad_values = grad_values_op(grad_output, input, *pattern, ...) # kept entries of dy.T @ x only
    grad_bias   = bias_grad_op(grad_output)                         # float32 sum over leading dims
"""

from __future__ import annotations

from typing import Callable


def bsr_linear_autograd(grad_input_op: Callable, grad_values_op: Callable, bias_grad_op: Callable):
    """For ``bsr_linear(input, values, <5 index tensors>, bias)``."""

    def setup_context(ctx, inputs, output):
        input, values, *index, bias = inputs
        ctx.save_for_backward(input, values, *index)
        ctx.has_bias = bias is not None

    def backward(ctx, grad_output):
        input, values, *index = ctx.saved_tensors
        needs_input, needs_values, needs_bias = (ctx.needs_input_grad[i] for i in (0, 1, 7))
        grad_input = grad_input_op(grad_output, values, *index) if needs_input else None
        grad_values = grad_values_op(grad_output, input, *index, values.shape[-1]) if needs_values else None
        grad_bias = bias_grad_op(grad_output) if ctx.has_bias and needs_bias else None
        return grad_input, grad_values, None, None, None, None, None, grad_bias

    return setup_context, backward


def nm_linear_autograd(grad_input_op: Callable, grad_values_op: Callable, bias_grad_op: Callable):
    """For ``nm_linear(input, values, positions, n, m, bias)``."""

    def setup_context(ctx, inputs, output):
        input, values, positions, n, m, bias = inputs
        ctx.save_for_backward(input, values, positions)
        ctx.n, ctx.m = n, m
        ctx.has_bias = bias is not None

    def backward(ctx, grad_output):
        input, values, positions = ctx.saved_tensors
        n, m = ctx.n, ctx.m
        needs_input, needs_values, needs_bias = (ctx.needs_input_grad[i] for i in (0, 1, 5))
        grad_input = grad_input_op(grad_output, values, positions, n, m) if needs_input else None
        grad_values = grad_values_op(grad_output, input, positions, n, m) if needs_values else None
        grad_bias = bias_grad_op(grad_output) if ctx.has_bias and needs_bias else None
        return grad_input, grad_values, None, None, None, grad_bias

    return setup_context, backward
