/*
 * Fused per-cell NB / ZINB log-likelihood, value and gradients in one pass (float32).
 *
 * Compiled on first use by cellvi/_native/__init__.py with the system C compiler and called
 * through ctypes; cellvi/distributions/_rowsum.py falls back to PyTorch operations when no
 * compiler is available. The mathematics is documented in _rowsum._NBRows:
 *
 *   r = mu / theta,  a = -theta log1p(r) = log NB(0),  s = sigmoid(pi),  p0 = s + (1 - s) e^a,
 *   dense part (every entry): log p0 (ZINB) or a (NB), with w = (1 - s) e^a / p0 (1 for the NB)
 *     d/dmu = -w / (1 + r),  d/dtheta = w (r / (1 + r) - log1p(r)),  d/dpi = s / p0 - s;
 *   non-zero counts x: log NB(x) (+ log(1 - s)), whose value and gradients replace the dense ones
 *   at those entries (Gamma-function terms evaluated there only, in double precision).
 *
 * The dense part runs on GCC/Clang vector extensions (16 floats: AVX-512 where the CPU has it,
 * split into narrower registers elsewhere) with Cephes-style exp and log polynomials. A row in
 * which p0 falls below 1e-30 (both pi and a below about -69) is redone in double precision with
 * log p0 = logaddexp(pi, a) - softplus(pi).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define W 16
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));

static inline vf vsplat(float x) { return (vf){0} + x; }
static inline vf vselect(vi mask, vf yes, vf no) { return (vf)((mask & (vi)yes) | (~mask & (vi)no)); }

/*
 * 1 / x: where the CPU has AVX-512, a 14-bit hardware estimate refined by one Newton step
 * (relative error below 1e-7, like the division it replaces, at a fraction of its cost).
 */
static inline vf vrcp(vf x) {
#if defined(__AVX512F__) && W == 16
    vf y = (vf)__builtin_ia32_rcp14ps512_mask((__attribute__((vector_size(64))) float)x,
                                              (__attribute__((vector_size(64))) float){0},
                                              (unsigned short)0xffff);
    return y * (2.0f - x * y);
#else
    return 1.0f / x;
#endif
}

/* e^x, relative error ~1e-7 on [-87, 88]; 0 below about -87.6, e^88 above 88; NaN stays NaN. */
static inline vf vexp(vf x) {
    x = vselect(x > 88.0f, vsplat(88.0f), x);
    x = vselect(x < -88.0f, vsplat(-88.0f), x);
    vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
    vf r = x - n * 0.693359375f - n * -2.12194440e-4f;
    vf p = vsplat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi k = __builtin_convertvector(n, vi) + 127;
    k = k & (k > 0); /* 2^n, or 0 when n < -126 */
    return p * (vf)(k << 23);
}

/* log(x) for x >= FLT_MIN (normal numbers), relative error ~1e-7; NaN and +inf pass through. */
static inline vf vlog(vf x) {
    vi bits = (vi)x;
    vi e = ((bits >> 23) & 0xff) - 126;
    vf mant = (vf)((bits & 0x007fffff) | 0x3f000000); /* in [0.5, 1) */
    vi small = mant < 0.707106781186547524f;
    vf ef = __builtin_convertvector(e + small, vf); /* e - 1 where small (mask is -1) */
    vf f = vselect(small, mant + mant, mant) - 1.0f;
    vf z = f * f;
    vf y = vsplat(7.0376836292e-2f);
    y = y * f - 1.1514610310e-1f;
    y = y * f + 1.1676998740e-1f;
    y = y * f - 1.2420140846e-1f;
    y = y * f + 1.4249322787e-1f;
    y = y * f - 1.6668057665e-1f;
    y = y * f + 2.0000714765e-1f;
    y = y * f - 2.4999993993e-1f;
    y = y * f + 3.3333331174e-1f;
    y = y * f * z;
    y = y + ef * -2.12194440e-4f;
    y = y - 0.5f * z;
    vf res = f + y + ef * 0.693359375f;
    vi special = (x != x) | (x == (vf){0} + INFINITY); /* NaN or +inf: returned as they are */
    return vselect(special, x, res);
}

/* r / (1 + r) - log1p(r) (the theta-derivative of a), with a series where it cancels. */
static inline vf vq(vf r, vf inv, vf l) {
    vf direct = r * inv - l;
    vf s = vsplat(-7.0f / 8.0f);
    s = s * r + 6.0f / 7.0f;
    s = s * r - 5.0f / 6.0f;
    s = s * r + 4.0f / 5.0f;
    s = s * r - 3.0f / 4.0f;
    s = s * r + 2.0f / 3.0f;
    s = s * r - 0.5f;
    return vselect(r < 0.05f, s * r * r, direct);
}

