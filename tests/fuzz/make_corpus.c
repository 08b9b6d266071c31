/* Writes the fuzzers' seed corpus: usage make_corpus DIR
 *   DIR/load/    checkpoints for fuzz_load: valid ones of a few small
 *                configurations (built-in and host F&T, with and without
 *                an optimiser, warm-up done or in flight, p fixed by the
 *                host with imml_predominant_set), and broken ones
 *                (truncated, a flipped byte, a bad CRC, and fields made
 *                invalid with the CRC fixed);
 *   DIR/config/  inputs for fuzz_config (fuzz_common.h's encoding): valid
 *                configurations and ones beyond each limit, and the fields
 *                of 1.0 (precision, memory_limit, a struct from a newer
 *                header with a zero or non-zero tail);
 *   DIR/struct/  edit programs for fuzz_struct (its header comment): every
 *                seed unedited, and one edit of each kind, among them the
 *                findings of issue 13 (step counts around 2^53 and
 *                INT64_MAX, max_batch 2^17, dict_size 2^20).
 * The committed tests/fuzz/corpus was written by it (meson compile -C
 * BUILD fuzz-corpus); the fuzzers add what they find beside it. */
#include "fuzz_common.h"

#include <errno.h>
#include <sys/stat.h>

/* ---- output ---------------------------------------------------------- */

static const char *out_dir;
static int n_written;
static size_t bytes_written;

static void put_file(const char *sub, const char *name, const void *buf,
                     size_t size) {
  char path[1024];
  snprintf(path, sizeof path, "%s/%s/%s", out_dir, sub, name);
  FILE *f = fopen(path, "wb");
  if (!f || (size && fwrite(buf, 1, size, f) != size) || fclose(f) != 0) {
    fprintf(stderr, "make_corpus: cannot write %s\n", path);
    exit(1);
  }
  n_written++;
  bytes_written += size;
}

static void make_dir(const char *sub) {
  char path[1024];
  snprintf(path, sizeof path, "%s%s%s", out_dir, sub ? "/" : "",
           sub ? sub : "");
  if (mkdir(path, 0755) != 0 && errno != EEXIST) {
    fprintf(stderr, "make_corpus: cannot create %s\n", path);
    exit(1);
  }
}

/* ---- checkpoints ------------------------------------------------------ */

static uint32_t rd32(const unsigned char *b, size_t at) {
  return (uint32_t)b[at] | (uint32_t)b[at + 1] << 8 |
         (uint32_t)b[at + 2] << 16 | (uint32_t)b[at + 3] << 24;
}

static void wr32(unsigned char *b, size_t at, uint32_t v) {
  for (int i = 0; i < 4; i++)
    b[at + (size_t)i] = (unsigned char)(v >> (8 * i));
}

static void wrf(unsigned char *b, size_t at, float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  wr32(b, at, u);
}

static void fix_crc(unsigned char *b, size_t size) {
  wr32(b, size - 4, fuzz_crc32(b, size - 4));
}

/* Byte offsets of the fields make_corpus changes (doc/FORMAT.md). */
typedef struct layout {
  size_t max_batch, dict_size, tau, first_value, second_name, dict_fill,
      opt_flag, m2;
} layout;

