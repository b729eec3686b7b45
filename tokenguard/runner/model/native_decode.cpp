// The decoder layers of a decode step on a CPU, in one call.
//
// Decoding one token is dispatch-bound on a CPU: through PyTorch a layer is about 150
// small operators, each a few microseconds of Python and dispatcher for a few hundred
// floats of work. Here a step runs every layer in C++: the matrix products still call
// PyTorch's own kernels (the int4, int8 and dense ones the Python path calls, on the same
// weights), and so does the attention of one sequence over consecutive slots; the rest -
// RMS norm, rotary embedding, writing the new keys and values into the cache, attention
// read in place from a paged pool, SiLU - are loops the compiler vectorizes. See
// native.py for when it runs.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <memory>
#include <optional>
#include <vector>

using at::Tensor;

namespace {

enum Kind : int64_t { kInt4 = 0, kInt8 = 1, kDense = 2 };
constexpr int64_t kGroupSize = 32;     // the int4 kernel's group size (GGUF's Q4 block)

// ``x [B, in]`` times one linear layer: ``a``/``b`` are the packed weight and its scales
// (int4: scales and zeros; int8: per-channel scales), or the dense weight. From
// ``dense_min_rows`` rows on the quantized layers multiply their dense copy, as in Python.
Tensor linear(const Tensor& x, int64_t kind, const Tensor& a, const Tensor& b, const Tensor& dense,
              int64_t dense_min_rows) {
  if (kind == kDense || x.size(0) >= dense_min_rows) return at::linear(x, kind == kDense ? a : dense);
  if (kind == kInt4) return at::_weight_int4pack_mm_for_cpu(x, a, kGroupSize, b);
  return at::_weight_int8pack_mm(x, a, b);
}

// ``x [B, H]`` float32, RMS-normed and scaled by ``w [H]`` (float32), returned in ``dtype``.
Tensor rms_norm(const Tensor& x, const Tensor& w, float eps, at::ScalarType dtype) {
  const int64_t rows = x.size(0), width = x.size(1);
  Tensor out = at::empty({rows, width}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = xp + r * width;
    float squares = 0.f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < width; ++i) squares += in[i] * in[i];
    const float inv = 1.f / std::sqrt(squares / static_cast<float>(width) + eps);
    float* o = op + r * width;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) o[i] = in[i] * inv * wp[i];
  }
  return dtype == at::kFloat ? out : out.to(dtype);
}

// e^x for x <= 0, as 2^(x log2 e) split into an integer power and a polynomial on [0, 1)
// (relative error under 1e-7): std::exp does not vectorize without -ffast-math.
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.f) * 1.4426950408889634f;
  const float whole = std::floor(t);
  const float f = t - whole;
  float p = 2.1690608991775662e-4f;
  p = p * f + 1.2443081941455603e-3f;
  p = p * f + 9.678472764790058e-3f;
  p = p * f + 5.548352375626564e-2f;
  p = p * f + 2.402298003435135e-1f;
  p = p * f + 6.931470036506653e-1f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(whole) + 127) << 23;  // 2^whole, built from its exponent
  float power;
  std::memcpy(&power, &bits, sizeof power);
  return p * power;
}

// Rotates each row's query and new key (HF's half-split layout: ``x cos + roll(x, D/2) signed_sin``)
// and writes its key and value at slot ``write[b]`` of the layer's ``keys``/``values``
// ``[Hkv, slots, D]``. ``qkv [B, (H + 2 Hkv) D]`` is in the cache's dtype ``T``; returns the
// rotated queries ``[B, H, 1, D]`` in it.
template <typename T>
Tensor rotate_and_store(const Tensor& qkv_t, const Tensor& cos_t, const Tensor& sin_t, Tensor keys_t,
                        Tensor values_t, const Tensor& write_t, int64_t heads, int64_t kv_heads) {
  const int64_t rows = qkv_t.size(0), dim = cos_t.size(1), half = dim / 2;
  const int64_t width = qkv_t.size(1), slots = keys_t.size(1), head_stride = keys_t.stride(0);
  Tensor queries_t = at::empty({rows, heads, 1, dim}, qkv_t.options());
  const T* qkv = qkv_t.data_ptr<T>();
  const float* cos = cos_t.data_ptr<float>();
  const float* sin = sin_t.data_ptr<float>();
  T* keys = keys_t.data_ptr<T>();
  T* values = values_t.data_ptr<T>();
  T* queries = queries_t.data_ptr<T>();
  const int64_t* write = write_t.data_ptr<int64_t>();
  for (int64_t b = 0; b < rows; ++b) {
    TORCH_CHECK(write[b] >= 0 && write[b] < slots, "write slot out of the pool");
    const T* row = qkv + b * width;
    const float* c = cos + b * dim;
    const float* s = sin + b * dim;
    for (int64_t h = 0; h < heads + kv_heads; ++h) {
      const T* x = row + h * dim;
      T* target = h < heads ? queries + (b * heads + h) * dim : keys + (h - heads) * head_stride + write[b] * dim;
      for (int64_t i = 0; i < half; ++i) {
        target[i] = static_cast<T>(static_cast<float>(x[i]) * c[i] + static_cast<float>(x[i + half]) * s[i]);
      }
      for (int64_t i = half; i < dim; ++i) {
        target[i] = static_cast<T>(static_cast<float>(x[i]) * c[i] + static_cast<float>(x[i - half]) * s[i]);
      }
    }
    for (int64_t g = 0; g < kv_heads; ++g) {
      std::memcpy(values + g * head_stride + write[b] * dim, row + (heads + kv_heads + g) * dim, dim * sizeof(T));
    }
  }
  return queries_t;
}

