/* Channels-last instance norm + LeakyReLU for CPU training, forward and backward, fp32 or bf16.
 *
 * A tensor in channels-last layout is a row-major [N, S, C] array (S: the spatial size). Statistics are per
 * (n, c) over S, accumulated in fp32 blocks flushed into doubles; everything else is computed in fp32 and stored
 * in the tensor's dtype (bf16 rounded to nearest even). Rows are processed in blocks of m rows, m * C a multiple
 * of 64 elements, against per-channel coefficients repeated m times, so that the inner loops are whole vectors
 * whatever C is (24 channels would otherwise leave a third of each row to the scalar remainder loop). Work is
 * split by rows over `threads` POSIX threads. Built and loaded by automedseg/fused_norm.py; no Python or torch
 * headers.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FLUSH_BLOCKS 16 /* fp32 partial sums over at most this many blocks before they go into the doubles */
#define MIN_ELEMENTS_PER_THREAD 32768 /* below, a thread costs more to start than its share takes */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
}

static inline float f32_id(float v) { return v; }

/* The four passes over `len` contiguous elements (a block or a row), their coefficients expanded to `len`. */
#define DEFINE_PASSES(SFX, T, LOAD, STORE)                                                                    \
    static void stats_##SFX(const T *x, int64_t len, const float *sh, float *s0, float *s1) {               \
        for (int64_t k = 0; k < len; k++) {                                                                  \
            float v = LOAD(x[k]) - sh[k];                                                                    \
            s0[k] += v;                                                                                      \
            s1[k] += v * v;                                                                                  \
        }                                                                                                    \
    }                                                                                                        \
    static void apply_##SFX(const T *x, T *y, int64_t len, const float *a, const float *b, float sl) {       \
        for (int64_t k = 0; k < len; k++) {                                                                  \
            float p = LOAD(x[k]) * a[k] + b[k];                                                              \
            y[k] = STORE(p > 0.f ? p : p * sl);                                                              \
        }                                                                                                    \
    }                                                                                                        \
    static void grad_sums_##SFX(const T *x, const T *g, int64_t len, const float *a, const float *b,         \
                                const float *m, float sl, float *s0, float *s1) {                            \
        for (int64_t k = 0; k < len; k++) {                                                                  \
            float xv = LOAD(x[k]), gv = LOAD(g[k]);                                                          \
            float d = (xv * a[k] + b[k]) > 0.f ? gv : gv * sl;                                               \
            s0[k] += d;                                                                                      \
            s1[k] += d * (xv - m[k]);                                                                        \
        }                                                                                                    \
    }                                                                                                        \
    static void grad_input_##SFX(const T *x, const T *g, T *out, int64_t len, const float *a, const float *b,\
                                 const float *m, const float *kd, const float *k0, const float *kx, float sl) {\
        for (int64_t k = 0; k < len; k++) {                                                                  \
            float xv = LOAD(x[k]), gv = LOAD(g[k]);                                                          \
            float d = (xv * a[k] + b[k]) > 0.f ? gv : gv * sl;                                               \
            out[k] = STORE(d * kd[k] + k0[k] + (xv - m[k]) * kx[k]);                                         \
        }                                                                                                    \
    }

DEFINE_PASSES(f32, float, f32_id, f32_id)
DEFINE_PASSES(bf16, uint16_t, bf16_to_f32, f32_to_bf16)

enum { OP_STATS, OP_APPLY, OP_GRAD_SUMS, OP_GRAD_INPUT, N_COEF = 6 };

typedef struct {
    int op, bf16;
    int64_t n, s, c, row0, row1;
    const void *x, *dy;
    void *y;
    const float *coef[N_COEF]; /* per (n, c): a, b, mean, kd, k0, kx (the op's, the rest NULL) */
    float slope;
    double *acc0, *acc1; /* this thread's [n * c] partial sums */
    int failed;
} Job;