static void walk(const unsigned char *b, size_t size, layout *L) {
  memset(L, 0, sizeof *L);
  const uint32_t M = rd32(b, 24);
  size_t o = 28 + 4 * (size_t)M; /* after the dims */
  const uint32_t k = rd32(b, o + 4);
  L->max_batch = o + 12;
  L->dict_size = o + 16;
  L->tau = o + 32;
  o += 20 + 16 + 12 + 8 + 4; /* ints, floats, p/warm-up/slot, seed, builtin */
  o += 12 + 4 * (size_t)M;   /* predominant state */
  const uint32_t nt = rd32(b, o);
  o += 4;
  size_t n_params = 0;
  for (uint32_t i = 0; i < nt; i++) {
    if (i == 1)
      L->second_name = o + 4;
    const uint32_t len = rd32(b, o);
    o += 4 + len;
    const size_t cnt = (size_t)rd32(b, o) * rd32(b, o + 4);
    o += 8;
    if (i == 0)
      L->first_value = o;
    o += 4 * cnt;
    n_params += cnt;
  }
  L->dict_fill = o;
  o += 8 + 4 * (size_t)rd32(b, o) * M * k;
  L->opt_flag = o;
  /* flag, kind, lr, wd, momentum, nesterov, beta1, beta2, eps, clip, t
   * (8 bytes), has_buf, then moment 1 */
  L->m2 = rd32(b, o) ? o + 52 + 4 * n_params : 0;
  if (L->m2 + 4 * n_params + 4 > size)
    L->m2 = 0;
}

typedef struct spec {
  const char *name;
  int M, dims[3], H, k, C, B, J, warmup, predominant, strict, host;
  int opt; /* -1 none */
  int steps;
  int fix_p; /* >= 0: imml_predominant_set(fix_p) before training */
} spec;

static const spec specs[] = {
    {"valid-builtin-adamw",
     2,
     {3, 2, 0},
     4,
     2,
     2,
     3,
     4,
     2,
     -1,
     0,
     0,
     IMML_OPTIM_ADAMW,
     4,
     -1},
    {"valid-builtin-fresh",
     2,
     {2, 3, 0},
     3,
     2,
     3,
     2,
     3,
     5,
     -1,
     0,
     0,
     -1,
     0,
     -1},
    {"valid-host-sgd-warmup",
     2,
     {3, 3, 0},
     4,
     2,
     2,
     4,
     6,
     10,
     -1,
     0,
     1,
     IMML_OPTIM_SGD,
     2,
     -1},
    {"valid-strict-m3-sgd",
     3,
     {2, 2, 3},
     3,
     2,
     3,
     2,
     5,
     0,
     1,
     1,
     0,
     IMML_OPTIM_SGD,
     3,
     -1},
    {"valid-host-noopt-fixed",
     2,
     {2, 4, 0},
     3,
     3,
     2,
     3,
     3,
     1,
     -1,
     0,
     1,
     -1,
     3,
     -1},
    /* p fixed by the host (imml_predominant_set) with the warm-up unfinished */
    {"valid-predominant-set",
     3,
     {2, 3, 2},
     3,
     2,
     2,
     3,
     4,
     20,
     -1,
     0,
     0,
     IMML_OPTIM_ADAMW,
     2,
     2},
};
#define N_SPECS (int)(sizeof specs / sizeof specs[0])

