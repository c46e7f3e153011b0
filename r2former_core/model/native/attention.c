/* Softmax attention for heads of dimension 8, float32, CPU: the two shapes of the R2Former reranker.
 *
 * r2f_attention_hd8: long sequences (block 2: 4 heads over ~1001 tokens per pair), where torch's fused
 * kernel spends its time in the softmax. Reads the qkv projection as the linear layer wrote it, (B, N, 3C)
 * with C = H x 8, and writes (B, N, C) as the output projection reads it: no permute or copy around the
 * call. Per (pair, head) the keys (scaled) and values are transposed once into scratch (8 x N each); query
 * rows go in blocks of 16 through two passes over the keys in chunks of 256 (a chunk's keys and values stay
 * in L1 while the block's rows use them, two rows at a time): scores and running maxima, then exp, sums and
 * weighted values. The vectors are GCC/Clang vector extensions of 16 floats (one AVX-512 register, two AVX2
 * ones, ...), so the same source compiles for the machine it runs on (-march=native).
 *
 * r2f_attention_small_hd8: many short sequences (block 1: a class token and 5 pair tokens per local token),
 * 16 sequences at a time transposed into vector lanes; optionally only the first rows' output.
 *
 * The softmax weights are powers of two of base-2 scores (below), by a polynomial the compiler vectorizes;
 * build WITHOUT -ffast-math (the rounding trick in it needs IEEE order).
 * Threads: pthreads over independent units (no OpenMP runtime of its own); every unit is computed the same
 * way whatever the thread count, so results do not depend on it.
 * Both return 0, or an errno value (EINVAL for bad sizes, ENOMEM).
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"
#include "vectors.h"

#define D 8

/* Softmax weights are computed as powers of two: the scores come in base 2 (log2(e) is folded into the
 * scale of the keys or queries), and 2^x = 2^n 2^r with n = round(x), r = x - n in [-1/2, 1/2] (exact), 2^r by
 * a degree-5 polynomial fitted for relative error on that interval (1.6e-7 in float32 with fused
 * multiply-adds; expf's is ~1e-7). Softmax is invariant to the base, so the weights are those of e^x. */
#define LOG2E 1.44269504088896341f
#define EXP2_POLY(r)                                                                                           \
    (((((1.326472731307149e-3f * (r) + 9.671512991189957e-3f) * (r) + 5.550733581185341e-2f) * (r)             \
       + 2.4022242426872253e-1f) * (r) + 6.931470036506653e-1f) * (r) + 1.0f)
#define EXP2_LOW -126.0f        /* 2^-126: the smallest normal float; lower arguments give 2^-126 ~ 1.2e-38 */
#define ROUND_MAGIC 12582912.0f /* 1.5 * 2^23: adding it rounds a float to an integer (to even) */

static inline float exp2_nonpositive(float x)
{
    /* 2^x for x <= 0 (NaN stays NaN). */
    x = x < EXP2_LOW ? EXP2_LOW : x;
    float n = (x + ROUND_MAGIC) - ROUND_MAGIC;
    float p = EXP2_POLY(x - n);
    union { uint32_t i; float f; } scale;
    scale.i = (uint32_t)((int32_t)n + 127) << 23;     /* 2^n, n in [-126, 0] */
    return p * scale.f;
}

/* With 16 registers of 8 floats (AVX2) two rows' accumulators do not fit: pass 2 then takes one row at a time. */
#define TWO_ROWS (W == 16)
#define ROW_BLOCK 16          /* rows sharing one pass over a chunk of keys */
#define CHUNK 256             /* keys per chunk: 8 x 256 keys and values = 16 kB, in L1 */

static inline vf vexp2_nonpositive(vf x)
{
    /* exp2_nonpositive on W lanes: the same values (AVX-512: round and scale by 2^n in one instruction each) */
    x = vmax((vf){0} + EXP2_LOW, x);           /* (low, x): a NaN in x stays NaN (maxps returns its 2nd operand) */
#if defined(__AVX512F__)
    const vf n = (vf)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return (vf)_mm512_scalef_ps((__m512)EXP2_POLY(x - n), (__m512)n);
#else
    const vf n = (x + ROUND_MAGIC) - ROUND_MAGIC;
    const vf p = EXP2_POLY(x - n);
    const vi e = (vi)(((__builtin_convertvector(n, vi) + 127)) << 23);
    return p * (vf)e;
#endif
}

