/* libFuzzer target, structure-aware: the input is not a checkpoint but a
 * program of edits to one.  A CRC only defends against accidents: a
 * crafted file carries a correct one, so this target edits fields (counts,
 * dims, sizes, enum values, the predominant state, warm-up steps, EMAs,
 * the dictionary's fill and position, the optimiser's kind, step count and
 * momentum flag, moments, tensor names and shapes) and recomputes the
 * payload size and the CRC-32 before every load.
 *
 * Input:
 *   byte 0   the seed: one of N_SEEDS small models built in-process with
 *            the public API (create, optimiser, training steps, and
 *            imml_predominant_set for one), saved with imml_model_save_mem
 *            and parsed into its fields (fs_ckpt);
 *   byte 1   bits 0-1: the memory_limit of the first load: 256 KiB, 1 MiB,
 *            4 MiB or 16 MiB;
 *   then at most FS_MAX_OPS edits, each an op byte (op % FS_N_OPS) and its
 *   operands; an operand past the end of the input reads as 0 (a float:
 *   as the value it replaces, a factor: as 1):
 *    0 SET_U32   field, value    a u32 field of the config, the header,
 *                                the predominant state, the counts or the
 *                                optimiser (fs_u32_field) set to a value
 *    1 ADD_U32   field, delta    the same field plus a signed byte
 *    2 SET_F32   field, value    beta, gamma1, gamma2, tau, lr,
 *                                weight_decay, momentum, beta1, beta2,
 *                                eps, clip_norm (fuzz_common.h's float)
 *    3 SET_U64   field, value    the seed or the optimiser's step count
 *    4 ADD_U64   field, delta    the same plus a signed byte (wrapping)
 *    5 SET_ELEM  array, i, value dims[i], a tensor's rows / cols / name
 *                                length field
 *    6 SET_VAL   array, i, value one float of the EMAs, a tensor, the
 *                                dictionary or a moment (i: 2 bytes)
 *    7 RESHAPE   what, (i,) value M, dims[i], H, k, C, the F&T kind, the
 *                                dictionary fill, optimiser presence or
 *                                dict_size changed *consistently*: every
 *                                array and tensor is rebuilt to the new
 *                                shape (values kept where the shape is),
 *                                so the result is a valid checkpoint of
 *                                another model unless a limit says no
 *    8 NAME      t, pos, byte    one byte of a tensor's name
 *    9 TENSORS   op, t, u        drop tensor t, duplicate it, or swap two
 *   10 FRAMING   what, value     bytes the payload does not account for,
 *                                or the payload size field off by a signed
 *                                byte
 *   11 SCALE     array, factor   every value of the EMAs, the parameters,
 *                                the dictionary or a moment multiplied
 * Integers are encoded as in fs_u32() / fs_u64(): one byte for the small
 * values and the powers of two around every limit (2^53 +- 1 among them),
 * or raw bytes.
 *
 * Promises checked, besides fuzz_common.h's fuzz_checkpoint() (a refusal
 * returns a failed handle with a message and frees everything, TOO_LARGE
 * before any allocation but the handle's; the allocator never holds, nor
 * is asked for, more than memory_limit and a handle; a checkpoint that
 * loads saves back to the same bytes, predicts, trains a step without
 * letting a non-finite value in, and saves a checkpoint that loads
 * again):
 * - an unedited seed loads;
 * - a refusal is one of the statuses an edited, correctly framed
 *   checkpoint can earn (never BAD_MAGIC or CHECKSUM, which the edits do
 *   not touch);
 * - a checkpoint that loads obeys doc/FORMAT.md: version 1, reserved 0,
 *   nothing past the fields, M in 2..64 with M dims and M EMAs (finite,
 *   >= 0), the predominant state consistent, the tensors exactly those the
 *   config implies, the dictionary fill and position consistent, the
 *   optimiser flag, kind and momentum flag in range, a step count of at
 *   most 2^53, moments of n_params values, AdamW second moments >= 0;
 * - after the training step the model's checkpoint still holds a step
 *   count of at most 2^53, equal to the loaded one or one more.
 * Loads go through fuzz_common.h's capped, counting allocator. */
#include "fuzz_common.h"

#define FS_MAX_M 66 /* beyond IMML_MAX_MODALITIES: counts may exceed it */
#define FS_MAX_T (6 * FS_MAX_M + 4 + 8)
#define FS_NAME 16
#define FS_MAX_OPS 64
#define FS_N_OPS 12
#define FS_MAX_FLOATS ((size_t)1 << 18) /* a reshape beyond it is skipped */
#define FS_STEPS_MAX ((uint64_t)1 << 53)

/* ---- a checkpoint as fields ------------------------------------------ */

typedef struct fs_vec {
  float *v;
  size_t n;
} fs_vec;

typedef struct fs_tensor {
  uint32_t name_len; /* the field; name_n bytes of name follow it */
  char name[FS_NAME];
  size_t name_n;
  uint32_t rows, cols;
  fs_vec val;
} fs_tensor;

typedef struct fs_ckpt {
  uint32_t version, reserved;
  /* config */
  uint32_t M;
  size_t nd;
  uint32_t dims[FS_MAX_M];
  uint32_t H, k, C, B, J;
  float beta, gamma1, gamma2, tau;
  uint32_t predominant, warmup, slot;
  uint64_t seed;
  uint32_t builtin;
  /* predominant state */
  uint32_t p_fixed, p, steps;
  fs_vec ema;
  /* parameters */
  uint32_t n_tensors; /* the count field */
  int nt;             /* tensors written */
  fs_tensor t[FS_MAX_T];
  /* dictionary */
  uint32_t fill, pos;
  fs_vec dict;
  /* optimiser */
  uint32_t has_opt; /* the flag field */
  int opt_block;    /* whether the optimiser's fields are written */
  uint32_t kind;
  float lr, wd, mom;
  uint32_t nesterov;
  float b1, b2, eps, clip;
  uint64_t step;
  uint32_t has_buf;
  fs_vec m1, m2;
  /* framing */
  size_t extra;          /* bytes before the CRC that no field accounts for */
  int64_t payload_delta; /* added to the payload size field */
} fs_ckpt;

