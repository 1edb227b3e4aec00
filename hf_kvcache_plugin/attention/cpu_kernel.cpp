// Fused decode attention on CPU: one pass over a layer's packed codes per (batch, head).
//
// The PyTorch reference (reference.py) computes the same sums with many small
// ops per chunk of tokens; here each packed byte is loaded once, its codes are
// widened in registers and multiplied into float32 accumulators, so a decode
// step reads the quantized bytes and little else. Built once per machine by
// cpu_kernel.py (torch.utils.cpp_extension) and registered as torch.ops.hf_kvcache.*.
//
// Layouts (see blocks.py / quantization.py):
//   keys grouped per channel:  data [B, H, n, G/pb, D] (token-major: byte j of a block's
//                              channel d holds tokens j*pb .. j*pb+pb-1, low bits first),
//                              scale/zero [B, H, n, D]
//   values grouped per token:  data [B, H, n*G, ng, gs/pb] (byte j of group g holds channels
//                              g*gs + j*pb + i), scale/zero [B, H, n*G, ng]
// A code c means c*s + z (asymmetric) or (c - 2^(bits-1))*s (symmetric).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <vector>

namespace {

// 16 lanes in GCC/Clang vector extensions: one AVX-512 register, two AVX2 ones, four SSE ones.
constexpr int kLanes = 16;
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint8_t vbyte __attribute__((vector_size(kLanes)));

template <int BITS>
constexpr int kPerByte = 8 / BITS;
template <int BITS>
constexpr int kMask = (1 << BITS) - 1;
template <int BITS>
constexpr float kSymmetricOffset = float(1 << (BITS - 1));

// 16 bytes widened to 16 int32 lanes. GCC scalarizes __builtin_convertvector from uint8, so the x86
// widening instructions are named where the build has them.
inline vint load_bytes(const uint8_t* p) {
#if defined(__AVX512F__)
  const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  vint out;
  __builtin_memcpy(&out, &w, sizeof(out));
  return out;
#elif defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i lo = _mm256_cvtepu8_epi32(b);
  const __m256i hi = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
  vint out;
  __builtin_memcpy(&out, &lo, sizeof(lo));
  __builtin_memcpy(reinterpret_cast<char*>(&out) + sizeof(lo), &hi, sizeof(hi));
  return out;
#else
  vbyte b;
  __builtin_memcpy(&b, p, sizeof(b));
  return __builtin_convertvector(b, vint);
#endif
}

template <int BITS>
inline vfloat codes_of(vint bytes, int shift) {
  return __builtin_convertvector((bytes >> shift) & kMask<BITS>, vfloat);
}

inline vfloat load_floats(const float* p) {
  vfloat v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline void store_floats(float* p, vfloat v) { __builtin_memcpy(p, &v, sizeof(v)); }

typedef float vfloat8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vfloat4 __attribute__((vector_size(4 * sizeof(float))));

inline float lane_sum(vfloat v) {  // a tree of halves: 4 shuffles and 4 adds
  const vfloat8 h8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                     __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vfloat4 h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
  return (h4[0] + h4[2]) + (h4[1] + h4[3]);
}

// Tokens whose codes are widened together: enough independent sums to hide the FMA latency.
constexpr int kTileTokens = 8;

// scores[bh, m, offset + k*G + t] = sum_d q[bh, m, d] * (code[k, t, d] * s[k, d] + z[k, d])
//                                 = sum_d (q*s)[d] * code[t, d] + (q . z)
// One tensor of a tier's parts (blocks.py): its codes, scales and zeros, and its blocks (keys) or tokens (values).
template <typename S>
struct Part {
  const uint8_t* data;
  const S* scale;
  const S* zero;  // nullptr: symmetric
  int64_t n;
};

template <int BITS, typename S>
void key_scores_kernel(const float* query, const std::vector<Part<S>>& parts, float* scores, int64_t BH, int64_t M,
                       int64_t G, int64_t D, int64_t total, int64_t offset) {
  constexpr int PB = kPerByte<BITS>;
  const int64_t rows_per_block = G / PB;
  const int64_t vec_d = D - D % kLanes;
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(M * D);
    std::vector<float> bias(M);
    std::vector<float> tile(kTileTokens * D);  // widened codes of up to kTileTokens tokens, token-major
    for (int64_t bh = begin; bh < end; ++bh) {
      const float* q = query + bh * M * D;
      int64_t part_offset = offset;
      for (const Part<S>& part : parts) {
      const int64_t n = part.n;
      const uint8_t* data = part.data;
      const S* scale = part.scale;
      const S* zero = part.zero;
      for (int64_t k = 0; k < n; ++k) {
        const S* s = scale + (bh * n + k) * D;
        const S* z = zero == nullptr ? nullptr : zero + (bh * n + k) * D;
        for (int64_t m = 0; m < M; ++m) {
          float b = 0.f;
          float* qsm = qs.data() + m * D;
          for (int64_t d = 0; d < D; ++d) {
            qsm[d] = q[m * D + d] * static_cast<float>(s[d]);
            b += z == nullptr ? -kSymmetricOffset<BITS> * qsm[d] : q[m * D + d] * static_cast<float>(z[d]);
          }
          bias[m] = b;
        }
        const uint8_t* block = data + (bh * n + k) * rows_per_block * D;
        if (M == 1 && vec_d == D) {
          // one query row (no grouped heads): codes go from bytes to sums in registers
          constexpr int R = kTileTokens / PB;  // byte rows per tile
          float* out = scores + bh * total + part_offset + k * G;
          int64_t j0 = 0;
          for (; j0 + R <= rows_per_block; j0 += R) {
            vfloat acc[kTileTokens] = {};
            for (int64_t d = 0; d < D; d += kLanes) {
              const vfloat qv = load_floats(qs.data() + d);
              for (int r = 0; r < R; ++r) {
                const vint bytes = load_bytes(block + (j0 + r) * D + d);
                for (int i = 0; i < PB; ++i) acc[r * PB + i] += qv * codes_of<BITS>(bytes, i * BITS);
              }
            }
            for (int t = 0; t < kTileTokens; ++t) out[j0 * PB + t] = lane_sum(acc[t]) + bias[0];
          }
          for (; j0 < rows_per_block; ++j0) {
            vfloat acc[PB] = {};
            for (int64_t d = 0; d < D; d += kLanes) {
              const vfloat qv = load_floats(qs.data() + d);
              const vint bytes = load_bytes(block + j0 * D + d);
              for (int i = 0; i < PB; ++i) acc[i] += qv * codes_of<BITS>(bytes, i * BITS);
            }
            for (int i = 0; i < PB; ++i) out[j0 * PB + i] = lane_sum(acc[i]) + bias[0];
          }
          continue;
        }
        for (int64_t j0 = 0; j0 < rows_per_block; j0 += kTileTokens / PB) {
          const int64_t rows = std::min<int64_t>(kTileTokens / PB, rows_per_block - j0);
          const int64_t count = rows * PB;
          // widen: token j*PB + i of the tile sits in byte row j at bits i*BITS
          for (int64_t r = 0; r < rows; ++r) {
            const uint8_t* row = block + (j0 + r) * D;
            int64_t d = 0;
            for (; d < vec_d; d += kLanes) {
              const vint bytes = load_bytes(row + d);
              for (int i = 0; i < PB; ++i) store_floats(&tile[(r * PB + i) * D + d], codes_of<BITS>(bytes, i * BITS));
            }
            for (; d < D; ++d) {
              for (int i = 0; i < PB; ++i) tile[(r * PB + i) * D + d] = float((row[d] >> (i * BITS)) & kMask<BITS>);
            }
          }
          for (int64_t m = 0; m < M; ++m) {
            const float* qsm = qs.data() + m * D;
            vfloat acc[kTileTokens] = {};
            int64_t d = 0;
            for (; d < vec_d; d += kLanes) {
              const vfloat qv = load_floats(qsm + d);
              for (int t = 0; t < kTileTokens; ++t) {
                if (t < count) acc[t] += qv * load_floats(&tile[t * D + d]);
              }
            }
            float* out = scores + (bh * M + m) * total + part_offset + k * G + j0 * PB;
            for (int64_t t = 0; t < count; ++t) {
              float sum = lane_sum(acc[t]);
              for (int64_t e = d; e < D; ++e) sum += qsm[e] * tile[t * D + e];
              out[t] = sum + bias[m];
            }
          }
        }
      }
      part_offset += n * G;
      }
    }
  });
}

