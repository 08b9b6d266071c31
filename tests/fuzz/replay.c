/* Replays a corpus through a fuzz target without libFuzzer: every file
 * named on the command line, and every file in every directory named, is
 * given to LLVMFuzzerTestOneInput once, in sorted order, each in its own
 * child process so that one failing input does not hide the others.  A
 * broken promise aborts (fuzz_common.h's FUZZ_CHECK); under ASan/UBSan or
 * valgrind a memory error or a leak fails the input too.  Output is TAP,
 * one line per input; the exit status is non-zero if any input failed.
 * A target's LLVMFuzzerInitialize, if it has one, runs once first.
 * usage: replay PATH... */
#include "fuzz_common.h"

#include <dirent.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static int n_inputs, n_failed;

/* libFuzzer calls it once, before the first input, when the target defines
 * it; so does the replay, before it forks the children, which then share
 * what it prepared (fuzz_struct's seeds). */
int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));

/* Runs one input in a child; 0 if it returned normally. */
static int run_child(const unsigned char *data, size_t n, char *why,
                     size_t why_n) {
  fflush(stdout);
  fflush(stderr);
  const pid_t pid = fork();
  if (pid < 0) {
    snprintf(why, why_n, "fork failed");
    return 1;
  }
  if (pid == 0) {
    LLVMFuzzerTestOneInput(data, n);
    exit(0); /* exit, not _exit: LeakSanitizer checks at exit */
  }
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) {
    snprintf(why, why_n, "waitpid failed");
    return 1;
  }
  if (WIFSIGNALED(status)) {
    snprintf(why, why_n, "killed by signal %d", WTERMSIG(status));
    return 1;
  }
  if (WEXITSTATUS(status) != 0) {
    snprintf(why, why_n, "exit status %d", WEXITSTATUS(status));
    return 1;
  }
  return 0;
}

static void replay_file(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    printf("not ok %d - cannot open %s\n", ++n_inputs, path);
    exit(1);
  }
  size_t cap = 4096, n = 0;
  unsigned char *buf = malloc(cap);
  size_t r;
  while (buf && (r = fread(buf + n, 1, cap - n, f)) > 0) {
    n += r;
    if (n == cap) {
      unsigned char *bigger = realloc(buf, cap * 2);
      if (!bigger) {
        free(buf);
        buf = NULL;
        break;
      }
      buf = bigger;
      cap *= 2;
    }
  }
  fclose(f);
  if (!buf) {
    printf("not ok %d - out of memory reading %s\n", ++n_inputs, path);
    exit(1);
  }
  /* an exact-size copy, so that ASan sees a read past the end */
  unsigned char *exact = malloc(n ? n : 1);
  if (!exact)
    exit(1);
  memcpy(exact, buf, n);
  free(buf);
  char why[64];
  if (run_child(exact, n, why, sizeof why) == 0) {
    printf("ok %d - %s (%zu bytes)\n", ++n_inputs, path, n);
  } else {
    printf("not ok %d - %s (%zu bytes): %s\n", ++n_inputs, path, n, why);
    n_failed++;
  }
  free(exact);
}

static int by_name(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static void replay_dir(const char *dir) {
  DIR *d = opendir(dir);
  if (!d) {
    replay_file(dir);
    return;
  }
  char **names = NULL;
  size_t n = 0, cap = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    if (e->d_name[0] == '.')
      continue;
    if (n == cap) {
      cap = cap ? cap * 2 : 64;
      char **bigger = realloc(names, cap * sizeof *names);
      if (!bigger)
        exit(1);
      names = bigger;
    }
    const size_t len = strlen(dir) + strlen(e->d_name) + 2;
    names[n] = malloc(len);
    if (!names[n])
      exit(1);
    snprintf(names[n], len, "%s/%s", dir, e->d_name);
    n++;
  }
  closedir(d);
  qsort(names, n, sizeof *names, by_name);
  for (size_t i = 0; i < n; i++) {
    replay_file(names[i]);
    free(names[i]);
  }
  free(names);
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: replay PATH...\n");
    return 2;
  }
  if (LLVMFuzzerInitialize)
    LLVMFuzzerInitialize(&argc, &argv);
  for (int i = 1; i < argc; i++)
    replay_dir(argv[i]);
  if (n_inputs == 0) {
    printf("not ok 1 - no inputs\n1..1\n");
    return 1;
  }
  printf("1..%d\n", n_inputs);
  return n_failed ? 1 : 0;
}
