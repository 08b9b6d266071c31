/* bf16 matrix products on AVX512-BF16; see bf16.h for the contract and
 * doc/DECISIONS.md ("bf16 matrix products") for why the library has its
 * own kernel.
 *
 * The blocking is a BLAS's (Goto, BLIS): for each NC-column block of C and
 * each KC-deep slice of the sum, a block of op(B) is rounded to bf16 and
 * packed into panels of NR = 64 columns; for each MC-row block of C, the
 * matching block of op(A) is rounded and laid out for broadcasting; then a
 * micro-kernel keeps an MR x NR tile of C in 24 registers while it runs
 * down the slice.  VDPBF16PS multiplies pairs of bf16 along the sum and
 * adds both products to a float32 lane, so both operands are stored as
 * 32-bit words, each holding the pair (k even, k odd) of one row or column:
 * op(B) as [k pair][column], op(A) as [row][k pair] or [k pair][row],
 * whichever its memory order gives without a transpose.  Odd sums and the
 * edges of C are padded with zeros, which add nothing. */
#include "bf16.h"
#include "internal.h"
#include "kernels.h"
#include "team.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* The context and one single-thread context per team member (its scratch
 * region and work floats, for tasks); then, each from the next 64-byte
 * boundary on, the team, the scratch regions and the members' work
 * floats. */
#define CTX_ALIGN 64
#define CTX_HEAD (sizeof(k_ctx) * (1 + IMML_BF16_THREADS_MAX))

static unsigned char *align_up(unsigned char *p) {
  return p + (CTX_ALIGN - (uintptr_t)p % CTX_ALIGN) % CTX_ALIGN;
}

/* Work floats of one member, rounded up to whole 64-byte lines. */
static size_t work_round(size_t work_floats) {
  return (work_floats + 15) / 16 * 16;
}

size_t imml_bf16_ctx_bytes(size_t work_floats) {
  const size_t work =
      work_round(work_floats) * sizeof(float) * IMML_BF16_THREADS_MAX;
  return CTX_HEAD + CTX_ALIGN + sizeof(imml_team) + CTX_ALIGN +
         imml_bf16_scratch_bytes() + work;
}

struct k_ctx *imml_bf16_ctx_create(const imml_allocator *alloc,
                                   size_t work_floats) {
  if (work_floats > SIZE_MAX / 4 / sizeof(float) / IMML_BF16_THREADS_MAX)
    return NULL;
  unsigned char *block = imml_alloc(alloc, imml_bf16_ctx_bytes(work_floats));
  if (!block)
    return NULL;
  k_ctx *ctx = (k_ctx *)(void *)block;
  k_ctx *solo = ctx + 1;
  imml_team *team = (imml_team *)(void *)align_up(block + CTX_HEAD);
  if (imml_team_init(team) != 0) {
    imml_free(alloc, block);
    return NULL;
  }
  unsigned char *scratch = align_up((unsigned char *)(team + 1));
  float *work = (float *)(void *)(scratch + imml_bf16_scratch_bytes());
  const size_t per = work_round(work_floats);
  for (int i = 0; i < IMML_BF16_THREADS_MAX; i++)
    solo[i] = (k_ctx){.bf16 = 1,
                      .start_min_macs = IMML_BF16_START_MIN_MACS,
                      .part_min_macs = IMML_BF16_PART_MIN_MACS,
                      .scratch = scratch + (size_t)i * imml_bf16_region_bytes(),
                      .work = work + (size_t)i * per,
                      .work_floats = work_floats,
                      .block = block};
  *ctx = solo[0];
  ctx->team = team;
  ctx->solo = solo;
  return ctx;
}

void imml_bf16_ctx_end(struct k_ctx *ctx) {
  if (ctx)
    imml_team_end(ctx->team);
}

void imml_bf16_ctx_free(const imml_allocator *alloc, struct k_ctx *ctx) {
  if (ctx) {
    imml_team_destroy(ctx->team);
    imml_free(alloc, ctx->block);
  }
}

double imml_bf16_part_min(const struct k_ctx *ctx) {
  /* without running helpers a split pays for starting them */
  return ctx->team && imml_team_running(ctx->team) ? ctx->part_min_macs
                                                   : ctx->start_min_macs;
}

