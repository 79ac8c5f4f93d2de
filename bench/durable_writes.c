/* LD_PRELOAD shim for bench/ingest.py: gives dcmtk storescp durable writes for comparison.
 *
 * Every regular file a process closes with fclose() after writing is flushed to disk
 * (fdatasync) and so is its folder entry (fsync of the folder), before the close returns:
 * storescp then answers a C-STORE only once the instance is on disk, as rtauto does. (It is
 * a lenient reference: storescp writes under the final name, so a crash can still leave a
 * partial file there; rtauto links a file to its name only once it is whole and flushed.)
 *
 *     gcc -shared -fPIC -O2 -o durable_writes.so durable_writes.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

static int (*real_fclose)(FILE *) = NULL;

int fclose(FILE *stream) {
    if (!real_fclose) real_fclose = (int (*)(FILE *))dlsym(RTLD_NEXT, "fclose");
    int fd = fileno(stream);
    int flags = fd > 2 ? fcntl(fd, F_GETFL) : -1;
    struct stat st;
    if (flags >= 0 && (flags & O_ACCMODE) != O_RDONLY && fstat(fd, &st) == 0 &&
        S_ISREG(st.st_mode)) {
        char link[64], path[PATH_MAX];
        fflush(stream);
        fdatasync(fd);
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(link, path, sizeof path - 1);
        if (n > 0) {
            path[n] = '\0';
            int folder = open(dirname(path), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (folder >= 0) {
                fsync(folder);
                close(folder);
            }
        }
    }
    return real_fclose(stream);
}
