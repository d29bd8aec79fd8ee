/* MLX's real-valued CBLAS products (cblas_sgemm, cblas_dgemm) over numpy's bundled OpenBLAS, whose
   symbols are renamed (scipy_..._64_, 64-bit integers). Built and loaded by policy_core/backends/cpu_blas.py.

   Most layers of a batch-1 request are a weight matrix times at most 8 vectors (batch x time steps).
   Streaming each row once against all the vectors reads such a matrix faster than OpenBLAS's blocked
   GEMM (benchmarks/NOTES.md): this file does those products itself. Every other product is cut into
   blocks of rows (or columns) of the result, each one single-threaded OpenBLAS product.

   One thread pool runs both, and OpenBLAS is kept single-threaded (its thread count set to 1 at load;
   the pool takes the count it had, OPENBLAS_NUM_THREADS or the cores). That makes every product's result
   independent of the thread count and of other processes: a block is computed the same way whichever
   thread takes it, and how a product is cut depends on its shape only. OpenBLAS's own threads would cut
   by thread count, and their jobs wait on each other, so one helper that other processes keep off the
   cores stalls them all. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

typedef int64_t i64;
void scipy_cblas_sgemm64_(int, int, int, i64, i64, i64, float, const float *, i64, const float *, i64,
                          float, float *, i64);
void scipy_cblas_dgemm64_(int, int, int, i64, i64, i64, double, const double *, i64, const double *, i64,
                          double, double *, i64);
/* Weak: absent from other OpenBLAS builds, then null (and the pool is not installed). */
int scipy_openblas_get_num_threads64_(void) __attribute__((weak));
void scipy_openblas_set_num_threads64_(int) __attribute__((weak));

/* ---- The pool: the calling thread and helpers 1..threads-1 claim a call's jobs in turn, so where a
   helper is not running (other processes hold the cores) the caller does its share instead of waiting
   for it. Helpers spin for a while after a call, since a layer's next product follows within
   microseconds, then sleep; waits spin briefly, then yield the core.

   A robot computer runs other software. Where helpers keep starting late (over late_ns after a call was
   published, in LATE_LIMIT of the last LATE_WINDOW calls), no core is free for them: every product runs
   on the calling thread for a pause, then the pool looks again; the pause doubles while the cores stay
   busy. Results are the same either way. */

/* 5 ms: with 0.2 ms the wake-ups between a batch-4 request's products cost it 10%. */
enum { SPIN_NS = 5000000, WAIT_SPIN_NS = 20000, MAX_HELPERS = 255 };
enum { LATE_WINDOW = 8, LATE_LIMIT = 3, CALM_CALLS = 256 };
static const long PAUSE_MIN_NS = 50000000L, PAUSE_MAX_NS = 2000000000L;
typedef void (*pool_job)(int job, void *arg);

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER; /* one call at a time */
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static int pool_installed; /* 0: every product goes to OpenBLAS as it is */
static int pool_threads;   /* the pool's size: OpenBLAS's thread count at load */
static int helpers;        /* started; guarded by pool_lock */
static unsigned long started_at[MAX_HELPERS + 1]; /* helper i's last call before it started */
static unsigned long joined[MAX_HELPERS + 1];     /* the last call helper i took part in */
static pool_job call_fn;                          /* the call's fields, written while generation is odd */
static void *call_arg;
static int call_jobs, call_threads;
static long call_published;       /* now_ns() when the call was published */
static unsigned long generation;  /* even: fields stable; odd: being written */
static unsigned long long claims; /* (generation << 32) | the next job */
static int unfinished;            /* jobs of the current call not yet done */
static unsigned long late_call;   /* the last call a helper started over late_ns after its publication */
static int sleeping;
static long pool_calls, kernel_calls;
static long late_ns = 500000; /* a helper starting later than this after publication is late; < 0: never */
/* Busy cores, guarded by pool_lock: recent calls' lateness, the next pause, calls since the last one. */
static unsigned late_history;
static long pause_ns = 50000000L, calm_calls;
static long paused_until; /* products run on the calling thread alone until then */

