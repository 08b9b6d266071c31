/* flock(): BSD and Linux, outside POSIX */
#define _DEFAULT_SOURCE

/* The checkpoint format (doc/FORMAT.md): explicit little-endian fields, a
 * CRC-32 over everything before it, atomic file writes, and a loader that
 * validates every field before it trusts it. */
#include "cache.h"
#include "internal.h"
#include "kernels.h"

#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#define CKPT_MAGIC "IMMLCKPT"
#define CKPT_VERSION 1u
#define CKPT_HEADER 24 /* magic 8, version 4, reserved 4, payload size 8 */
#define CKPT_TRAILER 4 /* CRC-32 */

/* ---- CRC-32 (IEEE 802.3, reflected 0xEDB88320) ---------------------- */

static uint32_t crc32_ieee(const unsigned char *p, size_t n) {
  uint32_t table[256];
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int j = 0; j < 8; j++)
      c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    table[i] = c;
  }
  uint32_t crc = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; i++)
    crc = table[(crc ^ p[i]) & 0xFFu] ^ (crc >> 8);
  return crc ^ 0xFFFFFFFFu;
}

/* ---- writer: with base NULL it only counts ------------------------- */

typedef struct writer {
  unsigned char *base;
  size_t pos;
} writer;

static void put_bytes(writer *w, const void *src, size_t n) {
  if (w->base)
    memcpy(w->base + w->pos, src, n);
  w->pos += n;
}

static void put_u32(writer *w, uint32_t v) {
  unsigned char b[4] = {(unsigned char)v, (unsigned char)(v >> 8),
                        (unsigned char)(v >> 16), (unsigned char)(v >> 24)};
  put_bytes(w, b, 4);
}

static void put_u64(writer *w, uint64_t v) {
  put_u32(w, (uint32_t)v);
  put_u32(w, (uint32_t)(v >> 32));
}

static void put_f32(writer *w, float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  put_u32(w, u);
}

static void put_f32s(writer *w, const float *x, size_t n) {
  for (size_t i = 0; i < n; i++)
    put_f32(w, x[i]);
}

static void write_model(writer *w, const imml_model *m) {
  const imml_config *c = &m->cfg;
  const int M = c->n_modalities, k = c->knowledge_dim;
  put_bytes(w, CKPT_MAGIC, 8);
  put_u32(w, CKPT_VERSION);
  put_u32(w, 0); /* reserved */
  const size_t size_pos = w->pos;
  put_u64(w, 0); /* payload size, patched below */
  const size_t payload_start = w->pos;
  /* config */
  put_u32(w, (uint32_t)M);
  for (int mm = 0; mm < M; mm++)
    put_u32(w, (uint32_t)c->dims[mm]);
  put_u32(w, (uint32_t)c->hidden_dim);
  put_u32(w, (uint32_t)k);
  put_u32(w, (uint32_t)c->n_classes);
  put_u32(w, (uint32_t)c->max_batch);
  put_u32(w, (uint32_t)c->dict_size);
  put_f32(w, c->beta);
  put_f32(w, c->gamma1);
  put_f32(w, c->gamma2);
  put_f32(w, c->tau);
  put_u32(w, (uint32_t)c->predominant);
  put_u32(w, (uint32_t)c->warmup_steps);
  put_u32(w, (uint32_t)c->slot_mode);
  put_u64(w, c->seed);
  put_u32(w, (uint32_t)m->builtin_ft);
  /* predominant-modality state */
  put_u32(w, (uint32_t)m->p_fixed);
  put_u32(w, (uint32_t)(m->p_fixed ? m->p : -1));
  put_u32(w, (uint32_t)m->steps);
  put_f32s(w, m->ema, (size_t)M);
  /* parameters */
  put_u32(w, (uint32_t)m->n_tensors);
  for (int i = 0; i < m->n_tensors; i++) {
    const imml_tensor *t = &m->tensors[i];
    const uint32_t len = (uint32_t)strlen(t->name);
    put_u32(w, len);
    put_bytes(w, t->name, len);
    put_u32(w, (uint32_t)t->rows);
    put_u32(w, (uint32_t)t->cols);
    put_f32s(w, m->params + t->offset, (size_t)t->rows * t->cols);
  }
  /* strata dictionary */
  put_u32(w, (uint32_t)m->dict_fill);
  put_u32(w, (uint32_t)m->dict_pos);
  put_f32s(w, m->dict, (size_t)m->dict_fill * M * k);
  /* optimiser */
  put_u32(w, (uint32_t)m->opt.active);
  if (m->opt.active) {
    const imml_optim_config *o = &m->opt.cfg;
    put_u32(w, (uint32_t)o->kind);
    put_f32(w, o->lr);
    put_f32(w, o->weight_decay);
    put_f32(w, o->momentum);
    put_u32(w, (uint32_t)o->nesterov);
    put_f32(w, o->beta1);
    put_f32(w, o->beta2);
    put_f32(w, o->eps);
    put_f32(w, o->clip_norm);
    put_u64(w, (uint64_t)m->opt.t);
    put_u32(w, (uint32_t)m->opt.has_buf);
    put_f32s(w, m->opt.m1, m->n_params);
    put_f32s(w, m->opt.m2, m->n_params);
  }
  const uint64_t payload = (uint64_t)(w->pos - payload_start);
  if (w->base) {
    writer patch = {w->base, size_pos};
    put_u64(&patch, payload);
    const uint32_t crc = crc32_ieee(w->base, w->pos);
    put_u32(w, crc);
  } else {
    w->pos += CKPT_TRAILER;
  }
}

