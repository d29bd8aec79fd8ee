// Probe of the costs a persistent sampler kernel is built from (benchmarks/NOTES.md, ninth session):
// (1) HBM streaming rate with G blocks, one an SM: plain 16-byte loads and bulk copies into a shared ring;
// (2) the same with the products' arithmetic: FP32 FMAs (L output positions a weight) or bf16 tensor-core
//     products (mma.sync m16n8k16, a lane's 16-byte load its A fragment);
// (3) grid barriers: an arrival counter plus generation word (the sampler's until the ninth session) and
//     per-block counts on their own lines (its barrier since), with and without writes before each;
//     thread-block cluster barriers of 2-16 blocks;
// (4) one activation exchange inside a cluster through distributed shared memory.
// Build and run on the GPU:
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o /tmp/probe benchmarks/cluster_probe.cu && /tmp/probe
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
namespace cg = cooperative_groups;

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s (line %d)\n", #x, cudaGetErrorString(e), __LINE__); exit(1); } } while (0)

__device__ __forceinline__ unsigned sa(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void bar_wait(unsigned long long* b, unsigned parity) {
  unsigned done = 0;
  while (!done)
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(sa(b)), "r"(parity) : "memory");
}

// This block's contiguous share [lo, hi) of n items.
__device__ __forceinline__ void block_share(size_t n, size_t& lo, size_t& hi) {
  const size_t per = (n + gridDim.x - 1) / gridDim.x;
  lo = blockIdx.x * per;
  hi = lo + per < n ? lo + per : n;
}

// A thread's U 16-byte loads of one round, blockDim.x apart from item i (zeros past hi), all in flight.
template <int U>
__device__ __forceinline__ void load_group(const uint4* __restrict__ w, size_t i, size_t hi, uint4 (&v)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const size_t j = i + (size_t)u * blockDim.x;
    v[u] = j < hi ? __ldg(w + j) : make_uint4(0, 0, 0, 0);
  }
}

// (1)/(2): plain loads, U 16-byte loads a thread in flight; L > 0 does L FMAs per weight element.
template <int U, int L>
__global__ void stream_plain(const uint4* __restrict__ w, size_t n16, float* out) {
  extern __shared__ float act[];  // L activations per input element group (broadcast reads)
  size_t lo, hi;
  block_share(n16, lo, hi);
  float acc[L > 0 ? L : 1] = {};
  float s = 0.f;
  if (L > 0) for (int i = threadIdx.x; i < 8 * L; i += blockDim.x) act[i] = 0.001f * i;
  __syncthreads();
  for (size_t i = lo + threadIdx.x; i < hi; i += (size_t)blockDim.x * U) {
    uint4 v[U];
    load_group<U>(w, i, hi, v);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (L == 0) {
        s += __uint_as_float(v[u].x ^ v[u].y ^ v[u].z ^ v[u].w);
      } else {
        const unsigned words[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float w0 = __uint_as_float(words[q] << 16), w1 = __uint_as_float(words[q] & 0xffff0000u);
#pragma unroll
          for (int l = 0; l < (L > 0 ? L : 1); ++l) {
            acc[l] = fmaf(w0, act[(2 * q) * L + l], acc[l]);
            acc[l] = fmaf(w1, act[(2 * q + 1) * L + l], acc[l]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int l = 0; l < (L > 0 ? L : 1); ++l) s += acc[l];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

// (2) through tensor cores: each lane's 16-byte load is its A fragment of one m16n8k16 bf16 product (weights
// laid out in fragment order), multiplied with NT n-tiles of 8 positions whose B fragments come from smem.
template <int U, int NT>
__global__ void stream_mma(const uint4* __restrict__ w, size_t n16, float* out) {
  extern __shared__ unsigned act2[];  // B fragments: 64 k-slices x NT tiles x 32 lanes x 2 words
  const int lane = threadIdx.x & 31;
  for (int i = threadIdx.x; i < 64 * NT * 64; i += blockDim.x) act2[i] = 0x3c003c00u ^ i;
  __syncthreads();
  size_t lo, hi;
  block_share(n16, lo, hi);
  float acc[2][NT][4] = {};
  int kslice = 0;
  for (size_t i = lo + threadIdx.x; i < hi; i += (size_t)blockDim.x * U) {
    uint4 v[U];
    load_group<U>(w, i, hi, v);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      kslice = (kslice + 1) & 63;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint2 b = reinterpret_cast<const uint2*>(act2)[(kslice * NT + nt) * 32 + lane];
        float* c = acc[u & 1][nt];
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(v[u].x), "r"(v[u].y), "r"(v[u].z), "r"(v[u].w), "r"(b.x), "r"(b.y));
      }
    }
  }
  float s = 0.f;
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) s += acc[r][nt][0] + acc[r][nt][1] + acc[r][nt][2] + acc[r][nt][3];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

// (1): bulk copies of CH bytes into a ring of S stages; warp CW's lane 0 produces, CW warps consume.
template <int CH, int S, int CW>
__global__ void stream_bulk(const unsigned char* __restrict__ w, size_t bytes, float* out) {
  extern __shared__ __align__(128) unsigned char ring[];
  __shared__ __align__(8) unsigned long long full[S], empty[S];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(sa(&full[s])) : "memory");
      asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(sa(&empty[s])), "r"(CW) : "memory");
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  size_t lo, hi;
  block_share(bytes / CH, lo, hi);
  float s = 0.f;
  if (warp == CW) {
    if (lane == 0)
      for (size_t i = lo; i < hi; ++i) {
        const size_t k = i - lo;
        const int slot = k % S;
        if (k >= S) bar_wait(&empty[slot], ((k / S) - 1) & 1);
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(sa(&full[slot])), "r"(CH) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     ::"r"(sa(ring + slot * CH)), "l"(w + i * CH), "r"(CH), "r"(sa(&full[slot])) : "memory");
      }
  } else {
    for (size_t i = lo; i < hi; ++i) {
      const size_t k = i - lo;
      const int slot = k % S;
      bar_wait(&full[slot], (k / S) & 1);
      const uint4* p = reinterpret_cast<const uint4*>(ring + slot * CH);
      for (int q = warp * 32 + lane; q < CH / 16; q += CW * 32) { uint4 v = p[q]; s += __uint_as_float(v.x ^ v.y ^ v.z ^ v.w); }
      __syncwarp();
      if (lane == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(sa(&empty[slot])) : "memory");
    }
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

// (3): N cluster barriers; globaltimer on block 0.
__global__ void cluster_barriers(int n, unsigned long long* ns) {
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  unsigned long long t0, t1;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  for (int i = 0; i < n; ++i) cluster.sync();
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t1));
  if (blockIdx.x == 0 && threadIdx.x == 0) *ns = t1 - t0;
}

