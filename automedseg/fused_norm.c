/* Channels-last instance norm + LeakyReLU for CPU training, forward and backward, fp32 or bf16.
 *
 * A tensor in channels-last layout is a row-major [N, S, C] array (S: the spatial size). Statistics are per
 * (n, c) over S, accumulated in fp32 blocks flushed into doubles; everything else is computed in fp32 and stored
 * in the tensor's dtype (bf16 rounded to nearest even). Work is split by rows over `threads` POSIX threads.
 * Built and loaded by automedseg/fused_norm.py; no Python or torch headers.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK_ROWS 64

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

typedef struct {
    int op, bf16;
    int64_t n, s, c, row0, row1;
    const void *x, *dy;
    void *y;
    const float *mean, *a, *b, *k0, *kx, *kd;  /* per (n, c) */
    float slope;
    double *acc0, *acc1;  /* this thread's [n * c] partial sums */
    int failed;
} Job;

/* op 0: sums of (x - shift) and its square; shift = a (one sample per (n, c)). */
static void stats_rows(Job *j) {
    const int64_t C = j->c;
    float *s0 = calloc(C, sizeof(float)), *s1 = calloc(C, sizeof(float));
    if (!s0 || !s1) { free(s0); free(s1); j->failed = 1; return; }
    int64_t r = j->row0;
    while (r < j->row1) {
        int64_t n = r / j->s, end = (n + 1) * j->s;
        if (end > j->row1) end = j->row1;
        const float *sh = j->a + n * C;
        for (int64_t r0 = r; r0 < end; r0 += BLOCK_ROWS) {
            int64_t r1 = r0 + BLOCK_ROWS < end ? r0 + BLOCK_ROWS : end;
            memset(s0, 0, C * sizeof(float));
            memset(s1, 0, C * sizeof(float));
            if (j->bf16) {
                for (int64_t q = r0; q < r1; q++) {
                    const uint16_t *row = (const uint16_t *)j->x + q * C;
                    for (int64_t k = 0; k < C; k++) { float v = bf16_to_f32(row[k]) - sh[k]; s0[k] += v; s1[k] += v * v; }
                }
            } else {
                for (int64_t q = r0; q < r1; q++) {
                    const float *row = (const float *)j->x + q * C;
                    for (int64_t k = 0; k < C; k++) { float v = row[k] - sh[k]; s0[k] += v; s1[k] += v * v; }
                }
            }
            for (int64_t k = 0; k < C; k++) { j->acc0[n * C + k] += s0[k]; j->acc1[n * C + k] += s1[k]; }
        }
        r = end;
    }
    free(s0);
    free(s1);
}

/* op 1: y = leaky(x * a + b). */
static void apply_rows(Job *j) {
    const int64_t C = j->c;
    for (int64_t r = j->row0; r < j->row1; r++) {
        int64_t n = r / j->s;
        const float *a = j->a + n * C, *b = j->b + n * C;
        const float sl = j->slope;
        if (j->bf16) {
            const uint16_t *xr = (const uint16_t *)j->x + r * C;
            uint16_t *yr = (uint16_t *)j->y + r * C;
            for (int64_t k = 0; k < C; k++) { float p = bf16_to_f32(xr[k]) * a[k] + b[k]; yr[k] = f32_to_bf16(p > 0.f ? p : p * sl); }
        } else {
            const float *xr = (const float *)j->x + r * C;
            float *yr = (float *)j->y + r * C;
            for (int64_t k = 0; k < C; k++) { float p = xr[k] * a[k] + b[k]; yr[k] = p > 0.f ? p : p * sl; }
        }
    }
}