static void fs_vec_free(fs_vec *x) {
  free(x->v);
  x->v = NULL;
  x->n = 0;
}

/* x resized to n values, the old ones kept, new ones from gen(). */
static float fs_gen(size_t i, float lo) {
  const float v = (float)((i * 37u + 11u) % 200u) / 1000.0f - 0.1f;
  return v < lo ? -v : v;
}

static void fs_vec_resize(fs_vec *x, size_t n, float lo) {
  float *v = realloc(x->v, (n ? n : 1) * sizeof(float));
  FUZZ_CHECK(v != NULL, "test allocation");
  for (size_t i = x->n; i < n; i++)
    v[i] = fs_gen(i, lo);
  x->v = v;
  x->n = n;
}

static void fs_vec_copy(fs_vec *dst, const fs_vec *src) {
  dst->v = NULL;
  dst->n = 0;
  fs_vec_resize(dst, src->n, -1.0f);
  if (src->n)
    memcpy(dst->v, src->v, src->n * sizeof(float));
}

static void fs_free(fs_ckpt *c) {
  fs_vec_free(&c->ema);
  for (int i = 0; i < c->nt; i++)
    fs_vec_free(&c->t[i].val);
  c->nt = 0;
  fs_vec_free(&c->dict);
  fs_vec_free(&c->m1);
  fs_vec_free(&c->m2);
}

static void fs_copy(fs_ckpt *dst, const fs_ckpt *src) {
  *dst = *src;
  fs_vec_copy(&dst->ema, &src->ema);
  for (int i = 0; i < src->nt; i++)
    fs_vec_copy(&dst->t[i].val, &src->t[i].val);
  fs_vec_copy(&dst->dict, &src->dict);
  fs_vec_copy(&dst->m1, &src->m1);
  fs_vec_copy(&dst->m2, &src->m2);
}

/* ---- parsing a checkpoint the library wrote ---------------------------- */

typedef struct fs_in {
  const unsigned char *p;
  size_t n, pos;
  int ok;
} fs_in;

static uint32_t in_u32(fs_in *r) {
  if (!r->ok || r->n - r->pos < 4) {
    r->ok = 0;
    return 0;
  }
  const unsigned char *b = r->p + r->pos;
  r->pos += 4;
  return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 |
         (uint32_t)b[3] << 24;
}

static uint64_t in_u64(fs_in *r) {
  const uint64_t lo = in_u32(r);
  return lo | (uint64_t)in_u32(r) << 32;
}

