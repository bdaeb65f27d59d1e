// One post-norm Transformer encoder layer of the Exceiver's process stack, fused into
// one kernel for small latent widths (d <= 8; the published model has d = 4):
//
//   y  = x + Wo·MHA(x) + bo         (self-attention over the cell's N latents)
//   x1 = LN1(y)
//   x2 = LN2(x1 + W2·GELU(W1·x1 + b1) + b2)
//
// One block per cell, one thread per latent (blockDim.x = N <= 1024). Each thread keeps
// its latent's d values in registers; the cell's keys and values (N·d each) go through
// shared memory; the feed-forward's hidden layer (ff wide, 2048 in the published model)
// is never stored: each thread walks the ff hidden units, adding each one's share of
// the output as it goes, so the layer reads x once and writes y once. Weights are read
// by every thread of a block at the same address (broadcast through the caches).
//
// The arithmetic follows accel/fused.rs's CPU implementation step by step (the tests
// check that one against candle's unfused ops and the reference fixtures).
//
// Weights, packed per layer (accel/fused.rs, `pack_layer`), f32:
//   wqkv [3d, d], bqkv [3d], wo [d, d], bo [d], n1w [d], n1b [d],
//   w1 [ff, d], b1 [ff], w2 [d, ff], b2 [d], n2w [d], n2b [d]

template <int D>
__device__ __forceinline__ void layer_norm(float* v, const float* w, const float* b, float eps) {
  float mean = 0.f;
#pragma unroll
  for (int c = 0; c < D; ++c) mean += v[c];
  mean /= (float)D;
  float var = 0.f;
#pragma unroll
  for (int c = 0; c < D; ++c) {
    float t = v[c] - mean;
    var += t * t;
  }
  var /= (float)D;
  float r = 1.f / sqrtf(var + eps);
#pragma unroll
  for (int c = 0; c < D; ++c) v[c] = (v[c] - mean) * r * w[c] + b[c];
}

template <int D>
__device__ void process_layer(const float* __restrict__ x, float* __restrict__ y,
                              const float* __restrict__ p, int n, int heads, int ff,
                              float eps) {
  extern __shared__ float shared[];
  float* sk = shared;          // [n, D]
  float* sv = shared + n * D;  // [n, D]
  const float* wqkv = p;
  const float* bqkv = wqkv + 3 * D * D;
  const float* wo = bqkv + 3 * D;
  const float* bo = wo + D * D;
  const float* n1w = bo + D;
  const float* n1b = n1w + D;
  const float* w1 = n1b + D;
  const float* b1 = w1 + ff * D;
  const float* w2 = b1 + ff;
  const float* b2 = w2 + D * ff;
  const float* n2w = b2 + D;
  const float* n2b = n2w + D;

  const int i = threadIdx.x;
  const size_t row = ((size_t)blockIdx.x * n + i) * D;
  const int hd = D / heads;
  const float scale = 1.f / sqrtf((float)hd);

  float xi[D], q[D];
#pragma unroll
  for (int c = 0; c < D; ++c) xi[c] = x[row + c];
#pragma unroll
  for (int o = 0; o < D; ++o) {
    float aq = bqkv[o], ak = bqkv[D + o], av = bqkv[2 * D + o];
#pragma unroll
    for (int c = 0; c < D; ++c) {
      aq += wqkv[o * D + c] * xi[c];
      ak += wqkv[(D + o) * D + c] * xi[c];
      av += wqkv[(2 * D + o) * D + c] * xi[c];
    }
    q[o] = aq * scale;
    sk[i * D + o] = ak;
    sv[i * D + o] = av;
  }
  __syncthreads();

  // attention, head by head: a max pass, then the exponentials and sums
  float att[D];
  for (int h = 0; h < heads; ++h) {
    const int c0 = h * hd;
    float m = -INFINITY;
    for (int j = 0; j < n; ++j) {
      float s = 0.f;
      for (int c = c0; c < c0 + hd; ++c) s += q[c] * sk[j * D + c];
      m = fmaxf(m, s);
    }
    float z = 0.f;
    float acc[D];
#pragma unroll
    for (int c = 0; c < D; ++c) acc[c] = 0.f;
    for (int j = 0; j < n; ++j) {
      float s = 0.f;
      for (int c = c0; c < c0 + hd; ++c) s += q[c] * sk[j * D + c];
      float e = expf(s - m);
      z += e;
      for (int c = c0; c < c0 + hd; ++c) acc[c] += e * sv[j * D + c];
    }
    for (int c = c0; c < c0 + hd; ++c) att[c] = acc[c] / z;
  }

  // out projection, residual, LN1
  float v[D];
#pragma unroll
  for (int o = 0; o < D; ++o) {
    float a = bo[o];
#pragma unroll
    for (int c = 0; c < D; ++c) a += wo[o * D + c] * att[c];
    v[o] = xi[o] + a;
  }
  layer_norm<D>(v, n1w, n1b, eps);

  // feed-forward without storing its hidden layer; erf GELU as nn.GELU()
  float f[D];
#pragma unroll
  for (int c = 0; c < D; ++c) f[c] = b2[c];
  for (int j = 0; j < ff; ++j) {
    float h = b1[j];
#pragma unroll
    for (int c = 0; c < D; ++c) h += w1[j * D + c] * v[c];
    float g = 0.5f * h * (1.f + erff(h * 0.70710678118654752f));
#pragma unroll
    for (int c = 0; c < D; ++c) f[c] += w2[c * ff + j] * g;
  }
#pragma unroll
  for (int c = 0; c < D; ++c) v[c] += f[c];
  layer_norm<D>(v, n2w, n2b, eps);
#pragma unroll
  for (int c = 0; c < D; ++c) y[row + c] = v[c];
}

#define INSTANCE(D)                                                                      \
  extern "C" __global__ void exceiver_process_layer_d##D(                                \
      const float* x, float* y, const float* p, int n, int heads, int ff, float eps) {   \
    process_layer<D>(x, y, p, n, heads, ff, eps);                                        \
  }
INSTANCE(1)
INSTANCE(2)
INSTANCE(4)
INSTANCE(8)
