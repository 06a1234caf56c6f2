"""Files that a kill cannot truncate: written beside their path, then renamed over it."""
import errno
import os

TEMPORARY_SUFFIX = ".tmp-"  # + the writing process's id


def write_atomically(path, mode, write):
    """Call write(file) on a temporary file beside `path`, then rename it to `path`.

    A process killed meanwhile leaves the previous `path` (or none), never a truncated one.
    """
    tmp = f"{path}{TEMPORARY_SUFFIX}{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def is_out_of_space(error):
    """True if `error`, or an error it was raised from, says the disk or quota is full (torch's
    zip writer turns a short write into "unexpected pos")."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(error, RuntimeError) and "unexpected pos" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False