static long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* Waits until *counter is 0: a spin (the helpers are usually at work), then yielding the core to them. */
static void wait_for_zero(int *counter) {
  const long start = now_ns();
  for (int spin = 1; __atomic_load_n(counter, __ATOMIC_ACQUIRE) > 0; ++spin) {
    if ((spin & 63) == 0 && now_ns() - start > WAIT_SPIN_NS) sched_yield();
    else CPU_RELAX();
  }
}

/* Runs the jobs of call g that are still unclaimed. */
static void run_jobs(unsigned long g, int jobs, pool_job fn, void *arg) {
  unsigned long long w = __atomic_load_n(&claims, __ATOMIC_ACQUIRE);
  for (;;) {
    if ((unsigned)(w >> 32) != (unsigned)g || (int)(unsigned)w >= jobs) return; /* all taken, or over */
    if (!__atomic_compare_exchange_n(&claims, &w, w + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) continue;
    fn((int)(unsigned)w, arg);
    __atomic_sub_fetch(&unfinished, 1, __ATOMIC_RELEASE);
    w = __atomic_load_n(&claims, __ATOMIC_ACQUIRE);
  }
}

static void *helper_main(void *index_ptr) {
  const int index = (int)(intptr_t)index_ptr;
  unsigned long seen = started_at[index];
  for (;;) {
    unsigned long g = __atomic_load_n(&generation, __ATOMIC_ACQUIRE);
    if (g == seen || (g & 1)) {
      long start = now_ns();
      for (int spin = 1;; ++spin) {
        g = __atomic_load_n(&generation, __ATOMIC_ACQUIRE);
        if (g != seen && !(g & 1)) break;
        CPU_RELAX();
        if ((spin & 63) == 0 && now_ns() - start > SPIN_NS) {
          pthread_mutex_lock(&sleep_lock);
          __atomic_add_fetch(&sleeping, 1, __ATOMIC_SEQ_CST);
          while ((g = __atomic_load_n(&generation, __ATOMIC_SEQ_CST)) == seen || (g & 1))
            pthread_cond_wait(&wake, &sleep_lock);
          __atomic_sub_fetch(&sleeping, 1, __ATOMIC_SEQ_CST);
          pthread_mutex_unlock(&sleep_lock);
          break;
        }
      }
    }
    /* A helper can read the fields while the next call writes them: read, then check that the
       generation did not move. Jobs are claimed under call g's generation, so a helper that comes late
       to a finished call finds none left. */
    const pool_job fn = __atomic_load_n(&call_fn, __ATOMIC_RELAXED);
    void *const arg = __atomic_load_n(&call_arg, __ATOMIC_RELAXED);
    const int jobs = __atomic_load_n(&call_jobs, __ATOMIC_RELAXED);
    const int threads = __atomic_load_n(&call_threads, __ATOMIC_RELAXED);
    const long published = __atomic_load_n(&call_published, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (__atomic_load_n(&generation, __ATOMIC_RELAXED) != g) continue;
    seen = g;
    if (index >= threads) continue;
    __atomic_store_n(&joined[index], g, __ATOMIC_RELAXED);
    const long threshold = __atomic_load_n(&late_ns, __ATOMIC_RELAXED);
    if (threshold >= 0 && now_ns() - published > threshold) __atomic_store_n(&late_call, g, __ATOMIC_RELAXED);
    run_jobs(g, jobs, fn, arg);
  }
  return NULL;
}

/* After each call, under pool_lock: a pause where helpers were late too often. */
static void note_lateness(int was_late) {
  late_history = ((late_history << 1) | (unsigned)was_late) & ((1u << LATE_WINDOW) - 1);
  if (__builtin_popcount(late_history) >= LATE_LIMIT) {
    late_history = 0;
    calm_calls = 0;
    __atomic_store_n(&paused_until, now_ns() + pause_ns, __ATOMIC_RELEASE);
    pause_ns = pause_ns * 2 < PAUSE_MAX_NS ? pause_ns * 2 : PAUSE_MAX_NS;
  } else if (++calm_calls >= CALM_CALLS) {
    pause_ns = PAUSE_MIN_NS;
  }
}

/* The threads a product may use now: the pool's, or 1 during a pause. */
static int threads_now(void) {
  const long until = __atomic_load_n(&paused_until, __ATOMIC_ACQUIRE);
  return until && now_ns() < until ? 1 : __atomic_load_n(&pool_threads, __ATOMIC_RELAXED);
}

/* Runs fn(0..jobs-1, arg) on the caller and up to threads-1 helpers, each job claimed by whoever comes. */
static void pool_run(int threads, int jobs, pool_job fn, void *arg) {
  if (threads <= 1 || jobs <= 1) {
    for (int job = 0; job < jobs; ++job) fn(job, arg);
    return;
  }
  pthread_mutex_lock(&pool_lock);
  while (helpers < threads - 1 && helpers < MAX_HELPERS) {
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    started_at[helpers + 1] = generation;
    const int failed = pthread_create(&thread, &attr, helper_main, (void *)(intptr_t)(helpers + 1));
    pthread_attr_destroy(&attr);
    if (failed) break; /* the caller claims what nobody else does */
    ++helpers;
  }
  const int together = threads <= helpers + 1 ? threads : helpers + 1; /* the caller is participant 0 */
  const unsigned long g = __atomic_add_fetch(&generation, 1, __ATOMIC_RELAXED) + 1; /* odd: writing */
  __atomic_thread_fence(__ATOMIC_RELEASE);                                        /* ... seen odd first */
  __atomic_store_n(&call_fn, fn, __ATOMIC_RELAXED);
  __atomic_store_n(&call_arg, arg, __ATOMIC_RELAXED);
  __atomic_store_n(&call_jobs, jobs, __ATOMIC_RELAXED);
  __atomic_store_n(&call_threads, together, __ATOMIC_RELAXED);
  __atomic_store_n(&claims, (unsigned long long)(unsigned)g << 32, __ATOMIC_RELAXED);
  __atomic_store_n(&unfinished, jobs, __ATOMIC_RELAXED);
  __atomic_store_n(&call_published, now_ns(), __ATOMIC_RELAXED);
  __atomic_add_fetch(&generation, 1, __ATOMIC_SEQ_CST); /* even (g): published */
  if (__atomic_load_n(&sleeping, __ATOMIC_SEQ_CST) > 0) {
    pthread_mutex_lock(&sleep_lock);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&sleep_lock);
  }
  run_jobs(g, jobs, fn, arg);
  /* Late: a helper started late, or one had not started when the caller ran out of jobs to claim. */
  const long threshold = __atomic_load_n(&late_ns, __ATOMIC_RELAXED);
  int was_late = __atomic_load_n(&late_call, __ATOMIC_RELAXED) == g;
  if (threshold >= 0 && now_ns() - __atomic_load_n(&call_published, __ATOMIC_RELAXED) > threshold)
    for (int i = 1; i < together && !was_late; ++i) was_late = __atomic_load_n(&joined[i], __ATOMIC_RELAXED) != g;
  wait_for_zero(&unfinished);
  note_lateness(was_late);
  __atomic_add_fetch(&pool_calls, 1, __ATOMIC_RELAXED);
  pthread_mutex_unlock(&pool_lock);
}

/* A fork waits for the pool's call in flight; the child has none of the helpers and starts a fresh pool. */
static void pool_before_fork(void) {
  pthread_mutex_lock(&pool_lock);
  pthread_mutex_lock(&sleep_lock);
}

static void pool_after_fork_in_parent(void) {
  pthread_mutex_unlock(&sleep_lock);
  pthread_mutex_unlock(&pool_lock);
}

static void pool_after_fork_in_child(void) {
  pthread_mutex_unlock(&sleep_lock);
  pthread_mutex_unlock(&pool_lock);
  pthread_cond_init(&wake, NULL); /* its waiters were the parent's helpers */
  helpers = 0;
  sleeping = 0;
  unfinished = 0;
  generation &= ~1UL;
}

__attribute__((constructor)) static void pool_install(void) {
  if (!scipy_openblas_get_num_threads64_ || !scipy_openblas_set_num_threads64_) return;
  pool_threads = scipy_openblas_get_num_threads64_();
  scipy_openblas_set_num_threads64_(1);
  pthread_atfork(pool_before_fork, pool_after_fork_in_parent, pool_after_fork_in_child);
  pool_installed = 1;
}

/* ---- The kernel: C[i*si + j*sj] = alpha * sum_k big[i*ldbig + k] * pack_j[k] (+ beta C) for the rows i
   of a large matrix and at most 8 vectors packed below (zero vectors up to 4 or 8), R rows at a time.
   The packed vectors are PACK_SKEW floats further apart than their length: vectors 4 KB apart alias
   in L1 (1024 x 5120 by 16 took 7.4 ms instead of 1.8). */

/* Products under KERNEL_MIN_ELEMENTS weights stay with OpenBLAS; under PARALLEL_MIN_ELEMENTS (1 MB)
   the kernel runs on the calling thread alone. Each thread's share is claimed in CHUNKS jobs; a row's
   result does not depend on which job computes it. */
enum { KERNEL_MAX_VECTORS = 8, KERNEL_MIN_ELEMENTS = 1 << 16, PARALLEL_MIN_ELEMENTS = 1 << 18 };
enum { PACK_SKEW = 16, CHUNKS = 4 };
typedef float v8 __attribute__((vector_size(32)));
#define LOAD8(p) ({ v8 v_; memcpy(&v_, (p), sizeof v_); v_; })
#define HSUM8(v) ((((v)[0] + (v)[4]) + ((v)[1] + (v)[5])) + (((v)[2] + (v)[6]) + (((v)[3] + (v)[7]))))

struct kernel_call {
  const float *big, *pack;
  i64 ldbig, rows, k, stride, vectors, si, sj, rows_per_job;
  float alpha, beta;
  float *c;
};

#define KERNEL_BLOCK(R, NSP)                                                                    \
  static void rows_##R##_##NSP(const struct kernel_call *p, i64 first, i64 last) {              \
    const i64 kv = p->k & ~(i64)7;                                                              \
    for (i64 i0 = first; i0 < last; i0 += R) {                                                  \
      v8 acc[R][NSP];                                                                           \
      memset(acc, 0, sizeof acc);                                                               \
      const float *a[R];                                                                        \
      for (int r = 0; r < R; ++r) a[r] = p->big + (i0 + r < last ? i0 + r : last - 1) * p->ldbig; \
      for (i64 kk = 0; kk < kv; kk += 8) {                                                      \
        v8 x[R];                                                                                \
        for (int r = 0; r < R; ++r) x[r] = LOAD8(a[r] + kk);                                    \
        for (int j = 0; j < NSP; ++j) {                                                         \
          const v8 s = LOAD8(p->pack + j * p->stride + kk);                                     \
          for (int r = 0; r < R; ++r) acc[r][j] += x[r] * s;                                    \
        }                                                                                       \
      }                                                                                         \
      for (int r = 0; r < R && i0 + r < last; ++r)                                              \
        for (int j = 0; j < p->vectors; ++j) {                                                  \
          float sum = HSUM8(acc[r][j]);                                                         \
          for (i64 kk = kv; kk < p->k; ++kk) sum += a[r][kk] * p->pack[j * p->stride + kk];     \
          float *out = p->c + (i0 + r) * p->si + j * p->sj;                                     \
          *out = p->beta == 0.f ? p->alpha * sum : p->alpha * sum + p->beta * *out;             \
        }                                                                                       \
    }                                                                                           \
  }