static int64_t gcd64(int64_t a, int64_t b) {
    while (b) {
        int64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

static void fold(double *acc, const float *part, int64_t c, int64_t len) {
    for (int64_t k = 0; k < len; k++) acc[k % c] += part[k];
}

static void run_rows(Job *j) {
    const int64_t C = j->c, m = 64 / gcd64(C, 64), P = C * m;
    const size_t el = j->bf16 ? 2 : 4;
    float *buf = calloc((size_t)(N_COEF + 2) * P, sizeof(float));
    if (!buf) {
        j->failed = 1;
        return;
    }
    float *ex[N_COEF], *s0 = buf + N_COEF * P, *s1 = s0 + P;
    for (int i = 0; i < N_COEF; i++) ex[i] = buf + i * P;
    int64_t r = j->row0;
    while (r < j->row1) {
        int64_t n = r / j->s, end = (n + 1) * j->s;
        if (end > j->row1) end = j->row1;
        for (int i = 0; i < N_COEF; i++)
            if (j->coef[i])
                for (int64_t k = 0; k < P; k++) ex[i][k] = j->coef[i][n * C + k % C];
        const char *x = (const char *)j->x, *g = (const char *)j->dy;
        char *y = (char *)j->y;
        int reduce = j->op == OP_STATS || j->op == OP_GRAD_SUMS;
        int blocks = 0;
        if (reduce) {
            memset(s0, 0, P * sizeof(float));
            memset(s1, 0, P * sizeof(float));
        }
        for (int64_t q = r; q < end;) {
            int64_t rows = q + m <= end ? m : 1, len = rows * C, off = q * C;
            const float *a = ex[0], *b = ex[1], *mu = ex[2];
            switch (j->op) {
                case OP_STATS:
                    if (j->bf16) stats_bf16((const uint16_t *)(x + off * el), len, a, s0, s1);
                    else stats_f32((const float *)(x + off * el), len, a, s0, s1);
                    break;
                case OP_APPLY:
                    if (j->bf16) apply_bf16((const uint16_t *)(x + off * el), (uint16_t *)(y + off * el), len, a, b, j->slope);
                    else apply_f32((const float *)(x + off * el), (float *)(y + off * el), len, a, b, j->slope);
                    break;
                case OP_GRAD_SUMS:
                    if (j->bf16)
                        grad_sums_bf16((const uint16_t *)(x + off * el), (const uint16_t *)(g + off * el), len, a, b, mu,
                                       j->slope, s0, s1);
                    else
                        grad_sums_f32((const float *)(x + off * el), (const float *)(g + off * el), len, a, b, mu,
                                      j->slope, s0, s1);
                    break;
                default:
                    if (j->bf16)
                        grad_input_bf16((const uint16_t *)(x + off * el), (const uint16_t *)(g + off * el),
                                        (uint16_t *)(y + off * el), len, a, b, mu, ex[3], ex[4], ex[5], j->slope);
                    else
                        grad_input_f32((const float *)(x + off * el), (const float *)(g + off * el),
                                       (float *)(y + off * el), len, a, b, mu, ex[3], ex[4], ex[5], j->slope);
                    break;
            }
            q += rows;
            if (reduce && (++blocks == FLUSH_BLOCKS || q == end)) {
                fold(j->acc0 + n * C, s0, C, P);
                fold(j->acc1 + n * C, s1, C, P);
                memset(s0, 0, P * sizeof(float));
                memset(s1, 0, P * sizeof(float));
                blocks = 0;
            }
        }
        r = end;
    }
    free(buf);
}

static void *run_job(void *arg) {
    run_rows((Job *)arg);
    return NULL;
}

/* Runs `proto` over rows split among `threads`; the partial sums (stats, grad sums) are added into out0/out1. */
static int run(Job proto, int threads, double *out0, double *out1) {
    int64_t rows = proto.n * proto.s, nc = proto.n * proto.c;
    if (threads < 1 || rows * proto.c < MIN_ELEMENTS_PER_THREAD * 2) threads = 1;
    if (threads > rows) threads = rows > 0 ? (int)rows : 1;
    Job *jobs = calloc(threads, sizeof(Job));
    pthread_t *tid = calloc(threads, sizeof(pthread_t));
    char *joined = calloc(threads, 1);
    double *acc = calloc((size_t)threads * 2 * nc, sizeof(double));
    if (!jobs || !tid || !joined || !acc) {
        free(jobs);
        free(tid);
        free(joined);
        free(acc);
        return -1;
    }
    for (int t = 0; t < threads; t++) {
        jobs[t] = proto;
        jobs[t].row0 = rows * t / threads;
        jobs[t].row1 = rows * (t + 1) / threads;
        jobs[t].acc0 = acc + (size_t)t * 2 * nc;
        jobs[t].acc1 = jobs[t].acc0 + nc;
    }
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&tid[t], NULL, run_job, &jobs[t]) == 0) joined[t] = 1;
        else run_job(&jobs[t]); /* no thread to be had: this one does the share */
    }
    run_job(&jobs[0]);
    for (int t = 1; t < threads; t++)
        if (joined[t]) pthread_join(tid[t], NULL);
    int failed = 0;
    for (int t = 0; t < threads; t++) failed |= jobs[t].failed;
    if (out0 && !failed)
        for (int t = 0; t < threads; t++)
            for (int64_t i = 0; i < nc; i++) {
                out0[i] += jobs[t].acc0[i];
                out1[i] += jobs[t].acc1[i];
            }
    free(jobs);
    free(tid);
    free(joined);
    free(acc);
    return failed ? -1 : 0;
}

