/* The exact expo kernel in one pass: x = (Σ cᵢθᵢ) / L rounded once, half to even, into the
 * output format (bfloat16, float16, float32). See native.py for how it is built and called and
 * docs/numerics.md for what "exact" means.
 *
 * Per element, in blocks that stay in the L1 cache:
 *   1. pᵢ = cᵢθᵢ, exact in double (the caller checks that cᵢ and θᵢ's precision fit 53 bits);
 *   2. s = Σ pᵢ by a TwoSum cascade: S = s + Σ eᵢ exactly (eᵢ the TwoSum errors);
 *   3. q = s · (1/L) and a rigorous bound E ≥ |q − S/L|;
 *   4. r = q rounded to the output grid (the magic-number addition: one rounding, half to even,
 *      at the grid's step in q's binade, or the subnormal step below the smallest normal);
 *   5. if q lies within E of the grid midpoint μ next to it, the side is the sign of
 *      S − Lμ = (s − Lμ) + Σ eᵢ: s − Lμ is exact (Sterbenz), Lμ is exact (the caller checks
 *      L's bits), and with two terms the sign of the rounded sum of two doubles is exact; a
 *      tie rounds μ to even;
 *   6. what that cannot settle (large cancellation, an undecided sign with more terms) is
 *      computed exactly from a nonoverlapping expansion of the sum (Shewchuk's
 *      Grow-Expansion), one element at a time.
 * Compile without contraction into FMA (-ffp-contract=off) and without -ffast-math: the
 * error-free transformations need every operation rounded as written. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 512
#define MAX_TERMS 64

enum { BF16 = 0, FP16 = 1, FP32 = 2 };

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

typedef struct {
    int terms;                 /* k: θ_T, θ₀, intermediates */
    const void *const *inputs; /* k pointers, already at the first element */
    const int *types;          /* k input formats */
    const double *coefficients;/* cᵢ (integers) */
    double denominator;        /* L */
    double inverse;            /* fl(1/L) */
    int precision;             /* output precision with the implicit bit */
    int emin;                  /* output's smallest normal exponent */
    int emax;                  /* output's largest exponent */
    double largest;            /* output's largest finite */
} Plan;

static inline uint64_t bits_of(double x) { uint64_t b; memcpy(&b, &x, 8); return b; }
static inline double from_bits(uint64_t b) { double x; memcpy(&x, &b, 8); return x; }

#define EXPONENT 0x7FF0000000000000ULL
#define MAGIC 6755399441055744.0 /* 1.5 · 2^52 */
#define U 1.1102230246251565e-16 /* 2^-53 */

/* ``yes`` where ``cond`` (0 or 1), else ``no``: a select the vectoriser turns into bit operations. */
static inline double choose(uint64_t cond, double yes, double no) {
    uint64_t m = -cond;
    return from_bits((bits_of(yes) & m) | (bits_of(no) & ~m));
}

/* Grow-Expansion with zero elimination: e (m nonoverlapping components, increasing) + b. */
static int grow(double *e, int m, double b) {
    double q = b;
    int out = 0;
    for (int i = 0; i < m; i++) {
        double sum = q + e[i];
        double bv = sum - q;
        double av = sum - bv;
        double err = (q - av) + (e[i] - bv);
        q = sum;
        if (err != 0.0) e[out++] = err;
    }
    if (q != 0.0) e[out++] = q;
    return out;
}

/* The output grid around q: r (q rounded), half the grid step, and the magic addend. */
static inline void cell(double q, const Plan *plan, double *r, double *half, double *magic) {
    double power = from_bits(bits_of(q) & EXPONENT);
    double smallest = ldexp(1.0, plan->emin);
    if (power < smallest) power = smallest;
    double ulp = ldexp(power, 1 - plan->precision);
    *half = ulp * 0.5;
    *magic = ulp * MAGIC;
    *r = (q + *magic) - *magic;
}