KERNEL_BLOCK(4, 4)
KERNEL_BLOCK(2, 8)

static void kernel_job(int job, void *arg) {
  const struct kernel_call *p = arg;
  const i64 first = job * p->rows_per_job;
  const i64 last = first + p->rows_per_job < p->rows ? first + p->rows_per_job : p->rows;
  if (first >= last) return;
  if (p->vectors <= 4) rows_4_4(p, first, last);
  else rows_2_8(p, first, last);
}

/* A thread's packed vectors, kept between calls and freed when the thread ends. */
static __thread float *pack_buffer;
static __thread size_t pack_capacity;
static pthread_key_t pack_key;
static pthread_once_t pack_key_once = PTHREAD_ONCE_INIT;
static void free_pack(void *buffer) {
  free(buffer);
  pack_buffer = NULL; /* a later destructor of the thread's may still multiply */
  pack_capacity = 0;
}
static void make_pack_key(void) { pthread_key_create(&pack_key, free_pack); }

/* Vector j's element kk is small[j * js + kk * ks]. Returns 0 (nothing done) where it can't take the call. */
static int kernel(const float *big, i64 ldbig, i64 rows, i64 k, const float *small, i64 js, i64 ks,
                  i64 vectors, float alpha, float beta, float *c, i64 si, i64 sj) {
  const i64 padded = vectors <= 4 ? 4 : 8;
  const i64 stride = ((k + 7) & ~(i64)7) + PACK_SKEW;
  const size_t need = (size_t)(padded * stride);
  if (need > pack_capacity) {
    float *grown = realloc(pack_buffer, need * sizeof(float));
    if (!grown) return 0;
    pack_buffer = grown;
    pack_capacity = need;
    pthread_once(&pack_key_once, make_pack_key);
    pthread_setspecific(pack_key, grown);
  }
  for (i64 j = 0; j < vectors; ++j)
    for (i64 kk = 0; kk < k; ++kk) pack_buffer[j * stride + kk] = small[j * js + kk * ks];
  /* The padding vectors are multiplied too (their sums never written): zeros, not stale values. */
  memset(pack_buffer + vectors * stride, 0, (size_t)((padded - vectors) * stride) * sizeof(float));
  const int threads = rows * k >= PARALLEL_MIN_ELEMENTS ? threads_now() : 1;
  const i64 block = padded == 4 ? 4 : 2; /* rows a block takes together */
  const i64 per_job = ((rows + threads * CHUNKS - 1) / (threads * CHUNKS) + block - 1) / block * block;
  const int jobs = (int)((rows + per_job - 1) / per_job);
  struct kernel_call call = {.big = big, .pack = pack_buffer, .ldbig = ldbig, .rows = rows, .k = k,
                             .stride = stride, .vectors = vectors, .si = si, .sj = sj,
                             .rows_per_job = per_job, .alpha = alpha, .beta = beta, .c = c};
  __atomic_add_fetch(&kernel_calls, 1, __ATOMIC_RELAXED);
  pool_run(threads, jobs, kernel_job, &call);
  return 1;
}

