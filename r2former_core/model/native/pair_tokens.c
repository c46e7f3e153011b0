/* The reranker's block-1 input, assembled in one pass (float32, CPU).
 *
 * r2f_pair_tokens: the pair head is linear, so a pair (query token i, reference token j) with correlation c
 * embeds as a_q[i] + b_r[j] + c w_c + bias (a_q: the query token's term, b_r: the reference token's, both
 * (tokens, D)). For each pair of images b, every query token i (its P best reference tokens idx_q[b, i, :], with
 * their correlations val_q) and then every reference token j (its P best query tokens idx_r[b, j, :], val_r)
 * becomes one sequence of 1 + P rows: the class token, then its P pair embeddings. Output (B, N + M, 1 + P, D),
 * contiguous: what torch.cat([cls, cat([q_side, r_side], 1) + bias]) gives, without the intermediate tensors.
 * a_q's batch stride may be 0 (one query shared by all pairs). Returns 0, or EINVAL (bad sizes or an index out
 * of range: nothing is read out of bounds).
 */
#include <errno.h>
#include <stdint.h>

#include "parallel.h"
#include "vectors.h"

#define MAX_D 256

struct args {
    const float *a_q, *b_r, *val_q, *val_r, *w_c, *bias, *cls;
    const int64_t *idx_q, *idx_r;
    float *out;
    long n, m, a_stride;
    int p, d;
};

struct job {
    struct range range;   /* pairs [first, last) */
    const struct args *args;
};

/* One sequence: the class token, then P rows own + partner[k] + value[k] * w_c + bias. */
static inline int sequence(float *restrict out, const float *restrict own, const float *restrict partners,
                           long partner_count, const int64_t *restrict idx, const float *restrict val, int p,
                           int d, const vf *restrict w, const vf *restrict bias, const vf *restrict cls)
{
    const int vectors = d / W;
    for (int k = 0; k < vectors; ++k)
        vstore(out + k * W, cls[k]);
    for (int r = 0; r < p; ++r) {
        const int64_t j = idx[r];
        if (j < 0 || j >= partner_count)
            return EINVAL;
        const float *partner = partners + j * d;
        const vf c = (vf){0} + val[r];
        float *row = out + (long)(r + 1) * d;
        for (int k = 0; k < vectors; ++k)
            vstore(row + k * W, vload(own + k * W) + vload(partner + k * W) + c * w[k] + bias[k]);
    }
    return 0;
}

static void *run(void *arg)
{
    struct job *job = arg;
    const struct args *a = job->args;
    const int p = a->p, d = a->d, vectors = d / W;
    const long seq = (long)(1 + p) * d;
    vf w[MAX_D / W], bias[MAX_D / W], cls[MAX_D / W];
    for (int k = 0; k < vectors; ++k) {
        w[k] = vload(a->w_c + k * W);
        bias[k] = vload(a->bias + k * W);
        cls[k] = vload(a->cls + k * W);
    }
    int status = 0;
    for (long b = job->range.first; b < job->range.last && !status; ++b) {
        const float *a_q = a->a_q + b * a->a_stride, *b_r = a->b_r + b * a->m * d;
        float *out = a->out + b * (a->n + a->m) * seq;
        for (long i = 0; i < a->n && !status; ++i)
            status = sequence(out + i * seq, a_q + i * d, b_r, a->m, a->idx_q + (b * a->n + i) * p,
                              a->val_q + (b * a->n + i) * p, p, d, w, bias, cls);
        for (long j = 0; j < a->m && !status; ++j)
            status = sequence(out + (a->n + j) * seq, b_r + j * d, a_q, a->n, a->idx_r + (b * a->m + j) * p,
                              a->val_r + (b * a->m + j) * p, p, d, w, bias, cls);
    }
    job->range.status = status;
    return NULL;
}

int r2f_pair_tokens(const float *a_q, long a_stride, const float *b_r, const float *val_q, const int64_t *idx_q,
                    const float *val_r, const int64_t *idx_r, const float *w_c, const float *bias, const float *cls,
                    float *out, long pairs, long n, long m, int p, int d, int threads)
{
    if (pairs < 0 || n < 1 || m < 1 || p < 1 || d < W || d > MAX_D || d % W || a_stride < 0 || threads < 1)
        return EINVAL;
    const struct args args = {a_q, b_r, val_q, val_r, w_c, bias, cls, idx_q, idx_r, out, n, m, a_stride, p, d};
    threads = clamp_threads(threads, pairs);
    struct job jobs[MAX_THREADS];
    for (int t = 0; t < threads; ++t)
        jobs[t] = (struct job){{pairs * t / threads, pairs * (t + 1) / threads, 0}, &args};
    return run_parallel(run, jobs, sizeof jobs[0], threads);
}