// A row of ``n`` cache values as float32 (bfloat16 is the top half of a float32: a shift
// the compiler vectorizes, unlike the conversion operator).
inline void to_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
}

// The first slot of a context of one row whose slots are consecutive (the pool read as a
// view), else -1. Checks every row's length and slots.
int64_t consecutive_start(const Tensor& context, const Tensor& lengths, int64_t slots) {
  const int64_t rows = context.size(0), width = context.size(1), stride = context.stride(0);
  const int64_t* len = lengths.data_ptr<int64_t>();
  const int64_t* positions = context.data_ptr<int64_t>();
  bool consecutive = rows == 1;
  for (int64_t b = 0; b < rows; ++b) {
    TORCH_CHECK(len[b] >= 1 && len[b] <= width, "context length out of range");
    const int64_t* row = positions + b * stride;
    for (int64_t t = 0; t < len[b]; ++t) {
      TORCH_CHECK(row[t] >= 0 && row[t] < slots, "context slot out of the pool");
      consecutive = consecutive && row[t] == row[0] + t;
    }
  }
  return consecutive ? positions[0] : -1;
}

constexpr int64_t kChunk = 128;  // context positions per attention work item

// Replaces the scores ``s[0..count)`` by e^(score - max); returns (max, sum of them).
inline std::pair<float, float> exponentiate(float* s, int64_t count) {
  const float top = *std::max_element(s, s + count);
  for (int64_t t = 0; t < count; ++t) s[t] = exp_nonpositive(s[t] - top);
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t t = 0; t < count; ++t) total += s[t];
  return {top, total};
}

// One chunk of one KV head's context, for its ``group`` query heads ``q [group, dim]``:
// per query head its largest score ``maxima[j]``, sum of exponentials ``sums[j]`` and
// weighted values ``weighted[j * dim...]``. ``scores`` and ``block`` are scratch
// (``group * kChunk`` and ``kChunk * dim`` floats).
template <typename T>
void attend_chunk(const float* q, int64_t group, int64_t dim, const T* keys, const T* values,
                  const int64_t* positions, int64_t count, float scale, float* scores, float* block, float* maxima,
                  float* sums, float* weighted) {
  for (int64_t t = 0; t < count; ++t) to_float(keys + positions[t] * dim, &block[t * dim], dim);
  for (int64_t j = 0; j < group; ++j) {
    const float* qj = q + j * dim;
    float* s = &scores[j * kChunk];
    for (int64_t t = 0; t < count; ++t) {
      const float* key = &block[t * dim];
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < dim; ++i) dot += qj[i] * key[i];
      s[t] = dot * scale;
    }
    std::tie(maxima[j], sums[j]) = exponentiate(s, count);
  }
  for (int64_t t = 0; t < count; ++t) to_float(values + positions[t] * dim, &block[t * dim], dim);
  for (int64_t j = 0; j < group; ++j) {
    float* acc = weighted + j * dim;
    const float* s = &scores[j * kChunk];
    std::fill(acc, acc + dim, 0.f);
    for (int64_t t = 0; t < count; ++t) {
      const float w = s[t];
      const float* v = &block[t * dim];
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) acc[i] += w * v[i];
    }
  }
}