/* ---- scalar double helpers for the non-zero counts ---- */

static double lgamma1_table[1024]; /* lgamma(k + 1) */
static int table_ready = 0;

static void init_table(void) {
    if (table_ready) return;
    for (int k = 0; k < 1024; ++k) lgamma1_table[k] = lgamma((double)k + 1.0);
    table_ready = 1;
}

static inline double lgamma1(double x) { /* lgamma(x + 1) */
    if (x < 1024.0 && x == floor(x)) return lgamma1_table[(int)x];
    return lgamma(x + 1.0);
}

static double digamma(double y) { /* y > 0 */
    double res = 0.0;
    while (y < 6.0) {
        res -= 1.0 / y;
        y += 1.0;
    }
    double i2 = 1.0 / (y * y);
    return res + log(y) - 0.5 / y -
           i2 * (1.0 / 12 - i2 * (1.0 / 120 - i2 * (1.0 / 252 - i2 * (1.0 / 240 - i2 * (1.0 / 132)))));
}

/* Largest integer count whose gamma terms are finite products (SUM_MAX) and the block length
 * of those products (SUM_BLOCK): (t + SUM_MAX)^SUM_BLOCK stays finite in double for t < 1e15. */
#define SUM_MAX 64
#define SUM_BLOCK 8

/*
 * lgamma(x + t) - lgamma(t) = log prod_k (t + k) and digamma(x + t) - digamma(t) =
 * sum_k 1 / (t + k), k < x, for an integer x <= SUM_MAX: in blocks of SUM_BLOCK terms, each
 * block's derivative sum is P' / P with P' by the product rule (one division per block instead
 * of one per term; every term positive, so nothing cancels).
 */
static inline double digamma_diff_blocks(int x, double t) {
    double dg = 0.0;
    for (int k0 = 0; k0 < x; k0 += SUM_BLOCK) {
        int k1 = k0 + SUM_BLOCK < x ? k0 + SUM_BLOCK : x;
        double p = 1.0, dp = 0.0;
        for (int k = k0; k < k1; ++k) {
            dp = dp * (t + k) + p;
            p *= t + k;
        }
        dg += dp / p;
    }
    return dg;
}

static inline void gamma_diff(double x, double t, double *lg, double *dg) {
    if (x <= SUM_MAX && x == floor(x) && t < 1e15) {
        double lsum = 0.0;
        for (int k0 = 0; k0 < (int)x; k0 += SUM_BLOCK) {
            int k1 = k0 + SUM_BLOCK < (int)x ? k0 + SUM_BLOCK : (int)x;
            double prod = 1.0;
            for (int k = k0; k < k1; ++k) prod *= t + k;
            lsum += log(prod);
        }
        *lg = lsum;
        *dg = digamma_diff_blocks((int)x, t);
    } else {
        *lg = lgamma(x + t) - lgamma(t);
        *dg = digamma(x + t) - digamma(t);
    }
}

static inline double softplus(double z) { return z > 0 ? z + log1p(exp(-z)) : log1p(exp(z)); }

/* log p0 and its gradients for one entry, in double precision (stable for any pi and a). */
static inline double zero_entry(double m, double t, double z, int zi, double *dm, double *dt,
                                double *dz) {
    double r = m / t, l = log1p(r), inv = 1.0 / (1.0 + r), a = -t * l;
    double q = r * inv - l;
    if (!zi) {
        *dm = -inv;
        *dt = q;
        return a;
    }
    double hi = z > a ? z : a, lo = z > a ? a : z;
    double lse = hi + log1p(exp(lo - hi)); /* log(e^pi + e^a) */
    double lp0 = lse - softplus(z);
    double w = exp(a - lse);              /* (1 - s) e^a / p0 */
    double s = 1.0 / (1.0 + exp(-z));
    *dm = -w * inv;
    *dt = w * q;
    *dz = (1.0 - w) - s;
    return lp0;
}

/* Scratch of one row: dense-pass quantities the non-zero pass reuses. */
typedef struct {
    float *val; /* log p0 (ZINB) or a (NB): the dense value at each entry */
    float *l;   /* log1p(r) */
    float *q;   /* r / (1 + r) - log1p(r) */
    float *s;   /* sigmoid(pi) */
    float *oms; /* 1 - sigmoid(pi) */
} scratch_t;

static inline void vstore(float *dst, vf v, int64_t n) {
    if (n == W) memcpy(dst, &v, sizeof v);
    else memcpy(dst, &v, n * sizeof(float));
}