/* A task's member indexes the single-thread contexts. */
_Static_assert(IMML_TEAM_MAX <= IMML_BF16_THREADS_MAX,
               "a team member without a context of its own");

typedef struct task_call {
  k_task_fn fn;
  void *arg;
  k_ctx *solo;
} task_call;

static void task_part(void *arg, int part, int member) {
  const task_call *t = arg;
  t->fn(t->arg, part, &t->solo[member]);
}

void imml_bf16_tasks(struct k_ctx *ctx, int threads, int parts,
                     void (*fn)(void *arg, int part, struct k_ctx *solo),
                     void *arg) {
  task_call t = {fn, arg, ctx->solo};
  imml_team_run(ctx->team, threads, parts, task_part, &t);
}

/* Software rounding: the tests' reference, and the conversion's contract.
 * Like VCVTNE2PS2BF16: nearest even, subnormal inputs read as zero, NaN
 * stays (a quiet) NaN. */
float imml_bf16_round(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  if ((u & 0x7f800000u) == 0) {
    u &= 0x80000000u; /* zero or subnormal: signed zero */
  } else if ((u & 0x7f800000u) == 0x7f800000u) {
    if (u & 0x007fffffu)
      u = (u | 0x00400000u) & 0xffff0000u; /* NaN: quiet, payload's top */
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
  }
  float y;
  memcpy(&y, &u, sizeof y);
  return y;
}

#if defined(IMML_HAVE_BF16_KERNEL)

#include <cpuid.h>
#include <immintrin.h>

#define BF16_TARGET                                                            \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

enum {
  MR = 6,      /* rows of the micro-tile */
  NR = 64,     /* columns of the micro-tile: 4 vectors of 16 floats */
  KC = 256,    /* depth of a slice (even) */
  KP = KC / 2, /* k pairs of a slice */
  MC = 96,     /* rows of an A block: a multiple of MR and of 16 */
  NC = 512,    /* columns of a B block: a multiple of NR */
  A_WORDS = MC * KP,
  B_WORDS = NC * KP,
  /* one thread's region: the A block, then the B block */
  REGION = (A_WORDS + B_WORDS) * 4
};

size_t imml_bf16_scratch_bytes(void) {
  return (size_t)REGION * IMML_BF16_THREADS_MAX;
}

size_t imml_bf16_region_bytes(void) { return REGION; }

/* XCR0: the operating system saves the SSE, AVX and the three AVX-512
 * register states (opmask, upper halves of zmm0-15, zmm16-31). */
static uint64_t xcr0(void) {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((uint64_t)hi << 32) | lo;
}

int imml_bf16_supported(char *why, size_t n) {
  unsigned a, b, c, d;
  const char *miss = NULL;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27)))
    miss = "the CPU reports no OSXSAVE";
  else if ((xcr0() & 0xe6u) != 0xe6u)
    miss = "the operating system does not enable the AVX-512 registers";
  else if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(b & (1u << 16)) ||
           !(b & (1u << 17)) || !(b & (1u << 30)) || !(b & (1u << 31)))
    miss = "the CPU lacks AVX-512 (F, DQ, BW and VL)";
  else if (a < 1 || /* leaf 7's highest subleaf */
           !__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5)))
    miss = "the CPU lacks AVX512-BF16 (avx512_bf16 in /proc/cpuinfo)";
  if (miss) {
    if (why && n)
      snprintf(why, n, "%s", miss);
    return 0;
  }
  return 1;
}

/* (x0[i], x1[i]) as 16 words, from 16 floats of each of two rows. */
BF16_TARGET static inline __m512i pair_rows(__m512 x0, __m512 x1) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11,
                                       26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21,
                                       5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i v = (__m512i)_mm512_cvtne2ps_pbh(x1, x0); /* x0 low, x1 high */
  return _mm512_permutexvar_epi16(idx, v);
}

/* The first `cnt` (0..16) lanes. */
static inline __mmask16 lanes(int cnt) {
  return cnt >= 16 ? (__mmask16)0xffff
                   : (__mmask16)((1u << (cnt > 0 ? cnt : 0)) - 1u);
}

/* Words (k pair p, 16 columns from col) of rows k0 + 2p and k0 + 2p + 1 of
 * a row-major matrix whose rows run along the sum; columns past `cols` and
 * a second row past `kc` read as zero. */
