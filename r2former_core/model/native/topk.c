/* Mutual top-P selection of the reranker's token correlations (float32, CPU).
 *
 * r2f_mutual_topk: for each pair b of (B, N, M) correlations C, the P largest values of every row (each query
 * token's best reference tokens) and of every column (each reference token's best query tokens), in descending
 * order with their indices: what torch.topk(C, P, dim=2) and torch.topk(C, P, dim=1) give, in one pass over C
 * instead of two partial sorts. NaN ranks above every number (as in torch.topk); equal values keep the lower
 * index first (torch leaves their order unspecified). Outputs: row_val, row_idx (B, N, P) and col_val, col_idx
 * (B, M, P): the column results transposed, one list of P per reference token. Indices are int64.
 *
 * Each row is read once, W values at a time: one comparison with the row's current P-th value (broadcast) and
 * one with the W columns' current P-th values; only the rare values that pass go through the scalar insertion.
 * Returns 0, or EINVAL for bad sizes, ENOMEM.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

#include "parallel.h"
#include "vectors.h"

#define MAX_P 64

/* x ranks before y: larger, or NaN before a number */
static inline int ranks_before(float x, float y) { return x > y || (x != x && y == y); }

/* Insert x (index i) into the sorted list val/idx of `len` entries (the last one is dropped when the list is
 * full, len == capacity): after every entry that ranks before it or equals it. */
static inline void insert(float *val, int64_t *idx, int len, float x, int64_t i)
{
    int k = len - 1;
    while (k > 0 && ranks_before(x, val[k - 1])) {
        val[k] = val[k - 1];
        idx[k] = idx[k - 1];
        --k;
    }
    val[k] = x;
    idx[k] = i;
}

/* Bit l set where lane l of x may rank before lane l of t: not (x <= t), which is also true where either is
 * NaN (the scalar test then decides). */
static inline uint32_t may_rank_before(vf x, vf t)
{
#if defined(__AVX512F__)
    return _mm512_cmp_ps_mask((__m512)x, (__m512)t, _CMP_NLE_UQ);
#elif defined(__AVX__)
    return (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps((__m256)x, (__m256)t, _CMP_NLE_UQ));
#else
    const vi pass = ~(x <= t);
    uint32_t bits = 0;
    for (int l = 0; l < W; ++l)
        bits |= (uint32_t)(pass[l] & 1) << l;
    return bits;
#endif
}

struct job {
    struct range range;   /* pairs [first, last) */
    const float *corr;
    float *row_val, *col_val;
    int64_t *row_idx, *col_idx;
    long n, m;
    int p;
};

static void select_pair(const float *restrict c, long n, long m, int p, float *restrict rv, int64_t *restrict ri,
                        float *restrict cv, int64_t *restrict ci, float *restrict cthr)
{
    for (long i = 0; i < n; ++i) {
        const float *row = c + i * m;
        float *v = rv + i * p;
        int64_t *ix = ri + i * p;
        long j = 0;
        for (; j < p; ++j)                                    /* the row's list starts with its first P values */
            insert(v, ix, (int)j + 1, row[j], j);
        if (i < p) {                                          /* the columns' lists start with the first P rows */
            for (long jj = 0; jj < m; ++jj) {
                insert(cv + jj * p, ci + jj * p, (int)i + 1, row[jj], i);
                if (i == p - 1)
                    cthr[jj] = cv[jj * p + p - 1];
            }
            for (; j < m; ++j)
                if (ranks_before(row[j], v[p - 1]))
                    insert(v, ix, p, row[j], j);
            continue;
        }
        float thr = v[p - 1];
        for (j = 0; j + W <= m; j += W) {
            const vf x = vload(row + j);
            uint32_t row_bits = may_rank_before(x, (vf){0} + thr), col_bits = may_rank_before(x, vload(cthr + j));
            while (row_bits | col_bits) {
                const int l = __builtin_ctz(row_bits | col_bits);
                const long jj = j + l;
                const float value = x[l];
                if (jj >= p && ranks_before(value, thr)) {
                    insert(v, ix, p, value, jj);
                    thr = v[p - 1];
                    row_bits &= may_rank_before(x, (vf){0} + thr);   /* the row's bar rose: fewer lanes pass */
                }
                if (ranks_before(value, cthr[jj])) {
                    insert(cv + jj * p, ci + jj * p, p, value, i);
                    cthr[jj] = cv[jj * p + p - 1];
                }
                row_bits &= ~(1u << l);
                col_bits &= ~(1u << l);
            }
        }
        for (; j < m; ++j) {
            const float value = row[j];
            if (j >= p && ranks_before(value, thr)) {
                insert(v, ix, p, value, j);
                thr = v[p - 1];
            }
            if (ranks_before(value, cthr[j])) {
                insert(cv + j * p, ci + j * p, p, value, i);
                cthr[j] = cv[j * p + p - 1];
            }
        }
    }
}

static void *run(void *arg)
{
    struct job *job = arg;
    const long n = job->n, m = job->m;
    const int p = job->p;
    float *thr = malloc(sizeof(float) * (size_t)m);
    if (!thr) {
        job->range.status = ENOMEM;
        return NULL;
    }
    for (long b = job->range.first; b < job->range.last; ++b)
        select_pair(job->corr + b * n * m, n, m, p, job->row_val + b * n * p, job->row_idx + b * n * p,
                    job->col_val + b * m * p, job->col_idx + b * m * p, thr);
    free(thr);
    job->range.status = 0;
    return NULL;
}

int r2f_mutual_topk(const float *corr, long pairs, long n, long m, int p, float *row_val, int64_t *row_idx,
                    float *col_val, int64_t *col_idx, int threads)
{
    if (pairs < 0 || p < 1 || p > MAX_P || n < p || m < p || threads < 1)
        return EINVAL;
    threads = clamp_threads(threads, pairs);
    struct job jobs[MAX_THREADS];
    for (int t = 0; t < threads; ++t)
        jobs[t] = (struct job){{pairs * t / threads, pairs * (t + 1) / threads, 0}, corr, row_val, col_val, row_idx,
                               col_idx, n, m, p};
    return run_parallel(run, jobs, sizeof jobs[0], threads);
}