static size_t checkpoint_size(const imml_model *m) {
  writer w = {NULL, 0};
  write_model(&w, m);
  return w.pos;
}

/* Uncommitted micro-batches are not part of the format: a checkpoint is
 * a model between steps. */
static imml_status check_between_steps(imml_model *m) {
  if (m->acc.micro > 0)
    return imml_fail(m, IMML_ERR_STATE,
                     "%d micro-batch(es) are not committed: call imml_commit "
                     "before saving",
                     m->acc.micro);
  return IMML_OK;
}

imml_status imml_model_save_mem(imml_model *m, void *buf, size_t capacity,
                                size_t *size) {
  IMML_ENTER_TRAIN(m);
  if (!size)
    return imml_fail(m, IMML_ERR_NULL, "size is NULL");
  imml_status st0 = check_between_steps(m);
  if (st0 != IMML_OK)
    return st0;
  const size_t need = checkpoint_size(m);
  if (!buf) {
    *size = need;
    return IMML_OK;
  }
  if (capacity < need) {
    *size = need;
    return imml_fail(m, IMML_ERR_BUFFER_SMALL,
                     "capacity = %zu bytes: the checkpoint needs %zu", capacity,
                     need);
  }
  writer w = {buf, 0};
  write_model(&w, m);
  *size = w.pos;
  return IMML_OK;
}

/* Temporary files of imml_model_save: PATH.imml-tmp-0 .. -7, each held
 * under an exclusive flock while a save writes it.  A save killed with -9
 * leaves its file behind unlocked; the next save to the same path takes the
 * first unlocked name, truncates what is there and renames it over PATH, so
 * a crash leaves at most one stale file per concurrent saver, and the next
 * save removes it.  A file under one of these names that neither is empty
 * nor starts with the checkpoint magic is not ours and is never touched
 * (doc/FORMAT.md). */
#define TMP_SUFFIX ".imml-tmp"
#define TMP_SLOTS 8
#define TMP_SUFFIX_SIZE 16

/* Whether the open file fd, named `name`, is a temporary of ours to take:
 * locked here (or on a file system without flock), a regular file with one
 * link, still under that name, and empty (when allow_empty) or starting
 * with the checkpoint magic. */