#if defined(__AVX512F__)
// The same for a bfloat16 cache with AVX-512, the group's query heads in registers:
// each key and value row is read and widened once, in registers, for all of them
// (about 20% faster than widening rows into ``block`` first). ``G`` query heads,
// ``head_dim = 16 * NV``.
inline __m512 widen16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <int G, int NV>
void attend_chunk_avx512(const float* q, int64_t, int64_t, const c10::BFloat16* keys,
                         const c10::BFloat16* values, const int64_t* positions, int64_t count, float scale,
                         float* scores, float*, float* maxima, float* sums, float* weighted) {
  constexpr int64_t D = 16 * NV;
  __m512 query[G][NV];
  for (int j = 0; j < G; ++j) {
    for (int n = 0; n < NV; ++n) query[j][n] = _mm512_loadu_ps(q + j * D + 16 * n);
  }
  for (int64_t t = 0; t < count; ++t) {
    const c10::BFloat16* key = keys + positions[t] * D;
    __m512 dot[G];
    for (int j = 0; j < G; ++j) dot[j] = _mm512_setzero_ps();
    for (int n = 0; n < NV; ++n) {
      const __m512 k = widen16(key + 16 * n);
      for (int j = 0; j < G; ++j) dot[j] = _mm512_fmadd_ps(query[j][n], k, dot[j]);
    }
    for (int j = 0; j < G; ++j) scores[j * kChunk + t] = _mm512_reduce_add_ps(dot[j]) * scale;
  }
  for (int j = 0; j < G; ++j) std::tie(maxima[j], sums[j]) = exponentiate(scores + j * kChunk, count);
  __m512 acc[G][NV];
  for (int j = 0; j < G; ++j) {
    for (int n = 0; n < NV; ++n) acc[j][n] = _mm512_setzero_ps();
  }
  for (int64_t t = 0; t < count; ++t) {
    const c10::BFloat16* value = values + positions[t] * D;
    __m512 weight[G];
    for (int j = 0; j < G; ++j) weight[j] = _mm512_set1_ps(scores[j * kChunk + t]);
    for (int n = 0; n < NV; ++n) {
      const __m512 v = widen16(value + 16 * n);
      for (int j = 0; j < G; ++j) acc[j][n] = _mm512_fmadd_ps(weight[j], v, acc[j][n]);
    }
  }
  for (int j = 0; j < G; ++j) {
    for (int n = 0; n < NV; ++n) _mm512_storeu_ps(weighted + j * D + 16 * n, acc[j][n]);
  }
}
#endif

template <typename T>
using ChunkKernel = void (*)(const float*, int64_t, int64_t, const T*, const T*, const int64_t*, int64_t, float,
                             float*, float*, float*, float*, float*);

// The chunk kernel for a cache of ``T`` with ``group`` query heads per KV head of ``dim``.
template <typename T>
ChunkKernel<T> chunk_kernel(int64_t group, int64_t dim) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
#define TG_CHUNK_KERNELS(NV) \
  switch (group) { \
    case 1: return attend_chunk_avx512<1, NV>; \
    case 2: return attend_chunk_avx512<2, NV>; \
    case 3: return attend_chunk_avx512<3, NV>; \
    case 4: return attend_chunk_avx512<4, NV>; \
    default: break; \
  }
    switch (dim) {
      case 16: TG_CHUNK_KERNELS(1) break;
      case 32: TG_CHUNK_KERNELS(2) break;
      case 64: TG_CHUNK_KERNELS(4) break;
      case 128: TG_CHUNK_KERNELS(8) break;
      default: break;
    }
#undef TG_CHUNK_KERNELS
  }
#endif
  (void)group;
  (void)dim;
  return attend_chunk<T>;
}

