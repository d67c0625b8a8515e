/*
 * _torpor_native: the system calls the agent needs and Python does not offer. A CPython
 * extension; the agent does without it (os.posix_spawn, and the statx fix always loaded)
 * when it is not built.
 *
 * spawn(): start a process the way posix_spawn() does (vfork-style clone, then execve),
 * with far fewer system calls in the child. Why: glibc's posix_spawn child cannot know which signals have handlers, so before the
 * exec it asks for and resets the disposition of every signal: 128 rt_sigaction() calls
 * (glibc 2.36). On gVisor's ptrace platform every system call of the child is a round trip
 * through the sentry, and those calls took ~2 ms of each command. The agent knows which
 * signals it handles, and passes them; the child here makes ~10 system calls before the
 * exec. It also takes the new process's user and groups itself, so the agent no longer
 * borrows the user's ids around the spawn (4-5 system calls less in the agent).
 *
 * The child shares the agent's memory until it execs (CLONE_VM | CLONE_VFORK: the agent
 * is suspended meanwhile), so it only makes raw system calls: no allocation, no locks, no
 * libc state. Signals stay blocked in the child until just before the exec, after the
 * handled ones are reset to their default; one arriving in that last instant for a
 * handler the agent did not declare would run CPython's C-level handler, which only sets
 * a flag and writes to the wakeup fd: harmless. A failed exec (or id change) is reported
 * to the agent through the shared memory, as glibc does, and the child is reaped here.
 *
 * spawn(path, argv, env, dup2, ids, setsid, sigdefault) -> pid
 *   path        str/bytes: the program (no PATH search)
 *   argv, env   sequences of str/bytes ("KEY=VALUE" for env)
 *   dup2        sequence of (from_fd, to_fd), applied in order (to_fd loses CLOEXEC)
 *   ids         None, or (uid, gid, groups): setgroups, setresgid, setresuid in the child
 *   setsid      bool
 *   sigdefault  sequence of signal numbers reset to SIG_DFL in the child
 * Raises OSError with the child's errno when the exec (or the id change) fails.
 *
 * statx_errno(path, flags) -> 0 or the errno of statx(AT_FDCWD, path, flags, basic stats):
 * lets the agent ask the kernel whether it has the AT_NO_AUTOMOUNT bug that
 * libtorpor_compat.so works around, so that it preloads the library (~1 ms per process
 * started, in gVisor) only where it is needed.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHILD_STACK_SIZE (64 * 1024)
#define KERNEL_SIGSET_SIZE (_NSIG / 8)

struct child {
    const char *path;
    char **argv;
    char **envp;
    const int *fds; /* pairs */
    int nfds;
    int set_ids;
    uid_t uid;
    gid_t gid;
    const gid_t *groups;
    int ngroups;
    int setsid;
    const int *sigdef;
    int nsigdef;
    const sigset_t *mask; /* the agent's mask, for the new program */
    volatile int err;     /* written by the child when it fails */
};

/* The kernel's struct sigaction with every field zero is SIG_DFL, no flags, empty mask,
 * whatever the architecture's field order. */
struct kernel_sigaction {
    void *handler;
    unsigned long flags;
    void *restorer;
    unsigned long mask;
};

static int child_main(void *arg)
{
    struct child *c = arg;
    struct kernel_sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    for (int i = 0; i < c->nsigdef; i++)
        syscall(SYS_rt_sigaction, c->sigdef[i], &dfl, NULL, KERNEL_SIGSET_SIZE);
    if (c->setsid && syscall(SYS_setsid) < 0)
        goto fail;
    for (int i = 0; i < c->nfds; i++) {
        int from = c->fds[2 * i], to = c->fds[2 * i + 1];
        long r = from == to ? syscall(SYS_fcntl, to, F_SETFD, 0)
                            : syscall(SYS_dup3, from, to, 0);
        if (r < 0)
            goto fail;
    }
    if (c->set_ids) {
        if (syscall(SYS_setgroups, c->ngroups, c->groups) < 0 ||
            syscall(SYS_setresgid, c->gid, c->gid, c->gid) < 0 ||
            syscall(SYS_setresuid, c->uid, c->uid, c->uid) < 0)
            goto fail;
    }
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, c->mask, NULL, KERNEL_SIGSET_SIZE);
    syscall(SYS_execve, c->path, c->argv, c->envp);
fail:
    c->err = errno ? errno : ECHILD;
    syscall(SYS_exit, 127);
    return 127;
}

/* A NULL-terminated char* array from a sequence of str/bytes; the bytes objects that own
 * the strings go into keep (a list). */
static char **to_cstrings(PyObject *seq, PyObject *keep, const char *what)
{
    PyObject *fast = PySequence_Fast(seq, what);
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    char **out = PyMem_Calloc(n + 1, sizeof(char *));
    if (out == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *b = NULL;
        if (!PyUnicode_FSConverter(PySequence_Fast_GET_ITEM(fast, i), &b) ||
            PyList_Append(keep, b) < 0) {
            Py_XDECREF(b);
            PyMem_Free(out);
            Py_DECREF(fast);
            return NULL;
        }
        out[i] = PyBytes_AS_STRING(b);
        Py_DECREF(b);
    }
    Py_DECREF(fast);
    return out;
}