static int claim_temp(const char *name, int fd, int allow_empty) {
  struct stat a, b;
  unsigned char head[8];
  ssize_t got = 0;
  /* a file system without flock (some network or FUSE mounts) cannot
   * tell a live save from a stale one: the name is then used as is */
  const int locked = flock(fd, LOCK_EX | LOCK_NB) == 0 || errno != EWOULDBLOCK;
  /* never write through a second link to some other file */
  if (!(locked && fstat(fd, &a) == 0 && S_ISREG(a.st_mode) && a.st_nlink == 1 &&
        lstat(name, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino))
    return 0;
  if (a.st_size == 0)
    return allow_empty;
  do /* a crashed save's, or someone else's */
    got = pread(fd, head, sizeof head, 0);
  while (got < 0 && errno == EINTR);
  return got > 0 && memcmp(head, CKPT_MAGIC, (size_t)got) == 0;
}

/* Returns a locked, empty temporary file for tmp[0..plen) (written into
 * tmp), or -1 with errno (0: every name is held or foreign). */
static int open_temp(char *tmp, size_t plen) {
  int last_errno = 0;
  for (int i = 0; i < TMP_SLOTS; i++) {
    snprintf(tmp + plen, TMP_SUFFIX_SIZE, "%s-%d", TMP_SUFFIX, i);
    const int fd = open(tmp, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0666);
    if (fd < 0) {
      last_errno = errno;
      continue;
    }
    if (claim_temp(tmp, fd, 1) && ftruncate(fd, 0) == 0)
      return fd;
    close(fd); /* held by a live save, renamed away, or foreign */
  }
  errno = last_errno;
  return -1;
}

/* After a save: removes the other slots' stale temporaries (those of saves
 * killed while another save held a lower slot), only those that start with
 * the magic and no live save holds. */
static void remove_stale_temps(char *tmp, size_t plen) {
  for (int i = 0; i < TMP_SLOTS; i++) {
    snprintf(tmp + plen, TMP_SUFFIX_SIZE, "%s-%d", TMP_SUFFIX, i);
    const int fd = open(tmp, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
      continue;
    if (claim_temp(tmp, fd, 0))
      unlink(tmp); /* while holding its lock */
    close(fd);
  }
}

imml_status imml_model_save(imml_model *m, const char *path) {
  IMML_ENTER_TRAIN(m);
  if (!path)
    return imml_fail(m, IMML_ERR_NULL, "path is NULL");
  imml_status st0 = check_between_steps(m);
  if (st0 != IMML_OK)
    return st0;
  const size_t need = checkpoint_size(m);
  unsigned char *buf = imml_alloc(&m->alloc, need);
  if (!buf)
    return imml_fail(m, IMML_ERR_NOMEM,
                     "out of memory for a %zu-byte checkpoint buffer", need);
  writer w = {buf, 0};
  write_model(&w, m);
  const size_t plen = strlen(path);
  char *tmp = imml_alloc(&m->alloc, plen + TMP_SUFFIX_SIZE);
  if (!tmp) {
    imml_free(&m->alloc, buf);
    return imml_fail(m, IMML_ERR_NOMEM, "out of memory for a file name");
  }
  memcpy(tmp, path, plen + 1);
  imml_status st = IMML_OK;
  const int fd = open_temp(tmp, plen);
  if (fd < 0) {
    st = imml_fail(m, IMML_ERR_IO,
                   "cannot create a temporary file beside '%s' (%s-0..%d): "
                   "%s",
                   path, TMP_SUFFIX, TMP_SLOTS - 1,
                   errno ? strerror(errno) : "every name is in use");
    goto out;
  }
  size_t done = 0;
  while (done < need) {
    ssize_t r = write(fd, buf + done, need - done);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0) {
      st = imml_fail(m, IMML_ERR_IO, "writing '%s': %s", tmp,
                     r < 0 ? strerror(errno) : "no progress");
      break;
    }
    done += (size_t)r;
  }
  if (st == IMML_OK && fsync(fd) != 0)
    st = imml_fail(m, IMML_ERR_IO, "fsync of '%s': %s", tmp, strerror(errno));
  /* renamed (or removed) while the lock is held, so no other save can
   * take the name in between */
  if (st == IMML_OK && rename(tmp, path) != 0)
    st = imml_fail(m, IMML_ERR_IO, "renaming '%s' to '%s': %s", tmp, path,
                   strerror(errno));
  if (st != IMML_OK)
    unlink(tmp);
  if (close(fd) != 0 && st == IMML_OK)
    st = imml_fail(m, IMML_ERR_IO, "closing '%s': %s", path, strerror(errno));
  if (st == IMML_OK)
    remove_stale_temps(tmp, plen);
out:
  imml_free(&m->alloc, tmp);
  imml_free(&m->alloc, buf);
  return st;
}

/* ---- reader: every read is bounds-checked -------------------------- */

typedef struct reader {
  const unsigned char *p;
  size_t pos, end;
  char *err;
  size_t err_size;
  imml_status st;
} reader;

static int need(reader *r, size_t n, const char *field) {
  if (r->st != IMML_OK)
    return 0;
  if (n > r->end - r->pos) {
    imml_set_err(r->err, r->err_size,
                 "%s at offset %zu: needs %zu bytes, only %zu remain", field,
                 r->pos, n, r->end - r->pos);
    r->st = IMML_ERR_TRUNCATED;
    return 0;
  }
  return 1;
}

static uint32_t get_u32(reader *r, const char *field) {
  if (!need(r, 4, field))
    return 0;
  const unsigned char *b = r->p + r->pos;
  r->pos += 4;
  return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 |
         (uint32_t)b[3] << 24;
}

static uint64_t get_u64(reader *r, const char *field) {
  const uint64_t lo = get_u32(r, field);
  const uint64_t hi = get_u32(r, field);
  return lo | hi << 32;
}

static float get_f32(reader *r, const char *field) {
  const uint32_t u = get_u32(r, field);
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static int get_f32s(reader *r, float *x, size_t n, const char *field) {
  size_t bytes;
  if (!imml_size_mul(&bytes, n, 4) || !need(r, bytes, field))
    return 0;
  const size_t at = r->pos;
  for (size_t i = 0; i < n; i++)
    x[i] = get_f32(r, field);
  if (!k_all_finite(n, x)) {
    imml_set_err(r->err, r->err_size, "%s at offset %zu holds NaN or infinity",
                 field, at);
    r->st = IMML_ERR_NONFINITE;
    return 0;
  }
  return 1;
}

static int bad(reader *r, imml_status st, size_t at, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;
static int bad(reader *r, imml_status st, size_t at, const char *fmt, ...) {
  char msg[200];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  imml_set_err(r->err, r->err_size, "%s (offset %zu)", msg, at);
  r->st = st;
  return 0;
}

/* Reads a u32 that must fit a non-negative int. */
static int get_int(reader *r, const char *field, int *out) {
  const size_t at = r->pos;
  const uint32_t v = get_u32(r, field);
  if (r->st != IMML_OK)
    return 0;
  if (v > 0x7FFFFFFFu)
    return bad(r, IMML_ERR_FORMAT, at, "%s = %u is out of range", field, v);
  *out = (int)v;
  return 1;
}

static int read_config(reader *r, imml_config *c, int *dims, int *builtin) {
  imml_config_init(c);
  size_t at = r->pos;
  const uint32_t M = get_u32(r, "config.n_modalities");
  if (r->st != IMML_OK)
    return 0;
  if (M < 2 || M > IMML_MAX_MODALITIES)
    return bad(r, IMML_ERR_FORMAT, at,
               "config.n_modalities = %u: must be in "
               "2..%d",
               M, IMML_MAX_MODALITIES);
  c->n_modalities = (int)M;
  for (uint32_t mm = 0; mm < M; mm++)
    if (!get_int(r, "config.dims", &dims[mm]))
      return 0;
  c->dims = dims;
  get_int(r, "config.hidden_dim", &c->hidden_dim);
  get_int(r, "config.knowledge_dim", &c->knowledge_dim);
  get_int(r, "config.n_classes", &c->n_classes);
  get_int(r, "config.max_batch", &c->max_batch);
  get_int(r, "config.dict_size", &c->dict_size);
  c->beta = get_f32(r, "config.beta");
  c->gamma1 = get_f32(r, "config.gamma1");
  c->gamma2 = get_f32(r, "config.gamma2");
  c->tau = get_f32(r, "config.tau");
  c->predominant = (int32_t)get_u32(r, "config.predominant");
  get_int(r, "config.warmup_steps", &c->warmup_steps);
  get_int(r, "config.slot_mode", &c->slot_mode);
  c->seed = get_u64(r, "config.seed");
  at = r->pos;
  const uint32_t b = get_u32(r, "builtin_ft");
  if (r->st != IMML_OK)
    return 0;
  if (b > 1)
    return bad(r, IMML_ERR_FORMAT, at, "builtin_ft = %u: must be 0 or 1", b);
  *builtin = (int)b;
  char msg[200];
  imml_status st = imml_config_validate(c, NULL, NULL, msg, sizeof msg);
  if (st != IMML_OK)
    return bad(r,
               st == IMML_ERR_TOO_LARGE ? IMML_ERR_TOO_LARGE : IMML_ERR_FORMAT,
               CKPT_HEADER, "%s", msg);
  return 1;
}

/* Bytes the rest of the payload must hold at least, from the config alone:
 * rejects absurd sizes before anything is allocated. */
static int check_room(reader *r, const imml_config *c, uint64_t n_params) {
  const uint64_t M = (uint64_t)c->n_modalities;
  uint64_t min_bytes = 12 + 4 * M + 4 + 4 * n_params + 8;
  if (min_bytes > r->end - r->pos)
    return bad(r, IMML_ERR_TRUNCATED, r->pos,
               "the config implies %llu parameters but only %zu bytes remain",
               (unsigned long long)n_params, r->end - r->pos);
  return 1;
}

/* The header's checks, on its first min(size, CKPT_HEADER) bytes and the
 * total size: a file is checked this way before anything else is read. */
static imml_status check_header(const unsigned char *hdr, size_t size,
                                char *err, size_t n) {
  if (size < 8 ? memcmp(hdr, CKPT_MAGIC, size) != 0
               : memcmp(hdr, CKPT_MAGIC, 8) != 0) {
    imml_set_err(err, n, "bad magic at offset 0: not an imml checkpoint");
    return IMML_ERR_BAD_MAGIC;
  }
  if (size < CKPT_HEADER + CKPT_TRAILER) {
    imml_set_err(err, n,
                 "%zu bytes: shorter than the %d-byte header and "
                 "checksum",
                 size, CKPT_HEADER + CKPT_TRAILER);
    return IMML_ERR_TRUNCATED;
  }
  reader r = {hdr, 8, CKPT_HEADER, err, n, IMML_OK};
  const uint32_t version = get_u32(&r, "version");
  if (version != CKPT_VERSION) {
    imml_set_err(err, n,
                 "format version %u at offset 8: this library reads "
                 "version %u",
                 version, CKPT_VERSION);
    return IMML_ERR_BAD_VERSION;
  }
  const uint32_t reserved = get_u32(&r, "reserved");
  if (reserved != 0) {
    imml_set_err(err, n, "reserved field at offset 12 = %u: must be 0",
                 reserved);
    return IMML_ERR_FORMAT;
  }
  const uint64_t payload = get_u64(&r, "payload size");
  const uint64_t avail = size - CKPT_HEADER - CKPT_TRAILER;
  if (payload > avail) {
    imml_set_err(err, n,
                 "payload size %llu at offset 16: only %llu bytes "
                 "follow the header",
                 (unsigned long long)payload, (unsigned long long)avail);
    return IMML_ERR_TRUNCATED;
  }
  if (payload < avail) {
    imml_set_err(err, n,
                 "payload size %llu at offset 16: %llu bytes of "
                 "trailing data",
                 (unsigned long long)payload,
                 (unsigned long long)(avail - payload));
    return IMML_ERR_FORMAT;
  }
  return IMML_OK;
}

/* Whether the file declares optimiser state, read ahead of the tensors and
 * the dictionary (whose sizes the config fixes): 1 yes, 0 no or not
 * readable (parsing then fails where it is). */
static int peek_optimiser(const reader *r, const imml_config *c,
                          const imml_tensor *t, int nt) {
  uint64_t at = r->pos + 4; /* tensor count */
  for (int i = 0; i < nt; i++)
    at += 4 + strlen(t[i].name) + 8 + 4 * (uint64_t)t[i].rows * t[i].cols;
  if (at + 8 > r->end)
    return 0;
  const unsigned char *p = r->p + at;
  const uint32_t fill = (uint32_t)p[0] | (uint32_t)p[1] << 8 |
                        (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
  if (fill > (uint32_t)c->dict_size)
    return 0;
  at += 8 + 4 * (uint64_t)fill * c->n_modalities * c->knowledge_dim;
  if (at + 4 > r->end)
    return 0;
  return r->p[at] == 1 && r->p[at + 1] == 0 && r->p[at + 2] == 0 &&
         r->p[at + 3] == 0;
}

/* The CRC-32 trailer against everything before it. */
static imml_status check_crc(const unsigned char *buf, size_t size, char *err,
                             size_t n) {
  const size_t crc_at = size - CKPT_TRAILER;
  const uint32_t stored =
      (uint32_t)buf[crc_at] | (uint32_t)buf[crc_at + 1] << 8 |
      (uint32_t)buf[crc_at + 2] << 16 | (uint32_t)buf[crc_at + 3] << 24;
  const uint32_t actual = crc32_ieee(buf, crc_at);
  if (stored != actual) {
    imml_set_err(err, n, "CRC-32 at offset %zu is %08x, the data gives %08x",
                 crc_at, stored, actual);
    return IMML_ERR_CHECKSUM;
  }
  return IMML_OK;
}

/* The F&T the file was saved with against the one the caller passes. */
static imml_status check_ft(int builtin, const imml_ft_ops *ft,
                            imml_ft_ops *ops, char *err, size_t n) {
  if (!builtin && !ft) {
    imml_set_err(err, n,
                 "the checkpoint was saved with host F&T callbacks: "
                 "pass the same imml_ft_ops to load it");
    return IMML_ERR_NEED_CALLBACKS;
  }
  if (builtin && ft) {
    imml_set_err(err, n,
                 "the checkpoint uses the built-in F&T: pass ft = "
                 "NULL");
    return IMML_ERR_INVALID_ARG;
  }
  return ft ? imml_ft_validate(ft, ops, err, n) : IMML_OK;
}

/* The predominant-modality section (METHOD.md section 5). */
typedef struct pstate {
  uint32_t fixed;
  int32_t p;
  int steps;
  float ema[IMML_MAX_MODALITIES];
} pstate;

static int read_pstate(reader *r, const imml_config *c, pstate *s) {
  const int M = c->n_modalities;
  const size_t at = r->pos;
  s->fixed = get_u32(r, "p_fixed");
  s->p = (int32_t)get_u32(r, "p");
  s->steps = 0;
  get_int(r, "warmup steps", &s->steps);
  if (!get_f32s(r, s->ema, (size_t)M, "ema"))
    return 0;
  if (s->fixed > 1 || (s->fixed && (s->p < 0 || s->p >= M)) ||
      (!s->fixed && s->p != -1))
    return bad(r, IMML_ERR_FORMAT, at,
               "predominant state (fixed %u, p %d) is invalid for %d "
               "modalities",
               s->fixed, s->p, M);
  if (c->predominant >= 0 && (!s->fixed || s->p != c->predominant))
    return bad(r, IMML_ERR_FORMAT, at,
               "config names predominant %d but the state says %d",
               c->predominant, s->p);
  if (!s->fixed && s->steps >= c->warmup_steps)
    return bad(r, IMML_ERR_FORMAT, at,
               "warm-up steps %d >= warmup_steps %d but p is not fixed",
               s->steps, c->warmup_steps);
  /* EMAs of cross-entropies (METHOD.md section 5): finite, >= 0 */
  for (int mm = 0; mm < M; mm++)
    if (!(s->ema[mm] >= 0.0f && s->ema[mm] <= FLT_MAX))
      return bad(r, IMML_ERR_FORMAT, at,
                 "ema[%d] = %g: must be finite and >= 0", mm,
                 (double)s->ema[mm]);
  return 1;
}

/* The tensors section: names and shapes as the config implies, then the
 * values into the model's parameters. */
static int read_tensors(reader *r, imml_model *m) {
  size_t at = r->pos;
  const uint32_t ntf = get_u32(r, "tensor count");
  if (r->st == IMML_OK && ntf != (uint32_t)m->n_tensors)
    return bad(r, IMML_ERR_FORMAT, at, "%u tensors, the config implies %d", ntf,
               m->n_tensors);
  for (int i = 0; i < m->n_tensors && r->st == IMML_OK; i++) {
    const imml_tensor *t = &m->tensors[i];
    at = r->pos;
    const uint32_t len = get_u32(r, "tensor name length");
    if (r->st != IMML_OK)
      break;
    if (len != strlen(t->name) || !need(r, len, "tensor name") ||
        memcmp(r->p + r->pos, t->name, len) != 0) {
      if (r->st == IMML_OK)
        bad(r, IMML_ERR_FORMAT, at, "tensor %d: expected name '%s'", i,
            t->name);
      break;
    }
    r->pos += len;
    at = r->pos;
    const uint32_t rows = get_u32(r, "tensor rows");
    const uint32_t cols = get_u32(r, "tensor cols");
    if (r->st == IMML_OK &&
        (rows != (uint32_t)t->rows || cols != (uint32_t)t->cols)) {
      bad(r, IMML_ERR_FORMAT, at,
          "tensor '%s' is %u x %u, the config implies %d x %d", t->name, rows,
          cols, t->rows, t->cols);
      break;
    }
    get_f32s(r, m->params + t->offset, (size_t)t->rows * t->cols, t->name);
  }
  return r->st == IMML_OK;
}

/* The strata dictionary section (METHOD.md section 2). */
static int read_dictionary(reader *r, imml_model *m) {
  const imml_config *c = &m->cfg;
  const size_t at = r->pos;
  int fill = 0, pos = 0;
  get_int(r, "dictionary fill", &fill);
  get_int(r, "dictionary position", &pos);
  if (r->st == IMML_OK &&
      (fill > c->dict_size || (fill < c->dict_size && pos != fill) ||
       (fill == c->dict_size && pos >= c->dict_size)))
    return bad(r, IMML_ERR_FORMAT, at,
               "dictionary fill %d / position %d invalid for dict_size %d",
               fill, pos, c->dict_size);
  if (r->st != IMML_OK)
    return 0;
  m->dict_fill = fill;
  m->dict_pos = pos;
  return get_f32s(r, m->dict, (size_t)fill * c->n_modalities * c->knowledge_dim,
                  "dictionary entries");
}

/* The optimiser section: a flag, then (if set) the configuration, the step
 * count, the momentum flag and both moments. */
static int read_optimiser(reader *r, imml_model *m) {
  size_t at = r->pos;
  const uint32_t has_opt = get_u32(r, "optimiser flag");
  if (r->st == IMML_OK && has_opt > 1)
    return bad(r, IMML_ERR_FORMAT, at, "optimiser flag = %u: must be 0 or 1",
               has_opt);
  if (r->st != IMML_OK || !has_opt)
    return r->st == IMML_OK;
  imml_optim_config o;
  imml_optim_config_init(&o, IMML_OPTIM_ADAMW);
  at = r->pos;
  get_int(r, "optim.kind", &o.kind);
  o.lr = get_f32(r, "optim.lr");
  o.weight_decay = get_f32(r, "optim.weight_decay");
  o.momentum = get_f32(r, "optim.momentum");
  get_int(r, "optim.nesterov", &o.nesterov);
  o.beta1 = get_f32(r, "optim.beta1");
  o.beta2 = get_f32(r, "optim.beta2");
  o.eps = get_f32(r, "optim.eps");
  o.clip_norm = get_f32(r, "optim.clip_norm");
  const uint64_t t = get_u64(r, "optim.step");
  int has_buf = 0;
  get_int(r, "optim.has_buf", &has_buf);
  if (r->st != IMML_OK)
    return 0;
  char msg[200];
  imml_optim_config ok;
  if (imml_optim_validate(&o, &ok, msg, sizeof msg) != IMML_OK)
    return bad(r, IMML_ERR_FORMAT, at, "%s", msg);
  if (t > (uint64_t)IMML_OPTIM_STEPS_MAX)
    return bad(r, IMML_ERR_FORMAT, at,
               "optimiser step count %llu: at most 2^53 (the bias "
               "corrections stay exact)",
               (unsigned long long)t);
  if (has_buf > 1)
    return bad(r, IMML_ERR_FORMAT, at, "optim.has_buf = %d: must be 0 or 1",
               has_buf);
  if ((r->st = imml_optim_alloc(m, &ok)) != IMML_OK) {
    imml_set_err(r->err, r->err_size, "%s", m->errmsg);
    return 0;
  }
  m->opt.t = (int64_t)t;
  m->opt.has_buf = has_buf;
  imml_cache_note(m, IMML_EV_MOMENTS_LOADED, NULL);
  get_f32s(r, m->opt.m1, m->n_params, "optimiser moment 1");
  const size_t at2 = r->pos;
  if (get_f32s(r, m->opt.m2, m->n_params, "optimiser moment 2") &&
      ok.kind == IMML_OPTIM_ADAMW)
    for (size_t i = 0; i < m->n_params; i++)
      if (m->opt.m2[i] < 0.0f)
        return bad(r, IMML_ERR_FORMAT, at2 + 4 * i,
                   "AdamW second moment %zu is negative (%g)", i,
                   (double)m->opt.m2[i]);
  return r->st == IMML_OK;
}

/* A checkpoint in memory, section by section (doc/FORMAT.md): header and
 * CRC, config, predominant state, then - once the sizes the config implies
 * are known to fit the bytes present and the memory limit - the model, its
 * tensors, dictionary and optimiser. */
static imml_status parse(const unsigned char *buf, size_t size,
                         const imml_ft_ops *ft, const imml_load_options *opt,
                         imml_model **out, char *err, size_t n) {
  imml_status st = check_header(buf, size, err, n);
  if (st == IMML_OK)
    st = check_crc(buf, size, err, n);
  if (st != IMML_OK)
    return st;
  reader r = {buf, CKPT_HEADER, size - CKPT_TRAILER, err, n, IMML_OK};
  imml_config c;
  int dims[IMML_MAX_MODALITIES];
  int builtin = 0;
  if (!read_config(&r, &c, dims, &builtin))
    return r.st;
  imml_ft_ops ops;
  st = check_ft(builtin, ft, &ops, err, n);
  if (st != IMML_OK)
    return st;
  pstate ps;
  if (!read_pstate(&r, &c, &ps))
    return r.st;
  imml_tensor layout[IMML_MAX_TENSORS];
  int nt = 0;
  const uint64_t np = imml_params_layout(&c, builtin, layout, &nt);
  if (!check_room(&r, &c, np))
    return r.st;
  c.allocator = opt->allocator;
  c.memory_limit = opt->memory_limit;
  /* the optimiser state the file declares counts in the memory limit (np
   * fits size_t: check_room bounded it by the bytes present) */
  const size_t opt_bytes =
      peek_optimiser(&r, &c, layout, nt) ? 2 * sizeof(float) * (size_t)np : 0;
  imml_model *m = NULL;
  st = imml_model_build(&c, dims, ft ? &ops : NULL, "load_options.memory_limit",
                        opt_bytes, &m, err, n);
  if (st != IMML_OK) {
    *out = m; /* NULL, or the failed handle of a refusal */
    return st;
  }
  m->p_fixed = (int)ps.fixed;
  m->p = ps.p;
  m->steps = ps.steps;
  memcpy(m->ema, ps.ema, (size_t)c.n_modalities * sizeof(float));
  if (read_tensors(&r, m) && read_dictionary(&r, m))
    read_optimiser(&r, m);
  if (r.st == IMML_OK && r.pos != r.end)
    bad(&r, IMML_ERR_FORMAT, r.pos, "%zu unexpected bytes before the CRC",
        r.end - r.pos);
  if (r.st != IMML_OK) {
    imml_model_free(m);
    return r.st;
  }
  *out = m;
  return IMML_OK;
}

void imml_load_options_init(imml_load_options *opt) {
  if (!opt)
    return;
  memset(opt, 0, sizeof *opt);
  opt->struct_size = sizeof *opt;
  opt->memory_limit = IMML_MEMORY_LIMIT_DEFAULT;
}

/* Reads and checks the load options (NULL: the defaults) into *o. */
static imml_status load_options(const imml_load_options *in,
                                imml_load_options *o, char *err, size_t n) {
  imml_load_options_init(o);
  if (!in)
    return IMML_OK;
  imml_status st = imml_struct_in(
      o, sizeof *o, IMML_LOAD_OPTIONS_SIZE_KNOWN, IMML_LOAD_OPTIONS_SIZE_1_0,
      in, "imml_load_options", "imml_load_options_init", err, n);
  if (st != IMML_OK)
    return st;
  if (!o->allocator.malloc_fn != !o->allocator.free_fn) {
    imml_set_err(err, n,
                 "load_options.allocator: malloc_fn and free_fn must both be "
                 "set or both be NULL");
    return IMML_ERR_INVALID_ARG;
  }
  return IMML_OK;
}

/* Reads len bytes at the file's current offset; 0, or -1 with errno, or 1
 * when the file ends early. */
static int read_all(int fd, unsigned char *buf, size_t len) {
  size_t done = 0;
  while (done < len) {
    const ssize_t r = read(fd, buf + done, len - done);
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0)
      return -1;
    if (r == 0)
      return 1;
    done += (size_t)r;
  }
  return 0;
}

/* Opens without blocking (a FIFO with no writer would block an fopen),
 * refuses anything but a regular file, checks the header against the
 * file's size and the memory limit, and only then reads the whole file. */
static imml_status load_file(const char *path, const imml_ft_ops *ft,
                             const imml_load_options *o, imml_model **m,
                             char *err, size_t n) {
  if (!path) {
    imml_set_err(err, n, "path is NULL");
    return IMML_ERR_NULL;
  }
  const int fd = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
  if (fd < 0) {
    imml_set_err(err, n, "cannot open '%s': %s", path, strerror(errno));
    return IMML_ERR_IO;
  }
  struct stat sb;
  if (fstat(fd, &sb) != 0) {
    imml_set_err(err, n, "cannot stat '%s': %s", path, strerror(errno));
    close(fd);
    return IMML_ERR_IO;
  }
  if (!S_ISREG(sb.st_mode) || sb.st_size < 0 ||
      (uint64_t)sb.st_size > (uint64_t)SIZE_MAX) {
    const char *kind = S_ISFIFO(sb.st_mode)   ? " (a FIFO)"
                       : S_ISDIR(sb.st_mode)  ? " (a directory)"
                       : S_ISCHR(sb.st_mode)  ? " (a character device)"
                       : S_ISBLK(sb.st_mode)  ? " (a block device)"
                       : S_ISSOCK(sb.st_mode) ? " (a socket)"
                                              : "";
    imml_set_err(err, n, "'%s' is not a regular file%s", path, kind);
    close(fd);
    return IMML_ERR_IO;
  }
  const size_t len = (size_t)sb.st_size;
  unsigned char hdr[CKPT_HEADER];
  const size_t hl = len < CKPT_HEADER ? len : CKPT_HEADER;
  imml_status st = IMML_OK;
  const int rh = read_all(fd, hdr, hl);
  if (rh != 0) {
    imml_set_err(err, n, "reading the header of '%s': %s", path,
                 rh < 0 ? strerror(errno) : "the file shrank");
    st = IMML_ERR_IO;
  }
  if (st == IMML_OK)
    st = check_header(hdr, len, err, n);
  if (st == IMML_OK && len > o->memory_limit) {
    imml_set_err(err, n,
                 "load_options.memory_limit = %zu bytes: '%s' is %zu bytes",
                 o->memory_limit, path, len);
    st = IMML_ERR_TOO_LARGE;
  }
  unsigned char *buf = NULL;
  if (st == IMML_OK) {
    buf = imml_alloc(&o->allocator, len);
    if (!buf) {
      imml_set_err(err, n, "out of memory reading '%s' (%zu bytes)", path, len);
      st = IMML_ERR_NOMEM;
    }
  }
  if (st == IMML_OK) {
    memcpy(buf, hdr, hl);
    const int rr = read_all(fd, buf + hl, len - hl);
    if (rr != 0) {
      imml_set_err(err, n, "reading '%s': %s", path,
                   rr < 0 ? strerror(errno) : "the file shrank while read");
      st = IMML_ERR_IO;
    }
  }
  close(fd);
  if (st == IMML_OK)
    st = parse(buf, len, ft, o, m, err, n);
  imml_free(&o->allocator, buf);
  return st;
}

/* Both loads: the options first, then the file or the buffer, and the
 * outcome through the one error channel (a failed handle). */
static imml_status load_any(int from_file, const char *path, const void *buf,
                            size_t size, const imml_ft_ops *ft,
                            const imml_load_options *opt, imml_model **out) {
  if (!out)
    return IMML_ERR_NULL;
  *out = NULL;
  char err[IMML_ERRMSG_SIZE] = "";
  imml_load_options o;
  imml_model *m = NULL;
  imml_status st = load_options(opt, &o, err, sizeof err);
  const imml_allocator *alloc = st == IMML_OK ? &o.allocator : NULL;
  if (st == IMML_OK && !from_file && !buf) {
    imml_set_err(err, sizeof err, "buffer is NULL");
    st = IMML_ERR_NULL;
  }
  if (st == IMML_OK)
    st = from_file ? load_file(path, ft, &o, &m, err, sizeof err)
                   : parse(buf, size, ft, &o, &m, err, sizeof err);
  return imml_hand_out(st, m, alloc, err, out);
}

imml_status imml_model_load_mem(const void *buf, size_t size,
                                const imml_ft_ops *ft,
                                const imml_load_options *opt,
                                imml_model **out) {
  return load_any(0, NULL, buf, size, ft, opt, out);
}

imml_status imml_model_load(const char *path, const imml_ft_ops *ft,
                            const imml_load_options *opt, imml_model **out) {
  return load_any(1, path, NULL, 0, ft, opt, out);
}