static unsigned char *checkpoint(const spec *sp, size_t *size) {
  imml_config c;
  imml_config_init(&c);
  c.n_modalities = sp->M;
  c.dims = sp->dims;
  c.hidden_dim = sp->H;
  c.knowledge_dim = sp->k;
  c.n_classes = sp->C;
  c.max_batch = sp->B;
  c.dict_size = sp->J;
  c.warmup_steps = sp->warmup;
  c.predominant = sp->predominant;
  c.slot_mode = sp->strict ? IMML_SLOT_STRICT : IMML_SLOT_CONDITIONAL;
  c.seed = 7;
  const imml_ft_ops ops = fuzz_host_ops();
  imml_model *m = NULL;
  if (imml_model_create(&c, sp->host ? &ops : NULL, &m) != IMML_OK) {
    fprintf(stderr, "make_corpus: %s: %s\n", sp->name, imml_model_errmsg(m));
    exit(1);
  }
  if (sp->fix_p >= 0 && imml_predominant_set(m, sp->fix_p) != IMML_OK) {
    fprintf(stderr, "make_corpus: %s: %s\n", sp->name, imml_model_errmsg(m));
    exit(1);
  }
  if (sp->opt >= 0) {
    imml_optim_config oc;
    imml_optim_config_init(&oc, (imml_optim_kind)sp->opt);
    oc.lr = 0.05f;
    if (sp->opt == IMML_OPTIM_SGD) {
      oc.momentum = 0.9f;
      oc.nesterov = 1;
    }
    imml_optim_setup(m, &oc);
  }
  for (int s = 0; s < sp->steps; s++) {
    float x[3][16];
    const float *f[3];
    int y[4];
    for (int mm = 0; mm < sp->M; mm++) {
      for (int i = 0; i < sp->B * sp->dims[mm]; i++)
        x[mm][i] = (float)((i * 5 + mm * 3 + s * 7) % 11) / 5.0f - 1.0f;
      f[mm] = x[mm];
    }
    for (int i = 0; i < sp->B; i++)
      y[i] = (i + s) % sp->C;
    if (imml_forward(m, IMML_MODE_TRAIN, sp->B, f, y, NULL, NULL) != IMML_OK ||
        imml_backward(m, NULL) != IMML_OK || imml_commit(m) != IMML_OK ||
        (sp->opt >= 0 && imml_optim_step(m) != IMML_OK)) {
      fprintf(stderr, "make_corpus: %s: %s\n", sp->name, imml_model_errmsg(m));
      exit(1);
    }
  }
  size_t need = 0;
  imml_model_save_mem(m, NULL, 0, &need);
  unsigned char *buf = need ? malloc(need) : NULL;
  if (!buf || imml_model_save_mem(m, buf, need, size) != IMML_OK) {
    fprintf(stderr, "make_corpus: %s: save failed\n", sp->name);
    exit(1);
  }
  imml_model_free(m);
  return buf;
}

static void broken_checkpoints(const unsigned char *v, size_t size) {
  unsigned char *b = malloc(size);
  if (!b)
    exit(1);
  layout L;
  walk(v, size, &L);
  put_file("load", "broken-empty", "", 0);
  put_file("load", "broken-magic-only", "IMMLCKPT", 8);
  put_file("load", "broken-header-only", v, 27);
  put_file("load", "broken-truncated-half", v, size / 2);
  put_file("load", "broken-no-crc", v, size - 4);
  memcpy(b, v, size);
  b[size / 2] ^= 0x10;
  put_file("load", "broken-flipped-payload", b, size);
  memcpy(b, v, size);
  b[size - 1] ^= 0x01;
  put_file("load", "broken-bad-crc", b, size);
  /* fields made invalid, CRC fixed so the field check itself runs */
  struct {
    const char *name;
    size_t at;
    int is_float;
    uint32_t u;
    float f;
  } edits[] = {
      {"crafted-version-2", 8, 0, 2, 0},
      {"crafted-dims-2p31", 28, 0, 0x7FFFFFFFu, 0},
      {"crafted-max-batch-2p20", L.max_batch, 0, 1u << 20, 0},
      {"crafted-dict-size-0", L.dict_size, 0, 0, 0},
      {"crafted-tau-nan", L.tau, 1, 0, NAN},
      {"crafted-param-inf", L.first_value, 1, 0, INFINITY},
      {"crafted-tensor-name", L.second_name, 0, 0x78787878u, 0},
      {"crafted-dict-fill-huge", L.dict_fill, 0, 0x7FFFFFF0u, 0},
      {"crafted-optimiser-flag-2", L.opt_flag, 0, 2, 0},
      {"crafted-negative-moment-2", L.m2, 1, 0, -1.0f},
  };
  for (size_t i = 0; i < sizeof edits / sizeof edits[0]; i++) {
    if (edits[i].at == 0 || edits[i].at + 4 > size - 4)
      continue;
    memcpy(b, v, size);
    if (edits[i].is_float)
      wrf(b, edits[i].at, edits[i].f);
    else
      wr32(b, edits[i].at, edits[i].u);
    fix_crc(b, size);
    put_file("load", edits[i].name, b, size);
  }
  free(b);
}

/* ---- fuzz_config inputs ---------------------------------------------- */