// Attention of ``queries [B, H, 1, D]`` over each row's context in the layer's
// ``keys``/``values [Hkv, slots, D]``, read where they lie. One row over consecutive slots
// (single-stream decoding) goes to PyTorch's fused kernel on a view of the pool. Other
// steps (a batch, or blocks out of order) would have PyTorch gather every context into
// a padded copy first, which costs more than the attention; here work items are (row, KV
// head, chunk of context): the query heads sharing a KV head read each key once, a long
// context splits across threads, and the chunks' partial softmaxes are merged at the end
// (as flash decoding does).
template <typename T>
Tensor attend(const Tensor& queries_t, const Tensor& keys_t, const Tensor& values_t, const Tensor& context_t,
              const Tensor& lengths_t, int64_t first) {
  const int64_t rows = queries_t.size(0), heads = queries_t.size(1), dim = queries_t.size(3);
  const int64_t kv_heads = keys_t.size(0), group = heads / kv_heads;
  const int64_t* lengths = lengths_t.data_ptr<int64_t>();
  if (first >= 0) {
    const Tensor k = keys_t.narrow(1, first, lengths[0]).unsqueeze(0);
    const Tensor v = values_t.narrow(1, first, lengths[0]).unsqueeze(0);
    return at::scaled_dot_product_attention(queries_t, k, v, std::nullopt, 0.0, false, std::nullopt, true)
        .reshape({rows, heads * dim});
  }
  const Tensor queries_f = queries_t.to(at::kFloat).contiguous();
  const float* queries = queries_f.data_ptr<float>();
  const T* keys = keys_t.data_ptr<T>();
  const T* values = values_t.data_ptr<T>();
  const int64_t head_stride = keys_t.stride(0), context_stride = context_t.stride(0);
  const int64_t* context = context_t.data_ptr<int64_t>();
  // Each row's context in chunks of kChunk positions, numbered across rows.
  std::vector<int64_t> first_chunk(rows + 1, 0), chunk_row;
  for (int64_t b = 0; b < rows; ++b) {
    first_chunk[b + 1] = first_chunk[b] + (lengths[b] + kChunk - 1) / kChunk;
    chunk_row.insert(chunk_row.end(), first_chunk[b + 1] - first_chunk[b], b);
  }
  const int64_t chunks = first_chunk[rows];
  // Per (chunk, query head): the chunk's largest score, its sum of exponentials and its
  // sum of values weighted by them (every entry is written before it is read).
  std::vector<float> maxima(chunks * heads), sums(chunks * heads);
  const std::unique_ptr<float[]> weighted(new float[chunks * heads * dim]);
  const float scale = 1.f / std::sqrt(static_cast<float>(dim));
  const ChunkKernel<T> kernel = chunk_kernel<T>(group, dim);
  at::parallel_for(0, chunks * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * kChunk), block(kChunk * dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item / kv_heads, g = item % kv_heads, b = chunk_row[k];
      const int64_t start = (k - first_chunk[b]) * kChunk, count = std::min(lengths[b] - start, kChunk);
      const int64_t* positions = context + b * context_stride + start;
      const float* q = queries + (b * heads + g * group) * dim;  // the group's query heads
      const int64_t slot = k * heads + g * group;  // query head j's partials: slot + j
      kernel(q, group, dim, keys + g * head_stride, values + g * head_stride, positions, count, scale, scores.data(),
             block.data(), &maxima[slot], &sums[slot], &weighted[slot * dim]);
    }
  });
  Tensor out_t = at::empty({rows, heads * dim}, keys_t.options());
  T* out = out_t.data_ptr<T>();
  std::vector<float> merged(dim);
  for (int64_t b = 0; b < rows; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      float top = -INFINITY;
      for (int64_t k = first_chunk[b]; k < first_chunk[b + 1]; ++k) top = std::max(top, maxima[k * heads + h]);
      float total = 0.f;
      std::fill(merged.begin(), merged.end(), 0.f);
      for (int64_t k = first_chunk[b]; k < first_chunk[b + 1]; ++k) {
        const float w = exp_nonpositive(maxima[k * heads + h] - top);
        total += w * sums[k * heads + h];
        const float* acc = &weighted[(k * heads + h) * dim];
        for (int64_t i = 0; i < dim; ++i) merged[i] += w * acc[i];
      }
      T* o = out + (b * heads + h) * dim;
      for (int64_t i = 0; i < dim; ++i) o[i] = static_cast<T>(merged[i] / total);
    }
  }
  return out_t;
}

// ``silu(gate) * up`` of ``gate_up [B, 2F]`` (the fused projection's halves), in its dtype.
Tensor silu_times_up(const Tensor& gate_up) {
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2;
  const Tensor g = gate_up.to(at::kFloat).contiguous();
  Tensor out = at::empty({rows, width}, g.options());
  const float* gp = g.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* gate = gp + r * 2 * width;
    const float* up = gate + width;
    float* o = op + r * width;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      // silu(a) = a / (1 + e^-a), with e^-|a| kept in (0, 1] for any sign of a
      const float a = gate[i];
      const float e = exp_nonpositive(-std::fabs(a));
      const float sigmoid = a >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
      o[i] = a * sigmoid * up[i];
    }
  }
  return out.to(gate_up.scalar_type());
}

}  // namespace