BF16_TARGET static inline __m512i pair_words(const float *x, size_t ld, int p,
                                             int kc, int col, int cols) {
  if (cols <= col)
    return _mm512_setzero_si512();
  const __mmask16 mk = lanes(cols - col);
  const float *r0 = x + (size_t)(2 * p) * ld + col;
  const __m512 x0 = _mm512_maskz_loadu_ps(mk, r0);
  const __m512 x1 =
      2 * p + 1 < kc ? _mm512_maskz_loadu_ps(mk, r0 + ld) : _mm512_setzero_ps();
  return pair_rows(x0, x1);
}

/* 16 words (k pairs p0 .. p0+15) of one row that runs along the sum, from
 * element 2 p0 on, with elements past kc zero. */
BF16_TARGET static inline __m512i row_words(const float *row, int p0, int kc) {
  const int k = 2 * p0;
  const __m512 lo = _mm512_maskz_loadu_ps(lanes(kc - k), row + k);
  const __m512 hi = _mm512_maskz_loadu_ps(lanes(kc - k - 16), row + k + 16);
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

/* In-register transpose of a 16 x 16 matrix of 32-bit words. */
BF16_TARGET static void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; i++) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  /* u[4i + c], 128-bit lane L: column 4L + c of rows 4i .. 4i+3 */
  for (int i = 0; i < 4; i++) {
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; c++) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
    const __m512i v1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i v2 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xee);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xee);
    r[c] = _mm512_shuffle_i32x4(v0, v1, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(v0, v1, 0xdd);
    r[8 + c] = _mm512_shuffle_i32x4(v2, v3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(v2, v3, 0xdd);
  }
}

/* Packs op(B)[k0 .. k0+kc) x [j0 .. j0+nc) into panels of NR columns:
 * word (q, p, j) at bs[q KP NR + p NR + j].  tb = 0: b is (kk, n), rows
 * along the sum; tb = 1: b is (n, kk), op(B) its transpose. */
BF16_TARGET static void pack_b(int tb, const float *b, size_t ldb, int k0,
                               int kc, int j0, int nc, uint32_t *bs) {
  const int kp = (kc + 1) / 2;
  for (int q = 0; q * NR < nc; q++) {
    uint32_t *panel = bs + (size_t)q * KP * NR;
    const int cols = nc - q * NR; /* columns of this panel that exist */
    if (!tb) {
      const float *x = b + (size_t)k0 * ldb + j0 + q * NR;
      for (int p = 0; p < kp; p++)
        for (int v = 0; v < NR / 16; v++)
          _mm512_store_si512(panel + (size_t)p * NR + 16 * v,
                             pair_words(x, ldb, p, kc, 16 * v, cols));
    } else {
      for (int v = 0; v < NR / 16; v++) {
        const int jv = q * NR + 16 * v; /* first column of the group */
        for (int p0 = 0; p0 < kp; p0 += 16) {
          __m512i r[16];
          for (int jj = 0; jj < 16; jj++)
            r[jj] =
                jv + jj < nc
                    ? row_words(b + (size_t)(j0 + jv + jj) * ldb + k0, p0, kc)
                    : _mm512_setzero_si512();
          transpose16(r);
          const int np = kp - p0 < 16 ? kp - p0 : 16;
          for (int pp = 0; pp < np; pp++)
            _mm512_store_si512(panel + (size_t)(p0 + pp) * NR + 16 * v, r[pp]);
        }
      }
    }
  }
}

/* Packs op(A)[i0 .. i0+mc) x [k0 .. k0+kc), rows padded with zeros to a
 * multiple of MR.  ta = 0: a is (m, kk), laid out [row][k pair] (row
 * stride KP); ta = 1: a is (kk, m), laid out [k pair][row] (stride MC). */
BF16_TARGET static void pack_a(int ta, const float *a, size_t lda, int i0,
                               int mc, int k0, int kc, uint32_t *as) {
  const int kp = (kc + 1) / 2, mpad = (mc + MR - 1) / MR * MR;
  if (!ta) {
    for (int r = 0; r < mpad; r++) {
      uint32_t *dst = as + (size_t)r * KP;
      if (r >= mc) {
        memset(dst, 0, (size_t)kp * sizeof *dst);
        continue;
      }
      const float *row = a + (size_t)(i0 + r) * lda + k0;
      for (int p0 = 0; p0 < kp; p0 += 16)
        _mm512_storeu_si512(dst + p0, row_words(row, p0, kc));
    }
  } else {
    const float *x = a + (size_t)k0 * lda + i0;
    for (int p = 0; p < kp; p++)
      for (int r0 = 0; r0 < mpad; r0 += 16)
        _mm512_storeu_si512(as + (size_t)p * MC + r0,
                            pair_words(x, lda, p, kc, r0, mc));
  }
}