typedef struct enc {
  unsigned char b[512];
  size_t n;
} enc;

static void e_byte(enc *e, int v) { e->b[e->n++] = (unsigned char)v; }

static void e_raw(enc *e, uint32_t u) {
  for (int i = 0; i < 4; i++)
    e_byte(e, (int)((u >> (8 * i)) & 0xFF));
}

static void e_int(enc *e, int v) {
  if (v >= 0 && v < 0x80) {
    e_byte(e, v);
  } else if (v == -1) {
    e_byte(e, 0x80);
  } else if (v == INT_MAX) {
    e_byte(e, 0x81);
  } else if (v > 0 && (v & (v - 1)) == 0 && v <= (1 << 29)) {
    int s = 0;
    while ((1 << s) != v)
      s++;
    e_byte(e, 0x83 + s);
  } else {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    e_byte(e, FUZZ_INT_RAW);
    e_raw(e, u);
  }
}

static void e_float(enc *e, float f) {
  for (int i = 0; i < 16; i++)
    if (memcmp(&fuzz_float_table[i], &f, sizeof f) == 0) {
      e_byte(e, i);
      return;
    }
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  e_byte(e, FUZZ_FLOAT_RAW);
  e_raw(e, u);
}

typedef struct cfg_seed {
  const char *name;
  int flags, M, d;
  int H, k, C, B, J, p, warm, slot;
  float beta, g1, g2, tau;
  int kind;
  float lr, wd, mom;
  int nest;
  int world, rank;
} cfg_seed;

static const cfg_seed cfg_seeds[] = {
    {"valid-small", 0,    2,    4,    8, 4,     3,     4,    8, -1, 2, 0,
     0.5f,          0.1f, 1.0f, 0.1f, 1, 1e-3f, 0.01f, 0.0f, 0, 1,  0},
    {"valid-host-adamw-train",
     1 | 2 | 4,
     2,
     3,
     4,
     2,
     2,
     3,
     5,
     -1,
     1,
     0,
     0.5f,
     0.1f,
     1.0f,
     0.1f,
     1,
     0.1f,
     0.01f,
     0.0f,
     0,
     1,
     0},
    {"valid-m3-strict-sgd-train",
     2 | 4,
     3,
     2,
     3,
     2,
     4,
     3,
     4,
     1,
     0,
     1,
     1.0f,
     1.0f,
     0.5f,
     0.5f,
     0,
     0.5f,
     0.0f,
     0.9f,
     1,
     1,
     0},
    {"valid-collective-train",
     4 | 32,
     2,
     2,
     3,
     2,
     2,
     2,
     3,
     -1,
     1,
     0,
     0.5f,
     0.1f,
     1.0f,
     0.1f,
     1,
     1e-3f,
     0.01f,
     0.0f,
     0,
     2,
     1},
    {"valid-huge-lr-train",
     2 | 4,
     2,
     3,
     4,
     2,
     3,
     3,
     4,
     0,
     0,
     0,
     0.5f,
     1e30f,
     1e30f,
     1e-30f,
     0,
     1e30f,
     0.0f,
     0.0f,
     0,
     1,
     0},
    {"limits-m65", 0,    65,   2,    8, 4,     3,     4,    8, -1, 2, 0,
     0.5f,         0.1f, 1.0f, 0.1f, 1, 1e-3f, 0.01f, 0.0f, 0, 1,  0},
    {"limits-dims-max",
     0,
     2,
     INT_MAX,
     8,
     4,
     3,
     4,
     8,
     -1,
     2,
     0,
     0.5f,
     0.1f,
     1.0f,
     0.1f,
     1,
     1e-3f,
     0.01f,
     0.0f,
     0,
     1,
     0},
    {"limits-product",
     0,
     2,
     1 << 24,
     1 << 24,
     4,
     3,
     4,
     8,
     -1,
     2,
     0,
     0.5f,
     0.1f,
     1.0f,
     0.1f,
     1,
     1e-3f,
     0.01f,
     0.0f,
     0,
     1,
     0},
    {"limits-batch-dict",
     4,
     2,
     2,
     2,
     2,
     2,
     1 << 20,
     1 << 20,
     -1,
     2,
     0,
     0.5f,
     0.1f,
     1.0f,
     0.1f,
     1,
     1e-3f,
     0.01f,
     0.0f,
     0,
     1,
     0},
    {"invalid-tau-nan",
     0,
     2,
     4,
     8,
     4,
     3,
     4,
     8,
     -1,
     2,
     0,
     0.5f,
     0.1f,
     1.0f,
     NAN,
     1,
     1e-3f,
     0.01f,
     0.0f,
     0,
     1,
     0},
    {"invalid-struct-size",
     8,
     2,
     4,
     8,
     4,
     3,
     4,
     8,
     -1,
     2,
     0,
     0.5f,
     0.1f,
     1.0f,
     0.1f,
     1,
     1e-3f,
     0.01f,
     0.0f,
     0,
     1,
     0},
    {"invalid-dims-null",
     16,
     2,
     4,
     8,
     4,
     3,
     4,
     8,
     -1,
     2,
     0,
     0.5f,
     0.1f,
     1.0f,
     0.1f,
     1,
     1e-3f,
     0.01f,
     0.0f,
     0,
     1,
     0},
    {"invalid-allocator",
     64,
     2,
     4,
     8,
     4,
     3,
     4,
     8,
     -1,
     2,
     0,
     0.5f,
     0.1f,
     1.0f,
     0.1f,
     1,
     1e-3f,
     0.01f,
     0.0f,
     0,
     1,
     0},
    {"invalid-collective-world",
     32,
     2,
     4,
     8,
     4,
     3,
     4,
     8,
     -1,
     2,
     0,
     0.5f,
     0.1f,
     1.0f,
     0.1f,
     1,
     1e-3f,
     0.01f,
     0.0f,
     0,
     1 << 20,
     0},
};

