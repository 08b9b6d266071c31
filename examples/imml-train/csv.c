#include "csv.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void seterr(char *err, size_t n, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, n, fmt, ap);
  va_end(ap);
}

/* Reads the whole file (works for pipes too); NUL-terminates it. */
static char *slurp(const char *path, size_t *len, char *err, size_t n) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    seterr(err, n, "%s: cannot open: %s", path, strerror(errno));
    return NULL;
  }
  size_t cap = 1 << 16, used = 0;
  char *buf = malloc(cap);
  while (buf) {
    if (used + 1 >= cap) {
      char *nb = cap < ((size_t)-1) / 2 ? realloc(buf, cap * 2) : NULL;
      if (!nb) {
        free(buf);
        buf = NULL;
        break;
      }
      buf = nb;
      cap *= 2;
    }
    const size_t got = fread(buf + used, 1, cap - 1 - used, f);
    used += got;
    if (got == 0)
      break;
  }
  if (!buf) {
    fclose(f);
    seterr(err, n, "%s: out of memory", path);
    return NULL;
  }
  if (ferror(f)) {
    seterr(err, n, "%s: read error: %s", path, strerror(errno));
    fclose(f);
    free(buf);
    return NULL;
  }
  fclose(f);
  buf[used] = '\0';
  *len = used;
  return buf;
}

static int is_blank(char c) { return c == ' ' || c == '\t'; }

/* Shows at most 24 characters of a bad cell. */
static void cell_text(const char *s, const char *end, char *out, size_t n) {
  while (s < end && is_blank(*s))
    s++;
  while (end > s && is_blank(end[-1]))
    end--;
  size_t len = (size_t)(end - s);
  const int cut = len > 24;
  if (cut)
    len = 24;
  snprintf(out, n, "%.*s%s", (int)len, s, cut ? "..." : "");
}

/* strtod also takes "nan", "inf" and hexadecimal floats: refuse them. */
static int decimal_chars(const char *s, const char *end) {
  for (; s < end; s++)
    if (!((*s >= '0' && *s <= '9') || *s == '.' || *s == '-' || *s == '+' ||
          *s == 'e' || *s == 'E'))
      return 0;
  return 1;
}

static int count_cells(const char *s, const char *end) {
  int c = 1;
  for (; s < end; s++)
    c += *s == ',';
  return c;
}

void csv_free(csv_table *t) {
  if (!t)
    return;
  free(t->data);
  free(t->line);
  free(t->lastcol);
  free(t->header);
  memset(t, 0, sizeof *t);
}

int csv_read(const char *path, csv_table *t, char *err, size_t n) {
  memset(t, 0, sizeof *t);
  size_t len = 0;
  char *buf = slurp(path, &len, err, n);
  if (!buf)
    return -1;
  int rc = -1, lineno = 0, header_line = 0;
  size_t cap = 0;
  char *p = buf, *const bufend = buf + len;
  while (p < bufend) {
    char *eol = memchr(p, '\n', (size_t)(bufend - p));
    char *next = eol ? eol + 1 : bufend;
    char *end = eol ? eol : bufend;
    lineno++;
    if (end > p && end[-1] == '\r')
      end--;
    const char *q = p;
    while (q < end && is_blank(*q))
      q++;
    if (q == end) { /* blank line */
      p = next;
      continue;
    }
    if (memchr(p, '\0', (size_t)(end - p))) {
      seterr(err, n, "%s:%d: NUL byte: not a text CSV file", path, lineno);
      goto out;
    }
    if (!t->header) {
      t->cols = count_cells(p, end);
      t->header = malloc((size_t)(end - p) + 1);
      if (!t->header) {
        seterr(err, n, "%s: out of memory", path);
        goto out;
      }
      memcpy(t->header, p, (size_t)(end - p));
      t->header[end - p] = '\0';
      header_line = lineno;
      p = next;
      continue;
    }
    const int cells = count_cells(p, end);
    if (cells != t->cols) {
      seterr(err, n,
             "%s:%d: ragged row: %d cells, expected %d (as in the header "
             "on line %d)",
             path, lineno, cells, t->cols, header_line);
      goto out;
    }
    if ((size_t)t->rows == cap) {
      const size_t nc = cap ? cap * 2 : 256;
      if (nc > (size_t)0x7fffffff || (size_t)t->cols > ((size_t)-1) / 8 / nc) {
        seterr(err, n, "%s: too many rows", path);
        goto out;
      }
      double *nd = realloc(t->data, nc * (size_t)t->cols * sizeof(double));
      if (nd)
        t->data = nd;
      int *nl = realloc(t->line, nc * sizeof(int));
      if (nl)
        t->line = nl;
      int *nlc = realloc(t->lastcol, nc * sizeof(int));
      if (nlc)
        t->lastcol = nlc;
      if (!nd || !nl || !nlc) {
        seterr(err, n, "%s: out of memory", path);
        goto out;
      }
      cap = nc;
    }
    double *row = t->data + (size_t)t->rows * (size_t)t->cols;
    const char *cell = p;
    for (int c = 0; c < t->cols; c++) {
      const char *cend = memchr(cell, ',', (size_t)(end - cell));
      if (!cend)
        cend = end;
      const int column = (int)(cell - p) + 1;
      if (c == t->cols - 1)
        t->lastcol[t->rows] = column;
      const char *s = cell;
      while (s < cend && is_blank(*s))
        s++;
      char shown[40];
      if (s == cend) {
        seterr(err, n, "%s:%d:%d: empty cell (column %d of %d)", path, lineno,
               column, c + 1, t->cols);
        goto out;
      }
      /* strtod stops at the ',' or the line end: both are non-numeric. */
      char *num_end = NULL;
      errno = 0;
      const double v = strtod(s, &num_end);
      const char *r = num_end;
      while (r < cend && is_blank(*r))
        r++;
      if (num_end == s || r != cend || !decimal_chars(s, num_end)) {
        cell_text(cell, cend, shown, sizeof shown);
        seterr(err, n, "%s:%d:%d: not a number: '%s' (column %d of %d)", path,
               lineno, column, shown, c + 1, t->cols);
        goto out;
      }
      if (!isfinite(v)) {
        cell_text(cell, cend, shown, sizeof shown);
        seterr(err, n, "%s:%d:%d: not a finite number: '%s' (column %d of %d)",
               path, lineno, column, shown, c + 1, t->cols);
        goto out;
      }
      row[c] = v;
      t->line[t->rows] = lineno;
      cell = cend + 1;
    }
    t->rows++;
    p = next;
  }
  if (!t->header) {
    seterr(err, n, "%s: empty file: expected a header row and data rows", path);
    goto out;
  }
  if (t->rows == 0) {
    seterr(err, n, "%s: no data rows after the header (line %d)", path,
           header_line);
    goto out;
  }
  rc = 0;
out:
  free(buf);
  if (rc != 0)
    csv_free(t);
  return rc;
}
