/*
 * The destination's floor: what it costs on this machine to fault in and fill fresh
 * memory from a socket or from a warm file, with nothing else to do. scripts/bench.py
 * compiles and runs it and reports each receive path's throughput as a fraction of it.
 *
 *   floor SIZE SHM_DIR WARM_FILE_DIR [CHUNK]
 *
 * For each memory kind (anonymous private; a shared file in SHM_DIR, as a destination's
 * guest RAM on tmpfs), each source (loopback TCP from a writer process; a file in
 * WARM_FILE_DIR read once before, so in the page cache) and each way of faulting in
 * (page by page as the data lands; MADV_POPULATE_WRITE on each chunk first), SIZE bytes
 * of fresh memory are filled in CHUNK-byte reads (default 512 KiB). One JSON object per
 * line on stdout: kind, source, mode, seconds, gib_per_s. The warm file is at most 1 GiB
 * and read round and round; every byte written is non-zero.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

static size_t size, chunk = 512 * 1024;
static const char *shm_dir, *file_dir;

static void die(const char *what)
{
    fprintf(stderr, "floor: %s: %s\n", what, strerror(errno));
    exit(1);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Fresh memory of `kind`; for a file, its descriptor goes to *fd (else -1). */
static char *fresh(const char *kind, int *fd)
{
    void *p;
    *fd = -1;
    if (strcmp(kind, "anonymous") == 0) {
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    } else {
        char path[4096];
        snprintf(path, sizeof path, "%s/floor-mem-%d", shm_dir, (int)getpid());
        *fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
        if (*fd < 0)
            die("open memory file");
        unlink(path);
        if (ftruncate(*fd, size) != 0)
            die("size memory file");
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, *fd, 0);
    }
    if (p == MAP_FAILED)
        die("mmap");
    return p;
}

static void release(char *mem, int fd)
{
    munmap(mem, size);
    if (fd >= 0)
        close(fd);
}

/* A writer process that sends `size` non-zero bytes to `port`, as fast as it can. */
static pid_t writer(int port)
{
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    char *buf = malloc(chunk);
    memset(buf, 0x5a, chunk);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (connect(s, (struct sockaddr *)&a, sizeof a) != 0)
        _exit(1);
    size_t left = size;
    while (left > 0) {
        ssize_t n = write(s, buf, left < chunk ? left : chunk);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            _exit(1);
        left -= n;
    }
    close(s);
    _exit(0);
}

static double fill_from_socket(char *mem, int populate)
{
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    if (bind(l, (struct sockaddr *)&a, sizeof a) != 0 || listen(l, 1) != 0
        || getsockname(l, (struct sockaddr *)&a, &al) != 0)
        die("listen");
    pid_t pid = writer(ntohs(a.sin_port));
    int s = accept(l, NULL, NULL);
    if (s < 0)
        die("accept");
    close(l);
    double t0 = now();
    for (size_t at = 0; at < size; at += chunk) {
        size_t len = size - at < chunk ? size - at : chunk;
        if (populate)
            madvise(mem + at, len, MADV_POPULATE_WRITE);
        size_t got = 0;
        while (got < len) {
            ssize_t n = read(s, mem + at + got, len - got);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                die("read socket");
            got += n;
        }
    }
    double t = now() - t0;
    close(s);
    int st;
    waitpid(pid, &st, 0);
    return t;
}

static int warm_file(void)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/floor-warm-%d", file_dir, (int)getpid());
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0)
        die("open warm file");
    unlink(path);
    size_t len = size < (1UL << 30) ? size : (1UL << 30);
    char *buf = malloc(chunk);
    memset(buf, 0xa5, chunk);
    for (size_t at = 0; at < len; at += chunk)
        if (pwrite(fd, buf, chunk, at) != (ssize_t)chunk)
            die("write warm file");
    for (size_t at = 0; at < len; at += chunk)
        if (pread(fd, buf, chunk, at) != (ssize_t)chunk)
            die("read warm file");
    free(buf);
    return fd;
}

static double fill_from_file(char *mem, int populate, int fd)
{
    size_t flen = size < (1UL << 30) ? size : (1UL << 30);
    double t0 = now();
    for (size_t at = 0; at < size; at += chunk) {
        size_t len = size - at < chunk ? size - at : chunk;
        if (populate)
            madvise(mem + at, len, MADV_POPULATE_WRITE);
        size_t got = 0;
        while (got < len) {
            ssize_t n = pread(fd, mem + at + got, len - got, (at + got) % flen);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                die("read warm file");
            got += n;
        }
    }
    return now() - t0;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: floor SIZE SHM_DIR WARM_FILE_DIR [CHUNK]\n");
        return 2;
    }
    size = strtoull(argv[1], NULL, 0);
    shm_dir = argv[2];
    file_dir = argv[3];
    if (argc > 4)
        chunk = strtoull(argv[4], NULL, 0);
    long page = sysconf(_SC_PAGESIZE);
    if (size == 0 || chunk == 0 || size % page || chunk % page) {
        fprintf(stderr, "floor: SIZE and CHUNK must be non-zero multiples of the page size %ld\n", page);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int file = warm_file();
    const char *kinds[] = {"anonymous", "tmpfs"};
    const char *sources[] = {"socket", "file"};
    for (int k = 0; k < 2; k++)
        for (int s = 0; s < 2; s++)
            for (int populate = 0; populate < 2; populate++) {
                int fd;
                char *mem = fresh(kinds[k], &fd);
                double t = s == 0 ? fill_from_socket(mem, populate) : fill_from_file(mem, populate, file);
                release(mem, fd);
                printf("{\"kind\": \"%s\", \"source\": \"%s\", \"mode\": \"%s\", \"seconds\": %.4f, "
                       "\"gib_per_s\": %.4f}\n",
                       kinds[k], sources[s], populate ? "populate" : "fault", t,
                       size / (double)(1UL << 30) / t);
                fflush(stdout);
            }
    close(file);
    return 0;
}