// out[bh, m, :] += sum_t probs[bh, m, offset + t] * (code[t, :] * s[t, group] + z[t, group])
// The parts are summed in one pass with one set of accumulators, so the result does not depend on how the
// tokens are cut into parts beyond where tiles of TT tokens start (part sizes are multiples of G).
template <int BITS, typename S>
void value_output_kernel(const float* probs, const std::vector<Part<S>>& parts, float* out, int64_t BH, int64_t M,
                         int64_t ng, int64_t gs, int64_t total, int64_t offset) {
  constexpr int PB = kPerByte<BITS>;
  const int64_t bytes_per_group = gs / PB;
  const int64_t vec_j = bytes_per_group - bytes_per_group % kLanes;
  const int64_t dv = ng * gs;
  constexpr int TT = 4;  // tokens folded into each accumulator update (one load/store per TT tokens)
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    // accumulators part-major ([m][group][i][j] for channel group*gs + j*PB + i): contiguous inner loops
    std::vector<float> acc(M * dv);
    std::vector<float> bias(M * ng);
    std::vector<float> w(M * ng * TT);  // probability x scale, per row, group and token of the tile
    for (int64_t bh = begin; bh < end; ++bh) {
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(bias.begin(), bias.end(), 0.f);
      const float* p = probs + bh * M * total + offset;
      for (const Part<S>& part : parts) {
      const int64_t tokens = part.n;
      const uint8_t* data = part.data;
      const S* scale = part.scale;
      const S* zero = part.zero;
      for (int64_t t0 = 0; t0 < tokens; t0 += TT) {
        const int64_t count = std::min<int64_t>(TT, tokens - t0);
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t g = 0; g < ng; ++g) {
            for (int64_t u = 0; u < TT; ++u) {
              float wu = 0.f;
              if (u < count) {
                const int64_t t = t0 + u;
                const float pm = p[m * total + t];
                wu = pm * static_cast<float>(scale[(bh * tokens + t) * ng + g]);
                bias[m * ng + g] += zero == nullptr ? -kSymmetricOffset<BITS> * wu
                                                    : pm * static_cast<float>(zero[(bh * tokens + t) * ng + g]);
              }
              w[(m * ng + g) * TT + u] = wu;
            }
          }
        }
        const uint8_t* rows = data + (bh * tokens + t0) * ng * bytes_per_group;
        const int64_t row_bytes = ng * bytes_per_group;
        for (int64_t g = 0; g < ng; ++g) {
          int64_t j = 0;
          for (; j < vec_j; j += kLanes) {
            vint bytes[TT];
            for (int u = 0; u < TT; ++u) {
              // a short tile reads its last token again, with weight 0
              bytes[u] = load_bytes(rows + std::min<int64_t>(u, count - 1) * row_bytes + g * bytes_per_group + j);
            }
            for (int i = 0; i < PB; ++i) {
              vfloat codes[TT];
              for (int u = 0; u < TT; ++u) codes[u] = codes_of<BITS>(bytes[u], i * BITS);
              for (int64_t m = 0; m < M; ++m) {
                const float* wm = &w[(m * ng + g) * TT];
                float* a = acc.data() + (m * ng + g) * gs + i * bytes_per_group + j;
                vfloat v = load_floats(a);
                for (int u = 0; u < TT; ++u) v += wm[u] * codes[u];
                store_floats(a, v);
              }
            }
          }
          for (; j < bytes_per_group; ++j) {
            for (int64_t u = 0; u < count; ++u) {
              const uint8_t byte = rows[u * row_bytes + g * bytes_per_group + j];
              for (int i = 0; i < PB; ++i) {
                const float code = float((byte >> (i * BITS)) & kMask<BITS>);
                for (int64_t m = 0; m < M; ++m) {
                  acc[(m * ng + g) * gs + i * bytes_per_group + j] += w[(m * ng + g) * TT + u] * code;
                }
              }
            }
          }
        }
      }
      p += tokens;
      }
      float* o = out + bh * M * dv;
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t g = 0; g < ng; ++g) {
          const float* a = acc.data() + (m * ng + g) * gs;
          float* og = o + m * dv + g * gs;
          const float b = bias[m * ng + g];
          for (int i = 0; i < PB; ++i) {
            for (int64_t j = 0; j < bytes_per_group; ++j) {
              og[j * PB + i] += a[i * bytes_per_group + j] + b;
            }
          }
        }
      }
    }
  });
}

