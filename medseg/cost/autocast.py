"""CUDA's autocast policy, applied to CPU tensors, so an AMP memory trace is the one a GPU runs.

Why not CPU autocast: its op lists differ from CUDA's. On CPU, softmax, layer_norm and the
upsampling ops run in bf16; CUDA autocast runs them in float32. Swin UNETR's attention
probabilities are softmax outputs, so a trace under CPU autocast underestimates a GPU.
Why not fake CUDA tensors: forward passes on them do go through the real ``AutocastCUDA`` kernels
(``tests/test_cost.py`` uses that as its reference), but autograd needs a CUDA device guard that
a CPU-only build lacks, so no backward can be traced.

So :func:`cuda_autocast_policy` registers, for as long as it is active, Python kernels at the
``AutocastCPU`` dispatch key that apply CUDA's policy (the lists of ``ATen/autocast_mode.h``,
copied below) to CPU tensors, and fall through for CPU-only entries. They sit where autocast
sits, above autograd, so the casts, the saved tensors and the cached bf16 weight copies are the
ones CUDA autocast produces. Used with fake CPU tensors, nothing is computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

# torch 2.x ATen/autocast_mode.h: AT_FORALL_LOWER_PRECISION_FP (+ cudnn entries registered for CUDA).
LOWER = (
    "_convolution", "_convolution.deprecated", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
    "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "prelu", "addmm", "addmv", "addr", "matmul",
    "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot",
    "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "_scaled_dot_product_flash_attention", "scaled_dot_product_attention", "cudnn_convolution", "cudnn_convolution_transpose",
)
# AT_FORALL_FP32 and AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE (norm: run in float32).
FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh", "tan",
    "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm", "native_layer_norm", "rms_norm",
    "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim", "cosine_similarity", "poisson_nll_loss",
    "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss",
    "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d", "_upsample_nearest_exact2d",
    "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa",
    "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa", "norm.Scalar", "norm.ScalarOpt_dim",
)
# AT_FORALL_FP32_SET_OPT_DTYPE: run with dtype=float32 when the first tensor is eligible.
FP32_SET_OPT_DTYPE = ("prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
                      "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList")
# AT_FORALL_PROMOTE: run in the widest floating type among the arguments.
PROMOTE = ("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put", "tensordot", "scatter_add")
BANNED = ("binary_cross_entropy",)  # CUDA autocast raises; so does this

POLICY: dict[str, str] = {**dict.fromkeys(LOWER, "lower"), **dict.fromkeys(FP32, "fp32"),
                          **dict.fromkeys(FP32_SET_OPT_DTYPE, "fp32_set_opt_dtype"), **dict.fromkeys(PROMOTE, "promote"),
                          **dict.fromkeys(BANNED, "banned")}

_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def ops_with_kernel(key: str) -> set[str]:
    """aten ops ("softmax.int") with a kernel at a dispatch key, from the dispatcher itself."""
    names = (n for n in torch._C._dispatch_get_all_op_names() if n.startswith("aten::"))
    return {n[6:] for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, key)}


def _eligible(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 and t.device.type == "cpu"


class _Policy:
    """The casts of one autocast region, with CUDA's cache of lower-precision weight copies (leaf
    float32 tensors that require grad are cast once per region; the copies live until it ends)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.active = False  # inside a region: cache weight copies (not in a backward recompute)
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def cast(self, x: Any, to: torch.dtype) -> Any:
        if isinstance(x, (list, tuple)):
            return type(x)(self.cast(v, to) for v in x)
        if not _eligible(x) or x.dtype == to:
            return x
        cacheable = self.active and to == self.dtype and x.dtype == torch.float32 and x.requires_grad and x.is_leaf and not x._is_view()
        if cacheable and id(x) in self.cache:
            return self.cache[id(x)][1]
        y = x.to(to)
        if cacheable:
            self.cache[id(x)] = (x, y)
        return y

    def kernel(self, op: torch._ops.OpOverload, policy: str):
        dtype_index = next((i for i, a in enumerate(op._schema.arguments) if a.name == "dtype"), None)

        def run(*args, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
                if policy == "banned":
                    raise RuntimeError(f"aten::{op.__name__} is unsafe to autocast (CUDA autocast refuses it)")
                if policy in ("lower", "fp32"):
                    to = self.dtype if policy == "lower" else torch.float32
                    args, kwargs = self.cast(args, to), {k: self.cast(v, to) for k, v in kwargs.items()}
                elif policy == "promote":
                    floats = [t.dtype for t in _tensors(args, kwargs) if _eligible(t)]
                    if floats:
                        to = torch.float32 if torch.float32 in floats else self.dtype
                        args, kwargs = self.cast(args, to), {k: self.cast(v, to) for k, v in kwargs.items()}
                elif policy == "fp32_set_opt_dtype":
                    first = next(iter(_tensors(args, kwargs)), None)
                    if _eligible(first):
                        args, kwargs = _set_dtype(args, kwargs, dtype_index, torch.float32)
                return op(*args, **kwargs)

        return run


def _tensors(args, kwargs) -> list[torch.Tensor]:
    flat = []
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            flat.append(v)
        elif isinstance(v, (list, tuple)):
            flat.extend(t for t in v if isinstance(t, torch.Tensor))
    return flat


def _set_dtype(args: tuple, kwargs: dict, index: int | None, dtype: torch.dtype) -> tuple[tuple, dict]:
    if index is None:
        return args, kwargs
    if index < len(args):
        if args[index] is None:
            args = (*args[:index], dtype, *args[index + 1:])
        return args, kwargs
    if kwargs.get("dtype") is None:
        kwargs = {**kwargs, "dtype": dtype}
    return args, kwargs


def _overload(name: str) -> torch._ops.OpOverload:
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, base), overload or "default")


@contextlib.contextmanager
def cuda_autocast_policy(dtype: torch.dtype = torch.bfloat16) -> Iterator[Callable[[], contextlib.AbstractContextManager]]:
    """Registers CUDA's autocast policy for CPU tensors until exit and yields ``region``: a context
    that enables it, as ``torch.autocast("cuda", dtype)`` does around a forward. The registration
    outlives regions so a checkpointed segment recomputed in the backward casts as on CUDA too."""
    policy = _Policy(dtype)
    lib = torch.library.Library("aten", "IMPL")

    @contextlib.contextmanager
    def region() -> Iterator[None]:
        policy.active = True
        try:
            with torch.autocast("cpu", dtype=dtype, cache_enabled=False):
                yield
        finally:
            policy.active = False
            policy.cache.clear()

    try:
        cuda_ops = ops_with_kernel("AutocastCUDA")
        for name in sorted(cuda_ops | ops_with_kernel("AutocastCPU")):
            if name in cuda_ops and name not in POLICY:
                raise RuntimeError(f"this torch autocasts aten::{name} on CUDA with a policy medseg does not know")
            kernel = policy.kernel(_overload(name), POLICY[name]) if name in cuda_ops else torch.library.fallthrough_kernel
            with _quiet():
                lib.impl(name, kernel, "AutocastCPU")
        yield region
    finally:
        policy.cache.clear()
        lib._destroy()


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype = torch.bfloat16) -> Iterator[None]:
    """One region of ``torch.autocast("cuda", dtype)``, for CPU tensors (fake ones in practice)."""
    with cuda_autocast_policy(dtype) as region, region():
        yield


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Overriding CPU autocast's own kernels warns once per op; that override is the point here."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
