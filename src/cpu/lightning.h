#pragma once
// Lightning (linear) attention of one head of one sequence (DESIGN.md §1):
//   o_t = sum_{j<=t} exp(-s (t-j)) (q_t . k_j) v_j,  state S (d x d) carried across calls.
// Rows of q, k and v are `stride` floats apart (they sit inside the per-head qkv layout).

#include <cstdint>

namespace m1::cpu {

struct LightningHead {
  const float* q;
  const float* k;
  const float* v;
  int64_t stride;  // floats between consecutive tokens of q, k, v
  float* out;      // count rows of d floats
  int64_t out_stride;
  int64_t count;   // tokens
  int64_t d;
  float decay;     // s
  float* state;    // d x d, row a holds S[a][:], updated in place
};

// Chunked form in blocks of `block` tokens: per block, O = (Q*qdec) S + ((Q K^T) * D) V, then
// S <- exp(-s B) S + (K*kdec)^T V, each product on the register-tiled kernels. Linear in count.
void lightning_chunked(const LightningHead& h, int64_t block);
// One token: S <- exp(-s) S + k^T v and o = q S in a single pass over S.
void lightning_decode_token(const LightningHead& h);
// The oracle: the recurrent form token by token, in double.
void lightning_reference(const LightningHead& h);

constexpr int64_t kLightningBlock = 64;

// The CPU backend's kernel for one head of one segment: the oracle when reference kernels are
// asked for, else the decode pass for one token and the chunked form in kLightningBlock blocks.
void lightning_head(const LightningHead& h, bool reference);

}  // namespace m1::cpu