/* ---- Every other product: blocks of SPLIT_ROWS or more rows (or columns) of the result, as many as its
   multiply-adds allow at SPLIT_MACS or more each, up to SPLIT_MAX blocks. The cut depends on the shape
   alone; each block is a single-threaded OpenBLAS product. */
enum { SPLIT_ROWS = 64, SPLIT_MAX = 32 };
static const double SPLIT_MACS = 1048576.0; /* ~15 us of one core: below it a block isn't worth a job */

struct split_call {
  int order, ta, tb;
  i64 m, n, k, lda, ldb, ldc, per_job;
  int by_rows;
  float alpha, beta;
  const float *a, *b;
  float *c;
};

static void split_job(int job, void *arg) {
  const struct split_call *p = arg;
  const i64 first = job * p->per_job;
  const i64 size = p->by_rows ? p->m : p->n;
  const i64 count = first + p->per_job < size ? p->per_job : size - first;
  if (count <= 0) return;
  if (p->by_rows) { /* rows of op(A) and of C */
    const float *a = p->a + (p->ta == 111 ? first * p->lda : first);
    scipy_cblas_sgemm64_(p->order, p->ta, p->tb, count, p->n, p->k, p->alpha, a, p->lda, p->b, p->ldb, p->beta,
                         p->c + first * p->ldc, p->ldc);
  } else { /* columns of op(B) and of C */
    const float *b = p->b + (p->tb == 111 ? first : first * p->ldb);
    scipy_cblas_sgemm64_(p->order, p->ta, p->tb, p->m, count, p->k, p->alpha, p->a, p->lda, b, p->ldb, p->beta,
                         p->c + first, p->ldc);
  }
}