/* The micro-kernel: an MR x 16 NV tile of C from kp k pairs.  A's word
 * (r, p) is at a[r SR + p SP]; B's panel as pack_b lays it out.  Stores
 * rows [0, mr) and columns [0, ncols): C = alpha acc + beta C on the
 * slice that starts the sum (first; C unread when beta is 0), C += alpha
 * acc on later ones. */
#define BF16_KERNEL(NAME, NV, SR, SP)                                          \
  BF16_TARGET static void NAME(int kp, const uint32_t *a, const uint32_t *b,   \
                               float *c, size_t ldc, int mr, int ncols,        \
                               float alpha, float beta, int first) {           \
    __m512 acc[MR][NV];                                                        \
    _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++)                       \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[r][v] =       \
            _mm512_setzero_ps();                                               \
    for (int p = 0; p < kp; p++) {                                             \
      __m512bh bv[NV];                                                         \
      _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) bv[v] =             \
          (__m512bh)_mm512_load_si512(b + (size_t)p * NR + 16 * v);            \
      const uint32_t *ap = a + (size_t)p * (SP);                               \
      _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++) {                   \
        const __m512bh av =                                                    \
            (__m512bh)_mm512_set1_epi32((int)ap[(size_t)r * (SR)]);            \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[r][v] =       \
            _mm512_dpbf16_ps(acc[r][v], av, bv[v]);                            \
      }                                                                        \
    }                                                                          \
    const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);        \
    _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++) {                     \
      if (r >= mr)                                                             \
        break;                                                                 \
      float *cr = c + (size_t)r * ldc;                                         \
      _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) {                   \
        const __mmask16 mk = lanes(ncols - 16 * v);                            \
        __m512 x = _mm512_mul_ps(acc[r][v], va);                               \
        if (!first)                                                            \
          x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mk, cr + 16 * v));        \
        else if (beta != 0.0f)                                                 \
          x = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mk, cr + 16 * v), x);  \
        _mm512_mask_storeu_ps(cr + 16 * v, mk, x);                             \
      }                                                                        \
    }                                                                          \
  }

BF16_KERNEL(kern_n4, 4, KP, 1)
BF16_KERNEL(kern_n3, 3, KP, 1)
BF16_KERNEL(kern_n2, 2, KP, 1)
BF16_KERNEL(kern_n1, 1, KP, 1)
BF16_KERNEL(kern_t4, 4, 1, MC)
BF16_KERNEL(kern_t3, 3, 1, MC)
BF16_KERNEL(kern_t2, 2, 1, MC)
BF16_KERNEL(kern_t1, 1, 1, MC)

typedef void (*kern_fn)(int, const uint32_t *, const uint32_t *, float *,
                        size_t, int, int, float, float, int);

/* One product (or one thread's part of it) in one scratch region. */
typedef struct gemm_job {
  int ta, tb, m, n, kk;
  float alpha, beta;
  const float *a, *b;
  size_t lda, ldb, ldc;
  float *c;
  unsigned char *region;
} gemm_job;

BF16_TARGET static void gemm_serial(const gemm_job *g) {
  static const kern_fn kern[2][4] = {{kern_n1, kern_n2, kern_n3, kern_n4},
                                     {kern_t1, kern_t2, kern_t3, kern_t4}};
  uint32_t *as = (uint32_t *)(void *)g->region;
  uint32_t *bs = as + A_WORDS;
  for (int jc = 0; jc < g->n; jc += NC) {
    const int nc = g->n - jc < NC ? g->n - jc : NC;
    for (int pc = 0; pc < g->kk; pc += KC) {
      const int kc = g->kk - pc < KC ? g->kk - pc : KC, kp = (kc + 1) / 2;
      pack_b(g->tb, g->b, g->ldb, pc, kc, jc, nc, bs);
      for (int ic = 0; ic < g->m; ic += MC) {
        const int mc = g->m - ic < MC ? g->m - ic : MC;
        pack_a(g->ta, g->a, g->lda, ic, mc, pc, kc, as);
        for (int q = 0; q * NR < nc; q++) {
          const int cols = nc - q * NR < NR ? nc - q * NR : NR;
          const kern_fn f = kern[g->ta][(cols + 15) / 16 - 1];
          for (int ir = 0; ir < mc; ir += MR)
            f(kp, as + (g->ta ? (size_t)ir : (size_t)ir * KP),
              bs + (size_t)q * KP * NR,
              g->c + (size_t)(ic + ir) * g->ldc + jc + q * NR, g->ldc,
              mc - ir < MR ? mc - ir : MR, cols, g->alpha, g->beta, pc == 0);
        }
      }
    }
  }
}

