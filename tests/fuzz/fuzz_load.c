/* libFuzzer target: bytes -> imml_load_mem_ex, twice: the bytes as they
 * are, and (when they are long enough to hold a header) a copy whose
 * payload size and CRC-32 are recomputed, so that mutations inside the
 * payload reach the field checks instead of stopping at the checksum.
 *
 * Whatever the bytes, the loader returns a status; a refusal leaves *out
 * NULL, a message and nothing allocated.  A checkpoint that loads:
 * - saves back to exactly the same bytes (imml_save_mem);
 * - predicts, trains one step, and never lets a non-finite value into the
 *   model (fuzz_exercise);
 * - then saves a checkpoint that loads again.
 * A host-F&T checkpoint is loaded with fuzz_common.h's callbacks.
 *
 * Loads go through imml_load_mem_ex with a capped allocator: the sizes a
 * checkpoint names for max_batch and dict_size are not bounded by its
 * length (doc/FORMAT.md), and neither plain malloc under ASan nor
 * libFuzzer's -malloc_limit_mb would let the library's own refusal run. */
#include "fuzz_common.h"

static imml_model *load(const uint8_t *data, size_t size, fuzz_alloc *a,
                        imml_status *st_out) {
  char err[256];
  imml_load_options o;
  imml_load_options_init(&o);
  o.allocator = fuzz_hooks(a);
  o.errmsg = err;
  o.errmsg_size = sizeof err;
  imml_model *m = (imml_model *)&o; /* must be overwritten */
  imml_status st = imml_load_mem_ex(data, size, NULL, &o, &m);
  if (st == IMML_ERR_NEED_CALLBACKS) {
    FUZZ_CHECK(m == NULL, "*out not NULL after a failure");
    const imml_ft_ops ops = fuzz_host_ops();
    m = (imml_model *)&o;
    st = imml_load_mem_ex(data, size, &ops, &o, &m);
  }
  *st_out = st;
  if (st != IMML_OK) {
    FUZZ_CHECK(m == NULL, "*out not NULL after a failure");
    fuzz_check_failure(st, err, "imml_load_mem_ex");
    FUZZ_CHECK(st != IMML_ERR_NOMEM || a->refused > 0,
               "IMML_ERR_NOMEM without a refused allocation: %s", err);
    return NULL;
  }
  FUZZ_CHECK(m != NULL && err[0] == '\0', "loaded, message '%s'", err);
  return m;
}

static unsigned char *save(imml_model *m, size_t *size) {
  size_t need = 0;
  FUZZ_CHECK(imml_save_mem(m, NULL, 0, &need) == IMML_OK, "size query: %s",
             imml_errmsg(m));
  unsigned char *buf = malloc(need ? need : 1);
  FUZZ_CHECK(buf != NULL, "test allocation");
  FUZZ_CHECK(imml_save_mem(m, buf, need, size) == IMML_OK && *size == need,
             "imml_save_mem: %s", imml_errmsg(m));
  return buf;
}

static void one(const uint8_t *data, size_t size) {
  fuzz_alloc a;
  memset(&a, 0, sizeof a);
  imml_status st;
  imml_model *m = load(data, size, &a, &st);
  if (!m) {
    FUZZ_CHECK(a.live == 0 && a.blocks == 0, "a refused load leaked %zu bytes",
               a.live);
    return;
  }
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
  imml_model *r = load(again, n, &b, &st);
  FUZZ_CHECK(r != NULL || st == IMML_ERR_NOMEM,
             "the model's own checkpoint does not load: %s", imml_strerror(st));
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