/* The encoding of s up to the collective (the 0.x fields). */
static void encode_seed(enc *e, const cfg_seed *s, int flags) {
  e->n = 0;
  e_byte(e, flags);
  e_int(e, s->M);
  const int nd = s->M >= 1 && s->M <= IMML_MAX_MODALITIES ? s->M : 1;
  for (int m = 0; m < nd; m++)
    e_int(e, s->d + (s->d < 100 ? m : 0));
  e_int(e, s->H);
  e_int(e, s->k);
  e_int(e, s->C);
  e_int(e, s->B);
  e_int(e, s->J);
  e_int(e, s->p);
  e_int(e, s->warm);
  e_int(e, s->slot);
  e_float(e, s->beta);
  e_float(e, s->g1);
  e_float(e, s->g2);
  e_float(e, s->tau);
  e_raw(e, 12345u);
  e_raw(e, 0u);
  e_int(e, s->kind);
  e_float(e, s->lr);
  e_float(e, s->wd);
  e_float(e, s->mom);
  e_int(e, s->nest);
  e_float(e, 0.9f);
  e_float(e, 0.999f);
  e_float(e, 1e-8f);
  e_float(e, 1.0f);
  e_int(e, s->world);
  e_int(e, s->rank);
}

/* Seeds of the fields added in 1.0 (precision, memory_limit, a struct from
 * a newer header): one of the seeds above, its flags changed, and the 1.0
 * fields appended. */
typedef struct v1_seed {
  const char *name;
  int base;      /* index into cfg_seeds */
  int flags;     /* replaces the base's */
  int precision; /* imml_config.precision */
  int mem_kib;   /* imml_config.memory_limit in KiB */
  int tail;      /* first byte beyond the library's imml_config (flag 128) */
} v1_seed;

#define KIB_8G (1 << 23)