/* Exact double-precision value and gradients of one non-zero count (the slow, general path). */
static double nonzero_exact(double x, double m, double t, double z, int has_zi, double *dm,
                            double *dt, double *dz) {
    double r = m / t, l = log1p(r), inv = 1.0 / (1.0 + r), lg, dg;
    gamma_diff(x, t, &lg, &dg);
    double v = -t * l + x * (log(r) - l) + lg - lgamma1(x);
    if (has_zi) v -= softplus(z); /* log(1 - s) */
    *dm = x / m - (x + t) / (t + m);
    *dt = r * inv - l - x / (t + m) + dg;
    *dz = -1.0 / (1.0 + exp(-z));
    return v;
}

/*
 * One row (one cell under one sample). mu, th, zi point at the row's G entries (ith: 1 / theta,
 * or NULL); d* at the row's gradient entries (NULL: no gradient). Returns the row's sum.
 */
static inline __attribute__((always_inline)) double row(
    int64_t G, const float *mu, const float *th, const float *ith, const float *zi, int64_t nnz,
    const int64_t *cols, const float *vals, float *dmu, float *dth, float *dzi, scratch_t sc,
    const int has_zi, const int grad) {
    vf acc = vsplat(0.0f);
    vi bad = (vi){0};
    const int keep = nnz > 0;
    for (int64_t g0 = 0; g0 < G; g0 += W) {
        int64_t n = G - g0 < W ? G - g0 : W;
        vf m, t, it, z = vsplat(0.0f);
        if (n == W) {
            memcpy(&m, mu + g0, sizeof m);
            memcpy(&t, th + g0, sizeof t);
            if (ith) memcpy(&it, ith + g0, sizeof it);
            if (has_zi) memcpy(&z, zi + g0, sizeof z);
        } else { /* tail: pad with harmless values */
            m = vsplat(1.0f);
            t = vsplat(1.0f);
            it = vsplat(1.0f);
            memcpy(&m, mu + g0, n * sizeof(float));
            memcpy(&t, th + g0, n * sizeof(float));
            if (ith) memcpy(&it, ith + g0, n * sizeof(float));
            if (has_zi) memcpy(&z, zi + g0, n * sizeof(float));
        }
        vf r = ith ? m * it : m / t;
        vf u = r + 1.0f;
        vf inv = vrcp(u);
        vf l = vlog(u) - ((u - 1.0f) - r) * inv; /* log1p(r), corrected for rounding 1 + r */
        vf a = -t * l;
        vf val, q = vsplat(0.0f), gm, gt, gz;
        if (grad) q = vq(r, inv, l);
        if (has_zi) {
            vf en = vexp(-z);
            vf s = vrcp(en + 1.0f);
            vf oms = en * s; /* 1 - s, accurate when s is near 1 */
            vf nb0 = oms * vexp(a);
            vf p0 = s + nb0;
            bad |= p0 < 1e-30f;
            val = vlog(vselect(p0 < 1e-30f, vsplat(1e-30f), p0)); /* NaN stays NaN */
            if (grad) {
                vf ip0 = vrcp(p0);
                vf w = nb0 * ip0;
                gm = -w * inv;
                gt = w * q;
                gz = s * ip0 - s;
            }
            if (keep) {
                if (grad) vstore(sc.s + g0, s, n);
                vstore(sc.oms + g0, oms, n);
            }
        } else {
            val = a;
            if (grad) {
                gm = -inv;
                gt = q;
            }
        }
        if (keep) {
            vstore(sc.val + g0, val, n);
            vstore(sc.l + g0, l, n);
            if (grad) vstore(sc.q + g0, q, n);
        }
        if (n == W) {
            acc += val;
        } else {
            for (int64_t k = 0; k < n; ++k) acc[0] += val[k];
        }
        if (grad) {
            vstore(dmu + g0, gm, n);
            vstore(dth + g0, gt, n);
            if (has_zi) vstore(dzi + g0, gz, n);
        }
    }
    double total = 0.0;
    int any_bad = 0;
    for (int k = 0; k < W; ++k) {
        total += acc[k];
        any_bad |= bad[k];
    }
    if (has_zi && any_bad) { /* p0 underflowed somewhere: the whole row in double precision */
        total = 0.0;
        for (int64_t g = 0; g < G; ++g) {
            double dm, dt, dz;
            double v = zero_entry(mu[g], th[g], zi[g], 1, &dm, &dt, &dz);
            total += v;
            if (keep) sc.val[g] = (float)v;
            if (grad) {
                dmu[g] = (float)dm;
                dth[g] = (float)dt;
                dzi[g] = (float)dz;
            }
        }
    }
    /*
     * Non-zero counts: remove the dense value there and add log NB(x) (+ log(1 - s)):
     *   log NB(x) = a + x log(m / (t + m)) + lgamma(x + t) - lgamma(t) - lgamma(x + 1),
     * where for an integer x <= SUM_MAX the middle terms are log(prod_k (t + k) m / (t + m)), one
     * log (the product leaves the double range only in extreme cases: then the exact path).
     */
    for (int64_t j = 0; j < nnz; ++j) {
        int64_t g = cols[j];
        double x = vals[j], m = mu[g], t = th[g];
        double itm = 1.0 / (t + m), v, dm = 0.0, dt = 0.0, dz = 0.0;
        total -= sc.val[g];
        if (x <= SUM_MAX && x == floor(x) && t < 1e15 && m > 0.0) {
            double ratio = m * itm, y = has_zi ? sc.oms[g] : 1.0;
            for (int k = 0; k < (int)x; ++k) y *= (t + k) * ratio;
            if (y > 1e-300 && y < 1e300) {
                v = -t * sc.l[g] + log(y) - lgamma1_table[(int)x];
                if (grad) {
                    dm = x / m - (x + t) * itm;
                    dt = sc.q[g] - x * itm + digamma_diff_blocks((int)x, t);
                    if (has_zi) dz = -sc.s[g];
                }
            } else {
                v = nonzero_exact(x, m, t, has_zi ? zi[g] : 0.0, has_zi, &dm, &dt, &dz);
            }
        } else {
            v = nonzero_exact(x, m, t, has_zi ? zi[g] : 0.0, has_zi, &dm, &dt, &dz);
        }
        total += v;
        if (grad) {
            dmu[g] = (float)dm;
            dth[g] = (float)dt;
            if (has_zi) dzi[g] = (float)dz;
        }
    }
    return total;
}