static void gemm_part(void *arg, int part, int member) {
  (void)member; /* part i runs in region i, whoever runs it */
  gemm_serial((const gemm_job *)arg + part);
}

void imml_bf16_gemm(struct k_ctx *ctx, int threads, int trans_a, int trans_b,
                    int m, int n, int kk, float alpha, const float *a, int lda,
                    const float *b, int ldb, float beta, float *c, int ldc) {
  const gemm_job whole = {
      trans_a != 0, trans_b != 0, m, n,           kk,
      alpha,        beta,         a, b,           (size_t)lda,
      (size_t)ldb,  (size_t)ldc,  c, ctx->scratch};
  const double macs = (double)m * n * kk;
  if (!ctx->team) { /* a team member's own context: one thread */
    gemm_serial(&whole);
    return;
  }
  const double part_min = imml_bf16_part_min(ctx);
  int parts = threads < IMML_BF16_THREADS_MAX ? threads : IMML_BF16_THREADS_MAX;
  if (macs / part_min < parts)
    parts = (int)(macs / part_min);
  /* Split along n (every part packs all of A) or along m (every part
   * packs all of B), whichever repeats the smaller operand, in whole
   * micro-tiles. */
  const int by_n_ok = n >= 2 * NR, by_m_ok = m >= 2 * MR;
  const int by_n = by_n_ok && (!by_m_ok || m <= n);
  const int unit = by_n ? NR : MR, len = by_n ? n : m;
  if (parts > len / unit)
    parts = len / unit;
  if (parts < 2 || (!by_n_ok && !by_m_ok)) {
    gemm_serial(&whole);
    return;
  }
  int chunk = (len + parts - 1) / parts;
  chunk = (chunk + unit - 1) / unit * unit;
  gemm_job job[IMML_BF16_THREADS_MAX];
  int np = 0;
  for (int lo = 0; lo < len; lo += chunk, np++) {
    const int cnt = len - lo < chunk ? len - lo : chunk;
    job[np] = whole;
    job[np].region = (unsigned char *)ctx->scratch + (size_t)np * REGION;
    if (by_n) {
      job[np].n = cnt;
      job[np].b = trans_b ? b + (size_t)lo * ldb : b + lo;
      job[np].c = c + lo;
    } else {
      job[np].m = cnt;
      job[np].a = trans_a ? a + lo : a + (size_t)lo * lda;
      job[np].c = c + (size_t)lo * ldc;
    }
  }
  imml_team_run(ctx->team, threads, np, gemm_part, job);
}

#else /* no kernel in this build */

size_t imml_bf16_scratch_bytes(void) { return 0; }

size_t imml_bf16_region_bytes(void) { return 0; }

int imml_bf16_supported(char *why, size_t n) {
  if (why && n)
    snprintf(why, n,
             "this libimml was built without the bf16 kernel (it needs "
             "x86-64 and a compiler with AVX512-BF16 intrinsics: GCC >= 10 "
             "or clang >= 9; meson option -Dbf16)");
  return 0;
}

void imml_bf16_gemm(struct k_ctx *ctx, int threads, int trans_a, int trans_b,
                    int m, int n, int kk, float alpha, const float *a, int lda,
                    const float *b, int ldb, float beta, float *c, int ldc) {
  /* unreachable: no bf16 model is created without the kernel */
  (void)ctx, (void)threads, (void)trans_a, (void)trans_b, (void)m;
  (void)n, (void)kk, (void)alpha, (void)a, (void)lda, (void)b, (void)ldb;
  (void)beta, (void)c, (void)ldc;
}

#endif