void check_common(const at::Tensor& data, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                  int64_t bits) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "hf_kvcache: bits has to be 2, 4 or 8 but got ", bits);
  TORCH_CHECK(data.device().is_cpu() && data.scalar_type() == at::kByte && data.is_contiguous(),
              "hf_kvcache: codes have to be a contiguous uint8 CPU tensor");
  TORCH_CHECK(scale.is_contiguous(), "hf_kvcache: scales have to be contiguous");
  if (zero.has_value()) {
    TORCH_CHECK(zero->is_contiguous() && zero->scalar_type() == scale.scalar_type() && zero->sizes() == scale.sizes(),
                "hf_kvcache: zeros have to be contiguous and match the scales' shape and dtype");
  }
}

template <typename F>
void dispatch_bits(int64_t bits, F&& f) {
  if (bits == 2) {
    f(std::integral_constant<int, 2>{});
  } else if (bits == 4) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 8>{});
  }
}

template <typename S>
Part<S> part_of(const at::Tensor& data, const at::Tensor& scale, const c10::optional<at::Tensor>& zero, int64_t n) {
  return Part<S>{data.data_ptr<uint8_t>(), scale.data_ptr<S>(), zero.has_value() ? zero->data_ptr<S>() : nullptr, n};
}

// One part's codes, scales and zeros in the layout the kernels read.
// Keys of one part as the kernel reads them: data [B, H, n, G/pb, D], scale/zero [B, H, n, D]. A QuantizedTensor's
// channel-grouped keys ([B, H, n, D, 1, G/pb] data, [B, H, n, D, 1] scale) are a permuted view of that memory.
struct PartTensors {
  at::Tensor data, scale;
  c10::optional<at::Tensor> zero;
  int64_t tokens = 0;  // values: tokens of the part
};

