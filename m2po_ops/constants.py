"""Every number that the rules, the buffers and the kernels share, defined once.

Plain Python (no torch, no triton): the PyTorch code imports these names, and the Triton
kernels wrap them in ``tl.constexpr`` (kernels/common.py), so both read the same values. A test
(tests/test_structure.py) checks that the rule constants, the weight codes and the buffer
offsets are written nowhere else. The math behind the rule constants is in docs/math.md.
"""

# ---------------------------------------------------------------------------------------------
# The rules (docs/math.md)

# The paper's second-moment budget.
DEFAULT_TAU = 0.04
# The spec's overflow guard: r = exp(clamp(delta, -DELTA_CLAMP, DELTA_CLAMP)).
DELTA_CLAMP = 20.0
# The authors' released code compares against these offsets (the official rule).
OFFICIAL_EPS = 1e-12
# The authors' "no constraint" return value for the clip bound (kpo_clip_harmful_tokens).
OFFICIAL_NO_CONSTRAINT_HIGH = 100000.0
# With r = exp(delta) correctly rounded to float32: r > 1 iff delta >= 2**-24, and r < 1 iff
# delta < -2**-25 (exp rounds to 1 in between). The official rule's eligibility tests r > 1 and
# r < 1 (the authors' 1 +- 1e-12 rounds to 1 in float32), so the kernels test delta instead.
RATIO_ABOVE_ONE_DELTA = 2.0**-24
RATIO_BELOW_ONE_DELTA = -(2.0**-25)

# Bit patterns of float32 values, read as int32 (non-negative floats order like their bits).
F32_INF_BITS = 0x7F800000
F32_MAX_BITS = 0x7F7FFFFF
# A paper cut's value when nothing is masked: no finite or infinite m2 reaches it.
KEEP_ALL_BITS = 0x7FFFFFFF

# ---------------------------------------------------------------------------------------------
# Exact sums (m2po_ops/split.py): float32 values as integer limbs of LIMB_BITS bits.

LIMB_BITS = 30
LIMB_MASK = (1 << LIMB_BITS) - 1
# p <= 253 for finite float32 (exponent 254), plus the high half: limbs 0..9
MAX_LIMBS = 10

# ---------------------------------------------------------------------------------------------
# The two-level radix histogram of the tail (m2po_ops/radix_select.py)

L1_SHIFT = 16  # level-1 bucket = key >> L1_SHIFT (8 exponent bits, 7 mantissa bits)
L1_BUCKETS = 1 << 15
L2_BUCKETS = 1 << 16  # level-2 bucket = key & (L2_BUCKETS - 1): one value each
L2_SLOTS = 2  # level-2 histograms of the boundary bucket (slot 0) and the bucket before it (slot 1)
# rows of the level-2 histogram buffer (int64 [2 * L2_SLOTS, L2_BUCKETS]), slot-major
HIST2_B1_COUNT, HIST2_B1_SUM, HIST2_B0_COUNT, HIST2_B0_SUM = range(4)
HIST2_ROWS = 2 * L2_SLOTS
SEARCH_STEPS = 32  # binary-search steps inside one value's run of ties (counts < 2**31)
SELECT_CHUNK = 1024  # level-1 buckets per program of select1 (GPU)
LEVEL2_CHUNK = 512  # level-2 buckets per program of select2 (GPU; it reads up to 3 rows of each)

# The mergeable sums (int64 vector, one all-reduce): the tail's level-1 histogram (count row,
# significand row), the below part's count and limbs, the tail's count, infinite keys and
# finite-value limbs.
BELOW_COUNT = 2 * L1_BUCKETS
BELOW_LIMBS = BELOW_COUNT + 1
TAIL_COUNT = BELOW_LIMBS + MAX_LIMBS
TAIL_INF = TAIL_COUNT + 1
TAIL_LIMBS = TAIL_INF + 1
SUMS_LEN = TAIL_LIMBS + MAX_LIMBS

# The select state (int64; float64 fields as bit patterns): refine flag, boundary bucket b1,
# previous non-empty tail bucket b0 (-1 if none), prefix count / sum before b1 and through b1,
# trust-region count, trust-region sum.
REFINE, B1, B0, K_BASE, S_BASE, K_END, S_END, N_TR, TOTAL = range(9)
STATE_LEN = 10

# A select program's partial row (int64): count, sum (select1: float64 bits; select2: the
# significand sum), last non-empty bucket, and (select2) slot 1's last non-empty bucket.
PART_COUNT, PART_SUM, PART_LAST, PART_LAST_B0 = range(4)
PART_COLS = 4

# The extreme ratios stats records of the valid tokens outside the official wide tail (int64,
# float32 bits): the minimum stored as F32_INF_BITS - bits (so both merge by atomic max).
RATIO_MIN_FLIPPED, RATIO_MAX = range(2)

# ---------------------------------------------------------------------------------------------
# Per-block partials (float64 rows) and what finalize makes of them