/* 1 / theta per gene in *ith (NULL when theta varies by row: th_s or th_n not 0); -1: no memory. */
static int theta_reciprocals(const float *theta, int64_t th_s, int64_t th_n, int64_t G,
                             float **ith) {
    *ith = 0;
    if (th_s != 0 || th_n != 0) return 0;
    *ith = malloc(G * sizeof(float));
    if (!*ith) return -1;
    for (int64_t g = 0; g < G; ++g) (*ith)[g] = 1.0f / theta[g];
    return 0;
}

/* A thread's scratch for rows of G genes, plus `extra` more rows of G floats; NULL: no memory. */
static float *scratch(int64_t G, int extra, scratch_t *sc) {
    float *buf = malloc((5 + extra) * G * sizeof(float));
    if (buf) *sc = (scratch_t){buf, buf + G, buf + 2 * G, buf + 3 * G, buf + 4 * G};
    return buf;
}

/*
 * Per-row sums of the NB (zi == NULL) or ZINB log-likelihood of S samples of N cells x G genes.
 *
 * mu, theta, zi: row (s, n) starts at mu + s * mu_s + n * mu_n (likewise theta and zi), and
 * its G entries are contiguous (th_s = th_n = 0 for one theta per gene). crow (N + 1), cols,
 * vals: the non-zero counts of the (N, G) count matrix in CSR form, shared by the S samples.
 * out: (S, N). dmu, dth, dzi: (S, N, G) per-entry derivatives of each row's sum, or NULL for
 * no gradient. Returns 0, or -1 when memory for the scratch could not be allocated.
 */
int cellvi_nb_rows(int64_t S, int64_t N, int64_t G, const float *mu, int64_t mu_s, int64_t mu_n,
                   const float *theta, int64_t th_s, int64_t th_n, const float *zi, int64_t zi_s,
                   int64_t zi_n, const int64_t *crow,
                   const int64_t *cols, const float *vals, float *out, float *dmu, float *dth,
                   float *dzi, int n_threads) {
    init_table();
    const int grad = dmu != 0;
    const int has_zi = zi != 0;
    const int64_t rows = S * N;
    float *ith = 0;
    if (theta_reciprocals(theta, th_s, th_n, G, &ith)) return -1;
    int failed = 0;
    if (n_threads < 1 || rows * G < 65536) n_threads = 1;
#pragma omp parallel num_threads(n_threads) reduction(| : failed)
    {
        scratch_t sc;
        float *buf = scratch(G, 0, &sc);
        if (!buf) failed = 1;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; ++i) {
            if (!buf) continue;
            int64_t s = i / N, n = i % N;
            const float *m = mu + s * mu_s + n * mu_n, *t = theta + s * th_s + n * th_n;
            const float *z = has_zi ? zi + s * zi_s + n * zi_n : 0;
            int64_t b = crow[n], nnz = crow[n + 1] - b;
            float *gm = grad ? dmu + i * G : 0, *gt = grad ? dth + i * G : 0;
            float *gz = grad && has_zi ? dzi + i * G : 0;
            double v;
            if (has_zi) {
                v = grad ? row(G, m, t, ith, z, nnz, cols + b, vals + b, gm, gt, gz, sc, 1, 1)
                         : row(G, m, t, ith, z, nnz, cols + b, vals + b, 0, 0, 0, sc, 1, 0);
            } else {
                v = grad ? row(G, m, t, ith, 0, nnz, cols + b, vals + b, gm, gt, 0, sc, 0, 1)
                         : row(G, m, t, ith, 0, nnz, cols + b, vals + b, 0, 0, 0, sc, 0, 0);
            }
            out[i] = (float)v;
        }
        free(buf);
    }
    free(ith);
    return failed ? -1 : 0;
}

