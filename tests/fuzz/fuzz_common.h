/* Shared by the fuzz targets (fuzz_load.c, fuzz_config.c), their corpus
 * replay (replay.c) and the seed generator (make_corpus.c): a capped,
 * counting allocator, the byte encoding fuzz_config reads, a host F&T and
 * a one-process collective, and the oracle that turns a broken promise into
 * a crash the fuzzer (or the replay test) reports.
 *
 * Public API only (imml.h, its experimental section included: the
 * collective and imml_unimodal_get). */
#ifndef IMML_FUZZ_COMMON_H
#define IMML_FUZZ_COMMON_H

#define IMML_EXPERIMENTAL
#include "imml.h"

#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* libFuzzer's entry point, defined by each target. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A broken promise: say which and crash, so the fuzzer keeps the input and
 * the replay test fails. */
#define FUZZ_CHECK(cond, ...)                                                  \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fprintf(stderr, "fuzz oracle: %s (%s:%d): ", #cond, __FILE__, __LINE__); \
      fprintf(stderr, __VA_ARGS__);                                            \
      fputc('\n', stderr);                                                     \
      abort();                                                                 \
    }                                                                          \
  } while (0)

/* ---- the capped allocator ------------------------------------------ */

/* Refuses any request that would take more than FUZZ_MEM_CAP bytes in all:
 * memory stays bounded whatever sizes the input names, and the library's
 * handling of a refused allocation is exercised on the way. */
#define FUZZ_MEM_CAP ((size_t)64 << 20)
#define FUZZ_HDR 32
/* Canary bytes after every block: an overrun is seen without ASan too (the
 * replay in a plain build). */
#define FUZZ_TAIL 256
#define FUZZ_CANARY 0xA5

typedef struct fuzz_alloc {
  size_t live;    /* bytes outstanding */
  size_t peak;    /* most bytes outstanding at once */
  long blocks;    /* blocks outstanding */
  long calls;     /* malloc_fn calls */
  long refused;   /* calls answered with NULL */
  size_t max_req; /* largest request */
} fuzz_alloc;

static inline void *fuzz_malloc(size_t size, void *ud) {
  fuzz_alloc *a = ud;
  a->calls++;
  if (size > a->max_req)
    a->max_req = size;
  if (size > FUZZ_MEM_CAP - a->live) {
    a->refused++;
    return NULL;
  }
  unsigned char *p = malloc(size + FUZZ_HDR + FUZZ_TAIL);
  if (!p) {
    a->refused++;
    return NULL;
  }
  memcpy(p, &size, sizeof size);
  memset(p + FUZZ_HDR + size, FUZZ_CANARY, FUZZ_TAIL);
  a->live += size;
  if (a->live > a->peak)
    a->peak = a->live;
  a->blocks++;
  return p + FUZZ_HDR;
}

static inline void fuzz_free(void *ptr, void *ud) {
  fuzz_alloc *a = ud;
  if (!ptr)
    return;
  unsigned char *p = (unsigned char *)ptr - FUZZ_HDR;
  size_t size;
  memcpy(&size, p, sizeof size);
  FUZZ_CHECK(size <= a->live && a->blocks > 0, "free of a foreign block");
  for (size_t i = 0; i < FUZZ_TAIL; i++)
    FUZZ_CHECK(p[FUZZ_HDR + size + i] == FUZZ_CANARY,
               "a %zu-byte block was written past its end (byte %zu)", size, i);
  a->live -= size;
  a->blocks--;
  free(p);
}

static inline imml_allocator fuzz_hooks(fuzz_alloc *a) {
  imml_allocator h;
  h.malloc_fn = fuzz_malloc;
  h.free_fn = fuzz_free;
  h.user_data = a;
  return h;
}

/* ---- a failed call must say why ------------------------------------ */

static inline void fuzz_check_failure(imml_status st, const char *msg,
                                      const char *call) {
  FUZZ_CHECK(st > IMML_OK && st <= IMML_ERR_UNSUPPORTED,
             "%s: status %d is no imml_status", call, (int)st);
  FUZZ_CHECK(strcmp(imml_status_string(st), "unknown status") != 0, "%s", call);
  FUZZ_CHECK(msg && msg[0] != '\0', "%s failed (%s) without a message", call,
             imml_status_string(st));
}

