"""Every Triton kernel variant we launch compiles for real GPUs (sm_80, sm_90), without a GPU.

The interpreter accepts kernels the NVIDIA compiler refuses; `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))` runs the real lowering and the bundled ptxas. It runs in a
subprocess: under TRITON_INTERPRET=1 (set by conftest) kernels are interpreted, not compiled.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import itertools
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ztriton.kernels import (event_current, event_weight_grad, lif_adjoint, lif_family_forward, lif_forward,
                                 sparse_input_grad,
                                 sparse_weight_grad, time_filter)

    F = lif_forward
    def forward(mode, dist=F.NORMAL, m=1, alpha=1, current="*fp32", spikes="*fp32", bias=False):
        sig = {"current_ptr": current, "bias_ptr": "*fp32", "spikes_ptr": spikes, "index_ptr": "*i64",
               "value_ptr": "*fp32", "count_ptr": "*i64", "membrane_ptr": "*fp32", "cdf_ptr": "*fp32",
               "abs_z_ptr": "*fp32", "n_cols": "i32", "n_out": "i32", "steps": "i32", "beta": "fp32",
               "threshold": "fp32", "leak": "fp32", "delta": "fp32", "scale": "fp32", "bth": "fp32",
               "capacity": "i32", "seed": "i64", "offset": "i64", "dist_param": "fp32"}
        const = dict(MODE=mode, HAS_BIAS=bias, M=m, DIST=dist, ALPHA=alpha,
                     TABLE_SIZE=20001 if dist == F.TABLE else 2, SEARCH_STEPS=15 if dist == F.TABLE else 1,
                     BLOCK=128)
        return F.lif_forward_kernel, sig, const

    variants = []
    laws = [(F.NORMAL, 1), (F.UNIFORM, 1), (F.LAPLACE, 1), (F.FAST_SIGMOID, -1), (F.TABLE, 1), (F.TABLE, -1)]
    for (dist, alpha), m in itertools.product(laws, (1, 5)):
        variants.append(forward(F.LOCALZO, dist, m, alpha))
    for dtype in ("*fp16", "*bf16"):
        variants.append(forward(F.LOCALZO, current=dtype, spikes=dtype, bias=True))
    for mode in (F.SPARSEGRAD, F.MEMBRANE, F.SPIKES):
        variants.append(forward(mode, bias=True))
    variants.append((F.sample_abs_z_kernel,
                     {"out_ptr": "*fp32", "n": "i32", "seed": "i64", "offset": "i64", "k": "i32",
                      "dist_param": "fp32", "cdf_ptr": "*fp32", "abs_z_ptr": "*fp32"},
                     dict(DIST=F.NORMAL, TABLE_SIZE=2, SEARCH_STEPS=1, BLOCK=1024)))
    filter_sig = {"src_ptr": None, "dst_ptr": "*fp32", "n_cols": "i32", "steps": "i32", "log2_beta": "fp32"}
    for reverse, dtype in itertools.product((False, True), ("*fp32", "*fp16")):
        variants.append((time_filter.time_filter_kernel, dict(filter_sig, src_ptr=dtype),
                         dict(REVERSE=reverse, CHECKPOINTS=False, K=1, TILE=time_filter.FILTER_TILE, BLOCK=128)))
    for dtype in ("*fp32", "*bf16"):
        variants.append((time_filter.time_filter_kernel, dict(filter_sig, src_ptr=dtype),
                         dict(REVERSE=False, CHECKPOINTS=True, K=sparse_weight_grad.CHECKPOINT_STEPS,
                              TILE=time_filter.FILTER_TILE, BLOCK=128)))
    for dtype, bias in (("*fp32", False), ("*fp32", True), ("*fp16", True), ("*bf16", True)):
        variants.append((sparse_weight_grad.sparse_weight_grad_kernel,
                         {"x_ptr": dtype, "ckpt_ptr": "*fp32", "ds_ptr": "*fp32", "gain_ptr": "*fp32",
                          "rows_ptr": "*i64", "crow_ptr": "*i64", "out_ptr": "*fp32", "bias_ptr": "*fp32",
                          "n_in": "i32", "batch": "i32", "beta": "fp32"},
                         dict(K=sparse_weight_grad.CHECKPOINT_STEPS, HAS_BIAS=bias, BLOCK_E=32, BLOCK_IN=128)))
    for dtype in ("*fp32", "*fp16", "*bf16"):
        variants.append((event_current.event_current_kernel,
                         {"row_ptr_ptr": "*i64", "cols_ptr": "*i64", "values_ptr": "*fp32", "weight_t_ptr": dtype,
                          "out_ptr": dtype, "n_out": "i32"}, dict(BLOCK_N=128)))
    for dtype in ("*fp32", "*fp16"):
        variants.append((event_weight_grad.event_weight_grad_kernel,
                         {"filtered_ptr": "*fp32", "rows_ptr": "*i64", "values_ptr": dtype, "col_ptr_ptr": "*i64",
                          "out_ptr": "*fp32", "n_out": "i32", "n_in": "i32"}, dict(BLOCK_E=32, BLOCK_O=128)))
    variants.append((sparse_input_grad.sparse_input_grad_kernel,
                     {"filtered_ptr": "*fp32", "weight_t_ptr": "*fp32", "rows_ptr": "*i64", "inputs_ptr": "*i64",
                      "out_ptr": "*fp32", "n_targets": "i32", "n_out": "i32"},
                     dict(BLOCK_U=64, BLOCK_O=64)))
    K = lif_family_forward
    def family(mode, block, recurrent=True, zero=False, leak=False, reset=False, dist=F.NORMAL, m=1, dtype="*fp32"):
        sig = {"current_ptr": dtype, "bias_ptr": dtype, "rec_t_ptr": dtype, "threshold_ptr": "*fp32",
               "spikes_ptr": dtype, "index_ptr": "*i64", "value_ptr": "*fp32", "leak_ptr": "*fp32",
               "reset_ptr": "*fp32", "last_ptr": "*i64", "count_ptr": "*i64", "membrane_ptr": "*fp32",
               "cdf_ptr": "*fp32", "abs_z_ptr": "*fp32", "batch": "i32", "n_out": "i32", "steps": "i32",
               "beta": "fp32", "delta": "fp32", "scale": "fp32", "bth": "fp32", "capacity": "i32", "seed": "i64",
               "offset": "i64", "dist_param": "fp32"}
        const = dict(MODE=mode, HAS_BIAS=True, RECURRENT=recurrent, ZERO_RESET=zero, TRACE_LEAK=leak,
                     TRACE_RESET=reset, TRACE_LAST=zero and mode < 2, M=m, DIST=dist, ALPHA=1,
                     TABLE_SIZE=20001 if dist == F.TABLE else 2, SEARCH_STEPS=15 if dist == F.TABLE else 1,
                     BLOCK_N=block, TILE_K=K.tile_k(block))
        return K.lif_family_forward_kernel, sig, const, K.num_warps(block)

    # the widest block (MAX_WIDTH) with the most state, a small one, every mode, both resets, fp16
    variants.append(family(F.LOCALZO, K.MAX_WIDTH, leak=True, reset=True, dist=F.TABLE, m=5))
    variants.append(family(F.LOCALZO, K.MAX_WIDTH, zero=True, leak=True))
    variants.append(family(F.SPARSEGRAD, 32, zero=True, leak=True))
    variants.append(family(F.MEMBRANE, 1024, leak=True, reset=True))
    variants.append(family(F.SPIKES, 1024, recurrent=False, dtype="*fp16"))
    variants.append(family(F.LOCALZO, 256, dtype="*bf16"))
    adjoint_sig = {"ext_ptr": "*fp32", "grad_ptr": "*fp32", "index_ptr": "*i64", "bounds_ptr": "*i64",
                   "rec_t_ptr": "*fp32", "spikes_ptr": "*fp32", "ds_ptr": "*fp32", "grid_ptr": "*fp32",
                   "batch": "i32", "n_out": "i32", "steps": "i32", "beta": "fp32"}
    for block, recurrent, zero, grid, spikes in ((K.MAX_WIDTH, True, True, True, "*fp32"), (64, True, False, False, "*fp32"),
                                                 (1024, False, True, True, "*fp16")):
        variants.append((lif_adjoint.lif_adjoint_kernel, dict(adjoint_sig, spikes_ptr=spikes),
                         dict(RECURRENT=recurrent, ZERO_RESET=zero, STORE_GRID=grid, BLOCK_N=block,
                              BLOCK_E=lif_adjoint.block_entries(block)), K.num_warps(block)))
    for arch in (80, 90):
        for fn, sig, const, *warps in variants:
            sig = dict(sig, **{name: "constexpr" for name in const})
            options = dict(num_warps=warps[0]) if warps else None
            binary = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", arch, 32), options=options)
            assert len(binary.asm["cubin"]) > 1000
            print("compiled", arch, fn.__name__, const)
''')


def test_every_kernel_variant_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    # 17 forward, 3 event current, 1 sampler, 6 filter, 7 gradient, 6 family forward, 3 family adjoint
    assert done.stdout.count("compiled") == 2 * 43