/*
 * Backward of cellvi_nb_rows: scale each row's derivatives by the upstream gradient g (S * N).
 * out_mu = dmu * g, out_zi = dzi * g (skipped when dzi is NULL); the theta derivative is either
 * summed over rows into out_th (G) when per_gene, or scaled like the others into out_th (S*N*G).
 * Threads split the genes, so the per-gene sums need no reduction between threads.
 */
int cellvi_nb_rows_backward(int64_t rows, int64_t G, const float *g, const float *dmu,
                            const float *dzi, const float *dth, int per_gene, float *out_mu,
                            float *out_zi, float *out_th, int n_threads) {
    if (n_threads < 1 || rows * G < 65536) n_threads = 1;
#pragma omp parallel num_threads(n_threads)
    {
        int nt = 1, t = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads();
        t = omp_get_thread_num();
#endif
        int64_t chunk = ((G + nt - 1) / nt + W - 1) / W * W;
        int64_t g0 = t * chunk, g1 = g0 + chunk < G ? g0 + chunk : G;
        if (per_gene && g0 < g1) memset(out_th + g0, 0, (g1 - g0) * sizeof(float));
        for (int64_t i = 0; i < rows && g0 < g1; ++i) {
            const float w = g[i];
            const int64_t o = i * G;
            for (int64_t k = g0; k < g1; ++k) out_mu[o + k] = dmu[o + k] * w;
            if (dzi)
                for (int64_t k = g0; k < g1; ++k) out_zi[o + k] = dzi[o + k] * w;
            if (per_gene)
                for (int64_t k = g0; k < g1; ++k) out_th[k] += dth[o + k] * w;
            else
                for (int64_t k = g0; k < g1; ++k) out_th[o + k] = dth[o + k] * w;
        }
    }
    return 0;
}

/*
 * out = exp(x - max(x)) over G contiguous entries (out may be x); returns 1 / sum(out), so
 * that out * the result is the softmax of x.
 */
static inline float softmax_row(const float *x, float *out, int64_t G) {
    vf vmx = vsplat(-INFINITY);
    int64_t k = 0;
    for (; k + W <= G; k += W) {
        vf v;
        memcpy(&v, x + k, sizeof v);
        vmx = vselect(v > vmx, v, vmx);
    }
    float mx = -INFINITY;
    for (int j = 0; j < W; ++j) mx = vmx[j] > mx ? vmx[j] : mx;
    for (; k < G; ++k) mx = x[k] > mx ? x[k] : mx;
    vf acc = vsplat(0.0f);
    for (k = 0; k + W <= G; k += W) {
        vf v;
        memcpy(&v, x + k, sizeof v);
        v = vexp(v - mx);
        memcpy(out + k, &v, sizeof v);
        acc += v;
    }
    if (k < G) {
        vf v = vsplat(-INFINITY); /* padding: exp gives 0 */
        memcpy(&v, x + k, (G - k) * sizeof(float));
        v = vexp(v - mx);
        memcpy(out + k, &v, (G - k) * sizeof(float));
        acc += v;
    }
    double total = 0.0;
    for (int j = 0; j < W; ++j) total += acc[j];
    return (float)(1.0 / total);
}

/*
 * scale = softmax(logits) over each row's G entries and rate = exp(log_lib) * scale + floor.
 * logits: row i at logits + i * ld (entries contiguous); log_lib, rows; scale, rate: (rows, G).
 */
int cellvi_softmax_rate(int64_t rows, int64_t G, const float *logits, int64_t ld,
                        const float *log_lib, float floor_, float *scale, float *rate,
                        int n_threads) {
    if (n_threads < 1 || rows * G < 65536) n_threads = 1;
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t i = 0; i < rows; ++i) {
        const float *x = logits + i * ld;
        float *s = scale + i * G, *r = rate + i * G;
        const float inv = softmax_row(x, s, G), lib = expf(log_lib[i]);
        for (int64_t j = 0; j < G; ++j) {
            float sj = s[j] * inv;
            s[j] = sj;
            r[j] = lib * sj + floor_;
        }
    }
    return 0;
}

/*
 * cellvi_nb_rows without gradients, from the decoder's logits: each row's expected counts
 * mu = exp(log_lib) * softmax(logits) + floor (exactly as cellvi_softmax_rate computes them) are
 * made in a per-thread row buffer and used there, so neither the normalised expression nor the
 * rate is ever written out. logits: row (s, n) at logits + s * lg_s + n * lg_n (G contiguous
 * entries); log_lib: S * N; the other arguments as for cellvi_nb_rows.
 */