static inline float hmax(vf v)
{
    float m = v[0];
    for (int l = 1; l < W; ++l)
        m = v[l] > m ? v[l] : m;
    return m;
}

/* One head over all query rows. kt, vt: (8, np) transposed keys (scaled) and values, zero beyond n;
 * s: (ROW_BLOCK, np) scores; acc: (ROW_BLOCK, 10) vectors of running maxima / sums / weighted values. */
static void attend(const float *restrict qkv, float *restrict out, long n, int heads, int h, float scale,
                   float *restrict kt, float *restrict vt, float *restrict s, vf *restrict acc)
{
    const long c = (long)heads * D, stride = 3 * c, np = (n + W - 1) / W * W;
    const float scale2 = scale * LOG2E;   /* scores in base 2 */
    for (long j = 0; j < np; ++j) {
        const float *k = qkv + j * stride + c + h * D, *v = k + c;
        for (int d = 0; d < D; ++d) {
            kt[d * np + j] = j < n ? k[d] * scale2 : 0.0f;
            vt[d * np + j] = j < n ? v[d] : 0.0f;
        }
    }
    vi tail;                                   /* lanes of the last key vector that hold keys */
    for (int l = 0; l < W; ++l)
        tail[l] = (np - W + l) < n ? -1 : 0;
    const vf lowest = (vf){0} - 3.0e38f;
    for (long i0 = 0; i0 < n; i0 += ROW_BLOCK) {
        const int rows = n - i0 < ROW_BLOCK ? (int)(n - i0) : ROW_BLOCK;
        for (int r = 0; r < rows; ++r)
            acc[r * 10] = lowest;
        /* pass 1: scores and running maxima, chunk by chunk, two rows at a time */
        for (long j0 = 0; j0 < np; j0 += CHUNK) {
            const long j1 = j0 + CHUNK < np ? j0 + CHUNK : np;
            for (int r = 0; r < rows; r += 2) {
                const int rb = r + 1 < rows ? r + 1 : r;
                const float *qa = qkv + (i0 + r) * stride + h * D, *qb = qkv + (i0 + rb) * stride + h * D;
                const float a0 = qa[0], a1 = qa[1], a2 = qa[2], a3 = qa[3], a4 = qa[4], a5 = qa[5], a6 = qa[6],
                            a7 = qa[7];
                const float b0 = qb[0], b1 = qb[1], b2 = qb[2], b3 = qb[3], b4 = qb[4], b5 = qb[5], b6 = qb[6],
                            b7 = qb[7];
                float *sa = s + r * np, *sb = s + rb * np;
                vf ma = acc[r * 10], mb = acc[rb * 10];
                for (long j = j0; j < j1; j += W) {
                    const vf k0 = vload(kt + j), k1 = vload(kt + np + j), k2 = vload(kt + 2 * np + j),
                             k3 = vload(kt + 3 * np + j), k4 = vload(kt + 4 * np + j), k5 = vload(kt + 5 * np + j),
                             k6 = vload(kt + 6 * np + j), k7 = vload(kt + 7 * np + j);
                    vf x = a0 * k0; x += a1 * k1; x += a2 * k2; x += a3 * k3; x += a4 * k4; x += a5 * k5; x += a6 * k6; x += a7 * k7;
                    vf y = b0 * k0; y += b1 * k1; y += b2 * k2; y += b3 * k3; y += b4 * k4; y += b5 * k5; y += b6 * k6; y += b7 * k7;
                    if (j + W == np) {
                        x = vselect(tail, x, lowest);
                        y = vselect(tail, y, lowest);
                    }
                    vstore(sa + j, x);
                    vstore(sb + j, y);
                    ma = vmax(ma, x);
                    mb = vmax(mb, y);
                }
                acc[r * 10] = ma;
                acc[rb * 10] = mb;
            }
        }
        for (int r = 0; r < rows; ++r) {
            const float m = hmax(acc[r * 10]);
            acc[r * 10] = (vf){0} + m;
            for (int k = 1; k < 10; ++k)
                acc[r * 10 + k] = (vf){0};
        }
        /* pass 2: exp, sums and weighted values, chunk by chunk, two rows (or one) at a time */
        for (long j0 = 0; j0 < np; j0 += CHUNK) {
            const long j1 = j0 + CHUNK < np ? j0 + CHUNK : np;
#if TWO_ROWS
            for (int r = 0; r < rows; r += 2) {
                const int rb = r + 1 < rows ? r + 1 : r;
                const float *sa = s + r * np, *sb = s + rb * np;
                vf *A = acc + r * 10, *B = acc + rb * 10;
                const vf ma = A[0], mb = B[0];
                vf la = A[1], o0 = A[2], o1 = A[3], o2 = A[4], o3 = A[5], o4 = A[6], o5 = A[7], o6 = A[8], o7 = A[9];
                vf lb = B[1], p0 = B[2], p1 = B[3], p2 = B[4], p3 = B[5], p4 = B[6], p5 = B[7], p6 = B[8], p7 = B[9];
                for (long j = j0; j < j1; j += W) {
                    const vf ea = vexp2_nonpositive(vload(sa + j) - ma), eb = vexp2_nonpositive(vload(sb + j) - mb);
                    const vf v0 = vload(vt + j), v1 = vload(vt + np + j), v2 = vload(vt + 2 * np + j),
                             v3 = vload(vt + 3 * np + j), v4 = vload(vt + 4 * np + j), v5 = vload(vt + 5 * np + j),
                             v6 = vload(vt + 6 * np + j), v7 = vload(vt + 7 * np + j);
                    la += ea; lb += eb;
                    o0 += ea * v0; o1 += ea * v1; o2 += ea * v2; o3 += ea * v3;
                    o4 += ea * v4; o5 += ea * v5; o6 += ea * v6; o7 += ea * v7;
                    p0 += eb * v0; p1 += eb * v1; p2 += eb * v2; p3 += eb * v3;
                    p4 += eb * v4; p5 += eb * v5; p6 += eb * v6; p7 += eb * v7;
                }
                A[1] = la; A[2] = o0; A[3] = o1; A[4] = o2; A[5] = o3; A[6] = o4; A[7] = o5; A[8] = o6; A[9] = o7;
                if (rb != r) {
                    B[1] = lb; B[2] = p0; B[3] = p1; B[4] = p2; B[5] = p3; B[6] = p4; B[7] = p5; B[8] = p6; B[9] = p7;
                }
            }
#else       /* exp and sums first (stored over the scores), then the weighted values: fewer live registers */
            for (int r = 0; r < rows; ++r) {
                float *sa = s + r * np;
                vf *A = acc + r * 10;
                const vf ma = A[0];
                vf la = A[1];
                for (long j = j0; j < j1; j += W) {
                    const vf ea = vexp2_nonpositive(vload(sa + j) - ma);
                    la += ea;
                    vstore(sa + j, ea);
                }
                A[1] = la;
                vf o0 = A[2], o1 = A[3], o2 = A[4], o3 = A[5], o4 = A[6], o5 = A[7], o6 = A[8], o7 = A[9];
                for (long j = j0; j < j1; j += W) {
                    const vf ea = vload(sa + j);
                    o0 += ea * vload(vt + j);
                    o1 += ea * vload(vt + np + j);
                    o2 += ea * vload(vt + 2 * np + j);
                    o3 += ea * vload(vt + 3 * np + j);
                    o4 += ea * vload(vt + 4 * np + j);
                    o5 += ea * vload(vt + 5 * np + j);
                    o6 += ea * vload(vt + 6 * np + j);
                    o7 += ea * vload(vt + 7 * np + j);
                }
                A[2] = o0; A[3] = o1; A[4] = o2; A[5] = o3; A[6] = o4; A[7] = o5; A[8] = o6; A[9] = o7;
            }
#endif
        }
        for (int r = 0; r < rows; ++r) {
            const float inv = 1.0f / hsum(acc[r * 10 + 1]);
            float *o = out + (i0 + r) * c + h * D;
            for (int d = 0; d < D; ++d)
                o[d] = hsum(acc[r * 10 + 2 + d]) * inv;
        }
    }
}