/* op 2: sums of dp and dp * (x - mean), dp = dy * leaky'(x * a + b). */
static void grad_sums_rows(Job *j) {
    const int64_t C = j->c;
    float *s0 = calloc(C, sizeof(float)), *s1 = calloc(C, sizeof(float));
    if (!s0 || !s1) { free(s0); free(s1); j->failed = 1; return; }
    int64_t r = j->row0;
    while (r < j->row1) {
        int64_t n = r / j->s, end = (n + 1) * j->s;
        if (end > j->row1) end = j->row1;
        const float *a = j->a + n * C, *b = j->b + n * C, *m = j->mean + n * C;
        const float sl = j->slope;
        for (int64_t r0 = r; r0 < end; r0 += BLOCK_ROWS) {
            int64_t r1 = r0 + BLOCK_ROWS < end ? r0 + BLOCK_ROWS : end;
            memset(s0, 0, C * sizeof(float));
            memset(s1, 0, C * sizeof(float));
            if (j->bf16) {
                for (int64_t q = r0; q < r1; q++) {
                    const uint16_t *xr = (const uint16_t *)j->x + q * C, *gr = (const uint16_t *)j->dy + q * C;
                    for (int64_t k = 0; k < C; k++) {
                        float xv = bf16_to_f32(xr[k]), g = bf16_to_f32(gr[k]);
                        float d = (xv * a[k] + b[k]) > 0.f ? g : g * sl;
                        s0[k] += d; s1[k] += d * (xv - m[k]);
                    }
                }
            } else {
                for (int64_t q = r0; q < r1; q++) {
                    const float *xr = (const float *)j->x + q * C, *gr = (const float *)j->dy + q * C;
                    for (int64_t k = 0; k < C; k++) {
                        float xv = xr[k], g = gr[k];
                        float d = (xv * a[k] + b[k]) > 0.f ? g : g * sl;
                        s0[k] += d; s1[k] += d * (xv - m[k]);
                    }
                }
            }
            for (int64_t k = 0; k < C; k++) { j->acc0[n * C + k] += s0[k]; j->acc1[n * C + k] += s1[k]; }
        }
        r = end;
    }
    free(s0);
    free(s1);
}

/* op 3: dx = dp * kd + k0 + (x - mean) * kx. */
static void grad_input_rows(Job *j) {
    const int64_t C = j->c;
    for (int64_t r = j->row0; r < j->row1; r++) {
        int64_t n = r / j->s;
        const float *a = j->a + n * C, *b = j->b + n * C, *m = j->mean + n * C;
        const float *kd = j->kd + n * C, *k0 = j->k0 + n * C, *kx = j->kx + n * C;
        const float sl = j->slope;
        if (j->bf16) {
            const uint16_t *xr = (const uint16_t *)j->x + r * C, *gr = (const uint16_t *)j->dy + r * C;
            uint16_t *out = (uint16_t *)j->y + r * C;
            for (int64_t k = 0; k < C; k++) {
                float xv = bf16_to_f32(xr[k]), g = bf16_to_f32(gr[k]);
                float d = (xv * a[k] + b[k]) > 0.f ? g : g * sl;
                out[k] = f32_to_bf16(d * kd[k] + k0[k] + (xv - m[k]) * kx[k]);
            }
        } else {
            const float *xr = (const float *)j->x + r * C, *gr = (const float *)j->dy + r * C;
            float *out = (float *)j->y + r * C;
            for (int64_t k = 0; k < C; k++) {
                float xv = xr[k], g = gr[k];
                float d = (xv * a[k] + b[k]) > 0.f ? g : g * sl;
                out[k] = d * kd[k] + k0[k] + (xv - m[k]) * kx[k];
            }
        }
    }
}

static void *run_job(void *arg) {
    Job *j = (Job *)arg;
    switch (j->op) {
        case 0: stats_rows(j); break;
        case 1: apply_rows(j); break;
        case 2: grad_sums_rows(j); break;
        default: grad_input_rows(j); break;
    }
    return NULL;
}