/* A failed imml_model_create / imml_model_load_mem / imml_model_share: *out
 * is the failed handle (NULL only when even that could not be allocated:
 * IMML_ERR_NOMEM), holding the message and refusing every other call with
 * IMML_ERR_STATE.  Checks that, then frees the handle. */
static inline void fuzz_failed_handle(imml_status st, imml_model *h,
                                      const char *call) {
  FUZZ_CHECK(h != NULL || st == IMML_ERR_NOMEM,
             "%s failed (%s) without a failed handle", call,
             imml_status_string(st));
  if (!h)
    return;
  fuzz_check_failure(st, imml_model_errmsg(h), call);
  imml_config c;
  imml_config_init(&c);
  FUZZ_CHECK(imml_model_get_config(h, &c) == IMML_ERR_STATE,
             "%s: a failed handle gives a config", call);
  FUZZ_CHECK(imml_param_count(h) == 0 && imml_fdc_dict_fill(h) == 0,
             "%s: a failed handle has parameters", call);
  size_t need = 0;
  FUZZ_CHECK(imml_model_save_mem(h, NULL, 0, &need) == IMML_ERR_STATE,
             "%s: a failed handle saves", call);
  FUZZ_CHECK(imml_model_errmsg(h)[0] != '\0',
             "%s: the failed handle lost its message", call);
  imml_model_free(h);
}

/* ---- checkpoint framing (doc/FORMAT.md) ----------------------------- */

static inline uint32_t fuzz_crc32(const unsigned char *p, size_t n) {
  uint32_t crc = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; i++) {
    crc ^= p[i];
    for (int j = 0; j < 8; j++)
      crc = (crc & 1u) ? 0xEDB88320u ^ (crc >> 1) : crc >> 1;
  }
  return crc ^ 0xFFFFFFFFu;
}

static inline void fuzz_put32(unsigned char *b, size_t at, uint32_t v) {
  for (int i = 0; i < 4; i++)
    b[at + (size_t)i] = (unsigned char)(v >> (8 * i));
}

/* Makes a (mutated) checkpoint self-consistent in its framing: the payload
 * size says what is there and the CRC matches, so that the loader's field
 * checks, not the checksum, meet the mutation.  size >= 28. */
static inline void fuzz_fix_framing(unsigned char *b, size_t size) {
  const uint64_t payload = (uint64_t)size - 28;
  fuzz_put32(b, 16, (uint32_t)payload);
  fuzz_put32(b, 20, (uint32_t)(payload >> 32));
  fuzz_put32(b, size - 4, fuzz_crc32(b, size - 4));
}

/* ---- the byte encoding of fuzz_config ------------------------------- */

/* An int is one byte b:
 *   0x00..0x7f  the value b;
 *   0x80 -1, 0x81 INT_MAX, 0x82 INT_MIN;
 *   0x83..0xa0  2^(b - 0x83) (1 .. 2^29);
 *   0xa1..0xbe  2^(b - 0xa1) + 1;
 *   0xbf..0xff  the next 4 bytes, little-endian two's complement.
 * A float is one byte b: below 16 an entry of fuzz_float_table, otherwise
 * the next 4 bytes as an IEEE-754 bit pattern.  A missing byte reads as the
 * field's default (the input simply ends). */
#define FUZZ_INT_RAW 0xff
#define FUZZ_FLOAT_RAW 0xff

static const float fuzz_float_table[16] = {
    0.0f,  1.0f,   0.5f,    0.1f,    -1.0f, NAN,  INFINITY, -INFINITY,
    1e30f, 1e-30f, FLT_MAX, FLT_MIN, -0.0f, 2.0f, 1e-8f,    0.999f};

typedef struct fuzz_reader {
  const uint8_t *p;
  size_t n, pos;
} fuzz_reader;

static inline int fuzz_byte(fuzz_reader *r, int *b) {
  if (r->pos >= r->n)
    return 0;
  *b = r->p[r->pos++];
  return 1;
}

static inline uint32_t fuzz_u32(fuzz_reader *r) {
  uint32_t v = 0;
  for (int i = 0; i < 4; i++) {
    int b = 0;
    fuzz_byte(r, &b);
    v |= (uint32_t)b << (8 * i);
  }
  return v;
}