struct job {
    struct range range;   /* (pair, head) units [first, last) */
    const float *qkv;
    float *out;
    long pairs, n;
    int heads;
    float scale;
};

static void *run(void *arg)
{
    struct job *job = arg;
    const long n = job->n, np = (n + W - 1) / W * W;
    void *memory = NULL;
    if (posix_memalign(&memory, 64, sizeof(float) * (size_t)np * (2 * D + ROW_BLOCK) + sizeof(vf) * ROW_BLOCK * 10)) {
        job->range.status = ENOMEM;
        return NULL;
    }
    float *scratch = memory;
    const long c = (long)job->heads * D;
    for (long u = job->range.first; u < job->range.last; ++u) {
        const long b = u / job->heads;
        const int h = (int)(u % job->heads);
        attend(job->qkv + b * n * 3 * c, job->out + b * n * c, n, job->heads, h, job->scale,
               scratch, scratch + D * np, scratch + 2 * D * np, (vf *)(scratch + (2 * D + ROW_BLOCK) * np));
    }
    free(memory);
    job->range.status = 0;
    return NULL;
}

int r2f_attention_hd8(const float *qkv, float *out, long pairs, long n, int heads, float scale, int threads)
{
    if (pairs < 0 || n < 1 || heads < 1 || threads < 1)
        return EINVAL;
    const long units = pairs * heads;
    threads = clamp_threads(threads, units);
    struct job jobs[MAX_THREADS];
    for (int t = 0; t < threads; ++t)
        jobs[t] = (struct job){{units * t / threads, units * (t + 1) / threads, 0}, qkv, out, pairs, n, heads, scale};
    return run_parallel(run, jobs, sizeof jobs[0], threads);
}