/* One element, exactly: the k values θᵢ (as doubles). */
static double exact_one(const double *theta, const Plan *plan) {
    double e[MAX_TERMS + 2];
    int m = 0;
    for (int i = 0; i < plan->terms; i++) m = grow(e, m, plan->coefficients[i] * theta[i]);
    if (m == 0) return 0.0; /* an exact zero is +0 */
    double top = e[m - 1];  /* |S − top| < top's last bit ≤ 2u|top| */
    double q = top / plan->denominator;
    double r, half, magic;
    cell(q, plan, &r, &half, &magic);
    double bound = fabs(q) * 0x1p-50;
    double dist = fabs(q - r);
    if (half - dist > bound) return copysign(r, top);
    double mid = r + copysign(half, q - r);
    m = grow(e, m, -(plan->denominator * mid));
    double side = m ? e[m - 1] : 0.0;
    double result = side > 0 ? mid + half : side < 0 ? mid - half : (mid + magic) - magic;
    return copysign(result, top);
}

static void load(const void *source, int type, int64_t begin, int n, double *out) {
    if (type == BF16) {
        const uint16_t *v = (const uint16_t *)source + begin;
        for (int j = 0; j < n; j++) {
            uint32_t w = (uint32_t)v[j] << 16;
            float f;
            memcpy(&f, &w, 4);
            out[j] = f;
        }
    } else if (type == FP16) {
        const _Float16 *v = (const _Float16 *)source + begin;
        for (int j = 0; j < n; j++) out[j] = (double)(float)v[j];
    } else {
        const float *v = (const float *)source + begin;
        for (int j = 0; j < n; j++) out[j] = v[j];
    }
}


static inline __attribute__((always_inline)) double load_one(const void *source, int type,
                                                             int64_t j) {
    if (type == BF16) {
        uint32_t w = (uint32_t)((const uint16_t *)source)[j] << 16;
        float f;
        memcpy(&f, &w, 4);
        return f;
    }
    if (type == FP16) return (double)(float)((const _Float16 *)source)[j];
    return ((const float *)source)[j];
}

/* Two inputs of one format (ExPO): q = (c₁θ₁ + c₀θ₀)/L in double is within 3.02 double ulps
 * of x (the products are exact, then one addition and one multiplication by fl(1/L)); it is
 * rounded on its bits, half to even. Within 4 ulps of a midpoint μ of the output grid (ties are
 * common: bf16 deltas are short), the side is the sign of (s − Lμ) + e, s − Lμ exact
 * (Sterbenz), e the addition's error (TwoSum): all of it branch-free, so the loop vectorises.
 * Elements below the output's smallest normal (subnormals, zeros) are flagged in bit 0 and
 * settled one at a time. */
static inline __attribute__((always_inline)) void store_one(void *out, int type, int64_t j,
                                                            double value) {
    float f = (float)value; /* exact: the value is on the output grid (or ±inf) */
    if (type == BF16) {
        uint32_t w;
        memcpy(&w, &f, 4);
        ((uint16_t *)out)[j] = (uint16_t)(w >> 16);
    } else if (type == FP16) {
        ((_Float16 *)out)[j] = (_Float16)f;
    } else {
        ((float *)out)[j] = f;
    }
}


/* x = (s + err)/L rounded once into a grid with ``tail`` fraction bits fewer than double, as
 * double bits; bit 0 set where x is below the output's smallest normal (``lowest``: a biased
 * double exponent), to be settled by ``exact_one``. Needs s + err = Σ cᵢθᵢ exactly and s the
 * rounded sum: q = s · fl(1/L) is then within 3.02 double ulps of x, and within 4 ulps of a
 * midpoint μ the side is the sign of (s − Lμ) + err, s − Lμ exact (Sterbenz). Branch-free. */
static inline __attribute__((always_inline)) uint64_t round_sum(double s, double err, double inv,
                                                                double L, int tail,
                                                                uint64_t lowest) {
    const uint64_t mask = (1ULL << tail) - 1, half = 1ULL << (tail - 1);
    double q = s * inv;
    uint64_t bq = bits_of(q);
    uint64_t low = bq & ~mask, odd = (bq >> tail) & 1;
    /* (tail − μ + 4) mod 2^tail: 0…8 within 4 ulps of μ, below half + 4 above μ */
    int64_t offset = (int64_t)((bq + (4 - half)) & mask);
    uint64_t above = offset < (int64_t)(half + 4);
    double t = (s - L * from_bits(low | half)) + err;
    uint64_t away = (uint64_t)(t > 0) ^ (bq >> 63); /* |x| > |μ| */
    uint64_t exact = odd ^ ((odd ^ away) & -(uint64_t)(t != 0)); /* a tie: to even */
    uint64_t up = above ^ ((above ^ exact) & -(uint64_t)(offset <= 8));
    uint64_t flag = ((bq >> 52) & 0x7FF) < lowest;
    return (low + (up << tail)) | flag;
}

