"""The integer codes the kernels take as constexpr arguments (the kernels compare the literals)."""

MODE_GRAD, MODE_HVP, MODE_DOTS, MODE_GGN = 0, 1, 2, 3
LOSS_SOFTMAX_CE, LOSS_LOGISTIC, LOSS_SQUARED = 0, 1, 2
ACT_IDENTITY, ACT_TANH, ACT_RELU, ACT_LEAKY, ACT_GELU, ACT_SILU, ACT_SIGMOID = range(7)