// True when `t` [B, H, n, D, 1, R] is the permuted view of contiguous [B, H, n, R, D] memory (keys as stored).
bool token_major(const at::Tensor& t) {
  if (t.dim() != 6 || t.size(4) != 1) return false;
  const int64_t D = t.size(3), R = t.size(5);
  int64_t expected = D * R;
  if (t.stride(3) != 1 || (R > 1 && t.stride(5) != D) || (t.size(2) > 1 && t.stride(2) != expected)) return false;
  expected *= t.size(2);
  if (t.size(1) > 1 && t.stride(1) != expected) return false;
  expected *= t.size(1);
  return t.size(0) == 1 || t.stride(0) == expected;
}

PartTensors key_tensors(const at::Tensor& data, const at::Tensor& scale, const c10::optional<at::Tensor>& zero) {
  if (data.dim() == 6 && token_major(data) && scale.is_contiguous() && (!zero.has_value() || zero->is_contiguous())) {
    // keys as stored: read in place, without building views (a long history has many parts)
    return {data, scale, zero};
  }
  if (data.dim() == 6) {
    TORCH_CHECK(data.size(4) == 1 && scale.dim() == 5 && scale.size(4) == 1,
                "hf_kvcache: grouped key codes have to be [B, H, n, D, 1, G/pb] with scales [B, H, n, D, 1]");
    c10::optional<at::Tensor> z;
    if (zero.has_value()) z = zero->squeeze(-1).contiguous();
    // contiguous(): a no-op for blocks as stored; a batch selection may have copied them in the logical order
    return {data.squeeze(-2).transpose(-1, -2).contiguous(), scale.squeeze(-1).contiguous(), z};
  }
  return {data, scale, zero};
}