static inline float float_of(uint32_t b) { float x; memcpy(&x, &b, 4); return x; }
static inline uint32_t bits_of_float(float x) { uint32_t b; memcpy(&b, &x, 4); return b; }

/* Whether float32 holds every cᵢθᵢ and their sum exactly for this block of bfloat16 pairs: the
 * exponent fields differ by at most ``gap`` and none is 0 (zero, subnormal) or above ``top``. */
static inline int float32_exact(const uint16_t *restrict a, const uint16_t *restrict b, int n,
                                uint16_t gap, uint16_t top) {
    uint16_t bad = 0;
    for (int j = 0; j < n; j++) {
        uint16_t e1 = a[j] & 0x7F80, e0 = b[j] & 0x7F80;
        bad |= (uint16_t)((uint16_t)(e1 - e0 + gap) > (uint16_t)(2 * gap));
        bad |= (uint16_t)((uint16_t)(e1 - 0x80) > top) | (uint16_t)((uint16_t)(e0 - 0x80) > top);
    }
    return !bad;
}

/* ``two_terms`` in float32 for a block of bfloat16 pairs (``float32_exact``): the same steps on
 * twice as many lanes. q is within 2.01 float32 ulps of x; μ (precision + 1 bits) times L fits
 * float32 (the caller checks L); s − Lμ is exact (Sterbenz). */
static inline __attribute__((always_inline)) uint32_t two_bf16_float32(
    const uint16_t *restrict a, const uint16_t *restrict b, int n, uint32_t *restrict rounded,
    float c1, float c0, float inv, float L, const int tail, uint32_t lowest) {
    const uint32_t mask = (1u << tail) - 1, half = 1u << (tail - 1);
    uint32_t any = 0;
    for (int j = 0; j < n; j++) {
        float x1 = float_of((uint32_t)a[j] << 16), x0 = float_of((uint32_t)b[j] << 16);
        float p1 = c1 * x1, p0 = c0 * x0, s = p1 + p0;
        float q = s * inv;
        uint32_t bq = bits_of_float(q);
        uint32_t low = bq & ~mask, odd = (bq >> tail) & 1;
        int32_t offset = (int32_t)((bq + (4 - half)) & mask); /* 0…8: within 4 ulps of μ */
        uint32_t above = offset < (int32_t)(half + 4);
        float t = s - L * float_of(low | half);
        uint32_t away = (uint32_t)(t > 0) ^ (bq >> 31); /* |x| > |μ| */
        uint32_t exact = odd ^ ((odd ^ away) & -(uint32_t)(t != 0)); /* a tie: to even */
        uint32_t up = above ^ ((above ^ exact) & -(uint32_t)(offset <= 8));
        uint32_t flag = ((bq >> 23) & 0xFF) < lowest;
        rounded[j] = (low + (up << tail)) | flag;
        any |= flag;
    }
    return any;
}

static int bit_length(double value) {
    int exponent;
    frexp(fabs(value), &exponent);
    return value == 0 ? 0 : exponent;
}