/* Runs `proto` over rows split among `threads`; the partial sums (ops 0 and 2) are added into out0/out1 [n * c]. */
static int run(Job proto, int threads, double *out0, double *out1) {
    int64_t rows = proto.n * proto.s, nc = proto.n * proto.c;
    if (threads < 1) threads = 1;
    if (threads > rows) threads = rows > 0 ? (int)rows : 1;
    Job *jobs = calloc(threads, sizeof(Job));
    pthread_t *tid = calloc(threads, sizeof(pthread_t));
    char *joined = calloc(threads, 1);
    double *acc = calloc((size_t)threads * 2 * nc, sizeof(double));
    if (!jobs || !tid || !joined || !acc) { free(jobs); free(tid); free(joined); free(acc); return -1; }
    for (int t = 0; t < threads; t++) {
        jobs[t] = proto;
        jobs[t].row0 = rows * t / threads;
        jobs[t].row1 = rows * (t + 1) / threads;
        jobs[t].acc0 = acc + (size_t)t * 2 * nc;
        jobs[t].acc1 = jobs[t].acc0 + nc;
    }
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&tid[t], NULL, run_job, &jobs[t]) == 0) joined[t] = 1;
        else run_job(&jobs[t]);  /* no thread to be had: this one does the share */
    }
    run_job(&jobs[0]);
    for (int t = 1; t < threads; t++) if (joined[t]) pthread_join(tid[t], NULL);
    int failed = 0;
    for (int t = 0; t < threads; t++) failed |= jobs[t].failed;
    if (out0 && !failed) {
        for (int t = 0; t < threads; t++)
            for (int64_t i = 0; i < nc; i++) { out0[i] += jobs[t].acc0[i]; out1[i] += jobs[t].acc1[i]; }
    }
    free(jobs);
    free(tid);
    free(joined);
    free(acc);
    return failed ? -1 : 0;
}

/* Sums over S of (x - shift) and (x - shift)^2 per (n, c), added into sum0 and sum1 [n * c]. */
int amseg_stats(const void *x, int bf16, int64_t n, int64_t s, int64_t c, const float *shift, double *sum0,
                double *sum1, int threads) {
    Job j = {0};
    j.op = 0; j.bf16 = bf16; j.n = n; j.s = s; j.c = c; j.x = x; j.a = shift;
    return run(j, threads, sum0, sum1);
}

/* y = leaky(x * a + b) with a, b per (n, c). */
int amseg_apply(const void *x, void *y, int bf16, int64_t n, int64_t s, int64_t c, const float *a, const float *b,
                float slope, int threads) {
    Job j = {0};
    j.op = 1; j.bf16 = bf16; j.n = n; j.s = s; j.c = c; j.x = x; j.y = y; j.a = a; j.b = b; j.slope = slope;
    return run(j, threads, NULL, NULL);
}

/* Sums over S of dp and dp * (x - mean), dp = dy * leaky'(x * a + b), added into sum0 and sum1 [n * c]. */
int amseg_grad_sums(const void *x, const void *dy, int bf16, int64_t n, int64_t s, int64_t c, const float *mean,
                    const float *a, const float *b, float slope, double *sum0, double *sum1, int threads) {
    Job j = {0};
    j.op = 2; j.bf16 = bf16; j.n = n; j.s = s; j.c = c; j.x = x; j.dy = dy; j.mean = mean; j.a = a; j.b = b;
    j.slope = slope;
    return run(j, threads, sum0, sum1);
}

/* dx = dp * kd + k0 + (x - mean) * kx, dp as in amseg_grad_sums. */
int amseg_grad_input(const void *x, const void *dy, void *dx, int bf16, int64_t n, int64_t s, int64_t c,
                     const float *mean, const float *a, const float *b, const float *kd, const float *k0,
                     const float *kx, float slope, int threads) {
    Job j = {0};
    j.op = 3; j.bf16 = bf16; j.n = n; j.s = s; j.c = c; j.x = x; j.dy = dy; j.y = dx; j.mean = mean; j.a = a;
    j.b = b; j.kd = kd; j.k0 = k0; j.kx = kx; j.slope = slope;
    return run(j, threads, NULL, NULL);
}
