/* Threads for the reranker's kernels: pthreads over independent units (no OpenMP runtime of their own).
 * Every unit is computed the same way whatever the thread count, so results do not depend on it. */
#ifndef R2F_PARALLEL_H
#define R2F_PARALLEL_H

#include <pthread.h>
#include <stddef.h>

/* The first member of every job: its share of the work and how it ended (see run_parallel). */
struct range {
    long first, last;
    int status;
};

#define MAX_THREADS 64

/* Runs fn on jobs[0..threads) (each `size` bytes, starting with a struct range), jobs[0] in this thread;
 * a thread that cannot be started has its share done here. Returns the first nonzero status, else 0. */
static inline int run_parallel(void *(*fn)(void *), void *jobs, size_t size, int threads)
{
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < threads; ++t)
        started[t] = pthread_create(&ids[t], NULL, fn, (char *)jobs + t * size) == 0;
    fn(jobs);
    int status = ((struct range *)jobs)->status;
    for (int t = 1; t < threads; ++t) {
        void *job = (char *)jobs + t * size;
        if (started[t])
            pthread_join(ids[t], NULL);
        else
            fn(job);
        if (((struct range *)job)->status && !status)
            status = ((struct range *)job)->status;
    }
    return status;
}

static inline int clamp_threads(int threads, long units)
{
    if (threads > units)
        threads = units > 0 ? (int)units : 1;
    return threads > MAX_THREADS ? MAX_THREADS : threads;
}

#endif