static inline __attribute__((always_inline)) int two_terms(const Plan *plan, int64_t count,
                                                           void *restrict out, const int in_type,
                                                           const int out_type, const int tail) {
    const void *restrict a = plan->inputs[0], *restrict b = plan->inputs[1];
    const double c1 = plan->coefficients[0], c0 = plan->coefficients[1], inv = plan->inverse;
    const double L = plan->denominator;
    const uint64_t lowest = (uint64_t)(plan->emin + 1023);
    const uint64_t highest = (uint64_t)(plan->emax + 1023);
    uint64_t bad = 0;
    uint64_t rounded[BLOCK];
    double first[BLOCK], second[BLOCK];
    /* bfloat16 inputs to a 16-bit output: float32 where it is exact (see float32_exact) */
    const int widest = bit_length(c1) > bit_length(c0) ? bit_length(c1) : bit_length(c0);
    const int gap = 15 - widest; /* 8 + widest + 1 + gap ≤ 24 bits */
    const int narrow = in_type == BF16 && out_type != FP32 && gap >= 0
                       && bit_length(L) + plan->precision + 1 <= 24;
    uint32_t narrow_rounded[BLOCK];
    for (int64_t begin = 0; begin < count; begin += BLOCK) {
        const int n = count - begin < BLOCK ? (int)(count - begin) : BLOCK;
        uint64_t any = 0;
        if (narrow) {
            const uint16_t *x1 = (const uint16_t *)a + begin, *x0 = (const uint16_t *)b + begin;
            if (float32_exact(x1, x0, n, (uint16_t)(gap << 7),
                              (uint16_t)((253 - widest - 1) << 7))) {
                const int tail32 = out_type == BF16 ? 16 : 13;
                uint32_t flagged = two_bf16_float32(x1, x0, n, narrow_rounded, (float)c1,
                                                    (float)c0, (float)inv, (float)L, tail32,
                                                    (uint32_t)(plan->emin + 127));
                if (flagged) {
                    for (int j = 0; j < n; j++) {
                        if (!(narrow_rounded[j] & 1)) continue;
                        double theta[2] = {load_one(a, in_type, begin + j),
                                           load_one(b, in_type, begin + j)};
                        narrow_rounded[j] = bits_of_float((float)exact_one(theta, plan));
                    }
                }
                for (int j = 0; j < n; j++) {
                    bad |= ((narrow_rounded[j] >> 23) & 0xFF) > (uint32_t)(plan->emax + 127);
                    store_one(out, out_type, begin + j, float_of(narrow_rounded[j]));
                }
                continue;
            }
        }
        for (int j = 0; j < n; j++) {
            first[j] = load_one(a, in_type, begin + j);
            second[j] = load_one(b, in_type, begin + j);
        }
        for (int j = 0; j < n; j++) {
            double p1 = c1 * first[j], p0 = c0 * second[j], s = p1 + p0;
            double bv = s - p1, av = s - bv, err = (p1 - av) + (p0 - bv); /* TwoSum */
            uint64_t r = round_sum(s, err, inv, L, tail, lowest);
            rounded[j] = r;
            uint64_t flag = r & 1;
            any |= flag;
        }
        if (any) { /* below the output's smallest normal: one at a time, exactly */
            for (int j = 0; j < n; j++) {
                if (!(rounded[j] & 1)) continue;
                double theta[2] = {load_one(a, in_type, begin + j), load_one(b, in_type, begin + j)};
                rounded[j] = bits_of(exact_one(theta, plan));
            }
        }
        for (int j = 0; j < n; j++) {
            bad |= ((rounded[j] >> 52) & 0x7FF) > highest;
            store_one(out, out_type, begin + j, from_bits(rounded[j]));
        }
    }
    return !bad;
}

/* Σ cᵢθᵢ of a block of bfloat16 inputs into ``s``, one input at a time; returns whether every
 * sum is exact in double: the inputs' nonzero exponent fields (subnormals as the smallest
 * normal) span at most ``span`` binades, none is inf/NaN. */
static inline int bf16_sums(const Plan *plan, int64_t begin, int n, int span,
                            double *restrict s) {
    double x[BLOCK];
    uint16_t lo = 0x7F80, hi = 0;
    for (int i = 0; i < plan->terms; i++) {
        const uint16_t *v = (const uint16_t *)plan->inputs[i] + begin;
        const double c = plan->coefficients[i];
        for (int j = 0; j < n; j++) { /* arithmetic selects: the loop vectorises */
            uint16_t m = v[j] & 0x7FFF, f = m & 0x7F80;
            f |= (uint16_t)(-(uint16_t)(f == 0) & 0x80);
            uint16_t zero = (uint16_t)-(uint16_t)(m == 0);
            uint16_t l = f | (zero & 0x7F80), h = f & (uint16_t)~zero;
            lo = l < lo ? l : lo;
            hi = h > hi ? h : hi;
            x[j] = load_one(v, BF16, j);
        }
        if (i == 0) {
            for (int j = 0; j < n; j++) s[j] = c * x[j];
        } else {
            for (int j = 0; j < n; j++) s[j] += c * x[j];
        }
    }
    return hi < 0x7F80 && hi <= lo + (span << 7);
}

/* Round exact sums ``s`` into the output and write them; whether one is flagged (bit 0 of
 * ``round_sum``: left for the caller to settle exactly). ``bad``: set if one is not finite. */