static float in_f32(fs_in *r) {
  const uint32_t u = in_u32(r);
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static void in_vec(fs_in *r, fs_vec *x, uint64_t n) {
  if (!r->ok || n > FS_MAX_FLOATS || (r->n - r->pos) / 4 < n) {
    r->ok = 0;
    return;
  }
  fs_vec_resize(x, (size_t)n, -1.0f);
  for (size_t i = 0; i < (size_t)n; i++)
    x->v[i] = in_f32(r);
}

/* Parses a checkpoint in the layout of doc/FORMAT.md whose counts agree
 * with its arrays (one the library saved); 0 if it is not one. */
static int fs_parse(const unsigned char *b, size_t size, fs_ckpt *c) {
  memset(c, 0, sizeof *c);
  fs_in r = {b, size, 0, 1};
  if (size < 28 || memcmp(b, "IMMLCKPT", 8) != 0)
    return 0;
  r.pos = 8;
  c->version = in_u32(&r);
  c->reserved = in_u32(&r);
  const uint64_t payload = in_u64(&r);
  if (payload != size - 28)
    return 0;
  r.n = size - 4;
  c->M = in_u32(&r);
  if (c->M > FS_MAX_M)
    return 0;
  c->nd = c->M;
  for (size_t i = 0; i < c->nd; i++)
    c->dims[i] = in_u32(&r);
  c->H = in_u32(&r);
  c->k = in_u32(&r);
  c->C = in_u32(&r);
  c->B = in_u32(&r);
  c->J = in_u32(&r);
  c->beta = in_f32(&r);
  c->gamma1 = in_f32(&r);
  c->gamma2 = in_f32(&r);
  c->tau = in_f32(&r);
  c->predominant = in_u32(&r);
  c->warmup = in_u32(&r);
  c->slot = in_u32(&r);
  c->seed = in_u64(&r);
  c->builtin = in_u32(&r);
  c->p_fixed = in_u32(&r);
  c->p = in_u32(&r);
  c->steps = in_u32(&r);
  in_vec(&r, &c->ema, c->M);
  c->n_tensors = in_u32(&r);
  if (!r.ok || c->n_tensors > FS_MAX_T)
    goto fail;
  for (uint32_t i = 0; i < c->n_tensors && r.ok; i++) {
    fs_tensor *t = &c->t[c->nt++];
    t->name_len = in_u32(&r);
    if (!r.ok || t->name_len >= FS_NAME || r.n - r.pos < t->name_len)
      goto fail;
    memcpy(t->name, r.p + r.pos, t->name_len);
    t->name_n = t->name_len;
    r.pos += t->name_len;
    t->rows = in_u32(&r);
    t->cols = in_u32(&r);
    in_vec(&r, &t->val, (uint64_t)t->rows * t->cols);
  }
  c->fill = in_u32(&r);
  c->pos = in_u32(&r);
  in_vec(&r, &c->dict, (uint64_t)c->fill * c->M * c->k);
  c->has_opt = in_u32(&r);
  c->opt_block = c->has_opt != 0;
  if (c->opt_block) {
    c->kind = in_u32(&r);
    c->lr = in_f32(&r);
    c->wd = in_f32(&r);
    c->mom = in_f32(&r);
    c->nesterov = in_u32(&r);
    c->b1 = in_f32(&r);
    c->b2 = in_f32(&r);
    c->eps = in_f32(&r);
    c->clip = in_f32(&r);
    c->step = in_u64(&r);
    c->has_buf = in_u32(&r);
    size_t np = 0;
    for (int i = 0; i < c->nt; i++)
      np += c->t[i].val.n;
    in_vec(&r, &c->m1, np);
    in_vec(&r, &c->m2, np);
  }
  if (r.ok && r.pos == r.n)
    return 1;
fail:
  fs_free(c);
  return 0;
}

/* ---- writing the fields back ----------------------------------------- */

typedef struct fs_out {
  unsigned char *p;
  size_t n, cap;
} fs_out;

static void out_bytes(fs_out *w, const void *src, size_t n) {
  if (w->cap - w->n < n) {
    size_t cap = w->cap ? w->cap : 4096;
    while (cap - w->n < n)
      cap *= 2;
    unsigned char *p = realloc(w->p, cap);
    FUZZ_CHECK(p != NULL, "test allocation");
    w->p = p;
    w->cap = cap;
  }
  memcpy(w->p + w->n, src, n);
  w->n += n;
}

static void out_u32(fs_out *w, uint32_t v) {
  const unsigned char b[4] = {(unsigned char)v, (unsigned char)(v >> 8),
                              (unsigned char)(v >> 16),
                              (unsigned char)(v >> 24)};
  out_bytes(w, b, 4);
}

static void out_u64(fs_out *w, uint64_t v) {
  out_u32(w, (uint32_t)v);
  out_u32(w, (uint32_t)(v >> 32));
}

static void out_f32(fs_out *w, float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  out_u32(w, u);
}

static void out_vec(fs_out *w, const fs_vec *x) {
  for (size_t i = 0; i < x->n; i++)
    out_f32(w, x->v[i]);
}

/* The checkpoint, its payload size (plus payload_delta) and CRC-32
 * computed; *size receives its length. */
static unsigned char *fs_write(const fs_ckpt *c, size_t *size) {
  fs_out w = {NULL, 0, 0};
  out_bytes(&w, "IMMLCKPT", 8);
  out_u32(&w, c->version);
  out_u32(&w, c->reserved);
  out_u64(&w, 0); /* payload size, below */
  out_u32(&w, c->M);
  for (size_t i = 0; i < c->nd; i++)
    out_u32(&w, c->dims[i]);
  out_u32(&w, c->H);
  out_u32(&w, c->k);
  out_u32(&w, c->C);
  out_u32(&w, c->B);
  out_u32(&w, c->J);
  out_f32(&w, c->beta);
  out_f32(&w, c->gamma1);
  out_f32(&w, c->gamma2);
  out_f32(&w, c->tau);
  out_u32(&w, c->predominant);
  out_u32(&w, c->warmup);
  out_u32(&w, c->slot);
  out_u64(&w, c->seed);
  out_u32(&w, c->builtin);
  out_u32(&w, c->p_fixed);
  out_u32(&w, c->p);
  out_u32(&w, c->steps);
  out_vec(&w, &c->ema);
  out_u32(&w, c->n_tensors);
  for (int i = 0; i < c->nt; i++) {
    const fs_tensor *t = &c->t[i];
    out_u32(&w, t->name_len);
    out_bytes(&w, t->name, t->name_n);
    out_u32(&w, t->rows);
    out_u32(&w, t->cols);
    out_vec(&w, &t->val);
  }
  out_u32(&w, c->fill);
  out_u32(&w, c->pos);
  out_vec(&w, &c->dict);
  out_u32(&w, c->has_opt);
  if (c->opt_block) {
    out_u32(&w, c->kind);
    out_f32(&w, c->lr);
    out_f32(&w, c->wd);
    out_f32(&w, c->mom);
    out_u32(&w, c->nesterov);
    out_f32(&w, c->b1);
    out_f32(&w, c->b2);
    out_f32(&w, c->eps);
    out_f32(&w, c->clip);
    out_u64(&w, c->step);
    out_u32(&w, c->has_buf);
    out_vec(&w, &c->m1);
    out_vec(&w, &c->m2);
  }
  for (size_t i = 0; i < c->extra; i++) {
    const unsigned char z = (unsigned char)i;
    out_bytes(&w, &z, 1);
  }
  const uint64_t payload = (uint64_t)(w.n - 24) + (uint64_t)c->payload_delta;
  fuzz_put32(w.p, 16, (uint32_t)payload);
  fuzz_put32(w.p, 20, (uint32_t)(payload >> 32));
  out_u32(&w, 0);
  fuzz_put32(w.p, w.n - 4, fuzz_crc32(w.p, w.n - 4));
  *size = w.n;
  return w.p;
}

/* ---- the layout a config implies (lib/arena.c, doc/FORMAT.md) -------- */

typedef struct fs_shape {
  char name[FS_NAME];
  uint64_t rows, cols;
} fs_shape;

/* The tensors of M (clamped to FS_MAX_M) modalities; 0 when dims are
 * missing. */
static int fs_layout(const fs_ckpt *c, fs_shape *s, int *n) {
  const uint32_t M = c->M < FS_MAX_M ? c->M : FS_MAX_M;
  if (c->nd < M)
    return 0;
  static const char *const suffix[6] = {"w1", "b1", "w2", "b2", "wc", "bc"};
  int nt = 0;
  for (uint32_t m = 0; m < M; m++) {
    const uint64_t rows[6] = {c->dims[m], 1, c->H, 1, c->k, 1};
    const uint64_t cols[6] = {c->H, c->H, c->k, c->k, c->C, c->C};
    for (int i = 0; i < 6; i++, nt++) {
      snprintf(s[nt].name, FS_NAME, "m%u.%s", (unsigned)m, suffix[i]);
      s[nt].rows = rows[i];
      s[nt].cols = cols[i];
    }
  }
  const uint64_t Mk = (uint64_t)M * c->k;
  snprintf(s[nt].name, FS_NAME, "fdc.wq");
  s[nt].rows = Mk, s[nt++].cols = c->k;
  snprintf(s[nt].name, FS_NAME, "fdc.wk");
  s[nt].rows = Mk, s[nt++].cols = c->k;
  if (c->builtin == 1) {
    snprintf(s[nt].name, FS_NAME, "ft.w");
    s[nt].rows = Mk, s[nt++].cols = c->C;
    snprintf(s[nt].name, FS_NAME, "ft.b");
    s[nt].rows = 1, s[nt++].cols = c->C;
  }
  *n = nt;
  return 1;
}

static size_t fs_n_params(const fs_ckpt *c) {
  size_t np = 0;
  for (int i = 0; i < c->nt; i++)
    np += c->t[i].val.n;
  return np;
}

/* Rebuilds every array of c to the shape its counts and dims imply:
 * dims and EMAs of M entries, the tensors of the layout (values kept for
 * a tensor of the same name and shape), fill * M * k dictionary values,
 * moments of n_params values, p and the config's predominant inside 0..M-1.
 * Returns 0, c unchanged, when that would take more than FS_MAX_FLOATS
 * floats. */
static int fs_rebuild(fs_ckpt *c) {
  if (c->M == 0 || c->M > FS_MAX_M)
    return 0;
  fs_ckpt n;
  fs_copy(&n, c);
  for (size_t i = n.nd; i < n.M; i++)
    n.dims[i] = 2 + (uint32_t)(i % 3);
  n.nd = n.M;
  fs_vec_resize(&n.ema, n.M, 0.0f);
  static fs_shape shape[FS_MAX_T];
  int ns = 0;
  uint64_t total = (uint64_t)n.fill * n.M * n.k;
  int ok = fs_layout(&n, shape, &ns);
  for (int i = 0; ok && i < ns; i++) {
    if (shape[i].rows > FS_MAX_FLOATS || shape[i].cols > FS_MAX_FLOATS)
      ok = 0;
    else
      total += shape[i].rows * shape[i].cols * (n.opt_block ? 3 : 1);
  }
  if (!ok || total > FS_MAX_FLOATS) {
    fs_free(&n);
    return 0;
  }
  fs_tensor *t = calloc(FS_MAX_T, sizeof *t);
  FUZZ_CHECK(t != NULL, "test allocation");
  for (int i = 0; i < ns; i++) {
    memcpy(t[i].name, shape[i].name, FS_NAME);
    t[i].name_n = t[i].name_len = (uint32_t)strlen(shape[i].name);
    t[i].rows = (uint32_t)shape[i].rows;
    t[i].cols = (uint32_t)shape[i].cols;
    const size_t cnt = (size_t)(shape[i].rows * shape[i].cols);
    for (int j = 0; j < n.nt; j++)
      if (n.t[j].name_n == t[i].name_n &&
          !memcmp(n.t[j].name, t[i].name, t[i].name_n) && n.t[j].val.n == cnt) {
        fs_vec_copy(&t[i].val, &n.t[j].val);
        break;
      }
    if (t[i].val.n != cnt)
      fs_vec_resize(&t[i].val, cnt, -1.0f);
  }
  for (int j = 0; j < n.nt; j++)
    fs_vec_free(&n.t[j].val);
  memcpy(n.t, t, sizeof n.t);
  free(t);
  n.nt = ns;
  n.n_tensors = (uint32_t)ns;
  const size_t nd = (size_t)n.fill * n.M * n.k;
  if (n.dict.n != nd) {
    n.dict.n = nd < n.dict.n ? nd : n.dict.n;
    fs_vec_resize(&n.dict, nd, -1.0f);
  }
  if (n.opt_block) {
    const size_t np = fs_n_params(&n);
    if (n.m1.n != np) {
      fs_vec_free(&n.m1);
      fs_vec_free(&n.m2);
      fs_vec_resize(&n.m1, np, -1.0f);
      fs_vec_resize(&n.m2, np, 0.0f);
    }
  }
  if (n.p_fixed && n.p != 0xFFFFFFFFu && n.p >= n.M)
    n.p = n.M - 1;
  if (n.predominant != 0xFFFFFFFFu && n.predominant >= n.M)
    n.predominant = n.p_fixed ? n.p : 0xFFFFFFFFu;
  fs_free(c);
  *c = n;
  return 1;
}

/* ---- the edits --------------------------------------------------------- */

#define FS_N_U32 22
static uint32_t *fs_u32_field(fs_ckpt *c, int i) {
  uint32_t *const f[FS_N_U32] = {
      &c->version,   &c->reserved, &c->M,       &c->H,           &c->k,
      &c->C,         &c->B,        &c->J,       &c->predominant, &c->warmup,
      &c->slot,      &c->builtin,  &c->p_fixed, &c->p,           &c->steps,
      &c->n_tensors, &c->fill,     &c->pos,     &c->has_opt,     &c->kind,
      &c->nesterov,  &c->has_buf};
  return f[i % FS_N_U32];
}

#define FS_N_F32 11
static float *fs_f32_field(fs_ckpt *c, int i) {
  float *const f[FS_N_F32] = {&c->beta, &c->gamma1, &c->gamma2, &c->tau,
                              &c->lr,   &c->wd,     &c->mom,    &c->b1,
                              &c->b2,   &c->eps,    &c->clip};
  return f[i % FS_N_F32];
}

static int fs_byte(fuzz_reader *r) {
  int b = 0;
  fuzz_byte(r, &b);
  return b;
}

/* A u32 is one byte b: below 0x40 the value b; 0x40..0x5f 2^(b-0x40);
 * 0x60..0x7f 2^(b-0x60) - 1; 0x80..0x9f 2^(b-0x80) + 1; 0xa0 2^32 - 1;
 * 0xa1..0xfe 64 + (b - 0xa1); 0xff the next 4 bytes. */
static uint32_t fs_u32(fuzz_reader *r) {
  const int b = fs_byte(r);
  if (b < 0x40)
    return (uint32_t)b;
  if (b < 0x60)
    return (uint32_t)1 << (b - 0x40);
  if (b < 0x80)
    return ((uint32_t)1 << (b - 0x60)) - 1u;
  if (b < 0xa0)
    return ((uint32_t)1 << (b - 0x80)) + 1u;
  if (b == 0xa0)
    return 0xFFFFFFFFu;
  if (b < 0xff)
    return 64u + (uint32_t)(b - 0xa1);
  return fuzz_u32(r);
}

/* A u64 is one byte b: below 0x40 the value b; 0x40..0x7f 2^(b-0x40);
 * 0x80..0xbf 2^(b-0x80) - 1; 0xc0 2^64 - 1; 0xc1..0xfe 2^(b-0xc1) + 1;
 * 0xff the next 8 bytes. */
static uint64_t fs_u64(fuzz_reader *r) {
  const int b = fs_byte(r);
  if (b < 0x40)
    return (uint64_t)b;
  if (b < 0x80)
    return (uint64_t)1 << (b - 0x40);
  if (b < 0xc0)
    return ((uint64_t)1 << (b - 0x80)) - 1u;
  if (b == 0xc0)
    return UINT64_MAX;
  if (b < 0xff)
    return ((uint64_t)1 << (b - 0xc1)) + 1u;
  const uint64_t lo = fuzz_u32(r);
  return lo | (uint64_t)fuzz_u32(r) << 32;
}

static fs_vec *fs_values(fs_ckpt *c, int which, int t) {
  switch (which) {
  case 0:
    return &c->ema;
  case 1:
    return c->nt ? &c->t[t % c->nt].val : NULL;
  case 2:
    return &c->dict;
  case 3:
    return &c->m1;
  default:
    return &c->m2;
  }
}

static void fs_toggle_optimiser(fs_ckpt *c) {
  if (c->opt_block) {
    c->opt_block = 0;
    c->has_opt = 0;
    fs_vec_free(&c->m1);
    fs_vec_free(&c->m2);
    return;
  }
  c->opt_block = 1;
  c->has_opt = 1;
  c->kind = IMML_OPTIM_ADAMW;
  c->lr = 1e-3f;
  c->wd = 0.01f;
  c->mom = 0.0f;
  c->nesterov = 0;
  c->b1 = 0.9f;
  c->b2 = 0.999f;
  c->eps = 1e-8f;
  c->clip = 0.0f;
  c->step = 0;
  c->has_buf = 0;
  const size_t np = fs_n_params(c);
  if (np > FS_MAX_FLOATS / 3) {
    fs_toggle_optimiser(c); /* too large: back to none */
    return;
  }
  fs_vec_resize(&c->m1, np, -1.0f);
  fs_vec_resize(&c->m2, np, 0.0f);
}

/* A consistent change of one dimension; undone when fs_rebuild declines. */
static void fs_reshape(fs_ckpt *c, fuzz_reader *r) {
  const int what = fs_byte(r) % 9;
  fs_ckpt keep = *c; /* scalars only: fs_rebuild leaves c as it was on 0 */
  switch (what) {
  case 0:
    c->M = fs_u32(r);
    break;
  case 1: {
    const int i = fs_byte(r);
    if (c->nd)
      c->dims[(size_t)i % c->nd] = fs_u32(r);
    break;
  }
  case 2:
    c->H = fs_u32(r);
    break;
  case 3:
    c->k = fs_u32(r);
    break;
  case 4:
    c->C = fs_u32(r);
    break;
  case 5:
    c->builtin = !c->builtin;
    break;
  case 6:
    c->fill = fs_u32(r);
    c->pos = c->fill < c->J ? c->fill : 0;
    break;
  case 7:
    fs_toggle_optimiser(c);
    return;
  default:
    c->J = fs_u32(r);
    if (c->fill > c->J) {
      c->fill = c->J;
      c->pos = 0;
    } else if (c->fill < c->J) {
      c->pos = c->fill;
    }
    break;
  }
  if (!fs_rebuild(c)) {
    c->M = keep.M;
    c->nd = keep.nd;
    memcpy(c->dims, keep.dims, sizeof c->dims);
    c->H = keep.H;
    c->k = keep.k;
    c->C = keep.C;
    c->builtin = keep.builtin;
    c->fill = keep.fill;
    c->pos = keep.pos;
    c->J = keep.J;
  }
}

static void fs_tensors(fs_ckpt *c, fuzz_reader *r) {
  const int op = fs_byte(r) % 3, a = fs_byte(r), b = fs_byte(r);
  if (c->nt == 0)
    return;
  const int i = a % c->nt, j = b % c->nt;
  if (op == 0) { /* drop */
    fs_vec_free(&c->t[i].val);
    memmove(&c->t[i], &c->t[i + 1], (size_t)(c->nt - i - 1) * sizeof c->t[0]);
    c->nt--;
  } else if (op == 1 && c->nt < FS_MAX_T &&
             fs_n_params(c) + c->t[i].val.n <= FS_MAX_FLOATS) { /* dup */
    c->t[c->nt] = c->t[i];
    fs_vec_copy(&c->t[c->nt].val, &c->t[i].val);
    c->nt++;
  } else if (op == 2) { /* swap */
    const fs_tensor t = c->t[i];
    c->t[i] = c->t[j];
    c->t[j] = t;
  }
}

static void fs_edit(fs_ckpt *c, fuzz_reader *r) {
  const int op = fs_byte(r) % FS_N_OPS;
  switch (op) {
  case 0: {
    uint32_t *f = fs_u32_field(c, fs_byte(r));
    *f = fs_u32(r);
    break;
  }
  case 1: {
    uint32_t *f = fs_u32_field(c, fs_byte(r));
    *f += (uint32_t)(int32_t)(int8_t)fs_byte(r);
    break;
  }
  case 2: {
    float *f = fs_f32_field(c, fs_byte(r));
    *f = fuzz_float(r, *f);
    break;
  }
  case 3: {
    uint64_t *f = fs_byte(r) & 1 ? &c->step : &c->seed;
    *f = fs_u64(r);
    break;
  }
  case 4: {
    uint64_t *f = fs_byte(r) & 1 ? &c->step : &c->seed;
    *f += (uint64_t)(int64_t)(int8_t)fs_byte(r);
    break;
  }
  case 5: {
    const int which = fs_byte(r) % 4, i = fs_byte(r);
    const uint32_t v = fs_u32(r);
    if (which == 0 && c->nd)
      c->dims[(size_t)i % c->nd] = v;
    else if (which && c->nt) {
      fs_tensor *t = &c->t[i % c->nt];
      *(which == 1 ? &t->rows : which == 2 ? &t->cols : &t->name_len) = v;
    }
    break;
  }
  case 6: {
    const int which = fs_byte(r) % 5, t = fs_byte(r);
    const size_t i = (size_t)fs_byte(r) | (size_t)fs_byte(r) << 8;
    const float v = fuzz_float(r, 0.0f);
    fs_vec *x = fs_values(c, which, t);
    if (x && x->n)
      x->v[i % x->n] = v;
    break;
  }
  case 7:
    fs_reshape(c, r);
    break;
  case 8: {
    const int t = fs_byte(r), pos = fs_byte(r), ch = fs_byte(r);
    if (c->nt && c->t[t % c->nt].name_n)
      c->t[t % c->nt].name[(size_t)pos % c->t[t % c->nt].name_n] = (char)ch;
    break;
  }
  case 9:
    fs_tensors(c, r);
    break;
  case 10:
    if (fs_byte(r) & 1)
      c->payload_delta = (int8_t)fs_byte(r);
    else
      c->extra += (size_t)fs_byte(r);
    break;
  default: {
    const int which = fs_byte(r) % 5;
    const float f = fuzz_float(r, 1.0f);
    for (int t = 0; t < (which == 1 ? c->nt : 1); t++) {
      fs_vec *x = fs_values(c, which, t);
      for (size_t i = 0; x && i < x->n; i++)
        x->v[i] *= f;
    }
    break;
  }
  }
}

/* ---- the seeds --------------------------------------------------------- */

typedef struct fs_seed {
  int M, dims[3], H, k, C, B, J, warmup, predominant, strict, host;
  int opt; /* -1 none, or an imml_optim_kind */
  float momentum, clip;
  int steps;
  int fix_p; /* >= 0: imml_predominant_set(fix_p) before training */
} fs_seed;

static const fs_seed fs_seeds[] = {
    /* AdamW, warm-up done, dictionary wrapped */
    {2, {3, 2, 0}, 4, 2, 2, 3, 4, 2, -1, 0, 0, 1, 0.0f, 0.0f, 4, -1},
    /* never trained, no optimiser */
    {2, {2, 3, 0}, 3, 2, 3, 2, 3, 5, -1, 0, 0, -1, 0.0f, 0.0f, 0, -1},
    /* host F&T, SGD Nesterov, warm-up in flight */
    {2, {3, 3, 0}, 4, 2, 2, 4, 6, 10, -1, 0, 1, 0, 0.9f, 0.0f, 2, -1},
    /* three modalities, strict slots, p fixed by the config, SGD */
    {3, {2, 2, 3}, 3, 2, 3, 2, 5, 0, 1, 1, 0, 0, 0.5f, 0.0f, 3, -1},
    /* host F&T, no optimiser, p fixed by the warm-up */
    {2, {2, 4, 0}, 3, 3, 2, 3, 3, 1, -1, 0, 1, -1, 0.0f, 0.0f, 3, -1},
    /* p fixed by the host during the warm-up, AdamW */
    {3, {2, 3, 2}, 3, 2, 2, 3, 4, 20, -1, 0, 0, 1, 0.0f, 0.0f, 2, 2},
    /* plain SGD (no momentum buffer), a two-entry dictionary */
    {2, {2, 2, 0}, 2, 2, 2, 2, 2, 1, -1, 0, 0, 0, 0.0f, 0.0f, 2, -1},
    /* AdamW with clipping, dictionary partly filled */
    {2, {4, 1, 0}, 3, 2, 4, 2, 8, 1, -1, 0, 0, 1, 0.0f, 0.5f, 3, -1},
};
#define N_SEEDS (int)(sizeof fs_seeds / sizeof fs_seeds[0])

/* The seed's checkpoint, built once per process. */
static unsigned char *fs_seed_bytes(int i, size_t *size) {
  static unsigned char *cache[N_SEEDS];
  static size_t cache_size[N_SEEDS];
  if (cache[i]) {
    *size = cache_size[i];
    return cache[i];
  }
  const fs_seed *s = &fs_seeds[i];
  imml_config c;
  imml_config_init(&c);
  c.n_modalities = s->M;
  c.dims = s->dims;
  c.hidden_dim = s->H;
  c.knowledge_dim = s->k;
  c.n_classes = s->C;
  c.max_batch = s->B;
  c.dict_size = s->J;
  c.warmup_steps = s->warmup;
  c.predominant = s->predominant;
  c.slot_mode = s->strict ? IMML_SLOT_STRICT : IMML_SLOT_CONDITIONAL;
  c.seed = 11u + (uint64_t)i;
  const imml_ft_ops ops = fuzz_host_ops();
  imml_model *m = NULL;
  imml_status st = imml_model_create(&c, s->host ? &ops : NULL, &m);
  FUZZ_CHECK(st == IMML_OK, "seed %d: create: %s", i, imml_model_errmsg(m));
  if (s->fix_p >= 0)
    FUZZ_CHECK(imml_predominant_set(m, s->fix_p) == IMML_OK, "seed %d", i);
  if (s->opt >= 0) {
    imml_optim_config oc;
    imml_optim_config_init(&oc, (imml_optim_kind)s->opt);
    oc.lr = 0.05f;
    oc.momentum = s->momentum;
    oc.nesterov = s->momentum > 0.0f;
    oc.clip_norm = s->clip;
    FUZZ_CHECK(imml_optim_setup(m, &oc) == IMML_OK, "seed %d: %s", i,
               imml_model_errmsg(m));
  }
  for (int step = 0; step < s->steps; step++) {
    float x[3][16];
    const float *f[3];
    int y[4];
    for (int mm = 0; mm < s->M; mm++) {
      for (int j = 0; j < s->B * s->dims[mm]; j++)
        x[mm][j] = (float)((j * 5 + mm * 3 + step * 7) % 11) / 5.0f - 1.0f;
      f[mm] = x[mm];
    }
    for (int j = 0; j < s->B; j++)
      y[j] = (j + step) % s->C;
    st = imml_forward(m, IMML_MODE_TRAIN, s->B, f, y, NULL, NULL);
    if (st == IMML_OK)
      st = imml_backward(m, NULL);
    if (st == IMML_OK)
      st = imml_commit(m);
    if (st == IMML_OK && s->opt >= 0)
      st = imml_optim_step(m);
    FUZZ_CHECK(st == IMML_OK, "seed %d step %d: %s", i, step,
               imml_model_errmsg(m));
  }
  size_t need = 0;
  imml_model_save_mem(m, NULL, 0, &need);
  unsigned char *b = malloc(need ? need : 1);
  FUZZ_CHECK(b != NULL && imml_model_save_mem(m, b, need, size) == IMML_OK,
             "seed %d: save", i);
  imml_model_free(m);
  /* the fuzzer's own reader and writer reproduce the library's bytes */
  fs_ckpt ck;
  FUZZ_CHECK(fs_parse(b, *size, &ck), "seed %d does not parse", i);
  size_t n = 0;
  unsigned char *again = fs_write(&ck, &n);
  FUZZ_CHECK(n == *size && memcmp(again, b, n) == 0,
             "seed %d: parse + write is not the identity", i);
  free(again);
  fs_free(&ck);
  cache[i] = b;
  cache_size[i] = *size;
  return b;
}

/* ---- what a loaded checkpoint must be (doc/FORMAT.md) ----------------- */

static void fs_check_accepted(const fs_ckpt *c) {
  FUZZ_CHECK(c->version == 1 && c->reserved == 0, "version %u reserved %u",
             c->version, c->reserved);
  FUZZ_CHECK(c->extra == 0 && c->payload_delta == 0,
             "%zu unaccounted bytes, payload size off by %lld", c->extra,
             (long long)c->payload_delta);
  FUZZ_CHECK(c->M >= 2 && c->M <= IMML_MAX_MODALITIES && c->nd == c->M &&
                 c->ema.n == c->M,
             "M %u with %zu dims and %zu EMAs", c->M, c->nd, c->ema.n);
  for (size_t i = 0; i < c->nd; i++)
    FUZZ_CHECK(c->dims[i] >= 1 && c->dims[i] <= 0x7FFFFFFFu, "dims[%zu] %u", i,
               c->dims[i]);
  FUZZ_CHECK(c->H >= 1 && c->k >= 1 && c->C >= 2 && c->B >= 1 && c->J >= 1,
             "H %u k %u C %u B %u J %u", c->H, c->k, c->C, c->B, c->J);
  FUZZ_CHECK(c->builtin <= 1 && c->slot <= 1, "builtin %u slot %u", c->builtin,
             c->slot);
  const int32_t p = (int32_t)c->p, pred = (int32_t)c->predominant;
  FUZZ_CHECK(c->p_fixed <= 1 &&
                 (c->p_fixed ? p >= 0 && p < (int32_t)c->M : p == -1),
             "predominant state fixed %u p %d", c->p_fixed, p);
  FUZZ_CHECK(pred == -1 || (pred >= 0 && c->p_fixed && pred == p),
             "config predominant %d, state %d", pred, p);
  FUZZ_CHECK(c->p_fixed || c->steps < c->warmup, "warm-up %u of %u, p unfixed",
             c->steps, c->warmup);
  for (size_t i = 0; i < c->ema.n; i++)
    FUZZ_CHECK(isfinite(c->ema.v[i]) && c->ema.v[i] >= 0.0f, "ema[%zu] %g", i,
               (double)c->ema.v[i]);
  static fs_shape shape[FS_MAX_T];
  int ns = 0;
  FUZZ_CHECK(fs_layout(c, shape, &ns), "layout");
  FUZZ_CHECK(c->n_tensors == (uint32_t)ns && c->nt == ns,
             "%u tensors (%d written), the config implies %d", c->n_tensors,
             c->nt, ns);
  for (int i = 0; i < ns; i++) {
    const fs_tensor *t = &c->t[i];
    FUZZ_CHECK(t->name_len == t->name_n && t->name_n == strlen(shape[i].name) &&
                   !memcmp(t->name, shape[i].name, t->name_n) &&
                   t->rows == shape[i].rows && t->cols == shape[i].cols,
               "tensor %d is not %s", i, shape[i].name);
    for (size_t j = 0; j < t->val.n; j++)
      FUZZ_CHECK(isfinite(t->val.v[j]), "%s[%zu] %g", shape[i].name, j,
                 (double)t->val.v[j]);
  }
  FUZZ_CHECK(c->fill <= c->J &&
                 (c->fill < c->J ? c->pos == c->fill : c->pos < c->J),
             "dictionary fill %u pos %u of %u", c->fill, c->pos, c->J);
  FUZZ_CHECK(c->dict.n == (size_t)c->fill * c->M * c->k, "dictionary size");
  for (size_t i = 0; i < c->dict.n; i++)
    FUZZ_CHECK(isfinite(c->dict.v[i]), "dictionary value %zu", i);
  FUZZ_CHECK(c->has_opt <= 1 && c->opt_block == (int)c->has_opt,
             "optimiser flag %u", c->has_opt);
  if (!c->has_opt)
    return;
  FUZZ_CHECK(c->kind <= 1 && c->has_buf <= 1, "optimiser kind %u has_buf %u",
             c->kind, c->has_buf);
  FUZZ_CHECK(c->step <= FS_STEPS_MAX, "optimiser step %llu loaded",
             (unsigned long long)c->step);
  const size_t np = fs_n_params(c);
  FUZZ_CHECK(c->m1.n == np && c->m2.n == np, "moments of %zu / %zu values",
             c->m1.n, c->m2.n);
  for (size_t i = 0; i < np; i++)
    FUZZ_CHECK(isfinite(c->m1.v[i]) && isfinite(c->m2.v[i]) &&
                   (c->kind != IMML_OPTIM_ADAMW || c->m2.v[i] >= 0.0f),
               "moment %zu: %g / %g", i, (double)c->m1.v[i],
               (double)c->m2.v[i]);
}

/* ---- the target --------------------------------------------------------- */

/* Builds every seed once, before the first input (libFuzzer, and the
 * replay before it forks a child per input). */
int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  for (int i = 0; i < N_SEEDS; i++) {
    size_t n;
    fs_seed_bytes(i, &n);
  }
  return 0;
}