/* An int array from a sequence of ints (pairs flattened when pairs is set). */
static int *to_ints(PyObject *seq, int pairs, int *count, const char *what)
{
    PyObject *fast = PySequence_Fast(seq, what);
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    int per = pairs ? 2 : 1;
    int *out = PyMem_Calloc(n * per + 1, sizeof(int));
    if (out == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        for (int j = 0; j < per; j++) {
            PyObject *v = pairs ? PySequence_GetItem(item, j) : (Py_INCREF(item), item);
            long x = v ? PyLong_AsLong(v) : -1;
            Py_XDECREF(v);
            if (x == -1 && PyErr_Occurred()) {
                PyMem_Free(out);
                Py_DECREF(fast);
                return NULL;
            }
            out[i * per + j] = (int)x;
        }
    }
    *count = (int)n;
    Py_DECREF(fast);
    return out;
}

static PyObject *spawn(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *path_obj, *argv_obj, *env_obj, *fds_obj, *ids_obj, *sigdef_obj;
    int want_setsid;
    if (!PyArg_ParseTuple(args, "O&OOOOpO:spawn", PyUnicode_FSConverter, &path_obj,
                          &argv_obj, &env_obj, &fds_obj, &ids_obj, &want_setsid, &sigdef_obj))
        return NULL;

    PyObject *result = NULL;
    PyObject *keep = PyList_New(0);
    struct child c;
    memset(&c, 0, sizeof c);
    char **argv = NULL, **envp = NULL;
    int *fds = NULL, *sigdef = NULL, *groups_int = NULL;
    gid_t *groups = NULL;
    char *stack = NULL;
    if (keep == NULL)
        goto done;
    c.path = PyBytes_AS_STRING(path_obj);
    if ((argv = to_cstrings(argv_obj, keep, "argv must be a sequence")) == NULL ||
        (envp = to_cstrings(env_obj, keep, "env must be a sequence")) == NULL ||
        (fds = to_ints(fds_obj, 1, &c.nfds, "dup2 must be a sequence of pairs")) == NULL ||
        (sigdef = to_ints(sigdef_obj, 0, &c.nsigdef, "sigdefault must be a sequence")) == NULL)
        goto done;
    if (argv[0] == NULL) {
        PyErr_SetString(PyExc_ValueError, "argv must not be empty");
        goto done;
    }
    c.argv = argv;
    c.envp = envp;
    c.fds = fds;
    c.sigdef = sigdef;
    c.setsid = want_setsid;
    if (ids_obj != Py_None) {
        PyObject *groups_obj;
        unsigned int uid, gid;
        if (!PyArg_ParseTuple(ids_obj, "IIO:ids", &uid, &gid, &groups_obj))
            goto done;
        if ((groups_int = to_ints(groups_obj, 0, &c.ngroups, "groups must be a sequence")) == NULL)
            goto done;
        groups = PyMem_Calloc(c.ngroups + 1, sizeof(gid_t));
        if (groups == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        for (int i = 0; i < c.ngroups; i++)
            groups[i] = (gid_t)groups_int[i];
        c.set_ids = 1;
        c.uid = uid;
        c.gid = gid;
        c.groups = groups;
    }
    stack = PyMem_Malloc(CHILD_STACK_SIZE);
    if (stack == NULL) {
        PyErr_NoMemory();
        goto done;
    }

    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    c.mask = &old;
    /* returns once the child has exec'd or exited (CLONE_VFORK) */
    pid_t pid = clone(child_main, stack + CHILD_STACK_SIZE, CLONE_VM | CLONE_VFORK | SIGCHLD,
                      &c);
    int clone_errno = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (pid < 0) {
        errno = clone_errno;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    if (c.err) {
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
            ;
        errno = c.err;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path_obj);
        goto done;
    }
    result = PyLong_FromLong(pid);

done:
    PyMem_Free(stack);
    PyMem_Free(groups);
    PyMem_Free(groups_int);
    PyMem_Free(sigdef);
    PyMem_Free(fds);
    PyMem_Free(envp);
    PyMem_Free(argv);
    Py_XDECREF(keep);
    Py_DECREF(path_obj);
    return result;
}

static PyObject *statx_errno(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *path_obj;
    int flags;
    if (!PyArg_ParseTuple(args, "O&i:statx_errno", PyUnicode_FSConverter, &path_obj, &flags))
        return NULL;
    struct statx buf;
    long r = syscall(SYS_statx, AT_FDCWD, PyBytes_AS_STRING(path_obj), flags, STATX_BASIC_STATS,
                     &buf);
    Py_DECREF(path_obj);
    return PyLong_FromLong(r < 0 ? errno : 0);
}

static PyMethodDef methods[] = {
    {"spawn", spawn, METH_VARARGS,
     "spawn(path, argv, env, dup2, ids, setsid, sigdefault) -> pid"},
    {"statx_errno", statx_errno, METH_VARARGS,
     "statx_errno(path, flags) -> 0, or the errno statx() fails with"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_torpor_native",
    "system calls the torpor agent needs and Python does not offer (see native.c)", -1,
    methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__torpor_native(void)
{
    return PyModule_Create(&module);
}