// The hidden states ``x [B, hidden]`` (float32) of B decoding rows through every layer.
// Per layer: norms[2l], norms[2l + 1] (attention, feed-forward; float32) and four linear
// layers 4l..4l+3 (qkv, output, gate-up, down) as (kinds, as, bs, denses). ``cos``/``sin``
// ``[B, head_dim]`` float32 (sin signed); ``keys``/``values [layers, Hkv, slots, D]``.
Tensor decode_layers(Tensor x, const Tensor& cos, const Tensor& sin, const std::vector<Tensor>& norms,
                     const std::vector<int64_t>& kinds, const std::vector<Tensor>& as,
                     const std::vector<Tensor>& bs, const std::vector<Tensor>& denses, const Tensor& keys,
                     const Tensor& values, const Tensor& write, const Tensor& context, const Tensor& lengths,
                     int64_t heads, int64_t kv_heads, double eps, int64_t dense_min_rows) {
  const int64_t layers = static_cast<int64_t>(norms.size()) / 2, rows = x.size(0), dim = cos.size(1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "x must be float32 [rows, hidden]");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, "cos and sin must be float32");
  TORCH_CHECK(cos.size(0) == rows && sin.sizes() == cos.sizes(), "cos and sin must be [rows, head_dim]");
  TORCH_CHECK(dim % 2 == 0, "head_dim must be even");
  TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(kinds.size() == 4 * static_cast<size_t>(layers) && as.size() == kinds.size() &&
                  bs.size() == kinds.size() && denses.size() == kinds.size(), "four linear layers per layer");
  TORCH_CHECK(keys.dim() == 4 && keys.size(0) == layers && keys.size(1) == kv_heads && keys.size(3) == dim &&
                  values.sizes() == keys.sizes(), "keys and values must be [layers, kv_heads, slots, head_dim]");
  TORCH_CHECK(keys.stride(3) == 1 && keys.stride(2) == dim && values.strides() == keys.strides(),
              "keys and values must be contiguous per head");
  TORCH_CHECK(write.scalar_type() == at::kLong && context.scalar_type() == at::kLong &&
                  lengths.scalar_type() == at::kLong, "slots must be int64");
  TORCH_CHECK(write.numel() == rows && lengths.numel() == rows && context.dim() == 2 && context.size(0) == rows &&
                  context.stride(1) == 1, "one write slot, context row and length per row");
  const auto dtype = keys.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "the cache must be float32 or bfloat16");
  const Tensor write_c = write.contiguous(), lengths_c = lengths.contiguous();
  const Tensor cos_c = cos.contiguous(), sin_c = sin.contiguous();
  const int64_t first = consecutive_start(context, lengths_c, keys.size(2));
  x = x.contiguous();
  for (int64_t l = 0; l < layers; ++l) {
    const size_t i = static_cast<size_t>(4 * l);
    const Tensor qkv = linear(rms_norm(x, norms[2 * l], static_cast<float>(eps), dtype), kinds[i], as[i], bs[i],
                              denses[i], dense_min_rows).contiguous();
    TORCH_CHECK(qkv.scalar_type() == dtype && qkv.size(1) == (heads + 2 * kv_heads) * dim,
                "the qkv projection must give (heads + 2 kv_heads) * head_dim values in the cache dtype");
    const Tensor layer_keys = keys[l], layer_values = values[l];
    const Tensor queries =
        dtype == at::kBFloat16
            ? rotate_and_store<c10::BFloat16>(qkv, cos_c, sin_c, layer_keys, layer_values, write_c, heads, kv_heads)
            : rotate_and_store<float>(qkv, cos_c, sin_c, layer_keys, layer_values, write_c, heads, kv_heads);
    const Tensor attended =
        dtype == at::kBFloat16
            ? attend<c10::BFloat16>(queries, layer_keys, layer_values, context, lengths_c, first)
            : attend<float>(queries, layer_keys, layer_values, context, lengths_c, first);
    const Tensor h = x + linear(attended, kinds[i + 1], as[i + 1], bs[i + 1], denses[i + 1], dense_min_rows);
    const Tensor gate_up = linear(rms_norm(h, norms[2 * l + 1], static_cast<float>(eps), dtype), kinds[i + 2],
                                  as[i + 2], bs[i + 2], denses[i + 2], dense_min_rows);
    x = h + linear(silu_times_up(gate_up), kinds[i + 3], as[i + 3], bs[i + 3], denses[i + 3], dense_min_rows);
  }
  return x;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Arguments are converted before the call: the step itself runs without the GIL, so the
  // engine process's other threads (requests, cancellations) are not held up by it.
  m.def("decode_layers", &decode_layers, "Every decoder layer of a decode step (see native_decode.cpp)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