# stats_kernel, per block: valid tokens, trust-region tokens, sum of -delta, sum of ratios, max
# ratio, masked-in tokens holding inf/NaN, sum of the terms outside the compacted list (as if
# nothing were masked), tokens clipped (official, under the unconstrained bounds), sum of the
# compacted list's terms.
(STATS_VALID, STATS_TRUST, STATS_NEG_DELTA, STATS_RATIO_SUM, STATS_RATIO_MAX, STATS_NONFINITE, STATS_LOSS,
 STATS_CLIPPED, STATS_LIST_LOSS) = range(9)
STATS_COLS = 9
# the fix-up passes, per block: loss terms, masked tokens, what was redone
APPLY_LOSS, APPLY_MASKED, APPLY_REDONE = range(3)
APPLY_COLS = 3
# APPLY_REDONE's values (0: nothing): the whole block (its terms and clipped count replace
# stats'), or the compacted list (its final terms replace the sum stats kept of them; its
# masked or clipped count adds to stats')
APPLY_WHOLE, APPLY_LIST = 1.0, 2.0
# finalize, per chunk of blocks (the first six as STATS_*): then the loss and the masked count
FINAL_LOSS, FINAL_MASKED = 6, 7
FINAL_COLS = 8

# How the loss weights tokens (finalize and the token passes): no loss (mask only), token-mean
# over the valid count, over a Python-number denominator, over a tensor denominator, or
# per-token weights (the sequence modes).
W_NONE, W_COUNT, W_SCALAR, W_TENSOR_DENOM, W_PER_TOKEN = range(5)

# What stats_kernel writes per token (a runtime bit set, not a specialisation, so a mask, a loss, a
# micro-batch pre-pass and a process group's call share one compiled variant): the derivative as
# if nothing were cut, keep, the keys.
WRITE_GRAD, WRITE_KEEP, WRITE_KEYS = 1, 2, 4
# How stats_kernel reads its inputs (a runtime bit set too, for the same reason): a mask to load,
# one advantage per row, the official rule's first advantage per row, per-token loss weights.
READ_MASK, READ_ADV_PER_ROW, READ_FIRST_PER_ROW, READ_WEIGHTS = 1, 2, 4, 8

# ---------------------------------------------------------------------------------------------
# A fused call's results (m2po_ops/triton_backend.py: Results): int64 [RESULTS_LEN], whose first
# F32_LEN / 2 words are float32 slots and the rest the cut's integers. The first VALUES_LEN
# float32 slots are also the ops' values vector (m2po_ops/ops.py): the cut's floats, finalize's
# outputs (OUT_*, from F32_OUT), the input error; then the cut's value bits. (The loss is not
# among them: an op's outputs may share no memory, so finalize stores it apart.)

CUT_LOWER, CUT_UPPER, CUT_M2, CUT_M2_AFTER, CUT_THRESHOLD = range(5)
F32_OUT = 5
(OUT_MASKED_FRACTION, OUT_TRUST_REGION_FRACTION, OUT_KL, OUT_RATIO_MEAN, OUT_RATIO_MAX, OUT_NONFINITE,
 OUT_SCALE) = range(7)
OUT_LEN = 7
# metrics["input_error"]: a zero unless validate=False found an error (also the zero pointer the
# kernels get for arguments a variant does not read: it is written only after the last pass)
F32_INPUT_ERROR = F32_OUT + OUT_LEN
VALUES_LEN = F32_INPUT_ERROR + 1
F32_VALUE_BITS = VALUES_LEN
F32_LEN = (F32_VALUE_BITS + 2) // 2 * 2  # (an even count: the int64 words after it stay 8-byte aligned)
CUT_TIES_KEPT, CUT_NUM_TRUST_REGION, CUT_NUM_VALID = range(3)
CUT_I64_LEN = 4
RESULTS_LEN = F32_LEN // 2 + CUT_I64_LEN

# The ops' values vector by name: the slots of the metrics dict and the backward scale.
V_CLIP_LOW, V_CLIP_HIGH, V_M2, V_M2_AFTER, V_CUT = CUT_LOWER, CUT_UPPER, CUT_M2, CUT_M2_AFTER, CUT_THRESHOLD
V_MASKED_FRACTION = F32_OUT + OUT_MASKED_FRACTION
V_TRUST_REGION_FRACTION = F32_OUT + OUT_TRUST_REGION_FRACTION
V_KL = F32_OUT + OUT_KL
V_RATIO_MEAN = F32_OUT + OUT_RATIO_MEAN
V_RATIO_MAX = F32_OUT + OUT_RATIO_MAX
V_NUM_NONFINITE = F32_OUT + OUT_NONFINITE
V_SCALE = F32_OUT + OUT_SCALE
V_INPUT_ERROR = F32_INPUT_ERROR

# The workspace's arrival counters (one per chunked kernel).
COUNTER_SELECT1, COUNTER_SELECT2, COUNTER_TIE_SCAN, COUNTER_FINALIZE = range(4)
NUM_COUNTERS = 4

# ---------------------------------------------------------------------------------------------
# metrics["input_error"] bits: what validate=False found wrong without a host read (the loss and
# gradient are then NaN). validate=True raises instead.

INPUT_ERROR_CU_SEQLENS = 1  # cu_seqlens decreasing, negative, or past the last token
INPUT_ERROR_NUM_TOKENS = 2  # num_tokens negative, NaN or infinite
