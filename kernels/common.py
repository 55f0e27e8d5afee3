"""Shared Triton helpers and constants of the m2po kernels.

Float64 hyperparameters (tau, its exact split, 1e-12) travel as int64 bit patterns: a Python
float argument would be specialised as fp32 by Triton (and reaches kernels as float64 under
torch.compile), and a float constexpr is materialised as fp32, both of which round tau.
"""

import os
import struct

import triton
import triton.language as tl

# libdevice calls fail under the interpreter; use the plain tl.* forms there.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_INTERP = tl.constexpr(INTERPRET)

L1_SHIFT = tl.constexpr(16)
L1_BUCKETS = 1 << 15
L2_BUCKETS = 1 << 16
KEEP_ALL_BITS = 0x7FFFFFFF
INF_BITS = 0x7F800000

if not INTERPRET:  # pragma: no cover - GPU only
    from triton.language.extra import libdevice
else:
    libdevice = None


def f64_bits(x: float) -> int:
    """The int64 bit pattern of a Python float (exact transport of float64 into a kernel)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@triton.jit
def as_f64(bits):
    # Triton types a small Python int as i32: widen (sign-preserving) before the bitcast.
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def exp_f32(x, INTERP: tl.constexpr):
    """Accurate float32 exp (libdevice expf on GPU; tl.exp is a fast approximation there)."""
    if INTERP:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def exp_f64(x, INTERP: tl.constexpr):
    if INTERP:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def significand(bits):
    """Integer significand (implicit bit included) of non-negative float32 bit patterns, int64."""
    b = bits.to(tl.int64)
    return (b & 0x7FFFFF) | tl.where((b >> 23) > 0, 0x800000, 0)


@triton.jit
def bucket_scale(bucket):
    """2**(exponent - 150) as float64 for level-1 bucket ids (inf for the inf/NaN exponent)."""
    e = tl.maximum(bucket.to(tl.int64) >> 7, 1)
    scale = ((e + (1023 - 150)) << 52).to(tl.float64, bitcast=True)
    return tl.where(e >= 255, float("inf"), scale)


@triton.jit
def bits_to_f64(bits):
    return bits.to(tl.int32).to(tl.float32, bitcast=True).to(tl.float64)


@triton.jit
def ratio_f32(delta, INTERP: tl.constexpr):
    """exp(delta) correctly rounded to float32 (float64 exp, one rounding): the same bits as
    m2po_ops.reference.ratio_f32 on every device."""
    return exp_f64(delta.to(tl.float64), INTERP).to(tl.float32)
