// Two precision tiers (kernels/lowbit.py, prescore_backend/tiers.py): the tiers' pick on the
// 4-bit key copy and attention over tiles read from the low-bit K/V copy.
#pragma once

// Both tiers of each (row, KV head) from one sparq4 ranking (sparq4_rank in picks.h): marks
// [R, Hkv, M] uint8, 2 = the best take_total[r] eligible tiles, 1 = the best take_exact[r] of
// those (the same order, ties to the lower index, so the exact picks are a subset); sinks and
// window (not eligible) are left 0 for the caller.
torch::Tensor sparq4_tiers_pick_cpu(torch::Tensor q, torch::Tensor kq, torch::Tensor kz,
                                    torch::Tensor bt, torch::Tensor num_tiles,
                                    torch::Tensor take_exact, torch::Tensor take_total,
                                    int64_t NC, int64_t M, int64_t T, int64_t sink,
                                    int64_t window) {
  const Sparq4Copy cp = sparq4_copy(kq, kz, q.size(1), q.size(2), T, NC, "sparq4_tiers_pick_cpu");
  auto marks = torch::zeros({q.size(0), cp.Hkv, M}, torch::dtype(torch::kByte));
  const int64_t* te = take_exact.data_ptr<int64_t>();
  const int64_t* tt = take_total.data_ptr<int64_t>();
  uint8_t* mk = marks.data_ptr<uint8_t>();
  sparq4_rows(cp, q, bt, num_tiles, M, T, sink, window,
              [&](int64_t rh, int64_t r, const v16u_t* uv, int64_t nv, int64_t n, int64_t k) {
                mark_top(uv, nv, n, k, std::min(k, std::max<int64_t>(tt[r], 0)), mk + rh * M, 2);
                mark_top(uv, nv, n, k, std::min(k, std::max<int64_t>(te[r], 0)), mk + rh * M, 1);
              });
  return marks;
}

// 8 codes of `bits` bit planes, one byte per plane (bit i of plane p = bit p of code i), as
// the bytes of a uint64 (byte i = code i): each plane byte spread to 8 bytes by a table.
struct SpreadTable {
  uint64_t t[256];
  SpreadTable() {
    for (int b = 0; b < 256; ++b) {
      uint64_t x = 0;
      for (int i = 0; i < 8; ++i) x |= static_cast<uint64_t>((b >> i) & 1) << (8 * i);
      t[b] = x;
    }
  }
};
static const SpreadTable kSpread;

static inline uint64_t codes8(const uint8_t* planes, int64_t plane_stride, int64_t bits) {
  uint64_t x = 0;
  for (int64_t p = 0; p < bits; ++p) x |= kSpread.t[planes[p * plane_stride]] << p;
  return x;
}

typedef float v8f __attribute__((vector_size(32)));

static inline v8f widen8(uint64_t x) {  // the 8 byte codes as fp32 lanes
#if defined(__AVX2__)
  const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(x))));
  v8f r;
  std::memcpy(&r, &f, 32);
  return r;
#else
  v8f r;
  for (int i = 0; i < 8; ++i) r[i] = static_cast<float>((x >> (8 * i)) & 0xFF);
  return r;
#endif
}

static inline float half_to_float(const c10::Half* p) { return static_cast<float>(*p); }