int cellvi_nb_rows_softmax(int64_t S, int64_t N, int64_t G, const float *logits, int64_t lg_s,
                           int64_t lg_n, const float *log_lib, float floor_, const float *theta,
                           int64_t th_s, int64_t th_n, const float *zi, int64_t zi_s,
                           int64_t zi_n, const int64_t *crow, const int64_t *cols,
                           const float *vals, float *out, int n_threads) {
    init_table();
    const int has_zi = zi != 0;
    const int64_t rows = S * N;
    float *ith = 0;
    if (theta_reciprocals(theta, th_s, th_n, G, &ith)) return -1;
    int failed = 0;
    if (n_threads < 1 || rows * G < 65536) n_threads = 1;
#pragma omp parallel num_threads(n_threads) reduction(| : failed)
    {
        scratch_t sc;
        float *buf = scratch(G, 1, &sc);
        if (!buf) failed = 1;
        float *mu = buf + 5 * G; /* the row's expected counts */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; ++i) {
            if (!buf) continue;
            int64_t s = i / N, n = i % N;
            const float inv = softmax_row(logits + s * lg_s + n * lg_n, mu, G);
            const float lib = expf(log_lib[i]);
            for (int64_t j = 0; j < G; ++j) {
                float sj = mu[j] * inv;
                mu[j] = lib * sj + floor_;
            }
            const float *t = theta + s * th_s + n * th_n;
            const float *z = has_zi ? zi + s * zi_s + n * zi_n : 0;
            int64_t b = crow[n], nnz = crow[n + 1] - b;
            out[i] = (float)(has_zi ? row(G, mu, t, ith, z, nnz, cols + b, vals + b, 0, 0, 0, sc, 1, 0)
                                    : row(G, mu, t, ith, 0, nnz, cols + b, vals + b, 0, 0, 0, sc, 0, 0));
        }
        free(buf);
    }
    free(ith);
    return failed ? -1 : 0;
}

/*
 * The training step's likelihood in one kernel: value and gradients from the decoder's logits.
 * For each row i, mu = exp(log_lib[i]) * softmax(logits_i) + floor (as cellvi_softmax_rate),
 * out[i] = sum_g log NB / ZINB(x_ig | mu_ig, theta_g, zi_ig) (as cellvi_nb_rows), and with the
 * row weight w[i] (the upstream gradient of out[i], known before the step):
 *   d_logits = w * (d out / d logits)  = s * (y - <s, y>),  y = w exp(log_lib) d out / d mu,
 *   d_zi     = w * (d out / d zi),
 *   d_theta  = sum_i w[i] * (d out[i] / d theta)  (one theta per gene).
 * Softmax, rate and the per-entry derivatives live in per-thread row buffers: the normalised
 * expression, the rate and the derivatives of cellvi_nb_rows are never written out.
 * logits, zi, d_logits, d_zi: (N, G) contiguous; zi and d_zi NULL for the NB.
 */