/* ---- many short sequences (the reranker's block 1: a class token and 5 pair tokens per local token) ----
 * Sixteen sequences at a time are transposed into lanes (token, channel, lane), so that every operation of
 * the attention runs on sixteen sequences at once; the output rows are transposed back. */
#define LANES 16
#define MAX_TOKENS 16

struct small_args {
    const float *q, *k, *v;
    long q_bs, q_ts, kv_bs, kv_ts;   /* batch and token strides, in floats */
    float *out;                       /* (B, rows, C) */
    long batch;
    int n, rows, heads;
    float scale;
};

static void attend_small(const struct small_args *a, long b0, int lanes, float *restrict buf)
{
    const int c = a->heads * D, n = a->n, rows = a->rows;
    float *restrict qb = buf;                                  /* [rows][c][LANES] */
    float *restrict kb = qb + (long)rows * c * LANES;          /* [n][c][LANES] */
    float *restrict vb = kb + (long)n * c * LANES;             /* [n][c][LANES] */
    float *restrict ob = vb + (long)n * c * LANES;             /* [rows][c][LANES] */
    for (int l = 0; l < LANES; ++l) {
        const long b = b0 + (l < lanes ? l : 0);               /* idle lanes repeat the first sequence */
        for (int t = 0; t < rows; ++t) {
            const float *q = a->q + b * a->q_bs + t * a->q_ts;
            for (int ch = 0; ch < c; ++ch)
                qb[(t * c + ch) * LANES + l] = q[ch] * (a->scale * LOG2E);
        }
        for (int t = 0; t < n; ++t) {
            const float *k = a->k + b * a->kv_bs + t * a->kv_ts, *v = a->v + b * a->kv_bs + t * a->kv_ts;
            for (int ch = 0; ch < c; ++ch) {
                kb[(t * c + ch) * LANES + l] = k[ch];
                vb[(t * c + ch) * LANES + l] = v[ch];
            }
        }
    }
    for (int h = 0; h < a->heads; ++h) {
        for (int i = 0; i < rows; ++i) {
            float s[MAX_TOKENS][LANES], m[LANES], sum[LANES];
            const float *qi = qb + (i * c + h * D) * LANES;
#pragma omp simd
            for (int l = 0; l < LANES; ++l)
                m[l] = -3.0e38f;
            for (int j = 0; j < n; ++j) {
                const float *kj = kb + (j * c + h * D) * LANES;
#pragma omp simd
                for (int l = 0; l < LANES; ++l) {
                    float acc = 0.0f;
                    for (int d = 0; d < D; ++d)
                        acc += qi[d * LANES + l] * kj[d * LANES + l];
                    s[j][l] = acc;
                    m[l] = acc > m[l] ? acc : m[l];
                }
            }
#pragma omp simd
            for (int l = 0; l < LANES; ++l)
                sum[l] = 0.0f;
            for (int j = 0; j < n; ++j) {
#pragma omp simd
                for (int l = 0; l < LANES; ++l) {
                    s[j][l] = exp2_nonpositive(s[j][l] - m[l]);
                    sum[l] += s[j][l];
                }
            }
            for (int d = 0; d < D; ++d) {
                float acc[LANES];
#pragma omp simd
                for (int l = 0; l < LANES; ++l)
                    acc[l] = 0.0f;
                for (int j = 0; j < n; ++j) {
                    const float *vj = vb + (j * c + h * D + d) * LANES;
#pragma omp simd
                    for (int l = 0; l < LANES; ++l)
                        acc[l] += s[j][l] * vj[l];
                }
                float *o = ob + (i * c + h * D + d) * LANES;
#pragma omp simd
                for (int l = 0; l < LANES; ++l)
                    o[l] = acc[l] / sum[l];
            }
        }
    }
    for (int l = 0; l < lanes; ++l) {
        float *o = a->out + (b0 + l) * rows * c;
        for (int t = 0; t < rows; ++t)
            for (int ch = 0; ch < c; ++ch)
                o[t * c + ch] = ob[(t * c + ch) * LANES + l];
    }
}