// (3): N grid barriers, WRITE floats of data written by every block before each (so a release waits for
// real writes). Modes 0-2: each block publishes its count in its own line of `flags` (stride words) and
// waits until every block's count has reached its own, polled 0, by a thread a block with acquire loads;
// 1, the same with relaxed loads and one acquire fence after; 2, by one warp, each lane its (up to 5)
// blocks' relaxed loads issued together, then one acquire fence. Mode 3: an arrival counter (flags[0])
// whose last block bumps a generation word (flags[32]), the others polling that.
__global__ void grid_barriers(int n, unsigned* flags, int stride, float* data, int write, int mode, unsigned long long* ns) {
  unsigned long long t0, t1;
  __syncthreads();
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  for (unsigned gen = 1; gen <= (unsigned)n; ++gen) {
    for (int i = threadIdx.x; i < write; i += blockDim.x) data[blockIdx.x * write + i] = gen;
    __syncthreads();
    if (mode == 3) {
      if (threadIdx.x == 0) {
        __threadfence();
        if (atomicAdd(flags, 1u) + 1 == gen * gridDim.x) {
          __threadfence();
          atomicAdd(flags + 32, 1u);
        } else {
          unsigned v;
          do asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(flags + 32) : "memory");
          while (v < gen);
        }
      }
    } else if (threadIdx.x == 0) {
      asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(flags + blockIdx.x * stride), "r"(gen) : "memory");
    }
    if (mode == 0) {
      for (int b = threadIdx.x; b < gridDim.x; b += blockDim.x) {
        unsigned v;
        do asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(flags + b * stride) : "memory");
        while (v < gen);
      }
    } else if (mode == 1) {
      for (int b = threadIdx.x; b < gridDim.x; b += blockDim.x) {
        unsigned v;
        do asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(flags + b * stride) : "memory");
        while (v < gen);
        asm volatile("fence.acq_rel.gpu;" ::: "memory");
      }
    } else if (mode == 2 && threadIdx.x < 32) {
      bool done = false;
      while (!done) {
        unsigned v[5];
#pragma unroll
        for (int k = 0; k < 5; ++k) {
          const int b = threadIdx.x + 32 * k;
          v[k] = gen;
          if (b < gridDim.x) asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v[k]) : "l"(flags + b * stride) : "memory");
        }
        bool mine = true;
