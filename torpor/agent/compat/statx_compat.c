/*
 * libtorpor_compat.so: preloaded (LD_PRELOAD) into every process the agent starts.
 *
 * The gVisor release these machines run (runsc 0.0~20221219) fails statx() with EINVAL
 * when the flags carry AT_NO_AUTOMOUNT, a flag Linux accepts and, for stat purposes,
 * ignores unless an automount point is in the way (there are none in a sandbox). Debian's
 * coreutils pass it, so `ls -l`, `stat` and `cp -a` fail ("cannot access '/': Invalid
 * argument"). This wrapper asks again without the flag, and only when the flag was there
 * and the answer was EINVAL: every other result, error or not, is passed through, and on a
 * kernel without the bug the second call never happens.
 *
 * It makes the system call itself instead of calling the next statx() (dlsym): its only
 * imports are then syscall() and errno, which every glibc since 2.2.5 (and musl) provides,
 * so preloading it into a template with an older or different C library cannot make every
 * process print a loader error.
 *
 * Programs that issue the syscall themselves (Go) or link statically do not go through
 * libc's statx() and are not helped; they rarely pass AT_NO_AUTOMOUNT.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef AT_NO_AUTOMOUNT
#define AT_NO_AUTOMOUNT 0x800
#endif

int statx(int dirfd, const char *restrict path, int flags, unsigned int mask,
          struct statx *restrict buf)
{
    int saved_errno = errno;
    long r = syscall(SYS_statx, dirfd, path, flags, mask, buf);
    if (r == -1 && errno == EINVAL && (flags & AT_NO_AUTOMOUNT)) {
        errno = saved_errno;
        r = syscall(SYS_statx, dirfd, path, flags & ~AT_NO_AUTOMOUNT, mask, buf);
    }
    return (int)r;
}