static void split(int order, int ta, int tb, i64 m, i64 n, i64 k, float alpha, const float *a, i64 lda,
                  const float *b, i64 ldb, float beta, float *c, i64 ldc) {
  const int by_rows = m >= n;
  const i64 size = by_rows ? m : n;
  i64 blocks = (i64)((double)m * (double)n * (double)k / SPLIT_MACS);
  if (blocks > size / SPLIT_ROWS) blocks = size / SPLIT_ROWS;
  if (blocks > SPLIT_MAX) blocks = SPLIT_MAX;
  if (blocks < 1) blocks = 1;
  const i64 per_job = (size + blocks - 1) / blocks;
  struct split_call call = {order, ta, tb, m, n, k, lda, ldb, ldc, per_job, by_rows, alpha, beta, a, b, c};
  pool_run(blocks > 1 ? threads_now() : 1, (int)((size + per_job - 1) / per_job), split_job, &call);
}

int dpmlx_pool_threads(void) { return pool_installed ? __atomic_load_n(&pool_threads, __ATOMIC_RELAXED) : 0; }
void dpmlx_pool_set_threads(int threads) {
  if (threads >= 1) __atomic_store_n(&pool_threads, threads, __ATOMIC_RELAXED);
}
long dpmlx_pool_calls(void) { return __atomic_load_n(&pool_calls, __ATOMIC_RELAXED); }
long dpmlx_kernel_calls(void) { return __atomic_load_n(&kernel_calls, __ATOMIC_RELAXED); }
int dpmlx_kernel_max_vectors(void) { return KERNEL_MAX_VECTORS; }
int dpmlx_pool_paused(void) { return threads_now() == 1 && __atomic_load_n(&paused_until, __ATOMIC_RELAXED); }