static int nb_softmax_train(int64_t N, int64_t G, const float *logits, const float *log_lib,
                            float floor_, const float *theta, const float *zi,
                            const int64_t *crow, const int64_t *cols, const float *vals,
                            const float *w, float *out, float *d_logits, float *d_zi,
                            float *d_theta, float *d_lib, int n_threads) {
    init_table();
    const int has_zi = zi != 0;
    float *ith = 0;
    if (theta_reciprocals(theta, 0, 0, G, &ith)) return -1;
    if (n_threads < 1 || N * G < 65536) n_threads = 1;
    float *acc_all = calloc((size_t)n_threads * G, sizeof(float)); /* per-thread theta sums */
    if (!acc_all) {
        free(ith);
        return -1;
    }
    int failed = 0;
#pragma omp parallel num_threads(n_threads) reduction(| : failed)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        float *acc = acc_all + (int64_t)t * G;
        scratch_t sc;
        float *buf = scratch(G, 4, &sc);
        if (!buf) failed = 1;
        float *s = buf + 5 * G, *mu = buf + 6 * G, *dmu = buf + 7 * G, *dth = buf + 8 * G;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < N; ++i) {
            if (!buf) continue;
            const float inv = softmax_row(logits + i * G, s, G);
            const float lib = expf(log_lib[i]);
            for (int64_t j = 0; j < G; ++j) {
                float sj = s[j] * inv;
                s[j] = sj;
                mu[j] = lib * sj + floor_;
            }
            int64_t b = crow[i], nnz = crow[i + 1] - b;
            float *gz = has_zi ? d_zi + i * G : 0;
            double v = has_zi
                ? row(G, mu, theta, ith, zi + i * G, nnz, cols + b, vals + b, dmu, dth, gz, sc, 1, 1)
                : row(G, mu, theta, ith, 0, nnz, cols + b, vals + b, dmu, dth, 0, sc, 0, 1);
            out[i] = (float)v;
            const float wi = w[i], c = wi * lib;
            float *d = d_logits + i * G;
            vf vsy = vsplat(0.0f);
            int64_t k = 0;
            for (; k + W <= G; k += W) {
                vf sv, g, th, a;
                memcpy(&sv, s + k, sizeof sv);
                memcpy(&g, dmu + k, sizeof g);
                memcpy(&th, dth + k, sizeof th);
                memcpy(&a, acc + k, sizeof a);
                a += wi * th;
                memcpy(acc + k, &a, sizeof a);
                g *= c;
                memcpy(d + k, &g, sizeof g);
                vsy += sv * g;
                if (has_zi) {
                    vf z;
                    memcpy(&z, gz + k, sizeof z);
                    z *= wi;
                    memcpy(gz + k, &z, sizeof z);
                }
            }
            double sy = 0.0;
            for (int j = 0; j < W; ++j) sy += vsy[j];
            for (; k < G; ++k) {
                acc[k] += wi * dth[k];
                d[k] = c * dmu[k];
                sy += (double)s[k] * d[k];
                if (has_zi) gz[k] *= wi;
            }
            const float csy = (float)sy;
            for (k = 0; k < G; ++k) d[k] = s[k] * (d[k] - csy);
            if (d_lib) d_lib[i] = csy; /* w exp(log_lib) <s, d out / d mu> = w d out / d log_lib */
        }
        free(buf);
    }
    for (int64_t g = 0; g < G; ++g) {
        float total = 0.0f;
        for (int t = 0; t < n_threads; ++t) total += acc_all[(int64_t)t * G + g]; /* 0 if idle */
        d_theta[g] = total;
    }
    free(acc_all);
    free(ith);
    return failed ? -1 : 0;
}

int cellvi_nb_softmax_train(int64_t N, int64_t G, const float *logits, const float *log_lib,
                            float floor_, const float *theta, const float *zi,
                            const int64_t *crow, const int64_t *cols, const float *vals,
                            const float *w, float *out, float *d_logits, float *d_zi,
                            float *d_theta, int n_threads) {
    return nb_softmax_train(N, G, logits, log_lib, floor_, theta, zi, crow, cols, vals, w, out,
                            d_logits, d_zi, d_theta, 0, n_threads);
}

/*
 * cellvi_nb_softmax_train with the gradient of the log library size as well (a modelled
 * library, LDVAE's): d_lib[i] = w[i] * d out[i] / d log_lib[i] = w[i] exp(log_lib[i])
 * <s_i, d out_i / d mu_i>, the row sum the softmax backward already forms.
 */
int cellvi_nb_softmax_train_lib(int64_t N, int64_t G, const float *logits,
                                const float *log_lib, float floor_, const float *theta,
                                const float *zi, const int64_t *crow, const int64_t *cols,
                                const float *vals, const float *w, float *out, float *d_logits,
                                float *d_zi, float *d_theta, float *d_lib, int n_threads) {
    return nb_softmax_train(N, G, logits, log_lib, floor_, theta, zi, crow, cols, vals, w, out,
                            d_logits, d_zi, d_theta, d_lib, n_threads);
}

/*
 * Backward of cellvi_softmax_rate. With y = g_scale + exp(log_lib) * g_rate (either may be
 * NULL: zero), d logits = scale * (y - sum(scale * y)) and d log_lib = exp(log_lib) *
 * sum(scale * g_rate) (written when d_lib is not NULL).
 */
int cellvi_softmax_rate_backward(int64_t rows, int64_t G, const float *scale, const float *log_lib,
                                 const float *g_scale, const float *g_rate, float *d_logits,
                                 float *d_lib, int n_threads) {
    if (n_threads < 1 || rows * G < 65536) n_threads = 1;
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t i = 0; i < rows; ++i) {
        const float *s = scale + i * G;
        const float *gs = g_scale ? g_scale + i * G : 0, *gr = g_rate ? g_rate + i * G : 0;
        float *d = d_logits + i * G;
        const float lib = expf(log_lib[i]);
        vf vsy = vsplat(0.0f), vsr = vsplat(0.0f); /* lane-wise sums of scale * y, scale * g_rate */
        int64_t k = 0;
        for (; k + W <= G; k += W) {
            vf sv, r = vsplat(0.0f), y = vsplat(0.0f);
            memcpy(&sv, s + k, sizeof sv);
            if (gr) memcpy(&r, gr + k, sizeof r);
            if (gs) memcpy(&y, gs + k, sizeof y);
            y += lib * r;
            memcpy(d + k, &y, sizeof y);
            vsy += sv * y;
            vsr += sv * r;
        }
        double sy = 0.0, sr = 0.0;
        for (int j = 0; j < W; ++j) {
            sy += vsy[j];
            sr += vsr[j];
        }
        for (; k < G; ++k) {
            float r = gr ? gr[k] : 0.0f;
            float y = (gs ? gs[k] : 0.0f) + lib * r;
            d[k] = y;
            sy += (double)s[k] * y;
            sr += (double)s[k] * r;
        }
        const float c = (float)sy;
        for (k = 0; k < G; ++k) d[k] = s[k] * (d[k] - c);
        if (d_lib) d_lib[i] = (float)(lib * sr);
    }
    return 0;
}