static const v1_seed v1_seeds[] = {
    {"v1-newer-struct-zero-tail-train", 1, 1 | 2 | 4 | 128, 0, KIB_8G, 0},
    {"v1-newer-struct-unknown-field", 0, 128, 0, KIB_8G, 0x5a},
    {"v1-precision-bf16-train", 1, 1 | 2 | 4, IMML_PRECISION_BF16, KIB_8G, 0},
    {"v1-precision-invalid", 0, 0, 7, KIB_8G, 0},
    {"v1-memory-limit-1kib", 0, 0, 0, 1, 0},
    {"v1-memory-limit-64mib-train", 2, 2 | 4, 0, 1 << 16, 0},
    /* the arena of valid-small is about 9.4 KiB */
    {"v1-memory-limit-9kib", 0, 0, 0, 9, 0},
    {"v1-memory-limit-10kib-train", 0, 4, 0, 10, 0},
};

static void config_seeds(void) {
  enc e;
  for (size_t i = 0; i < sizeof cfg_seeds / sizeof cfg_seeds[0]; i++) {
    encode_seed(&e, &cfg_seeds[i], cfg_seeds[i].flags);
    put_file("config", cfg_seeds[i].name, e.b, e.n);
  }
  for (size_t i = 0; i < sizeof v1_seeds / sizeof v1_seeds[0]; i++) {
    const v1_seed *v = &v1_seeds[i];
    encode_seed(&e, &cfg_seeds[v->base], v->flags);
    e_int(&e, v->precision);
    e_int(&e, v->mem_kib);
    e_int(&e, v->tail);
    put_file("config", v->name, e.b, e.n);
  }
}

/* ---- fuzz_struct programs --------------------------------------------- */

/* fuzz_struct's op codes and field numbers (tests/fuzz/fuzz_struct.c) */
enum {
  OP_SET_U32,
  OP_ADD_U32,
  OP_SET_F32,
  OP_SET_U64,
  OP_ADD_U64,
  OP_SET_ELEM,
  OP_SET_VAL,
  OP_RESHAPE,
  OP_NAME,
  OP_TENSORS,
  OP_FRAMING,
  OP_SCALE
};
enum {
  U_VERSION,
  U_RESERVED,
  U_M,
  U_H,
  U_K,
  U_C,
  U_B,
  U_J,
  U_PREDOMINANT,
  U_WARMUP,
  U_SLOT,
  U_BUILTIN,
  U_P_FIXED,
  U_P,
  U_STEPS,
  U_N_TENSORS,
  U_FILL,
  U_POS,
  U_HAS_OPT,
  U_KIND,
  U_NESTEROV,
  U_HAS_BUF
};
/* fs_u32 / fs_u64 codes: 2^e, 2^e - 1, 2^e + 1 */
#define P32(e) (0x40 + (e))
#define P64(e) (0x40 + (e))
#define P64_MINUS1(e) (0x80 + (e))
#define P64_PLUS1(e) (0xc1 + (e))
/* fuzz_common.h's float table */
#define F_NEG1 4
#define F_NAN 5
#define F_INF 6
#define F_1E30 8
#define F_ZERO 0
#define F_ONE 1
#define F_TWO 13

typedef struct program {
  const char *name;
  unsigned char b[24];
  size_t n;
} program;

#define PROG(name, ...)                                                        \
  { name, {__VA_ARGS__}, sizeof((unsigned char[]){__VA_ARGS__}) }

