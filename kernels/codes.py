"""The integer codes the kernels take as constexpr arguments; kernels/mlp.py compares against them by name.

A chain kernel's CURVATURE is the node-pass mode of its curvature product, or NO_CURVATURE.
"""

MODE_GRAD, MODE_HVP, MODE_DOTS, MODE_GGN = 0, 1, 2, 3
NO_CURVATURE = -1
LOSS_SOFTMAX_CE, LOSS_LOGISTIC, LOSS_SQUARED = 0, 1, 2
ACT_IDENTITY, ACT_TANH, ACT_RELU, ACT_LEAKY, ACT_GELU, ACT_SILU, ACT_SIGMOID = range(7)