// query [B, H, M, D] f32; per part: data [B, H, n, G/pb, D] (or the grouped view), scale/zero [B, H, n, D];
// scores [B, H, M, T] f32, written at offset .. offset + sum(n) * G
void key_scores_parts(const at::Tensor& query, at::TensorList data, at::TensorList scale, at::TensorList zero,
                      int64_t bits, at::Tensor& scores, int64_t offset) {
  TORCH_CHECK(query.dim() == 4 && query.scalar_type() == at::kFloat && query.is_contiguous(),
              "hf_kvcache: the query has to be a contiguous float32 [B, H, M, D] tensor");
  TORCH_CHECK(scores.dim() == 4 && scores.scalar_type() == at::kFloat && scores.is_contiguous(),
              "hf_kvcache: scores have to be a contiguous float32 [B, H, M, T] tensor");
  TORCH_CHECK(!data.empty() && scale.size() == data.size() && (zero.empty() || zero.size() == data.size()),
              "hf_kvcache: key parts need as many scales (and zeros, or none) as codes");
  const int64_t B = query.size(0), H = query.size(1), M = query.size(2), D = query.size(3), T = scores.size(3);
  TORCH_CHECK(scores.size(0) == B && scores.size(1) == H && scores.size(2) == M,
              "hf_kvcache: scores ", scores.sizes(), " do not match the query ", query.sizes());
  std::vector<PartTensors> parts;
  int64_t G = 0, tokens = 0;
  for (size_t i = 0; i < data.size(); ++i) {
    c10::optional<at::Tensor> z;
    if (!zero.empty()) z = zero[i];
    PartTensors k = key_tensors(data[i], scale[i], z);
    const bool in_place = k.data.dim() == 6;  // [B, H, n, D, 1, G/pb] over token-major memory
    TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "hf_kvcache: bits has to be 2, 4 or 8 but got ", bits);
    TORCH_CHECK(k.data.device().is_cpu() && k.data.scalar_type() == at::kByte,
                "hf_kvcache: codes have to be a uint8 CPU tensor");
    if (!in_place) check_common(k.data, k.scale, k.zero, bits);
    TORCH_CHECK(in_place || k.data.dim() == 5, "hf_kvcache: key codes have to be [B, H, n, G/pb, D]");
    const int64_t n = k.data.size(2), g = (in_place ? k.data.size(5) : k.data.size(3)) * (8 / bits);
    const int64_t width = in_place ? k.data.size(3) : k.data.size(4);
    const int64_t scale_dims = in_place ? 5 : 4;
    TORCH_CHECK(i == 0 || g == G, "hf_kvcache: key parts have different group sizes");
    TORCH_CHECK(k.scale.scalar_type() == scale[0].scalar_type(), "hf_kvcache: key parts have different scale dtypes");
    G = g;
    TORCH_CHECK(k.data.size(0) == B && k.data.size(1) == H && width == D,
                "hf_kvcache: key codes ", k.data.sizes(), " do not match the query ", query.sizes());
    TORCH_CHECK(k.scale.dim() == scale_dims && k.scale.size(0) == B && k.scale.size(1) == H && k.scale.size(2) == n &&
                    k.scale.size(3) == D && (!in_place || k.scale.size(4) == 1),
                "hf_kvcache: key scales have to be [B, H, n, D]");
    TORCH_CHECK(!k.zero.has_value() || (k.zero->sizes() == k.scale.sizes() &&
                                        k.zero->scalar_type() == k.scale.scalar_type()),
                "hf_kvcache: zeros have to match the scales' shape and dtype");
    tokens += n * G;
    parts.push_back(std::move(k));
  }
  TORCH_CHECK(offset >= 0 && offset + tokens <= T, "hf_kvcache: scores ", scores.sizes(), " cannot hold ", tokens,
              " tokens at offset ", offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, parts[0].scale.scalar_type(), "key_scores", [&] {
    std::vector<Part<scalar_t>> raw;
    for (const PartTensors& k : parts) raw.push_back(part_of<scalar_t>(k.data, k.scale, k.zero, k.data.size(2)));
    dispatch_bits(bits, [&](auto b) {
      key_scores_kernel<decltype(b)::value, scalar_t>(query.data_ptr<float>(), raw, scores.data_ptr<float>(), B * H,
                                                       M, G, D, T, offset);
    });
  });
}