static const program programs[] = {
    PROG("seed-0-adamw", 0, 0),
    PROG("seed-1-fresh", 1, 1),
    PROG("seed-2-host-sgd-warmup", 2, 2),
    PROG("seed-3-strict-m3", 3, 3),
    PROG("seed-4-host-noopt", 4, 0),
    PROG("seed-5-predominant-set", 5, 1),
    PROG("seed-6-plain-sgd", 6, 2),
    PROG("seed-7-adamw-clip", 7, 3),
    /* finding 1: the optimiser's step count */
    PROG("step-int64-max", 0, 0, OP_SET_U64, 1, P64_MINUS1(63)),
    PROG("step-int64-max-minus-1", 0, 0, OP_SET_U64, 1, P64_MINUS1(63),
         OP_ADD_U64, 1, 0xff),
    PROG("step-2p53", 0, 0, OP_SET_U64, 1, P64(53)),
    PROG("step-2p53-plus-1", 0, 0, OP_SET_U64, 1, P64_PLUS1(53)),
    PROG("step-2p53-minus-1", 0, 0, OP_SET_U64, 1, P64_MINUS1(53)),
    PROG("step-2p53-sgd", 2, 0, OP_SET_U64, 1, P64(53)),
    PROG("step-uint64-max", 7, 0, OP_SET_U64, 1, 0xc0),
    /* finding 4: sizes the file does not scale */
    PROG("max-batch-2p17", 0, 3, OP_SET_U32, U_B, P32(17)),
    PROG("max-batch-2p17-limit-256k", 0, 0, OP_SET_U32, U_B, P32(17)),
    PROG("dict-size-2p20", 1, 3, OP_RESHAPE, 8, P32(20)),
    PROG("dict-size-2p16-limit-1m", 0, 1, OP_RESHAPE, 8, P32(16)),
    /* consistent reshapes: valid checkpoints of other models */
    PROG("reshape-m3", 0, 0, OP_RESHAPE, 0, 3),
    PROG("reshape-m64", 1, 3, OP_RESHAPE, 0, 0xa1),
    PROG("reshape-m65", 1, 3, OP_RESHAPE, 0, 0xa2),
    PROG("reshape-m1", 0, 0, OP_RESHAPE, 0, 1),
    PROG("reshape-dims0-1000", 0, 2, OP_RESHAPE, 1, 0, 0xff, 0xe8, 0x03, 0, 0),
    PROG("reshape-hidden-0", 0, 0, OP_RESHAPE, 2, 0),
    PROG("reshape-knowledge-5", 4, 0, OP_RESHAPE, 3, 5),
    PROG("reshape-classes-1", 0, 0, OP_RESHAPE, 4, 1),
    PROG("reshape-to-host", 0, 0, OP_RESHAPE, 5),
    PROG("reshape-to-builtin", 2, 0, OP_RESHAPE, 5),
    PROG("reshape-fill-over", 0, 0, OP_RESHAPE, 6, 5),
    PROG("reshape-fill-2", 7, 0, OP_RESHAPE, 6, 2),
    PROG("reshape-add-optimiser", 1, 0, OP_RESHAPE, 7),
    PROG("reshape-drop-optimiser", 0, 0, OP_RESHAPE, 7),
    /* fields with the arrays left as they are */
    PROG("set-m3", 0, 0, OP_SET_U32, U_M, 3),
    PROG("set-p-5", 0, 0, OP_SET_U32, U_P, 5),
    PROG("set-p-unfixed", 0, 0, OP_SET_U32, U_P_FIXED, 0),
    PROG("set-steps-2p31", 5, 0, OP_SET_U32, U_STEPS, P32(31)),
    PROG("set-steps-warmup", 5, 0, OP_SET_U32, U_STEPS, 20),
    PROG("set-warmup-0-unfixed", 2, 0, OP_SET_U32, U_WARMUP, 0),
    PROG("set-predominant-0", 0, 0, OP_SET_U32, U_PREDOMINANT, 0),
    PROG("tensor-count-minus-1", 0, 0, OP_ADD_U32, U_N_TENSORS, 0xff),
    PROG("has-opt-2", 0, 0, OP_SET_U32, U_HAS_OPT, 2),
    PROG("sgd-as-adamw", 6, 0, OP_SET_U32, U_KIND, 1),
    PROG("kind-2", 0, 0, OP_SET_U32, U_KIND, 2),
    PROG("has-buf-2", 2, 0, OP_SET_U32, U_HAS_BUF, 2),
    PROG("adamw-nesterov", 0, 0, OP_SET_U32, U_NESTEROV, 1),
    PROG("version-2", 0, 0, OP_SET_U32, U_VERSION, 2),
    PROG("reserved-1", 0, 0, OP_SET_U32, U_RESERVED, 1),
    PROG("slot-2", 3, 0, OP_SET_U32, U_SLOT, 2),
    PROG("fill-dict-size", 7, 0, OP_SET_U32, U_FILL, 8),
    PROG("pos-over", 0, 0, OP_SET_U32, U_POS, 4),
    PROG("dims0-2p24", 0, 0, OP_SET_ELEM, 0, 0, P32(24)),
    PROG("rows-plus-1", 0, 0, OP_SET_ELEM, 1, 0, 4),
    PROG("name-length-15", 0, 0, OP_SET_ELEM, 3, 1, 15),
    /* values */
    PROG("ema-nan", 0, 0, OP_SET_VAL, 0, 0, 0, 0, F_NAN),
    PROG("ema-negative", 3, 0, OP_SET_VAL, 0, 0, 1, 0, F_NEG1),
    PROG("ema-1e30", 5, 0, OP_SET_VAL, 0, 0, 2, 0, F_1E30),
    PROG("param-inf", 0, 0, OP_SET_VAL, 1, 2, 0, 0, F_INF),
    PROG("m2-negative", 0, 0, OP_SET_VAL, 4, 0, 3, 0, F_NEG1),
    PROG("m1-negative-sgd", 2, 0, OP_SET_VAL, 3, 0, 3, 0, F_NEG1),
    PROG("dict-nan", 0, 0, OP_SET_VAL, 2, 0, 1, 0, F_NAN),
    PROG("params-times-1e30", 0, 0, OP_SCALE, 1, F_1E30),
    PROG("moments-times-zero", 7, 0, OP_SCALE, 4, F_ZERO),
    PROG("tau-nan", 0, 0, OP_SET_F32, 3, F_NAN),
    PROG("beta-2", 0, 0, OP_SET_F32, 0, F_TWO),
    PROG("lr-negative", 0, 0, OP_SET_F32, 4, F_NEG1),
    PROG("eps-0", 0, 0, OP_SET_F32, 9, F_ZERO),
    PROG("beta2-1", 0, 0, OP_SET_F32, 8, F_ONE),
    /* names, tensors, framing */
    PROG("name-byte", 0, 0, OP_NAME, 1, 0, 'x'),
    PROG("drop-tensor", 0, 0, OP_TENSORS, 0, 3, 0),
    PROG("duplicate-tensor", 0, 0, OP_TENSORS, 1, 0, 0),
    PROG("swap-tensors", 0, 0, OP_TENSORS, 2, 0, 1),
    PROG("unaccounted-bytes", 0, 0, OP_FRAMING, 0, 4),
    PROG("payload-size-minus-1", 0, 0, OP_FRAMING, 1, 0xff),
    PROG("payload-size-plus-1", 6, 0, OP_FRAMING, 1, 1),
};

static void struct_seeds(void) {
  for (size_t i = 0; i < sizeof programs / sizeof programs[0]; i++)
    put_file("struct", programs[i].name, programs[i].b, programs[i].n);
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: make_corpus DIR\n");
    return 2;
  }
  out_dir = argv[1];
  make_dir(NULL);
  make_dir("load");
  make_dir("config");
  make_dir("struct");
  for (int i = 0; i < N_SPECS; i++) {
    size_t size;
    unsigned char *buf = checkpoint(&specs[i], &size);
    char name[64];
    snprintf(name, sizeof name, "%s.imml", specs[i].name);
    put_file("load", name, buf, size);
    if (i == 0)
      broken_checkpoints(buf, size);
    free(buf);
  }
  config_seeds();
  struct_seeds();
  printf("make_corpus: %d files, %zu bytes in %s\n", n_written, bytes_written,
         out_dir);
  return 0;
}
