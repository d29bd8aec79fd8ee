/* MLX's real-valued CBLAS products (cblas_sgemm, cblas_dgemm) over numpy's bundled OpenBLAS, whose
   symbols are renamed (scipy_..._64_, 64-bit integers). Built and loaded by policy_core/backends/cpu_blas.py.

   Most layers of a batch-1 request are a weight matrix times at most 8 vectors (batch x time steps).
   Streaming each row once against all the vectors reads such a matrix faster than OpenBLAS's blocked
   GEMM (benchmarks/NOTES.md). This file does those products itself and passes every other one to
   OpenBLAS: from 9 vectors on the kernel is no faster (its packed vectors no longer stay in L1).

   Both run on one thread pool: OpenBLAS hands its parallel jobs to this file's pool (its caller-managed
   threading callback) instead of its own threads, since two pools on the same cores spin against each
   other. Without the callback (an OpenBLAS before 0.3.27) every product goes to OpenBLAS on its own
   threads. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sched.h>
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
typedef void (*openblas_dojob)(int thread, void *job, int data);
typedef void (*openblas_threads)(int sync, openblas_dojob dojob, int jobs, size_t job_size, void *job_data,
                                 int data);
/* Weak: absent from other OpenBLAS versions, then null. */
void scipy_openblas_set_threads_callback_function64_(openblas_threads) __attribute__((weak));
int scipy_openblas_get_num_threads64_(void) __attribute__((weak));
void scipy_openblas_set_num_threads64_(int) __attribute__((weak));

/* ---- The pool: the calling thread and helpers 1..threads-1 run a call's jobs, one call at a time.
   OpenBLAS's jobs wait on each other, so they run at once, job i on participant i. The kernel's jobs are
   chunks of rows that whoever runs claims in turn: where a helper is not running (other processes hold
   the cores) the caller does its share instead of waiting for it. Helpers spin for a while after a call,
   since a layer's next product follows within microseconds, then sleep; waits spin briefly, then yield
   the core.

   A robot computer runs other software. Where helpers keep starting late (over late_ns after a call was
   published, in LATE_LIMIT of the last LATE_WINDOW parallel calls), no core is free for them: OpenBLAS's
   thread count is lowered to 1 for a pause, so that every product runs on the calling thread as with one
   thread, then restored to look again; the pause doubles while the cores stay busy. */

/* 5 ms: with 0.2 ms the wake-ups between a batch-4 request's products cost it 10%. */
enum { SPIN_NS = 5000000, WAIT_SPIN_NS = 20000, MAX_HELPERS = 255 };
enum { LATE_WINDOW = 8, LATE_LIMIT = 3, CALM_CALLS = 256 };
static const long PAUSE_MIN_NS = 50000000L, PAUSE_MAX_NS = 2000000000L;
typedef void (*pool_job)(int job, void *arg);

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER; /* one call at a time */
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static int helpers;            /* started; guarded by pool_lock */
static unsigned long started_at[MAX_HELPERS + 1]; /* helper i's last call before it started */
static unsigned long joined[MAX_HELPERS + 1];     /* the last call helper i took part in */
static pool_job call_fn;       /* the call's fields, written while generation is odd */
static void *call_arg;
static int call_jobs, call_threads, call_chunked;
static long call_published;      /* now_ns() when the call was published */
static unsigned long generation; /* even: fields stable; odd: being written */
static unsigned long long claims; /* chunked calls: (generation << 32) | next chunk */
static int unfinished;           /* jobs of the current call not yet done (at once: the caller's excepted) */
static unsigned long late_call;  /* the last call a helper started over late_ns after its publication */
static int sleeping;
static long pool_calls, kernel_calls;
static long late_ns = 500000; /* a helper starting later than this after publication is late; < 0: never */
/* Busy cores, guarded by pool_lock: recent calls' lateness, the pause, calls since the last pause. */
static unsigned late_history;
static long pause_ns = 50000000L, calm_calls;
/* The pause's end (0: none) and OpenBLAS's thread count it lowered (0: not lowered); adjust_lock. */
static long paused_until;
static int lowered_from;
static pthread_mutex_t adjust_lock = PTHREAD_MUTEX_INITIALIZER;

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