// probs [B, H, M, T] f32; per part: data [B, H, tokens, ng, gs/pb] (or [B, H, n, G, ng, gs/pb]),
// scale/zero [B, H, tokens, ng] (or [B, H, n, G, ng]); out [B, H, M, ng*gs] f32 += the parts' sum
void value_output_parts(const at::Tensor& probs, int64_t offset, at::TensorList data, at::TensorList scale,
                        at::TensorList zero, int64_t bits, at::Tensor& out) {
  TORCH_CHECK(probs.dim() == 4 && probs.scalar_type() == at::kFloat && probs.is_contiguous(),
              "hf_kvcache: probabilities have to be a contiguous float32 [B, H, M, T] tensor");
  TORCH_CHECK(out.dim() == 4 && out.scalar_type() == at::kFloat && out.is_contiguous(),
              "hf_kvcache: the output has to be a contiguous float32 [B, H, M, Dv] tensor");
  TORCH_CHECK(!data.empty() && scale.size() == data.size() && (zero.empty() || zero.size() == data.size()),
              "hf_kvcache: value parts need as many scales (and zeros, or none) as codes");
  const int64_t B = probs.size(0), H = probs.size(1), M = probs.size(2), T = probs.size(3);
  std::vector<PartTensors> parts;
  int64_t ng = 0, gs = 0, tokens = 0;
  for (size_t i = 0; i < data.size(); ++i) {
    at::Tensor d = data[i], s = scale[i];
    c10::optional<at::Tensor> z;
    if (!zero.empty()) z = zero[i];
    int64_t part_tokens = d.dim() == 6 ? d.size(2) * d.size(3) : d.size(2);
    const bool in_place = d.dim() == 6 && d.is_contiguous() && s.is_contiguous() && (!z.has_value() || z->is_contiguous());
    if (d.dim() == 6 && !in_place) {  // blocks [B, H, n, G, ...] -> tokens [B, H, n*G, ...]
      d = d.flatten(2, 3).contiguous();
      s = s.flatten(2, 3).contiguous();
      if (z.has_value()) z = z->flatten(2, 3).contiguous();
    }
    check_common(d, s, z, bits);
    TORCH_CHECK(d.dim() == (in_place ? 6 : 5), "hf_kvcache: value codes have to be [B, H, tokens, ng, gs/pb]");
    const int64_t shift = in_place ? 1 : 0;  // [B, H, n, G, ng, gs/pb] read as [B, H, n*G, ng, gs/pb]
    TORCH_CHECK(i == 0 || (d.size(3 + shift) == ng && d.size(4 + shift) * (8 / bits) == gs),
                "hf_kvcache: value parts have different channel groups");
    TORCH_CHECK(s.scalar_type() == scale[0].scalar_type(), "hf_kvcache: value parts have different scale dtypes");
    ng = d.size(3 + shift);
    gs = d.size(4 + shift) * (8 / bits);
    TORCH_CHECK(d.size(0) == B && d.size(1) == H, "hf_kvcache: value codes ", d.sizes(),
                " do not match the probabilities ", probs.sizes());
    TORCH_CHECK(s.dim() == 4 + shift && s.size(0) == B && s.size(1) == H && s.numel() == B * H * part_tokens * ng &&
                    s.size(3 + shift) == ng,
                "hf_kvcache: value scales have to be [B, H, tokens, ng]");
    tokens += part_tokens;
    parts.push_back({d, s, z, part_tokens});
  }
  TORCH_CHECK(out.size(0) == B && out.size(1) == H && out.size(2) == M && out.size(3) == ng * gs,
              "hf_kvcache: the output ", out.sizes(), " does not match ", ng * gs, " value channels");
  TORCH_CHECK(offset >= 0 && offset + tokens <= T, "hf_kvcache: ", tokens, " tokens at offset ", offset,
              " exceed the ", T, " probabilities");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, parts[0].scale.scalar_type(), "value_output", [&] {
    std::vector<Part<scalar_t>> raw;
    for (const PartTensors& v : parts) raw.push_back(part_of<scalar_t>(v.data, v.scale, v.zero, v.tokens));
    dispatch_bits(bits, [&](auto b) {
      value_output_kernel<decltype(b)::value, scalar_t>(probs.data_ptr<float>(), raw, out.data_ptr<float>(), B * H,
                                                         M, ng, gs, T, offset);
    });
  });
}

}  // namespace

TORCH_LIBRARY(hf_kvcache, m) {
  m.def("key_scores_parts(Tensor query, Tensor[] data, Tensor[] scale, Tensor[] zero, int bits, Tensor(a!) scores, "
        "int offset) -> ()");
  m.def("value_output_parts(Tensor probs, int offset, Tensor[] data, Tensor[] scale, Tensor[] zero, int bits, "
        "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(hf_kvcache, CPU, m) {
  m.impl("key_scores_parts", &key_scores_parts);
  m.impl("value_output_parts", &value_output_parts);
}
