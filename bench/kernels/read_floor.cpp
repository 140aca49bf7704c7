// Memory floor readers of bench/kernels/read_floor.py (bench only, not part of the package).
#include <torch/extension.h>
#include <immintrin.h>

// 16-token chunks of one (row, KV head)'s selected tiles: K one run of D/2 lines, V D/16 runs
// of 8 lines B*32 bytes apart (vLLM's "amx" packing).
struct Cur {
  const int32_t* tl; int64_t S, T, L, B; const int32_t* btr; int64_t si = 0, c0 = 0;
  bool next(int64_t& blk, int64_t& off) {
    while (si < S) {
      const int64_t t = tl[si], tok = t * T + c0;
      if (t < 0 || c0 >= T || tok >= L) { ++si; c0 = 0; continue; }
      blk = btr[tok / B]; off = tok % B; c0 += 16; return true;
    }
    return false;
  }
};

static inline __m512i ldl(const char* p) { return _mm512_loadu_si512(p); }

double read_selected_amx(torch::Tensor k, torch::Tensor v, torch::Tensor bt, torch::Tensor seq_lens,
                         torch::Tensor tiles, int64_t T) {
  // k, v: [NB, Hkv, B, D] bf16 views (packed order); bt [R, nblk] int32; tiles [R, Hkv, S] int32
  const char* kb = reinterpret_cast<const char*>(k.data_ptr());
  const char* vb = reinterpret_cast<const char*>(v.data_ptr());
  const int64_t ks0 = k.stride(0) * 2, ks1 = k.stride(1) * 2, vs0 = v.stride(0) * 2, vs1 = v.stride(1) * 2;
  const int64_t R = tiles.size(0), H = tiles.size(1), S = tiles.size(2), B = k.size(2), D = k.size(3);
  const int32_t* tl = tiles.data_ptr<int32_t>();
  const int32_t* btp = bt.data_ptr<int32_t>();
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  __m512i acc = _mm512_setzero_si512();
  for (int64_t rh = 0; rh < R * H; ++rh) {
    const int64_t r = rh / H, h = rh % H;
    Cur cur{tl + rh * S, S, T, sl[r], B, btp + r * bt.stride(0)}, ahead = cur, far = cur;
    const char* kh = kb + h * ks1;
    const char* vh = vb + h * vs1;
    auto touch = [&] {
      int64_t blk, off;
      if (!far.next(blk, off)) return;
      const char* k2 = kh + blk * ks0 + off * D * 2;
      const char* v2 = vh + blk * vs0 + off * 32;
      __builtin_prefetch(k2, 0, 2); __builtin_prefetch(k2 + 64, 0, 2);
      for (int64_t d0 = 0; d0 < D; d0 += 16) {
        __builtin_prefetch(v2 + d0 * B * 2, 0, 2); __builtin_prefetch(v2 + d0 * B * 2 + 64, 0, 2);
      }
    };
    for (int i = 0; i < 6; ++i) touch();
    const char *kf = nullptr, *vf = nullptr;
    int64_t blk, off;
    if (ahead.next(blk, off)) {  // the first chunk: prefetched at once
      const char* k2 = kh + blk * ks0 + off * D * 2;
      const char* v2 = vh + blk * vs0 + off * 32;
      for (int64_t o = 0; o < D * 32; o += 64) __builtin_prefetch(k2 + o, 0, 3);
      for (int64_t d0 = 0; d0 < D; d0 += 16)
        for (int64_t o = 0; o < 512; o += 64) __builtin_prefetch(v2 + d0 * B * 2 + o, 0, 3);
    }
    auto advance = [&] {
      int64_t b2, o2;
      if (ahead.next(b2, o2)) { kf = kh + b2 * ks0 + o2 * D * 2; vf = vh + b2 * vs0 + o2 * 32; }
      else kf = vf = nullptr;
    };
    advance();
    while (cur.next(blk, off)) {
      touch();
      const char* kp = kh + blk * ks0 + off * D * 2;
      const char* vp = vh + blk * vs0 + off * 32;
      for (int64_t o = 0; o < D * 32; o += 64) {
        if (kf) __builtin_prefetch(kf + o, 0, 3);
        acc = _mm512_add_epi32(acc, ldl(kp + o));
      }
      for (int64_t d0 = 0; d0 < D; d0 += 16)
        for (int64_t o = 0; o < 512; o += 64) {
          if (vf) __builtin_prefetch(vf + d0 * B * 2 + o, 0, 3);
          acc = _mm512_add_epi32(acc, ldl(vp + d0 * B * 2 + o));
        }
      advance();
    }
  }
  return static_cast<double>(_mm512_reduce_add_epi32(acc));
}

double read_all_amx(torch::Tensor k, torch::Tensor v, torch::Tensor bt, torch::Tensor seq_lens) {
  // every block of every row in block-table order, K then V of each KV head
  const char* kb = reinterpret_cast<const char*>(k.data_ptr());
  const char* vb = reinterpret_cast<const char*>(v.data_ptr());
  const int64_t ks0 = k.stride(0) * 2, ks1 = k.stride(1) * 2, vs0 = v.stride(0) * 2, vs1 = v.stride(1) * 2;
  const int64_t R = bt.size(0), H = k.size(1), B = k.size(2), D = k.size(3);
  const int32_t* btp = bt.data_ptr<int32_t>();
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  __m512i acc = _mm512_setzero_si512();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j * B < sl[r]; ++j) {
      const int64_t blk = btp[r * bt.stride(0) + j];
      for (int64_t h = 0; h < H; ++h) {
        const char* kp = kb + blk * ks0 + h * ks1;
        const char* vp = vb + blk * vs0 + h * vs1;
        for (int64_t o = 0; o < B * D * 2; o += 64) acc = _mm512_add_epi32(acc, ldl(kp + o));
        for (int64_t o = 0; o < B * D * 2; o += 64) acc = _mm512_add_epi32(acc, ldl(vp + o));
      }
    }
  return static_cast<double>(_mm512_reduce_add_epi32(acc));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("read_selected_amx", &read_selected_amx, "read_selected_amx");
  m.def("read_all_amx", &read_all_amx, "read_all_amx");
}