#pragma unroll
        for (int k = 0; k < 5; ++k) mine = mine && v[k] >= gen;
        done = __all_sync(0xffffffffu, mine);
      }
      asm volatile("fence.acq_rel.gpu;" ::: "memory");
    }
    __syncthreads();
  }
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t1));
  if (blockIdx.x == 0 && threadIdx.x == 0) *ns = t1 - t0;
}

// (4): N exchanges of an activation of F floats: block r of the cluster owns F / size of them, writes
// them into every block's copy (distributed shared memory), cluster barrier, then reads its copy.
__global__ void cluster_exchange(int n, int floats, unsigned long long* ns, float* out) {
  extern __shared__ float buf[];
  cg::cluster_group cluster = cg::this_cluster();
  const int size = cluster.num_blocks(), rank = cluster.block_rank();
  const int share = floats / size;
  for (int i = threadIdx.x; i < floats; i += blockDim.x) buf[i] = 0.f;
  cluster.sync();
  unsigned long long t0, t1;
  float s = 0.f;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  for (int it = 0; it < n; ++it) {
    for (int peer = 0; peer < size; ++peer) {
      float4* dst = reinterpret_cast<float4*>(cluster.map_shared_rank(buf, peer) + rank * share);
      for (int i = threadIdx.x; i < share / 4; i += blockDim.x) dst[i] = make_float4(it, i, rank, peer);
    }
    cluster.sync();
    for (int i = threadIdx.x; i < floats / 4; i += blockDim.x) { float4 v = reinterpret_cast<float4*>(buf)[i]; s += v.x + v.w; }
    cluster.sync();  // nobody overwrites a copy that is still being read
  }
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t1));
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
  if (blockIdx.x == 0 && threadIdx.x == 0) *ns = t1 - t0;
}

template <typename K>
float time_ms(K launch, int reps = 5) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
  launch(); CK(cudaDeviceSynchronize());
  std::vector<float> t;
  for (int r = 0; r < reps; ++r) {
    CK(cudaEventRecord(a)); launch(); CK(cudaEventRecord(b)); CK(cudaEventSynchronize(b));
    float ms; CK(cudaEventElapsedTime(&ms, a, b)); t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main() {
  int sms; CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop; CK(cudaGetDeviceProperties(&prop, 0));
  printf("device %s, %d SMs, L2 %d MB\n", prop.name, sms, prop.l2CacheSize >> 20);
  const size_t bytes = (size_t)768 << 20;  // well past the L2
  unsigned char* w; CK(cudaMalloc(&w, bytes)); CK(cudaMemset(w, 1, bytes));
  float* out; CK(cudaMalloc(&out, 132 * 1024 * sizeof(float) * 4));
  unsigned long long* ns; CK(cudaMalloc(&ns, 8));
  const size_t one_per_sm = 120 << 10;  // dynamic smem that leaves room for one block an SM

  printf("\n(1, 2) streaming %zu MB, one block an SM; TB/s (kernel time incl. launch)\n", bytes >> 20);
  const int grids[] = {4, 8, 12, 16, 24, 32, 66, 132};
#define PLAIN(U, L, T)                                                                                      \
  {                                                                                                         \
    auto k = stream_plain<U, L>;                                                                            \
    CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)one_per_sm));               \
    printf("plain U=%d L=%2d T=%4d:", U, L, T);                                                             \
    for (int g : grids) {                                                                                   \
      float ms = time_ms([&] { k<<<g, T, one_per_sm>>>((const uint4*)w, bytes / 16, out); });               \
      printf("  G=%d %.2f", g, bytes / ms / 1e9);                                                           \
    }                                                                                                       \
    CK(cudaGetLastError()); printf("\n"); fflush(stdout);                                                   \
  }
  PLAIN(4, 0, 256) PLAIN(8, 0, 512) PLAIN(8, 0, 1024) PLAIN(16, 0, 1024)
  PLAIN(8, 4, 1024) PLAIN(4, 16, 512)
#define MMA(U, NT)                                                                                          \
  {                                                                                                         \
    auto k = stream_mma<U, NT>;                                                                             \
    CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)one_per_sm));               \
    printf("mma U=%d L=%2d T=1024:", U, 8 * NT);                                                            \
    for (int g : grids) {                                                                                   \
      float ms = time_ms([&] { k<<<g, 1024, one_per_sm>>>((const uint4*)w, bytes / 16, out); });            \
      printf("  G=%d %.2f", g, bytes / ms / 1e9);                                                           \
    }                                                                                                       \
    CK(cudaGetLastError()); printf("\n"); fflush(stdout);                                                  \
  }