static inline __attribute__((always_inline)) uint64_t round_store(
    const Plan *plan, const double *restrict s, int n, void *restrict out, int64_t begin,
    const int out_type, const int tail, uint64_t lowest, uint64_t highest, uint64_t *bad) {
    uint64_t flagged = 0, over = 0;
    const double inv = plan->inverse, L = plan->denominator;
    for (int j = 0; j < n; j++) {
        uint64_t r = round_sum(s[j], 0.0, inv, L, tail, lowest);
        flagged |= r & 1;
        over |= ((r >> 52) & 0x7FF) > highest;
        store_one(out, out_type, begin + j, from_bits(r & ~1ULL));
    }
    *bad |= over;
    return flagged;
}

/* The general block: any formats; Σ cᵢθᵢ by a TwoSum cascade (S = s + Σ eᵢ), q = s/L with a
 * rigorous bound E ≥ |q − x| from the errors' sizes, rounded on the output grid (subnormal step
 * below the smallest normal); within E of a midpoint the side is the sign of (s − Lμ) + Σ eᵢ
 * where that sum's rounding cannot flip it; the rest is flagged for ``exact_one``. */
static inline int general_block(const Plan *plan, int64_t begin, int n, double *restrict theta,
                                double *restrict s, double *restrict eps,
                                double *restrict abs_eps, double *restrict result,
                                unsigned char *restrict flags) {
    const int k = plan->terms;
    const double L = plan->denominator, inv = plan->inverse;
    const double bound_q = 2.0 * U * (1 + 0x1p-30), bound_e = inv * (1 + 0x1p-30);
    const double sure = 2.0 * (k + 2) * U;
    const double smallest = ldexp(1.0, plan->emin), scale = ldexp(1.0, 1 - plan->precision);
    for (int i = 0; i < k; i++) load(plan->inputs[i], plan->types[i], begin, n, theta + i * BLOCK);
    const double c = plan->coefficients[0];
    for (int j = 0; j < n; j++) { s[j] = c * theta[j]; eps[j] = 0.0; abs_eps[j] = 0.0; }
    for (int i = 1; i < k; i++) {
        const double ci = plan->coefficients[i];
        const double *x = theta + i * BLOCK;
        for (int j = 0; j < n; j++) { /* TwoSum(s, cᵢθᵢ) */
            double p = ci * x[j];
            double sum = s[j] + p;
            double bv = sum - s[j];
            double av = sum - bv;
            double err = (s[j] - av) + (p - bv);
            s[j] = sum;
            eps[j] += err;
            abs_eps[j] += fabs(err);
        }
    }
    int any = 0;
    for (int j = 0; j < n; j++) { /* branch-free (selects on bits), so it vectorises */
        double q = s[j] * inv;
        double aq = fabs(q);
        double bound = aq * bound_q + abs_eps[j] * bound_e;
        double power = from_bits(bits_of(q) & EXPONENT);
        power = choose(power < smallest, smallest, power);
        double ulp = power * scale, half = ulp * 0.5, magic = ulp * MAGIC;
        double r = (q + magic) - magic;
        double dist = fabs(q - r);
        uint64_t zero = (s[j] == 0.0) & (abs_eps[j] == 0.0);
        uint64_t near = (half - dist) <= bound;
        uint64_t hard = (bound >= half * 0.25) | ((aq <= bound) & !zero);
        double mid = r + copysign(half, q - r);
        double d = s[j] - L * mid; /* exact where near and not hard */
        double t = d + eps[j];
        uint64_t known = (uint64_t)(k == 2) | (abs_eps[j] == 0.0)
                         | (fabs(t) > (fabs(d) + abs_eps[j]) * sure);
        double tie = (mid + magic) - magic;
        double rounded = choose(t > 0, mid + half, choose(t < 0, mid - half, tie));
        double value = copysign(choose(near, rounded, r), q);
        result[j] = choose(zero, 0.0, value);
        hard |= near & !known;
        flags[j] = (unsigned char)hard;
        any |= (int)hard;
    }
    return any;
}