/* The next chunk of call g, or -1 when they are all taken or call g is over. */
static int claim(unsigned long g, int jobs) {
  unsigned long long w = __atomic_load_n(&claims, __ATOMIC_ACQUIRE);
  for (;;) {
    if ((unsigned)(w >> 32) != (unsigned)g || (int)(unsigned)w >= jobs) return -1;
    if (__atomic_compare_exchange_n(&claims, &w, w + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
      return (int)(unsigned)w;
  }
}

static void run_chunks(unsigned long g, int jobs, pool_job fn, void *arg) {
  for (int job; (job = claim(g, jobs)) >= 0;) {
    fn(job, arg);
    __atomic_sub_fetch(&unfinished, 1, __ATOMIC_RELEASE);
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
    /* A helper without a job in call g can read the fields while call g+1 writes them: read, then
       check that the generation did not move (a helper with a job holds its call open). */
    const pool_job fn = __atomic_load_n(&call_fn, __ATOMIC_RELAXED);
    void *const arg = __atomic_load_n(&call_arg, __ATOMIC_RELAXED);
    const int jobs = __atomic_load_n(&call_jobs, __ATOMIC_RELAXED);
    const int threads = __atomic_load_n(&call_threads, __ATOMIC_RELAXED);
    const int chunked = __atomic_load_n(&call_chunked, __ATOMIC_RELAXED);
    const long published = __atomic_load_n(&call_published, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (__atomic_load_n(&generation, __ATOMIC_RELAXED) != g) continue;
    seen = g;
    if (index >= threads) continue;
    __atomic_store_n(&joined[index], g, __ATOMIC_RELAXED);
    const long threshold = __atomic_load_n(&late_ns, __ATOMIC_RELAXED);
    if (threshold >= 0 && now_ns() - published > threshold) __atomic_store_n(&late_call, g, __ATOMIC_RELAXED);
    if (chunked) {
      run_chunks(g, jobs, fn, arg);
    } else {
      fn(index, arg);
      __atomic_sub_fetch(&unfinished, 1, __ATOMIC_RELEASE);
    }
  }
  return NULL;
}

/* After each parallel call, under pool_lock: a pause where helpers were late too often. */
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

/* At each product MLX asks for, outside OpenBLAS: OpenBLAS's thread count lowered to 1 while a pause
   lasts, restored after it (unless someone else set another count meanwhile). */
static void pool_adjust(void) {
  const long until = __atomic_load_n(&paused_until, __ATOMIC_ACQUIRE);
  if (!until) return;
  pthread_mutex_lock(&adjust_lock);
  const long now = now_ns();
  const int threads = scipy_openblas_get_num_threads64_();
  if (now < paused_until && !lowered_from && threads > 1) {
    lowered_from = threads;
    scipy_openblas_set_num_threads64_(1);
  } else if (now >= paused_until) {
    if (lowered_from && threads == 1) scipy_openblas_set_num_threads64_(lowered_from);
    lowered_from = 0;
    __atomic_store_n(&paused_until, 0, __ATOMIC_RELEASE);
  }
  pthread_mutex_unlock(&adjust_lock);
}

/* Runs fn(0..jobs-1, arg) on the caller and threads-1 helpers: at once, job i on participant i, or
   (chunked) claimed in turn. Where helpers can't be started, the caller runs the jobs it can; jobs that
   wait on each other (not chunked) then abort the process, since running them in turn would hang. */
static void pool_run(int threads, int jobs, pool_job fn, void *arg, int chunked) {
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
    if (failed) break;
    ++helpers;
  }
  const int together = threads <= helpers + 1 ? threads : helpers + 1; /* the caller is participant 0 */
  if (together < jobs && !chunked) {
    fprintf(stderr, "dpmlx BLAS shim: could not start %d threads for OpenBLAS's jobs\n", jobs - 1);
    abort();
  }
  const unsigned long g = __atomic_add_fetch(&generation, 1, __ATOMIC_RELAXED) + 1; /* odd: writing */
  __atomic_thread_fence(__ATOMIC_RELEASE);                                        /* ... seen odd first */
  __atomic_store_n(&call_fn, fn, __ATOMIC_RELAXED);
  __atomic_store_n(&call_arg, arg, __ATOMIC_RELAXED);
  __atomic_store_n(&call_jobs, jobs, __ATOMIC_RELAXED);
  __atomic_store_n(&call_threads, together, __ATOMIC_RELAXED);
  __atomic_store_n(&call_chunked, chunked, __ATOMIC_RELAXED);
  __atomic_store_n(&claims, (unsigned long long)(unsigned)g << 32, __ATOMIC_RELAXED);
  __atomic_store_n(&unfinished, chunked ? jobs : jobs - 1, __ATOMIC_RELAXED);
  __atomic_store_n(&call_published, now_ns(), __ATOMIC_RELAXED);
  __atomic_add_fetch(&generation, 1, __ATOMIC_SEQ_CST); /* even (g): published */
  if (__atomic_load_n(&sleeping, __ATOMIC_SEQ_CST) > 0) {
    pthread_mutex_lock(&sleep_lock);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&sleep_lock);
  }
  if (chunked) {
    run_chunks(g, jobs, fn, arg);
  } else {
    fn(0, arg);
  }
  /* Late: a helper started late, or one had not started when the caller was through with the jobs. */
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

struct openblas_call {
  openblas_dojob dojob;
  char *jobs;
  size_t job_size;
  int data;
};

static void openblas_job(int job, void *arg) {
  const struct openblas_call *call = arg;
  call->dojob(job, call->jobs + (size_t)job * call->job_size, call->data);
}

/* Job i runs as OpenBLAS "thread" i: it picks that thread's scratch buffer. */
static void openblas_on_pool(int sync, openblas_dojob dojob, int jobs, size_t job_size, void *job_data,
                             int data) {
  (void)sync; /* run to completion either way */
  struct openblas_call call = {dojob, job_data, job_size, data};
  pool_run(jobs, jobs, openblas_job, &call, 0);
}

static int pool_installed; /* 0: every product goes to OpenBLAS as it is, on its own threads */

__attribute__((constructor)) static void pool_install(void) {
  if (!scipy_openblas_set_threads_callback_function64_ || !scipy_openblas_get_num_threads64_ ||
      !scipy_openblas_set_num_threads64_)
    return;
  pthread_atfork(pool_before_fork, pool_after_fork_in_parent, pool_after_fork_in_child);
  pool_installed = 1;
  scipy_openblas_set_threads_callback_function64_(openblas_on_pool);
}

/* ---- The kernel: C[i*si + j*sj] = alpha * sum_k big[i*ldbig + k] * pack_j[k] (+ beta C) for the rows i
   of a large matrix and at most 8 vectors packed below (zero vectors up to 4 or 8), R rows at a time.
   The packed vectors are PACK_SKEW floats further apart than their length: vectors 4 KB apart alias
   in L1 (1024 x 5120 by 16 took 7.4 ms instead of 1.8). */

/* Products under KERNEL_MIN_ELEMENTS weights stay with OpenBLAS; under PARALLEL_MIN_ELEMENTS (1 MB)
   the kernel runs on the calling thread alone. */
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
  /* OpenBLAS's thread count as it is now (threadpoolctl, openblas_set_num_threads or a pause may lower
     it), each thread's share in CHUNKS chunks. */
  const int threads = rows * k >= PARALLEL_MIN_ELEMENTS ? scipy_openblas_get_num_threads64_() : 1;
  const i64 block = padded == 4 ? 4 : 2; /* rows a block takes together */
  const i64 per_job = ((rows + threads * CHUNKS - 1) / (threads * CHUNKS) + block - 1) / block * block;
  const int jobs = (int)((rows + per_job - 1) / per_job);
  struct kernel_call call = {.big = big, .pack = pack_buffer, .ldbig = ldbig, .rows = rows, .k = k,
                             .stride = stride, .vectors = vectors, .si = si, .sj = sj,
                             .rows_per_job = per_job, .alpha = alpha, .beta = beta, .c = c};
  __atomic_add_fetch(&kernel_calls, 1, __ATOMIC_RELAXED);
  pool_run(threads, jobs, kernel_job, &call, 1);
  return 1;
}

int dpmlx_pool_threads(void) { return pool_installed ? scipy_openblas_get_num_threads64_() : 0; }
int dpmlx_pool_paused(void) { return __atomic_load_n(&paused_until, __ATOMIC_ACQUIRE) != 0; }

/* Ends a pause now (OpenBLAS's thread count restored at the next product) and forgets recent lateness. */
void dpmlx_pool_resume(void) {
  pthread_mutex_lock(&pool_lock);
  late_history = 0;
  calm_calls = 0;
  pause_ns = PAUSE_MIN_NS;
  if (__atomic_load_n(&paused_until, __ATOMIC_ACQUIRE)) __atomic_store_n(&paused_until, 1, __ATOMIC_RELEASE);
  pthread_mutex_unlock(&pool_lock);
  pool_adjust();
}

/* Sets the lateness threshold in ns (default 0.5 ms; < 0: never late, so never paused); returns the old. */
long dpmlx_pool_set_late_ns(long ns) { return __atomic_exchange_n(&late_ns, ns, __ATOMIC_RELAXED); }
long dpmlx_pool_calls(void) { return __atomic_load_n(&pool_calls, __ATOMIC_RELAXED); }
long dpmlx_kernel_calls(void) { return __atomic_load_n(&kernel_calls, __ATOMIC_RELAXED); }
int dpmlx_kernel_max_vectors(void) { return KERNEL_MAX_VECTORS; }

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

/* Row-major leading dimensions BLAS accepts; OpenBLAS reports the others. */
static int valid(int ta, int tb, int m, int n, int k, int lda, int ldb, int ldc) {
  return lda >= (ta == NO_TRANS ? k : m) && ldb >= (tb == NO_TRANS ? n : k) && ldc >= n;
}

void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
  if (pool_installed) pool_adjust();
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
  }
  scipy_cblas_sgemm64_(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_dgemm(int order, int ta, int tb, int m, int n, int k, double alpha, const double *a, int lda,
                 const double *b, int ldb, double beta, double *c, int ldc) {
  if (pool_installed) pool_adjust();
  scipy_cblas_dgemm64_(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