#define BULK(CH, S)                                                                                         \
  {                                                                                                         \
    auto k = stream_bulk<CH, S, 8>;                                                                         \
    CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, CH * S));                       \
    printf("bulk %5d B x %2d (%3d KB):", CH, S, CH * S / 1024);                                              \
    for (int g : grids) {                                                                                   \
      float ms = time_ms([&] { k<<<g, 288, CH * S>>>(w, bytes, out); });                                    \
      printf("  G=%d %.2f", g, bytes / ms / 1e9);                                                           \
    }                                                                                                       \
    CK(cudaGetLastError()); printf("\n"); fflush(stdout);                                                   \
  }
  MMA(8, 1) MMA(8, 2) MMA(4, 2) MMA(8, 4)
  BULK(16384, 8) BULK(16384, 12) BULK(32768, 6) BULK(8192, 24)

  printf("\n(3) barriers, us each (one block an SM)\n");
  {
    float* data; CK(cudaMalloc(&data, (size_t)132 * 4096 * 4));
    unsigned* flags; CK(cudaMalloc(&flags, 132 * 64 * 4));
    CK(cudaFuncSetAttribute(grid_barriers, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)one_per_sm));
    const int n = 4000;
    for (int round = 0; round < 2; ++round)
    for (int write : {0, 1024}) {
      unsigned long long t;
      CK(cudaMemset(flags, 0, 132 * 64 * 4));
      grid_barriers<<<sms, 256, one_per_sm>>>(n, flags, 0, data, write, 3, ns); CK(cudaDeviceSynchronize());
      CK(cudaMemcpy(&t, ns, 8, cudaMemcpyDeviceToHost));
      printf("counter barrier, %d blocks, %4d floats written a block before: %.3f us\n", sms, write, t / 1e3 / n);
      for (int mode : {0, 1, 2})
      for (int stride : {1, 8, 32, 64}) {
        if (mode > 0 && stride != 32) continue;
        CK(cudaMemset(flags, 0, 132 * 64 * 4));
        grid_barriers<<<sms, 256, one_per_sm>>>(n, flags, stride, data, write, mode, ns); CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(&t, ns, 8, cudaMemcpyDeviceToHost));
        printf("flag barrier, poll mode %d, stride %2d words, %d blocks, %4d floats written a block before: %.3f us\n", mode, stride, sms, write, t / 1e3 / n);
      }
    }
    fflush(stdout);
  }
  CK(cudaFuncSetAttribute(cluster_barriers, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  CK(cudaFuncSetAttribute(cluster_exchange, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  CK(cudaFuncSetAttribute(cluster_barriers, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)one_per_sm));
  CK(cudaFuncSetAttribute(cluster_exchange, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)one_per_sm));
  for (int c : {2, 4, 8, 16}) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(c); cfg.blockDim = dim3(256); cfg.dynamicSmemBytes = one_per_sm;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = c; attr[0].val.clusterDim.y = 1; attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr; cfg.numAttrs = 1;
    int clusters = 0;
    cudaError_t e = cudaOccupancyMaxActiveClusters(&clusters, (void*)cluster_barriers, &cfg);
    printf("cluster %2d: max active clusters %d (%s)\n", c, clusters, cudaGetErrorString(e));
    if (e != cudaSuccess || clusters == 0) { cudaGetLastError(); continue; }
    const int n = 20000;
    CK(cudaLaunchKernelEx(&cfg, cluster_barriers, n, ns)); CK(cudaDeviceSynchronize());
    unsigned long long t; CK(cudaMemcpy(&t, ns, 8, cudaMemcpyDeviceToHost));
    printf("  cluster barrier: %.3f us\n", t / 1e3 / n);
    for (int floats : {4096, 16384}) {
      const int m = 5000;
      CK(cudaLaunchKernelEx(&cfg, cluster_exchange, m, floats, ns, out)); CK(cudaDeviceSynchronize());
      CK(cudaMemcpy(&t, ns, 8, cudaMemcpyDeviceToHost));
      printf("  exchange of %5d floats (push to every block, barrier, read, barrier): %.3f us\n", floats, t / 1e3 / m);
    }
    fflush(stdout);
  }
  return 0;
}
