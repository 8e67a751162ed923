"""The kernels compile for a Hopper GPU (sm_90) with Triton's real compiler, no GPU needed.

The other kernel tests run Triton's interpreter on CPU, which executes the kernels as Python and
so accepts code the compiler refuses. Here every kernel is lowered to a cubin, in a subprocess
(the interpreter is chosen per process, before triton is imported), for configurations that
between them take every mode, loss, activation, curvature, hop count and dtype branch. Compiling
is not running: numbers on a GPU come from benchmarks/gpu_suite.py.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # the real compiler, in a subprocess (marked kernels by its folder)

TARGET = ("cuda", 90, 32)  # backend, compute capability, warp size: the H200
SHARED_MEMORY_PER_BLOCK = 227 * 1024  # bytes a block may opt into on sm_90 (Triton opts in above 48 KiB)


def configurations() -> list[tuple[str, dict, str]]:
    """(kernel name, constexpr arguments, float dtype) covering every constexpr branch once."""
    from dicekern.kernels import codes

    blocks = dict(BLOCK_B=16, BW=32, WMAX=256, BLOCK_D=128)  # the widest layers the kernels take
    losses = (codes.LOSS_SOFTMAX_CE, codes.LOSS_LOGISTIC, codes.LOSS_SQUARED)
    activations = (codes.ACT_IDENTITY, codes.ACT_TANH, codes.ACT_RELU, codes.ACT_LEAKY, codes.ACT_GELU, codes.ACT_SILU, codes.ACT_SIGMOID)
    modes = (codes.MODE_GRAD, codes.MODE_HVP, codes.MODE_DOTS, codes.MODE_GGN)
    node = [("mlp_node_kernel", dict(MODE=modes[i % 4], LOSS=losses[i % 3], ACT=act, **blocks), ("fp64", "fp32")[i % 2])
            for i, act in enumerate(activations)]
    chains = [(name, dict(HOPS=hops, SENDER=sender, CURVATURE=curvature, LOSS=losses[hops % 3], ACT=codes.ACT_TANH, **blocks), dtype)
              for name in ("mlp_adjoint_chain_kernel", "mlp_forward_chain_kernel")
              for hops, sender, curvature, dtype in ((0, True, codes.NO_CURVATURE, "fp64"), (2, False, codes.MODE_GGN, "fp32"),
                                                     (3, True, codes.MODE_HVP, "fp64"))]
    mixing = [("gossip_mix_kernel", dict(HAS_C=c, HAS_G=g, BLOCK_D=128), dtype) for c, g, dtype in ((False, False, "fp64"), (True, True, "fp32"))]
    return node + chains + mixing


INTEGER_POINTERS = {"p_rowptr", "p_col", "p_widths", "p_woff", "p_boff"}


def compile_all() -> dict[str, str]:
    """Compile every configuration; name -> "ok", the compiler's error, or the shared memory it
    needs beyond what a block may have."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dicekern.kernels import codes, gossip_mix, mlp

    results = {}
    for name, constexprs, dtype in configurations():
        kernel = getattr(mlp, name, None) or getattr(gossip_mix, name)
        targets = "*i64" if constexprs.get("LOSS") == codes.LOSS_SOFTMAX_CE else f"*{dtype}"
        signature = {}
        for arg in inspect.signature(kernel.fn).parameters:
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg in INTEGER_POINTERS:
                signature[arg] = "*i64"
            elif arg in ("p_y", "p_yt"):
                signature[arg] = targets
            else:
                signature[arg] = f"*{dtype}" if arg.startswith("p_") else "i32"
        label = f"{name} {dtype} " + " ".join(f"{k}={v}" for k, v in constexprs.items() if not k.startswith("B") and k != "WMAX")
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=GPUTarget(*TARGET))
            shared = compiled.metadata.shared
            results[label] = "ok" if shared <= SHARED_MEMORY_PER_BLOCK else f"needs {shared} bytes of shared memory"
        except Exception as error:  # the compiler's own error is the finding: its innermost cause names the line
            while error.__cause__ is not None:
                error = error.__cause__
            results[label] = f"{type(error).__name__}: {error}"[-2000:]
    return results


def test_every_kernel_configuration_compiles_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == len(configurations())
    failed = {label: outcome for label, outcome in results.items() if outcome != "ok"}
    assert not failed, failed


if __name__ == "__main__":
    outcomes = compile_all()
    print(json.dumps(outcomes))
    sys.exit(any(outcome != "ok" for outcome in outcomes.values()))  # run by hand, a failure is the exit status
