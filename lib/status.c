/* Status texts, per-model messages and the version functions. */
#include "internal.h"

#include <stdio.h>

unsigned imml_version_number(void) { return IMML_VERSION_NUMBER; }

const char *imml_version_string(void) { return IMML_VERSION_STRING; }

const char *imml_status_string(imml_status status) {
  switch (status) {
  case IMML_OK:
    return "success";
  case IMML_ERR_NULL:
    return "a required pointer argument is NULL";
  case IMML_ERR_INVALID_ARG:
    return "an argument is out of its allowed range";
  case IMML_ERR_NOMEM:
    return "out of memory";
  case IMML_ERR_SHAPE:
    return "batch size or dimensions do not match the model";
  case IMML_ERR_LABEL:
    return "a label is outside 0..n_classes-1";
  case IMML_ERR_STATE:
    return "call made in the wrong state";
  case IMML_ERR_CALLBACK:
    return "an F&T callback reported failure";
  case IMML_ERR_NONFINITE:
    return "NaN or infinity in an input or a result";
  case IMML_ERR_IO:
    return "input/output error";
  case IMML_ERR_BAD_MAGIC:
    return "not an imml checkpoint (bad magic)";
  case IMML_ERR_BAD_VERSION:
    return "unsupported checkpoint format version";
  case IMML_ERR_TRUNCATED:
    return "checkpoint is truncated";
  case IMML_ERR_CHECKSUM:
    return "checkpoint checksum mismatch";
  case IMML_ERR_FORMAT:
    return "checkpoint field is invalid or inconsistent";
  case IMML_ERR_TOO_LARGE:
    return "sizes overflow or exceed the library's limits";
  case IMML_ERR_NEED_CALLBACKS:
    return "model needs host F&T callbacks";
  case IMML_ERR_BUFFER_SMALL:
    return "caller buffer is too small";
  case IMML_ERR_UNKNOWN_FIELD:
    return "a struct sets a field this library does not know";
  case IMML_ERR_UNSUPPORTED:
    return "not supported by this build or this CPU";
  }
  return "unknown status";
}

void imml_set_err(char *buf, size_t size, const char *fmt, ...) {
  if (!buf || size == 0)
    return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, size, fmt, ap);
  va_end(ap);
}

imml_status imml_fail(imml_model *m, imml_status st, const char *fmt, ...) {
  if (m) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m->errmsg, sizeof m->errmsg, fmt, ap);
    va_end(ap);
  }
  return st;
}
