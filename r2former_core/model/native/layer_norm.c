/* Layer normalization over a short last dimension (float32, CPU): the reranker's width-32 tokens, where
 * torch's kernel spends most of its time per row rather than per value.
 *
 * r2f_layer_norm: y = (x - mean) / sqrt(var + eps) * weight + bias per row of `dim` values (a multiple of the
 * vector width, at most MAX_DIM), x and y contiguous. Mean, then the variance as the mean squared deviation from it (two passes over the row, which
 * is in registers), as torch computes it; the same for every thread count. Returns 0, or EINVAL.
 */
#include <errno.h>
#include <math.h>

#include "parallel.h"
#include "vectors.h"

#define MAX_DIM 256
#define MIN_ROWS 32768

struct job {
    struct range range;   /* rows [first, last) */
    const float *x, *weight, *bias;
    float *y;
    int dim;
    float eps;
};

static void *run(void *arg)
{
    struct job *job = arg;
    const int dim = job->dim, vectors = dim / W;
    vf w[MAX_DIM / W], b[MAX_DIM / W], v[MAX_DIM / W];
    for (int k = 0; k < vectors; ++k) {
        w[k] = vload(job->weight + k * W);
        b[k] = vload(job->bias + k * W);
    }
    const float inv_dim = 1.0f / (float)dim;
    for (long r = job->range.first; r < job->range.last; ++r) {
        const float *x = job->x + r * dim;
        float *y = job->y + r * dim;
        vf sum = (vf){0};
        for (int k = 0; k < vectors; ++k) {
            v[k] = vload(x + k * W);
            sum += v[k];
        }
        const vf mean = (vf){0} + hsum(sum) * inv_dim;
        vf squares = (vf){0};
        for (int k = 0; k < vectors; ++k) {
            v[k] -= mean;
            squares += v[k] * v[k];
        }
        const vf scale = (vf){0} + 1.0f / sqrtf(hsum(squares) * inv_dim + job->eps);
        for (int k = 0; k < vectors; ++k)
            vstore(y + k * W, v[k] * scale * w[k] + b[k]);
    }
    job->range.status = 0;
    return NULL;
}

int r2f_layer_norm(const float *x, long rows, int dim, const float *weight, const float *bias,
                   float eps, float *y, int threads)
{
    if (rows < 0 || dim < W || dim > MAX_DIM || dim % W || threads < 1)
        return EINVAL;
    /* ~10 ns a row: a thread started per call pays off only for long calls (and costs much when the other cores
     * are busy), so each thread takes at least MIN_ROWS rows */
    threads = clamp_threads(threads, rows / MIN_ROWS);
    struct job jobs[MAX_THREADS];
    for (int t = 0; t < threads; ++t)
        jobs[t] = (struct job){{rows * t / threads, rows * (t + 1) / threads, 0}, x, weight, bias, y, dim,
                               eps};
    return run_parallel(run, jobs, sizeof jobs[0], threads);
}