struct small_job {
    struct range range;   /* blocks of LANES sequences [first, last) */
    const struct small_args *args;
};

static void *run_small(void *arg)
{
    struct small_job *job = arg;
    const struct small_args *a = job->args;
    const long c = (long)a->heads * D;
    float *buf = malloc(sizeof(float) * (size_t)(2 * a->rows + 2 * a->n) * c * LANES);
    if (!buf) {
        job->range.status = ENOMEM;
        return NULL;
    }
    for (long blk = job->range.first; blk < job->range.last; ++blk) {
        const long b0 = blk * LANES;
        const int lanes = a->batch - b0 < LANES ? (int)(a->batch - b0) : LANES;
        attend_small(a, b0, lanes, buf);
    }
    free(buf);
    job->range.status = 0;
    return NULL;
}

int r2f_attention_small_hd8(const float *q, long q_bs, long q_ts, const float *k, const float *v, long kv_bs,
                            long kv_ts, float *out, long batch, int n, int rows, int heads, float scale, int threads)
{
    if (batch < 0 || n < 1 || n > MAX_TOKENS || rows < 1 || rows > n || heads < 1 || threads < 1)
        return EINVAL;
    const struct small_args args = {q, k, v, q_bs, q_ts, kv_bs, kv_ts, out, batch, n, rows, heads, scale};
    const long blocks = (batch + LANES - 1) / LANES;
    threads = clamp_threads(threads, blocks);
    struct small_job jobs[MAX_THREADS];
    for (int t = 0; t < threads; ++t)
        jobs[t] = (struct small_job){{blocks * t / threads, blocks * (t + 1) / threads, 0}, &args};
    return run_parallel(run_small, jobs, sizeof jobs[0], threads);
}