/*
 * out (n_rows, K) = A @ B for a CSR matrix A (n_rows x n_cols: crow, cols, vals) and a dense
 * row-major B (n_cols, K): each output row is a weighted sum of rows of B, written once.
 */
int cellvi_csr_matmul(int64_t n_rows, int64_t K, const int64_t *crow, const int64_t *cols,
                      const float *vals, const float *B, float *out, int n_threads) {
    if (n_threads < 1 || crow[n_rows] * K < 65536) n_threads = 1;
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t i = 0; i < n_rows; ++i) {
        float *o = out + i * K;
        memset(o, 0, K * sizeof(float));
        for (int64_t j = crow[i]; j < crow[i + 1]; ++j) {
            const float v = vals[j];
            const float *b = B + cols[j] * K;
            for (int64_t k = 0; k < K; ++k) o[k] += v * b[k];
        }
    }
    return 0;
}

/*
 * y = softmax(x) over each row's G contiguous entries (row i at x + i * ldx and y + i * ldy; y
 * may be x). The exponentials are written to y and rescaled there: x is read once.
 */
int cellvi_softmax(int64_t rows, int64_t G, const float *x, int64_t ldx, float *y, int64_t ldy,
                   int n_threads) {
    if (n_threads < 1 || rows * G < 65536) n_threads = 1;
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t i = 0; i < rows; ++i) {
        float *out = y + i * ldy;
        const float inv = softmax_row(x + i * ldx, out, G);
        for (int64_t k = 0; k < G; ++k) out[k] *= inv;
    }
    return 0;
}

/*
 * Rows idx (n) of a CSR matrix (indptr, indices: int64 when is64, else int32; data: float32),
 * without its explicit zeros: crow (n + 1), cols, vals and, when rows is not NULL, each entry's
 * row. When tcrow is not NULL, also the transpose (n_cols x n) in CSR form: tcrow (n_cols + 1),
 * tcols (positions in idx, ascending) and tvals, by a counting sort. The outputs hold at least
 * sum(indptr[idx + 1] - indptr[idx]) entries. Returns the number of entries written.
 */
int64_t cellvi_gather_rows(int64_t n, const int64_t *idx, const void *indptr, const void *indices,
                           int is64, const float *data, int64_t n_cols, int64_t *crow,
                           int64_t *cols, float *vals, int64_t *rows, int64_t *tcrow,
                           int64_t *tcols, float *tvals) {
    const int64_t *p64 = indptr, *i64 = indices;
    const int32_t *p32 = indptr, *i32 = indices;
    int64_t nnz = 0;
    crow[0] = 0;
    for (int64_t r = 0; r < n; ++r) {
        int64_t c = idx[r];
        int64_t a = is64 ? p64[c] : p32[c], b = is64 ? p64[c + 1] : p32[c + 1];
        for (int64_t j = a; j < b; ++j) {
            float v = data[j];
            if (v == 0.0f) continue;
            cols[nnz] = is64 ? i64[j] : i32[j];
            vals[nnz] = v;
            if (rows) rows[nnz] = r;
            ++nnz;
        }
        crow[r + 1] = nnz;
    }
    if (tcrow) {
        memset(tcrow, 0, (n_cols + 1) * sizeof(int64_t));
        for (int64_t j = 0; j < nnz; ++j) tcrow[cols[j] + 1]++;
        for (int64_t g = 0; g < n_cols; ++g) tcrow[g + 1] += tcrow[g];
        int64_t *next = malloc((n_cols > 0 ? n_cols : 1) * sizeof(int64_t));
        if (!next) return -1;
        memcpy(next, tcrow, n_cols * sizeof(int64_t));
        for (int64_t r = 0; r < n; ++r)
            for (int64_t j = crow[r]; j < crow[r + 1]; ++j) {
                int64_t pos = next[cols[j]]++;
                tcols[pos] = r;
                tvals[pos] = vals[j];
            }
        free(next);
    }
    return nnz;
}