/* Write a block of results (on the output grid, or ±inf) into ``out``; whether one is not finite. */
static inline uint64_t store_block(void *out, int out_type, int64_t begin, const double *result,
                                   int n, uint64_t highest) {
    uint64_t bad = 0;
    for (int j = 0; j < n; j++) bad |= ((bits_of(result[j]) >> 52) & 0x7FF) > highest;
    if (out_type == BF16) {
        for (int j = 0; j < n; j++) store_one(out, BF16, begin + j, result[j]);
    } else if (out_type == FP16) {
        for (int j = 0; j < n; j++) store_one(out, FP16, begin + j, result[j]);
    } else {
        for (int j = 0; j < n; j++) store_one(out, FP32, begin + j, result[j]);
    }
    return bad;
}

/* Any number of inputs and formats (the iterative-DPO merge, mixed formats). */
static inline __attribute__((always_inline)) int any_terms(const Plan *plan, int64_t count,
                                                           void *out, int out_type) {
    const int k = plan->terms;
    double *buffer = malloc(sizeof(double) * BLOCK * (k + 5));
    unsigned char flags[BLOCK];
    if (!buffer) return -1;
    double *theta = buffer, *s = buffer + BLOCK * k, *eps = s + BLOCK, *abs_eps = eps + BLOCK;
    double *result = abs_eps + BLOCK, *tmp = result + BLOCK;
    const uint64_t lowest = (uint64_t)(plan->emin + 1023);
    const uint64_t highest = (uint64_t)(plan->emax + 1023);
    int widest = 0, terms_bits = 0;
    for (int i = 0; i < k; i++) {
        int bits = bit_length(plan->coefficients[i]);
        widest = bits > widest ? bits : widest;
    }
    while ((1 << terms_bits) < k) terms_bits++;
    const int span = 53 - 8 - widest - terms_bits - 1; /* bf16: 8 bits each */
    int bf16 = span >= 0;
    for (int i = 0; i < k; i++) bf16 &= plan->types[i] == BF16;
    uint64_t bad = 0;
    for (int64_t begin = 0; begin < count; begin += BLOCK) {
        const int n = count - begin < BLOCK ? (int)(count - begin) : BLOCK;
        int any = 0;
        if (bf16 && bf16_sums(plan, begin, n, span, s)) { /* the usual case */
            uint64_t flagged = 0;
            if (out_type == BF16) {
                flagged = round_store(plan, s, n, out, begin, BF16, 45, lowest, highest, &bad);
            } else if (out_type == FP16) {
                flagged = round_store(plan, s, n, out, begin, FP16, 42, lowest, highest, &bad);
            } else {
                flagged = round_store(plan, s, n, out, begin, FP32, 29, lowest, highest, &bad);
            }
            if (flagged) { /* below the output's smallest normal: one at a time, exactly */
                for (int j = 0; j < n; j++) {
                    double q = s[j] * plan->inverse;
                    if (((bits_of(q) >> 52) & 0x7FF) >= lowest) continue;
                    for (int i = 0; i < k; i++)
                        tmp[i] = load_one(plan->inputs[i], plan->types[i], begin + j);
                    double value = exact_one(tmp, plan);
                    bad |= ((bits_of(value) >> 52) & 0x7FF) > highest;
                    store_one(out, out_type, begin + j, value);
                }
            }
            continue;
        } else {
            any = general_block(plan, begin, n, theta, s, eps, abs_eps, result, flags);
        }
        if (any) {
            for (int j = 0; j < n; j++) {
                if (!flags[j]) continue;
                for (int i = 0; i < k; i++)
                    tmp[i] = load_one(plan->inputs[i], plan->types[i], begin + j);
                result[j] = exact_one(tmp, plan);
            }
        }
        bad |= store_block(out, out_type, begin, result, n, highest);
    }
    free(buffer);
    return !bad;
}

/* Returns 1 if every written element is finite, else 0; -1 if out of memory. */
CLONES int expo_exact(const Plan *plan, int64_t count, void *out, int out_type) {
    const int *types = plan->types;
    if (plan->terms == 2 && types[0] == types[1]) {
#define CASE(IN, OUT) \
        if (types[0] == IN && out_type == OUT) \
            return two_terms(plan, count, out, IN, OUT, OUT == BF16 ? 45 : OUT == FP16 ? 42 : 29);
        CASE(BF16, BF16) CASE(BF16, FP16) CASE(BF16, FP32)
        CASE(FP16, BF16) CASE(FP16, FP16) CASE(FP16, FP32)
        CASE(FP32, BF16) CASE(FP32, FP16) CASE(FP32, FP32)
#undef CASE
    }
    return any_terms(plan, count, out, out_type);
}