/* Ends a pause now and forgets recent lateness. */
void dpmlx_pool_resume(void) {
  pthread_mutex_lock(&pool_lock);
  late_history = 0;
  calm_calls = 0;
  pause_ns = PAUSE_MIN_NS;
  __atomic_store_n(&paused_until, 0, __ATOMIC_RELEASE);
  pthread_mutex_unlock(&pool_lock);
}

/* Sets the lateness threshold in ns (default 0.5 ms; < 0: never late, so never paused); returns the old. */
long dpmlx_pool_set_late_ns(long ns) { return __atomic_exchange_n(&late_ns, ns, __ATOMIC_RELAXED); }

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

/* Row-major leading dimensions BLAS accepts; OpenBLAS reports the others. */
static int valid(int ta, int tb, int m, int n, int k, int lda, int ldb, int ldc) {
  return lda >= (ta == NO_TRANS ? k : m) && ldb >= (tb == NO_TRANS ? n : k) && ldc >= n;
}

void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
  /* alpha == 0: BLAS gives beta C without reading A and B (the kernel would make 0 * inf a NaN). */
  if (pool_installed && order == ROW_MAJOR && m > 0 && n > 0 && k > 0 && alpha != 0.f &&
      valid(ta, tb, m, n, k, lda, ldb, ldc)) {
    /* A (m x k) times at most 8 columns of B. */
    if (ta == NO_TRANS && n <= KERNEL_MAX_VECTORS && (i64)m * k >= KERNEL_MIN_ELEMENTS &&
        (tb == NO_TRANS ? kernel(a, lda, m, k, b, 1, ldb, n, alpha, beta, c, ldc, 1)
                        : kernel(a, lda, m, k, b, ldb, 1, n, alpha, beta, c, ldc, 1)))
      return;
    /* At most 8 rows of A times B^T, B (n x k): the same with the roles swapped, C written transposed. */
    if (tb == TRANS && m <= KERNEL_MAX_VECTORS && (i64)n * k >= KERNEL_MIN_ELEMENTS &&
        (ta == NO_TRANS ? kernel(b, ldb, n, k, a, lda, 1, m, alpha, beta, c, 1, ldc)
                        : kernel(b, ldb, n, k, a, 1, lda, m, alpha, beta, c, 1, ldc)))
      return;
    split(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  scipy_cblas_sgemm64_(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_dgemm(int order, int ta, int tb, int m, int n, int k, double alpha, const double *a, int lda,
                 const double *b, int ldb, double beta, double *c, int ldc) {
  scipy_cblas_dgemm64_(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