static Job job(int op, const void *x, int bf16, int64_t n, int64_t s, int64_t c, float slope) {
    Job j;
    memset(&j, 0, sizeof(j));
    j.op = op;
    j.x = x;
    j.bf16 = bf16;
    j.n = n;
    j.s = s;
    j.c = c;
    j.slope = slope;
    return j;
}

/* Sums over S of (x - shift) and (x - shift)^2 per (n, c), added into sum0 and sum1 [n * c]. */
int amseg_stats(const void *x, int bf16, int64_t n, int64_t s, int64_t c, const float *shift, double *sum0,
                double *sum1, int threads) {
    Job j = job(OP_STATS, x, bf16, n, s, c, 0.f);
    j.coef[0] = shift;
    return run(j, threads, sum0, sum1);
}

/* y = leaky(x * a + b) with a, b per (n, c). */
int amseg_apply(const void *x, void *y, int bf16, int64_t n, int64_t s, int64_t c, const float *a, const float *b,
                float slope, int threads) {
    Job j = job(OP_APPLY, x, bf16, n, s, c, slope);
    j.y = y;
    j.coef[0] = a;
    j.coef[1] = b;
    return run(j, threads, NULL, NULL);
}

/* Sums over S of dp and dp * (x - mean), dp = dy * leaky'(x * a + b), added into sum0 and sum1 [n * c]. */
int amseg_grad_sums(const void *x, const void *dy, int bf16, int64_t n, int64_t s, int64_t c, const float *mean,
                    const float *a, const float *b, float slope, double *sum0, double *sum1, int threads) {
    Job j = job(OP_GRAD_SUMS, x, bf16, n, s, c, slope);
    j.dy = dy;
    j.coef[0] = a;
    j.coef[1] = b;
    j.coef[2] = mean;
    return run(j, threads, sum0, sum1);
}

/* dx = dp * kd + k0 + (x - mean) * kx, dp as in amseg_grad_sums. */
int amseg_grad_input(const void *x, const void *dy, void *dx, int bf16, int64_t n, int64_t s, int64_t c,
                     const float *mean, const float *a, const float *b, const float *kd, const float *k0,
                     const float *kx, float slope, int threads) {
    Job j = job(OP_GRAD_INPUT, x, bf16, n, s, c, slope);
    j.dy = dy;
    j.y = dx;
    j.coef[0] = a;
    j.coef[1] = b;
    j.coef[2] = mean;
    j.coef[3] = kd;
    j.coef[4] = k0;
    j.coef[5] = kx;
    return run(j, threads, NULL, NULL);
}
