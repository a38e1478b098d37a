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
 * (page by page as the data lands; MADV_POPULATE_WRITE on each chunk first; for tmpfs
 * also "write": each chunk read into a buffer and written to the file with `pwrite`, which
 * allocates the pages without clearing them or mapping them), SIZE bytes of fresh memory
 * are filled in CHUNK-byte reads (default 512 KiB). One JSON object per line on stdout:
 * kind, source, mode, seconds, gib_per_s. The warm file is at most 1 GiB and read round
 * and round; every byte written is non-zero.
 *
 * Then the same into tmpfs by two threads of one process at once, each filling its half
 * (sources "socket2", each thread with its own connection and writer process, and
 * "file2"): the floor of a destination with two multifd channels, whose receivers share
 * one address space and one memory file. The kernel lets one thread at a time write
 * into a file, so in mode "write" a thread that finds another writing fills its chunk
 * through the mapping (populated first) instead of waiting.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
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

enum mode { FAULT, POPULATE, WRITE, MODES };
static const char *mode_names[] = {"fault", "populate", "write"};

static size_t size, chunk = 512 * 1024;
/* Held by the thread writing into the memory file (mode WRITE). */
static pthread_mutex_t file_writer = PTHREAD_MUTEX_INITIALIZER;
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

/* A writer process that sends `bytes` non-zero bytes to `port`, as fast as it can. */
static pid_t writer(int port, size_t bytes)
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
    size_t left = bytes;
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

/* Fills mem[from, to) in chunks from a socket (`sock` >= 0) or from the warm file. */
struct part {
    char *mem;
    size_t from, to;
    int mode, sock, file, memfd;
};

/* Reads `len` bytes from the part's source at `at` into `dst`. */
static void read_chunk(struct part *p, char *dst, size_t at, size_t len)
{
    size_t flen = size < (1UL << 30) ? size : (1UL << 30);
    size_t got = 0;
    while (got < len) {
        ssize_t n = p->sock >= 0 ? read(p->sock, dst + got, len - got)
                                 : pread(p->file, dst + got, len - got, (at + got) % flen);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            die(p->sock >= 0 ? "read socket" : "read warm file");
        got += n;
    }
}

static void *fill_part(void *arg)
{
    struct part *p = arg;
    char *buf = p->mode == WRITE ? malloc(chunk) : NULL;
    for (size_t at = p->from; at < p->to; at += chunk) {
        size_t len = p->to - at < chunk ? p->to - at : chunk;
        if (p->mode == WRITE && pthread_mutex_trylock(&file_writer) == 0) {
            pthread_mutex_unlock(&file_writer);
            read_chunk(p, buf, at, len);
            pthread_mutex_lock(&file_writer);
            if (pwrite(p->memfd, buf, len, at) != (ssize_t)len)
                die("write memory file");
            pthread_mutex_unlock(&file_writer);
            continue;
        }
        if (p->mode != FAULT)
            madvise(p->mem + at, len, MADV_POPULATE_WRITE);
        read_chunk(p, p->mem + at, at, len);
    }
    free(buf);
    return NULL;
}

/* Fills `mem` with `streams` threads, each its share of whole chunks, from sockets (one
 * writer process each) or from the warm file `file` (when >= 0). */
static double fill(char *mem, int memfd, int mode, int streams, int file)
{
    struct part parts[8];
    pthread_t threads[8];
    pid_t writers[8];
    size_t chunks = (size + chunk - 1) / chunk, at = 0;
    for (int i = 0; i < streams; i++) {
        size_t n = chunks / streams + ((size_t)i < chunks % streams);
        size_t to = at + n * chunk < size ? at + n * chunk : size;
        parts[i] = (struct part){.mem = mem, .from = at, .to = to, .mode = mode,
                                 .sock = -1, .file = file, .memfd = memfd};
        at = to;
        if (file >= 0)
            continue;
        int l = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t al = sizeof a;
        if (bind(l, (struct sockaddr *)&a, sizeof a) != 0 || listen(l, 1) != 0
            || getsockname(l, (struct sockaddr *)&a, &al) != 0)
            die("listen");
        writers[i] = writer(ntohs(a.sin_port), parts[i].to - parts[i].from);
        parts[i].sock = accept(l, NULL, NULL);
        if (parts[i].sock < 0)
            die("accept");
        close(l);
    }
    double t0 = now();
    if (streams == 1) {
        fill_part(&parts[0]);
    } else {
        for (int i = 0; i < streams; i++)
            if (pthread_create(&threads[i], NULL, fill_part, &parts[i]) != 0)
                die("pthread_create");
        for (int i = 0; i < streams; i++)
            pthread_join(threads[i], NULL);
    }
    double t = now() - t0;
    for (int i = 0; i < streams; i++) {
        if (parts[i].sock >= 0) {
            int st;
            close(parts[i].sock);
            waitpid(writers[i], &st, 0);
        }
    }
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

static void report(const char *kind, const char *source, int mode, double t)
{
    printf("{\"kind\": \"%s\", \"source\": \"%s\", \"mode\": \"%s\", \"seconds\": %.4f, "
           "\"gib_per_s\": %.4f}\n",
           kind, source, mode_names[mode], t, size / (double)(1UL << 30) / t);
    fflush(stdout);
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
            for (int mode = 0; mode < (k == 0 ? WRITE : MODES); mode++) {
                int fd;
                char *mem = fresh(kinds[k], &fd);
                double t = fill(mem, fd, mode, 1, s == 0 ? -1 : file);
                release(mem, fd);
                report(kinds[k], sources[s], mode, t);
            }
    const char *sources2[] = {"socket2", "file2"};
    for (int s = 0; s < 2; s++)
        for (int mode = 0; mode < MODES; mode++) {
            int fd;
            char *mem = fresh("tmpfs", &fd);
            double t = fill(mem, fd, mode, 2, s == 0 ? -1 : file);
            release(mem, fd);
            report("tmpfs", sources2[s], mode, t);
        }
    close(file);
    return 0;
}