static const size_t fs_limits[4] = {(size_t)256 << 10, (size_t)1 << 20,
                                    (size_t)4 << 20, FUZZ_LOAD_LIMIT};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fuzz_reader r = {data, size, 0};
  const int seed = fs_byte(&r) % N_SEEDS;
  const size_t limit = fs_limits[fs_byte(&r) & 3];
  size_t n = 0;
  const unsigned char *sb = fs_seed_bytes(seed, &n);
  fs_ckpt c;
  FUZZ_CHECK(fs_parse(sb, n, &c), "seed %d", seed);
  int edits = 0;
  while (r.pos < r.n && edits < FS_MAX_OPS) {
    fs_edit(&c, &r);
    edits++;
  }
  unsigned char *b = fs_write(&c, &n);
  unsigned char *after = NULL;
  size_t after_n = 0;
  const imml_status st = fuzz_checkpoint(b, n, limit, &after, &after_n);
  if (edits == 0)
    FUZZ_CHECK(st == IMML_OK, "seed %d does not load: %s", seed,
               imml_status_string(st));
  FUZZ_CHECK(
      st == IMML_OK || st == IMML_ERR_BAD_VERSION || st == IMML_ERR_TRUNCATED ||
          st == IMML_ERR_FORMAT || st == IMML_ERR_TOO_LARGE ||
          st == IMML_ERR_NONFINITE || st == IMML_ERR_NOMEM,
      "an edited, framed checkpoint refused with %s", imml_status_string(st));
  if (st == IMML_OK) {
    fs_check_accepted(&c);
    fs_ckpt a;
    FUZZ_CHECK(fs_parse(after, after_n, &a),
               "the library's own checkpoint does not parse");
    FUZZ_CHECK(a.has_opt == c.has_opt &&
                   (!a.has_opt || a.step == c.step || a.step == c.step + 1),
               "optimiser step %llu after one training step from %llu",
               (unsigned long long)a.step, (unsigned long long)c.step);
    FUZZ_CHECK(!a.has_opt || a.step <= FS_STEPS_MAX,
               "optimiser step %llu saved", (unsigned long long)a.step);
    fs_free(&a);
  }
  free(after);
  free(b);
  fs_free(&c);
  return 0;
}