// Softmax attention of one (row, KV head)'s G query heads over the tiles it reads from the
// copy, online over 8-token chunks. K per (block, channel): q.k = sum_c q_c min_c +
// sum_c (q_c step_c) code_c, so per block the group's query is folded with the scales once and
// a chunk costs D x bits table lookups and D x G fp32 multiply-adds over 8 lanes; V per token:
// o += w step_t code_t + w min_t, the min term kept as one sum per head.
template <int G>
static void lowbit_row(const float* q /* [G, D], scaled */, const uint8_t* kc, const c10::Half* kz,
                       const uint8_t* vc, const c10::Half* vz, const int64_t* btr,
                       const int32_t* tiles, int64_t S, int64_t seq_len, int64_t Hkv, int64_t h,
                       int64_t D, int64_t B, int64_t T, int64_t bits, float* out /* [G, D] */,
                       float* lse /* [G] */) {
  std::vector<float> qs(G * D), o(G * D, 0.f);
  float qmin[G], mx[G], l[G], omin[G];
  for (int g = 0; g < G; ++g) { mx[g] = -INFINITY; l[g] = 0.f; omin[g] = 0.f; }
  int64_t cur = -1;
  const int64_t kblk = D * bits * (B / 8), vblk = B * bits * (D / 8);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t t = tiles[s];
    if (t < 0) continue;
    const int64_t lb = t * T / B, id = btr[lb];
    const uint8_t* kb = kc + (id * Hkv + h) * kblk;
    const uint8_t* vb = vc + (id * Hkv + h) * vblk;
    const c10::Half* vzb = vz + (id * Hkv + h) * B * 2;
    if (id != cur) {  // the block's K scales folded into the group's query
      cur = id;
      const c10::Half* zb = kz + (id * Hkv + h) * 2 * D;
      for (int g = 0; g < G; ++g) {
        float a = 0.f;
        for (int64_t c = 0; c < D; ++c) {
          a += q[g * D + c] * half_to_float(zb + c);
          qs[g * D + c] = q[g * D + c] * half_to_float(zb + D + c);
        }
        qmin[g] = a;
      }
    }
    for (int64_t c0 = (t * T) % B; c0 < (t * T) % B + T; c0 += 8) {  // 8 tokens of the block
      const int64_t pos0 = lb * B + c0;
      if (pos0 >= seq_len) break;
      v8f acc[G];
      for (int g = 0; g < G; ++g) acc[g] = v8f{} + qmin[g];
      const uint8_t* kp = kb + c0 / 8;
      for (int64_t c = 0; c < D; ++c) {
        const v8f cf = widen8(codes8(kp + c * bits * (B / 8), B / 8, bits));
        for (int g = 0; g < G; ++g) acc[g] += qs[g * D + c] * cf;
      }
      const int64_t valid = std::min<int64_t>(8, seq_len - pos0);
      float wv[G][8];
      for (int g = 0; g < G; ++g) {
        float m = mx[g];
        for (int64_t i = 0; i < valid; ++i) m = std::max(m, acc[g][i]);
        const float sc = std::exp(mx[g] - m);  // exp(-inf) = 0 on the first chunk
        mx[g] = m;
        float sum = 0.f;
        for (int64_t i = 0; i < 8; ++i) {
          wv[g][i] = i < valid ? std::exp(acc[g][i] - m) : 0.f;
          sum += wv[g][i];
        }
        l[g] = l[g] * sc + sum;
        omin[g] *= sc;
        float* og = o.data() + g * D;
        for (int64_t c = 0; c < D; ++c) og[c] *= sc;
      }
      for (int64_t i = 0; i < valid; ++i) {
        const float vmin = half_to_float(vzb + (c0 + i) * 2), vstep = half_to_float(vzb + (c0 + i) * 2 + 1);
        const uint8_t* vp = vb + (c0 + i) * bits * (D / 8);
        for (int64_t c = 0; c < D; c += 8) {
          const v8f cf = widen8(codes8(vp + c / 8, D / 8, bits));
          for (int g = 0; g < G; ++g) {
            v8f* og = reinterpret_cast<v8f*>(o.data() + g * D + c);
            v8f x;
            std::memcpy(&x, og, 32);
            x += (wv[g][i] * vstep) * cf;
            std::memcpy(og, &x, 32);
          }
        }
        for (int g = 0; g < G; ++g) omin[g] += wv[g][i] * vmin;
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    if (l[g] > 0.f) {
      const float inv = 1.f / l[g];
      for (int64_t c = 0; c < D; ++c) out[g * D + c] = (o[g * D + c] + omin[g]) * inv;
      lse[g] = mx[g] + std::log(l[g]);
    } else {
      for (int64_t c = 0; c < D; ++c) out[g * D + c] = 0.f;
      lse[g] = -INFINITY;
    }
  }
}

// q [R, Hq, D] fp32; kc [NB, Hkv, D, bits, B/8] and vc [NB, Hkv, B, bits, D/8] uint8; kz
// [NB, Hkv, 2, D] and vz [NB, Hkv, B, 2] fp16; bt [R, MB] int64; seq_lens [R] int64; tiles
// [R, Hkv, S] int32 (-1 pad). -> out [R, Hq, D] fp32, lse [R, Hq] fp32 (-inf where none).
std::vector<torch::Tensor> lowbit_decode_cpu(torch::Tensor q, torch::Tensor kc, torch::Tensor kz,
                                             torch::Tensor vc, torch::Tensor vz, torch::Tensor bt,
                                             torch::Tensor seq_lens, torch::Tensor tiles,
                                             int64_t T, double scale) {
  TORCH_CHECK(kc.dim() == 5 && vc.dim() == 5 && kc.scalar_type() == at::kByte &&
              vc.scalar_type() == at::kByte && kz.scalar_type() == at::kHalf &&
              vz.scalar_type() == at::kHalf && kc.is_contiguous() && vc.is_contiguous() &&
              kz.is_contiguous() && vz.is_contiguous(),
              "lowbit_decode_cpu: codes uint8 [NB, Hkv, D, bits, B/8] / [NB, Hkv, B, bits, D/8], "
              "scales fp16, contiguous");
  const auto qc = as_contig(q, at::kFloat), btc = as_contig(bt, at::kLong),
             slc = as_contig(seq_lens, at::kLong), tc = as_contig(tiles, at::kInt);
  const int64_t R = qc.size(0), Hq = qc.size(1), D = qc.size(2);
  const int64_t Hkv = kc.size(1), bits = kc.size(3), B = kc.size(4) * 8, S = tc.size(2);
  TORCH_CHECK(kc.size(2) == D && vc.size(2) == B && vc.size(3) == bits && vc.size(4) * 8 == D &&
              Hq % Hkv == 0 && tc.size(0) == R && tc.size(1) == Hkv && B % T == 0 && T % 8 == 0 &&
              D % 8 == 0, "lowbit_decode_cpu: shapes of q, the copy and the tiles do not match");
  const int64_t G = Hq / Hkv, MB = btc.size(1);
  auto out = torch::empty({R, Hq, D}, torch::dtype(torch::kFloat));
  auto lse = torch::empty({R, Hq}, torch::dtype(torch::kFloat));
  const float* qp = qc.data_ptr<float>();
  const int64_t* btp = btc.data_ptr<int64_t>();
  const int64_t* sl = slc.data_ptr<int64_t>();
  const int32_t* tp = tc.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, R * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qg(G * D);
    for (int64_t rh = begin; rh < end; ++rh) {
      const int64_t r = rh / Hkv, h = rh % Hkv;
      for (int64_t i = 0; i < G * D; ++i) qg[i] = qp[rh * G * D + i] * sc;
      auto run = [&](auto gc) {
        lowbit_row<decltype(gc)::value>(qg.data(), kc.data_ptr<uint8_t>(), kz.data_ptr<c10::Half>(),
                                        vc.data_ptr<uint8_t>(), vz.data_ptr<c10::Half>(),
                                        btp + r * MB, tp + rh * S, S, sl[r], Hkv, h, D, B, T, bits,
                                        op + rh * G * D, lp + rh * G);
      };
      switch (G) {
        case 1: run(std::integral_constant<int, 1>{}); break;
        case 2: run(std::integral_constant<int, 2>{}); break;
        case 3: run(std::integral_constant<int, 3>{}); break;
        case 4: run(std::integral_constant<int, 4>{}); break;
        case 5: run(std::integral_constant<int, 5>{}); break;
        case 6: run(std::integral_constant<int, 6>{}); break;
        case 7: run(std::integral_constant<int, 7>{}); break;
        case 8: run(std::integral_constant<int, 8>{}); break;
        default: TORCH_CHECK(false, "lowbit_decode_cpu: GQA groups of 1 to 8 heads");
      }
    }
  });
  return {out, lse};
}
