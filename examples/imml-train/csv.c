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

/* Parses one cell [s, cend): 0 and *v, 1 (not a number), 2 (not finite),
 * 3 (empty). */
static int parse_cell(const char *s, const char *cend, double *v) {
  while (s < cend && is_blank(*s))
    s++;
  if (s == cend)
    return 3;
  /* strtod stops at the ',' or the line end: both are non-numeric. */
  char *num_end = NULL;
  errno = 0;
  *v = strtod(s, &num_end);
  const char *r = num_end;
  while (r < cend && is_blank(*r))
    r++;
  if (num_end == s || r != cend || !decimal_chars(s, num_end))
    return 1;
  return isfinite(*v) ? 0 : 2;
}

/* CSV_HEADER_AUTO's rule for the first non-blank line [p, end) of `cols`
 * cells: 1 (a header) when a cell is not a number or the cells but the last
 * count 0, 1, 2, ... or 1, 2, 3, ... (two or more of them). */
static int looks_like_header(const char *p, const char *end, int cols) {
  double first = 0.0;
  int counting = cols >= 3;
  const char *cell = p;
  for (int c = 0; c < cols; c++) {
    const char *cend = memchr(cell, ',', (size_t)(end - cell));
    if (!cend)
      cend = end;
    double v;
    if (parse_cell(cell, cend, &v) != 0)
      return 1;
    if (c == 0)
      first = v;
    if (c < cols - 1 && counting &&
        !((first == 0.0 || first == 1.0) && v == first + c))
      counting = 0;
    cell = cend + 1;
  }
  return counting;
}

int csv_read(const char *path, int header_mode, int label_last, csv_table *t,
             char *err, size_t n) {
  memset(t, 0, sizeof *t);
  size_t len = 0;
  char *buf = slurp(path, &len, err, n);
  if (!buf)
    return -1;
  int rc = -1, lineno = 0, header_line = 0, first_line = 1;
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
    if (first_line) {
      first_line = 0;
      t->cols = count_cells(p, end);
      header_line = lineno;
      const int is_header =
          header_mode == CSV_HEADER_YES || (header_mode == CSV_HEADER_AUTO &&
                                            looks_like_header(p, end, t->cols));
      if (is_header) {
        t->header = malloc((size_t)(end - p) + 1);
        if (!t->header) {
          seterr(err, n, "%s: out of memory", path);
          goto out;
        }
        memcpy(t->header, p, (size_t)(end - p));
        t->header[end - p] = '\0';
        p = next;
        continue;
      }
      t->header_guessed_absent = header_mode == CSV_HEADER_AUTO;
    }
    const int cells = count_cells(p, end);
    if (cells != t->cols) {
      seterr(err, n,
             "%s:%d: ragged row: %d cells, expected %d (as in the %s on line "
             "%d)",
             path, lineno, cells, t->cols, t->header ? "header" : "first row",
             header_line);
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
      const int is_label = label_last && c == t->cols - 1;
      if (c == t->cols - 1)
        t->lastcol[t->rows] = column;
      char shown[40];
      double v = 0.0;
      const int bad = parse_cell(cell, cend, &v);
      if (bad == 3) {
        seterr(err, n, "%s:%d:%d: empty cell (column %d of %d)%s", path, lineno,
               column, c + 1, t->cols,
               is_label ? ": the last column is the class label, an integer "
                          "0..C-1"
                        : "");
        goto out;
      }
      if (bad) {
        cell_text(cell, cend, shown, sizeof shown);
        if (is_label)
          seterr(err, n,
                 "%s:%d:%d: label '%s' is not a number: the last column is "
                 "the class label, an integer 0..C-1 (C classes)",
                 path, lineno, column, shown);
        else
          seterr(err, n, "%s:%d:%d: not a %snumber: '%s' (column %d of %d)",
                 path, lineno, column, bad == 2 ? "finite " : "", shown, c + 1,
                 t->cols);
        goto out;
      }
      row[c] = v;
      t->line[t->rows] = lineno;
      cell = cend + 1;
    }
    t->rows++;
    p = next;
  }
  if (first_line) {
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