static inline int fuzz_int(fuzz_reader *r, int def) {
  int b;
  if (!fuzz_byte(r, &b))
    return def;
  if (b < 0x80)
    return b;
  if (b == 0x80)
    return -1;
  if (b == 0x81)
    return INT_MAX;
  if (b == 0x82)
    return INT_MIN;
  if (b <= 0xa0)
    return 1 << (b - 0x83);
  if (b <= 0xbe)
    return (1 << (b - 0xa1)) + 1;
  const uint32_t u = fuzz_u32(r);
  int32_t v;
  memcpy(&v, &u, sizeof v);
  return v;
}

static inline float fuzz_float(fuzz_reader *r, float def) {
  int b;
  if (!fuzz_byte(r, &b))
    return def;
  if (b < 16)
    return fuzz_float_table[b];
  const uint32_t u = fuzz_u32(r);
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* ---- a host F&T and a one-process collective ------------------------ */

/* logits[i][c] = sum_m sum_t slot_m[i][t] * w(m, t, c), w from a hash:
 * no state, so one ops struct serves any shape. */
static inline float fuzz_w(int m, int t, int c) {
  uint32_t h =
      (uint32_t)m * 2654435761u ^ (uint32_t)t * 40503u ^ (uint32_t)c * 69069u;
  h ^= h >> 13;
  return (float)(h % 201u) / 100.0f - 1.0f;
}

static inline int fuzz_host_forward(void *ud, int training, int B, int M, int k,
                                    const float *const *slots, int C,
                                    float *logits) {
  (void)ud;
  (void)training;
  for (int i = 0; i < B; i++)
    for (int c = 0; c < C; c++) {
      float acc = 0.0f;
      for (int m = 0; m < M; m++)
        for (int t = 0; t < k; t++)
          acc += slots[m][(size_t)i * k + t] * fuzz_w(m, t, c);
      logits[(size_t)i * C + c] = acc;
    }
  return 0;
}

static inline int fuzz_host_backward(void *ud, int B, int M, int k,
                                     const float *const *slots,
                                     const float *dlogits, int C,
                                     float *const *dslots) {
  (void)ud;
  (void)slots;
  for (int m = 0; m < M; m++)
    for (int i = 0; i < B; i++)
      for (int t = 0; t < k; t++) {
        float acc = 0.0f;
        for (int c = 0; c < C; c++)
          acc += dlogits[(size_t)i * C + c] * fuzz_w(m, t, c);
        dslots[m][(size_t)i * k + t] = acc;
      }
  return 0;
}

static inline imml_ft_ops fuzz_host_ops(void) {
  imml_ft_ops ops;
  imml_ft_ops_init(&ops);
  ops.forward = fuzz_host_forward;
  ops.backward = fuzz_host_backward;
  return ops;
}

/* Every rank sends what this one sends. */
static inline int fuzz_allgather(void *ud, const float *send, size_t count,
                                 float *recv) {
  const int *world = ud;
  for (int r = 0; r < *world; r++)
    memcpy(recv + (size_t)r * count, send, count * sizeof(float));
  return 0;
}

/* ---- one training step and one prediction --------------------------- */

/* Checks one successful prediction of B rows. */
static inline void fuzz_check_prediction(int B, int C, const float *logits,
                                         const float *probs,
                                         const int *classes) {
  for (int i = 0; i < B; i++) {
    FUZZ_CHECK(classes[i] >= 0 && classes[i] < C, "class %d", classes[i]);
    double sum = 0.0;
    for (int j = 0; j < C; j++) {
      const float pj = probs[(size_t)i * C + j];
      FUZZ_CHECK(isfinite(logits[(size_t)i * C + j]) && pj >= 0.0f &&
                     pj <= 1.0f,
                 "prediction row %d class %d", i, j);
      sum += pj;
    }
    FUZZ_CHECK(fabs(sum - 1.0) < 1e-3, "probabilities sum to %g", sum);
  }
}

/* Deterministic features in [-1, 1] and labels; batch B <= 8, widths are
 * the model's.  Every call must succeed or fail with a documented status
 * and a message; NaN/Inf produced inside (huge parameters, tiny tau) is
 * IMML_ERR_NONFINITE.  A prediction runs on a share of the model and on the
 * model itself, with the same result; a training step is forward, backward,
 * imml_commit, imml_optim_step. */
static inline void fuzz_exercise(imml_model *m, int train) {
  imml_config c;
  imml_config_init(&c);
  FUZZ_CHECK(imml_model_get_config(m, &c) == IMML_OK, "model_get_config");
  const int M = c.n_modalities;
  const int B = c.max_batch < 3 ? c.max_batch : 3;
  float *x[IMML_MAX_MODALITIES];
  const float *cx[IMML_MAX_MODALITIES];
  int labels[3];
  for (int mm = 0; mm < M; mm++) {
    const size_t n = (size_t)B * (size_t)c.dims[mm];
    x[mm] = malloc(n * sizeof(float));
    FUZZ_CHECK(x[mm] != NULL, "test allocation");
    for (size_t i = 0; i < n; i++)
      x[mm][i] = (float)((i * 7 + (size_t)mm * 3) % 9) / 4.0f - 1.0f;
    cx[mm] = x[mm];
  }
  for (int i = 0; i < B; i++)
    labels[i] = i % c.n_classes;
  const size_t nl = (size_t)B * (size_t)c.n_classes;
  float *logits = malloc(nl * sizeof(float));
  float *probs = malloc(nl * sizeof(float));
  float *logits2 = malloc(nl * sizeof(float));
  float *probs2 = malloc(nl * sizeof(float));
  FUZZ_CHECK(logits && probs && logits2 && probs2, "test allocation");
  int classes[3], classes2[3];
  imml_model *ws = NULL;
  imml_status st = imml_model_share(m, &ws);
  if (st == IMML_OK) {
    FUZZ_CHECK(ws != NULL && ws != m, "imml_model_share gave no share");
    st = imml_predict(ws, B, cx, logits, probs, classes);
    const imml_status st2 = imml_predict(m, B, cx, logits2, probs2, classes2);
    FUZZ_CHECK(st2 == st, "imml_predict: %s on the share, %s on the model",
               imml_status_string(st), imml_status_string(st2));
    if (st == IMML_OK) {
      fuzz_check_prediction(B, c.n_classes, logits, probs, classes);
      FUZZ_CHECK(memcmp(logits, logits2, nl * sizeof(float)) == 0 &&
                     memcmp(probs, probs2, nl * sizeof(float)) == 0 &&
                     memcmp(classes, classes2, (size_t)B * sizeof(int)) == 0,
                 "the share and the model predict differently");
      st = imml_unimodal_get(ws, M - 1, logits);
      FUZZ_CHECK(st == IMML_OK, "imml_unimodal_get: %d (%s)", (int)st,
                 imml_model_errmsg(ws));
    } else {
      FUZZ_CHECK(st == IMML_ERR_NONFINITE || st == IMML_ERR_CALLBACK,
                 "imml_predict: %s (%s)", imml_status_string(st),
                 imml_model_errmsg(ws));
      fuzz_check_failure(st, imml_model_errmsg(ws), "imml_predict (share)");
      fuzz_check_failure(st2, imml_model_errmsg(m), "imml_predict (model)");
      FUZZ_CHECK(imml_unimodal_get(ws, M - 1, logits) == IMML_ERR_STATE,
                 "unimodal logits after a failed prediction");
    }
    /* a share refuses to train */
    FUZZ_CHECK(imml_forward(ws, IMML_MODE_TRAIN, B, cx, labels, NULL, NULL) ==
                   IMML_ERR_STATE,
               "a share ran a training forward");
    imml_model_free(ws);
  } else {
    FUZZ_CHECK(st == IMML_ERR_NOMEM, "imml_model_share: %s",
               imml_status_string(st));
    fuzz_failed_handle(st, ws, "imml_model_share");
  }
  if (train) {
    imml_losses l;
    st = imml_forward(m, IMML_MODE_TRAIN, B, cx, labels, logits, &l);
    if (st == IMML_OK) {
      FUZZ_CHECK(isfinite(l.total), "finite forward with loss %g", l.total);
      st = imml_backward(m, NULL);
      if (st == IMML_OK) {
        st = imml_commit(m);
        FUZZ_CHECK(st == IMML_OK, "imml_commit after a backward: %s (%s)",
                   imml_status_string(st), imml_model_errmsg(m));
        FUZZ_CHECK(imml_commit(m) == IMML_ERR_STATE, "a second commit");
        st = imml_optim_step(m);
        if (st != IMML_OK) {
          FUZZ_CHECK(st == IMML_ERR_STATE || st == IMML_ERR_NONFINITE,
                     "imml_optim_step: %s", imml_status_string(st));
          fuzz_check_failure(st, imml_model_errmsg(m), "imml_optim_step");
        }
      } else {
        FUZZ_CHECK(st == IMML_ERR_NONFINITE, "imml_backward: %s",
                   imml_status_string(st));
        fuzz_check_failure(st, imml_model_errmsg(m), "imml_backward");
      }
    } else {
      FUZZ_CHECK(st == IMML_ERR_NONFINITE, "imml_forward: %s (%s)",
                 imml_status_string(st), imml_model_errmsg(m));
      fuzz_check_failure(st, imml_model_errmsg(m), "imml_forward");
    }
    /* whatever happened, nothing non-finite reached the model */
    float *p = NULL, *g = NULL;
    size_t n = 0;
    FUZZ_CHECK(imml_param_flat(m, &p, &g, &n) == IMML_OK, "param_flat");
    for (size_t i = 0; i < n; i++)
      FUZZ_CHECK(isfinite(p[i]) && isfinite(g[i]),
                 "parameter or gradient %zu is %g / %g", i, (double)p[i],
                 (double)g[i]);
    float ema[IMML_MAX_MODALITIES];
    int steps = 0;
    FUZZ_CHECK(imml_warmup_get(m, &steps, ema) == IMML_OK, "warmup_get");
    /* EMAs of cross-entropies (METHOD.md section 5): finite, >= 0 */
    for (int mm = 0; mm < M; mm++)
      FUZZ_CHECK(ema[mm] >= 0.0f && isfinite(ema[mm]), "ema[%d] = %g", mm,
                 (double)ema[mm]);
  }
  for (int mm = 0; mm < M; mm++)
    free(x[mm]);
  free(logits);
  free(probs);
  free(logits2);
  free(probs2);
}

/* ---- the checkpoint oracle (fuzz_load.c, fuzz_struct.c) ------------- */

#define FUZZ_LOAD_LIMIT (FUZZ_MEM_CAP / 4)
/* More than a model handle takes (the one block memory_limit does not
 * count) */
#define FUZZ_HANDLE_SLACK ((size_t)64 << 10)

/* One imml_model_load_mem through a's allocator, retried with the host
 * callbacks when the checkpoint needs them.  A refusal is checked and its
 * failed handle freed (NULL returned). */
static inline imml_model *fuzz_load(const uint8_t *data, size_t size,
                                    fuzz_alloc *a, size_t limit,
                                    imml_status *st_out) {
  imml_load_options o;
  imml_load_options_init(&o);
  o.allocator = fuzz_hooks(a);
  if (limit)
    o.memory_limit = limit;
  imml_model *m = (imml_model *)&o; /* must be overwritten */
  const long calls0 = a->calls;
  imml_status st = imml_model_load_mem(data, size, NULL, &o, &m);
  if (st == IMML_ERR_NEED_CALLBACKS) {
    FUZZ_CHECK(m != (imml_model *)&o, "*out not written");
    fuzz_failed_handle(st, m, "imml_model_load_mem");
    FUZZ_CHECK(a->live == 0 && a->blocks == 0,
               "a refused load leaked %zu bytes", a->live);
    const imml_ft_ops ops = fuzz_host_ops();
    m = (imml_model *)&o;
    st = imml_model_load_mem(data, size, &ops, &o, &m);
  }
  *st_out = st;
  FUZZ_CHECK(m != (imml_model *)&o, "*out not written");
  /* the budget: the model's memory (arena and optimiser state) within
   * memory_limit, the handle besides; no larger request even reaches the
   * allocator */
  FUZZ_CHECK(!limit || (a->peak <= limit + FUZZ_HANDLE_SLACK &&
                        a->max_req <= limit + FUZZ_HANDLE_SLACK),
             "%zu bytes held at once, %zu asked for at once, under "
             "memory_limit %zu (%s)",
             a->peak, a->max_req, limit, imml_status_string(st));
  if (st != IMML_OK) {
    FUZZ_CHECK(st != IMML_ERR_NOMEM || a->refused > 0,
               "IMML_ERR_NOMEM without a refused allocation: %s",
               imml_model_errmsg(m));
    /* nothing bigger than a handle was asked for: the failed handle is the
     * only block held */
    FUZZ_CHECK(
        st != IMML_ERR_TOO_LARGE ||
            (a->blocks == 1 ? a->max_req <= a->live : a->calls == calls0),
        "TOO_LARGE after %ld allocations (largest %zu bytes, %ld "
        "held): %s",
        a->calls - calls0, a->max_req, a->blocks, imml_model_errmsg(m));
    FUZZ_CHECK(a->blocks <= 1, "a refused load holds %ld blocks", a->blocks);
    fuzz_failed_handle(st, m, "imml_model_load_mem");
    FUZZ_CHECK(a->live == 0 && a->blocks == 0,
               "a refused load leaked %zu bytes", a->live);
    return NULL;
  }
  FUZZ_CHECK(m != NULL && imml_model_errmsg(m)[0] == '\0',
             "loaded, message '%s'", m ? imml_model_errmsg(m) : "(null)");
  return m;
}

/* The size query (buf NULL) is answered with the size, as OK or as
 * IMML_ERR_BUFFER_SMALL; the save itself must succeed. */
static inline unsigned char *fuzz_save(imml_model *m, size_t *size) {
  size_t need = 0;
  const imml_status sq = imml_model_save_mem(m, NULL, 0, &need);
  FUZZ_CHECK((sq == IMML_OK || sq == IMML_ERR_BUFFER_SMALL) && need > 28,
             "size query: %s (%s)", imml_status_string(sq),
             imml_model_errmsg(m));
  unsigned char *buf = malloc(need);
  FUZZ_CHECK(buf != NULL, "test allocation");
  FUZZ_CHECK(imml_model_save_mem(m, buf, need, size) == IMML_OK &&
                 *size == need,
             "imml_model_save_mem: %s", imml_model_errmsg(m));
  return buf;
}

/* The promises about one checkpoint (fuzz_load.c's header comment): the
 * bytes are loaded with memory_limit `limit` (and, when that is too small,
 * with the default, where the capped allocator stops what it cannot hold);
 * a refusal is checked and its status returned; a checkpoint that loads
 * must save back to the same bytes, predict, train one step and save a
 * checkpoint that loads again.  With `after` given, a loaded checkpoint's
 * last save is handed back in *after (malloc'ed, *after_size bytes) and
 * left untouched otherwise. */
static inline imml_status fuzz_checkpoint(const uint8_t *data, size_t size,
                                          size_t limit, unsigned char **after,
                                          size_t *after_size) {
  fuzz_alloc a;
  memset(&a, 0, sizeof a);
  imml_status st;
  imml_model *m = fuzz_load(data, size, &a, limit, &st);
  if (!m && st == IMML_ERR_TOO_LARGE) {
    /* over the limit: let the capped allocator refuse it instead */
    memset(&a, 0, sizeof a);
    m = fuzz_load(data, size, &a, 0, &st);
  }
  if (!m)
    return st;
  /* the loader validated every field: the model saves to the same bytes */
  size_t n = 0;
  unsigned char *again = fuzz_save(m, &n);
  FUZZ_CHECK(n == size && memcmp(again, data, size) == 0,
             "re-saved checkpoint differs (%zu vs %zu bytes)", n, size);
  free(again);
  /* it predicts and trains (a small arena only: time, not memory, is the
   * limit here) and still saves a checkpoint that loads */
  fuzz_exercise(m, a.live <= ((size_t)4 << 20));
  again = fuzz_save(m, &n);
  fuzz_alloc b;
  memset(&b, 0, sizeof b);
  imml_model *r = fuzz_load(again, n, &b, 0, &st);
  FUZZ_CHECK(r != NULL || st == IMML_ERR_NOMEM,
             "the model's own checkpoint does not load: %s",
             imml_status_string(st));
  imml_model_free(r);
  if (after) {
    *after = again;
    *after_size = n;
  } else {
    free(again);
  }
  imml_model_free(m);
  FUZZ_CHECK(a.live == 0 && a.blocks == 0 && b.live == 0 && b.blocks == 0,
             "imml_model_free left %zu + %zu bytes", a.live, b.live);
  return IMML_OK;
}

#endif
