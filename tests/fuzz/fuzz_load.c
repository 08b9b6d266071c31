/* libFuzzer target: bytes -> imml_model_load_mem, twice: the bytes as they
 * are, and (when they are long enough to hold a header) a copy whose
 * payload size and CRC-32 are recomputed, so that mutations inside the
 * payload reach the field checks instead of stopping at the checksum.
 *
 * Whatever the bytes, the loader returns a status; a refusal returns a
 * failed handle holding a message (NULL only for IMML_ERR_NOMEM), and
 * nothing is left allocated once it is freed.  Each input is first loaded
 * with a memory_limit of a quarter of the capped allocator's budget: the
 * allocator never holds, nor is asked for, more than that limit and a
 * handle, and a TOO_LARGE refusal must come before any allocation but the
 * failed handle's; the input is then loaded again with the default limit,
 * where the capped allocator's refusal (IMML_ERR_NOMEM) is what stops a
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
 * would let the library's own refusal run.  The checks themselves are
 * fuzz_common.h's fuzz_checkpoint(), which fuzz_struct.c shares. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fuzz_checkpoint(data, size, FUZZ_LOAD_LIMIT, NULL, NULL);
  if (size >= 28) {
    unsigned char *fixed = malloc(size);
    FUZZ_CHECK(fixed != NULL, "test allocation");
    memcpy(fixed, data, size);
    fuzz_fix_framing(fixed, size);
    if (memcmp(fixed, data, size) != 0)
      fuzz_checkpoint(fixed, size, FUZZ_LOAD_LIMIT, NULL, NULL);
    free(fixed);
  }
  return 0;
}
