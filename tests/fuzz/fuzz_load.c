/* libFuzzer target: bytes -> imml_model_load_mem, twice: the bytes as they
 * are, and (when they are long enough to hold a header) a copy whose
 * payload size and CRC-32 are recomputed, so that mutations inside the
 * payload reach the field checks instead of stopping at the checksum.
 *
 * Whatever the bytes, the loader returns a status; a refusal returns a
 * failed handle holding a message (NULL only for IMML_ERR_NOMEM), and
 * nothing is left allocated once it is freed.  Each input is first loaded
 * with a memory_limit of a quarter of the capped allocator's budget: a
 * TOO_LARGE refusal must come before any allocation but the failed
 * handle's; the input is then loaded again with the default limit, where
 * the capped allocator's refusal (IMML_ERR_NOMEM) is what stops a
 * checkpoint too large for it.  A checkpoint that loads:
 * - saves back to exactly the same bytes (imml_model_save_mem);
 * - predicts, trains one step, and never lets a non-finite value into the
 *   model (fuzz_exercise);
 * - then saves a checkpoint that loads again.
 * A host-F&T checkpoint is loaded with fuzz_common.h's callbacks.
 *
 * Loads go through a capped allocator: the sizes a checkpoint names for
 * max_batch and dict_size are not bounded by its length (doc/FORMAT.md),
 * and neither plain malloc under ASan nor libFuzzer's -malloc_limit_mb
 * would let the library's own refusal run. */
#include "fuzz_common.h"

#define FUZZ_LOAD_LIMIT (FUZZ_MEM_CAP / 4)

/* One imml_model_load_mem through a's allocator, retried with the host
 * callbacks when the checkpoint needs them.  A refusal is checked and its
 * failed handle freed (NULL returned). */
static imml_model *load(const uint8_t *data, size_t size, fuzz_alloc *a,
                        size_t limit, imml_status *st_out) {
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
static unsigned char *save(imml_model *m, size_t *size) {
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

static void one(const uint8_t *data, size_t size) {
  fuzz_alloc a;
  memset(&a, 0, sizeof a);
  imml_status st;
  imml_model *m = load(data, size, &a, FUZZ_LOAD_LIMIT, &st);
  if (!m && st == IMML_ERR_TOO_LARGE) {
    /* over the limit: let the capped allocator refuse it instead */
    memset(&a, 0, sizeof a);
    m = load(data, size, &a, 0, &st);
  }
  if (!m)
    return;
  /* the loader validated every field: the model saves to the same bytes */
  size_t n = 0;
  unsigned char *again = save(m, &n);
  FUZZ_CHECK(n == size && memcmp(again, data, size) == 0,
             "re-saved checkpoint differs (%zu vs %zu bytes)", n, size);
  free(again);
  /* it predicts and trains (a small arena only: time, not memory, is the
   * limit here) and still saves a checkpoint that loads */
  fuzz_exercise(m, a.live <= ((size_t)4 << 20));
  again = save(m, &n);
  fuzz_alloc b;
  memset(&b, 0, sizeof b);
  imml_model *r = load(again, n, &b, 0, &st);
  FUZZ_CHECK(r != NULL || st == IMML_ERR_NOMEM,
             "the model's own checkpoint does not load: %s",
             imml_status_string(st));
  imml_model_free(r);
  free(again);
  imml_model_free(m);
  FUZZ_CHECK(a.live == 0 && a.blocks == 0 && b.live == 0 && b.blocks == 0,
             "imml_model_free left %zu + %zu bytes", a.live, b.live);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  one(data, size);
  if (size >= 28) {
    unsigned char *fixed = malloc(size);
    FUZZ_CHECK(fixed != NULL, "test allocation");
    memcpy(fixed, data, size);
    fuzz_fix_framing(fixed, size);
    if (memcmp(fixed, data, size) != 0)
      one(fixed, size);
    free(fixed);
  }
  return 0;
}
