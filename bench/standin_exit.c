/* The fastest buildctl stand-in: writes the --metadata-file and exits at once.
 * If BENCH_TIMES names a file, appends "<start_ns> <end_ns>\n" (CLOCK_REALTIME) to it. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    long long start = now_ns();
    const char *meta = NULL;
    for (int i = 1; i < argc - 1; i++)
        if (strcmp(argv[i], "--metadata-file") == 0) meta = argv[i + 1];
    if (meta) {
        char digest[65];
        unsigned long long h = 1469598103934665603ULL ^ (unsigned long long)start;
        for (int i = 0; i < 64; i++) { h = h * 1099511628211ULL + (unsigned long long)i; digest[i] = "0123456789abcdef"[h >> 60]; }
        digest[64] = 0;
        FILE *f = fopen(meta, "w");
        if (!f) return 1;
        fprintf(f, "{\"containerimage.digest\":\"sha256:%s\",\"image.name\":\"bench\"}\n", digest);
        fclose(f);
    }
    const char *times = getenv("BENCH_TIMES");
    if (times) {
        char line[64];
        int n = snprintf(line, sizeof line, "%lld %lld\n", start, now_ns());
        int fd = open(times, O_WRONLY | O_APPEND | O_CREAT, 0644);
        if (fd >= 0) { if (write(fd, line, (size_t)n) < 0) {} close(fd); }
    }
    return 0;
}
