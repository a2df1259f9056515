"""jobworker.pyz bootstrap, the archive's __main__.py: put the bundled native packages on
sys.path, then run jobworker.

Native packages cannot be imported from inside a zip: each target's wheels, and jobworker's own
modules (so their bytecode is cached), are extracted once into a private cache dir, under a name
made of the payload's hash, atomically (temp dir + rename). build_zipapp.py copies this file
into the archive with CONFIG filled in; the tests import it and call its steps on their own dirs.

The cache dir: for root, /var/cache/jobworker or $JOBWORKER_CACHE_DIR, never one that HOME,
XDG_CACHE_HOME or TMPDIR point at; for other users, $JOBWORKER_CACHE_DIR, else
$XDG_CACHE_HOME/jobworker, else ~/.cache/jobworker, else $TMPDIR/jobworker-<uid>. Every directory
from / down to it must be owned by root or the user, writable by no one else (a sticky one may
be) and not a symlink; the cache dir itself must be the user's alone.

Each build extracts into its own dir, so every upgrade would leave one behind (about 40 MB):
every process running from a build holds a shared flock on the build's in-use file for as long
as it runs (the server hands the launcher one of its own), and the first run of a new build
removes the builds no run has started from for a day whose in-use file nobody holds (see
prune).
"""

import contextlib
import errno
import fcntl
import os
import re
import stat
import sys
import time

CONFIG = None  # filled in by build_zipapp.py
ROOT_CACHE = "/var/cache/jobworker"
UNUSED_FOR = 24 * 3600   # seconds since a run last started from a build before it may go
IN_USE = ".in-use"       # in each build: every process running from it holds a shared flock
# what the cache holds: builds (build id - tag), an extraction's temp dir (tempfile.mkdtemp),
# a build being removed
_BUILD = re.compile(r"[0-9a-f]{16}-cp3[0-9]+-[A-Za-z0-9_]+")
_EXTRACTING = re.compile(r"\.extract-[a-z0-9_]{8}")
_REMOVING = re.compile(r"\.prune-[0-9a-f]{16}-cp3[0-9]+-[A-Za-z0-9_]+")
_held = []   # the in-use file of this process's build, open (and locked) until it exits


class BootstrapError(Exception):
    """Why the pyz cannot run here; main() prints it as one line and exits 1."""


def archive_path():
    return os.path.dirname(os.path.abspath(__file__))


def glibc_version():
    """The C library's version, such as "2.36", or None where it is not glibc."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").split()[1]
    except (ValueError, OSError, AttributeError, IndexError):
        return None


def find_target(config, implementation=sys.implementation.name, version=sys.version_info[:2],
                machine=os.uname().machine, libc=None):
    """(tag, target): the packages in config that serve this interpreter on this machine."""
    tag = f"cp{version[0]}{version[1]}-{machine}"
    target = config["targets"].get(tag)
    if implementation != "cpython" or target is None:
        built = ", ".join(sorted(config["targets"]))
        raise BootstrapError(
            f"this jobworker.pyz has no packages for {implementation} {version[0]}.{version[1]} "
            f"on {machine}; it was built for {built} (build_zipapp.py --python/--platform)")
    libc = libc or glibc_version()
    if libc is None:
        raise BootstrapError("jobworker.pyz needs a glibc-based Linux (its packages are "
                             "manylinux wheels)")
    if tuple(int(x) for x in libc.split(".")[:2]) < tuple(target["glibc"]):
        raise BootstrapError(f"jobworker.pyz needs glibc {'.'.join(map(str, target['glibc']))} "
                             f"or newer (this host has {libc})")
    return tag, target


def cache_candidates(environ, euid):
    """The cache dirs to try, in order (the first that can be created is used)."""
    if environ.get("JOBWORKER_CACHE_DIR"):
        return [environ["JOBWORKER_CACHE_DIR"]]
    if euid == 0:
        # `sudo -E` keeps the caller's HOME: root's cache must not follow it into a dir that
        # user can write.
        return [ROOT_CACHE]
    candidates = []
    if environ.get("XDG_CACHE_HOME"):
        candidates.append(os.path.join(environ["XDG_CACHE_HOME"], "jobworker"))
    home = environ.get("HOME")
    if home is None:
        import pwd
        try:
            home = pwd.getpwuid(euid).pw_dir
        except KeyError:
            pass
    if home:
        candidates.append(os.path.join(home, ".cache", "jobworker"))
    candidates.append(os.path.join(environ.get("TMPDIR") or "/tmp", f"jobworker-{euid}"))
    return candidates


def unsafe_because(st, euid):
    """Why a directory with this lstat() result may not lie on the path to euid's cache, or None.

    Only root and euid may be able to rename or replace it: then nothing under it can be swapped
    once checked. In a sticky dir (/tmp) others may add entries but not rename ours. POSIX ACL
    entries that grant writes show in the group bits (the mask), so they are refused too.
    """
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid not in (0, euid):
        return f"belongs to uid {st.st_uid}"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def check_private(path, euid):
    """Raise BootstrapError unless path is a directory (not a symlink) of euid's, mode 0700."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise BootstrapError(f"cache dir {path} is a symlink or not a directory; remove it")
    if st.st_uid != euid:
        raise BootstrapError(f"cache dir {path} belongs to uid {st.st_uid}, not {euid}; "
                             f"remove it")
    if st.st_mode & 0o077:
        raise BootstrapError(f"cache dir {path} is open to others (mode "
                             f"{stat.S_IMODE(st.st_mode):o}); chmod 700 it")


def make_private_dir(path, euid):
    """path made absolute, created (mode 0700, with missing parents) and checked from / down.

    Each component is checked before anything is created below it. Raises BootstrapError naming
    the first unsafe component, OSError when a directory cannot be made.
    """
    path = os.path.abspath(path)
    owners = "root" if euid == 0 else f"root or uid {euid}"
    component = "/"
    for part in [""] + [p for p in path.split("/") if p]:
        component = os.path.join(component, part)
        try:
            st = os.lstat(component)
        except FileNotFoundError:
            try:
                os.mkdir(component, 0o700)
            except FileExistsError:
                pass   # made by a concurrent first run: checked below like any other
            st = os.lstat(component)
        problem = component != path and unsafe_because(st, euid)
        if problem:
            raise BootstrapError(
                f"unsafe cache dir {path}: {component} {problem}; every directory down to the "
                f"cache must be owned by {owners}, writable by no one else unless sticky, and "
                f"not a symlink (choose another with JOBWORKER_CACHE_DIR)")
    check_private(path, euid)
    return path


def cache_root(environ, euid):
    """The private cache dir for euid (see the module docstring), created if missing."""
    errors = []
    for path in cache_candidates(environ, euid):
        try:
            return make_private_dir(path, euid)
        except OSError as e:   # cannot be made here (read-only, no permission): try the next
            errors.append(f"{path}: {e.strerror}")
    hint = "" if environ.get("JOBWORKER_CACHE_DIR") else "; set JOBWORKER_CACHE_DIR"
    raise BootstrapError(f"cannot create a cache dir ({', '.join(errors)}){hint}")


def unpack(config, target, archive, tmp):
    """Write target's wheels' files and jobworker's modules from archive into tmp."""
    import shutil
    import zipfile
    os.close(os.open(os.path.join(tmp, IN_USE), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    prefixes = tuple(f"{config['lib']}/{stem}/" for stem in target["wheels"])
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if info.filename in config["modules"]:
                rel = info.filename   # our own modules too: imported from here, .pyc cached
            elif info.filename.startswith(prefixes):
                rel = info.filename.split("/", 2)[2]
            else:
                continue
            out = os.path.normpath(os.path.join(tmp, rel))
            if not out.startswith(tmp + os.sep):
                raise BootstrapError(f"bad path in archive: {info.filename}")
            os.makedirs(os.path.dirname(out), mode=0o700, exist_ok=True)
            with zf.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    # Bytecode now, once: imports are fast from the first cached run on, even where
    # PYTHONDONTWRITEBYTECODE stops Python from writing it later.
    import compileall
    compileall.compile_dir(tmp, quiet=2, force=True)


def _flock(path, how):
    """An fd of `path` (open read-only) holding flock `how`, or None: the lock is taken by
    another (LOCK_NB), or the file cannot be opened or locked (no locks on this filesystem)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, how)
    except OSError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def locked(root, how):
    """flock(2) on the cache dir itself: shared while a run finds, extracts and marks its
    build, exclusive while builds are chosen for removal. Yields whether it holds the lock
    (not when another holds it and `how` has LOCK_NB, or locks do not work here)."""
    fd = _flock(root, how)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)   # and the lock with it


def use_build(config, root, tag, target, archive, euid):
    """(dir, new): the dir of this build's packages (see extract) and whether this run
    extracted it. From then on this process holds the build's in-use file (a shared flock,
    until it exits), and the build is marked used now (its mtime). Under the cache's shared
    lock: no prune runs between the check and the hold. A cache that cannot be locked or
    marked (a read-only one made beforehand) is used all the same."""
    with locked(root, fcntl.LOCK_SH):
        new = not os.path.lexists(os.path.join(root, f"{config['build_id']}-{tag}"))
        dest = extract(config, root, tag, target, archive, euid)
        fd = _flock(os.path.join(dest, IN_USE), fcntl.LOCK_SH)
        if fd is not None:
            _held.append(fd)
        with contextlib.suppress(OSError):
            os.utime(dest)
    return dest, new


def prune(root, keep, now=None, unused_for=UNUSED_FOR):
    """Remove from root the builds other than `keep` that no run has started from for
    `unused_for` seconds (their mtime, set by use_build) and whose in-use file no process
    holds, the temp dirs of extractions that failed as long ago, and removals that did not
    finish. Only builds and temp dirs that carry an in-use file are touched: builds of older
    bootstraps, which hold no lock, and anything else in the dir stay. Skipped if a run
    holds the cache's lock; an entry that cannot be removed is left for next time. Returns
    the names removed."""
    import shutil
    now = time.time() if now is None else now
    doomed = []
    with locked(root, fcntl.LOCK_EX | fcntl.LOCK_NB) as got:
        if not got:
            return []
        for name in sorted(os.listdir(root)):
            try:
                path = _removable(root, name, keep, now - unused_for)
            except OSError:
                continue
            if path is not None:
                doomed.append((name, path))
    # Renamed already (no run can find them), so removing them holds no lock.
    for name, path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return [name for name, path in doomed if not os.path.lexists(path)]


def _removable(root, name, keep, used_before):
    """The path to remove for the entry `name` (a build renamed out of the way first), or
    None to keep it. Called under the cache's exclusive lock."""
    path = os.path.join(root, name)
    st = os.lstat(path)
    if path == keep or not stat.S_ISDIR(st.st_mode):
        return None
    if _REMOVING.fullmatch(name):
        return path   # a removal that did not finish (only prune makes these names)
    if not stat.S_ISREG(os.lstat(os.path.join(path, IN_USE)).st_mode):
        return None
    if st.st_mtime >= used_before:
        return None
    if _EXTRACTING.fullmatch(name):
        return path
    if not _BUILD.fullmatch(name):
        return None
    fd = _flock(os.path.join(path, IN_USE), fcntl.LOCK_EX | fcntl.LOCK_NB)
    if fd is None:
        return None   # a process runs from it
    try:   # none can start from it now: a run takes the cache's lock before the build's
        gone = os.path.join(root, f".prune-{name}")
        if os.path.lexists(gone):
            return None   # that one goes first (this round), this build the next
        os.rename(path, gone)
    finally:
        os.close(fd)
    return gone


def extract(config, root, tag, target, archive, euid):
    """The dir under root holding target's packages and jobworker's modules, extracted from
    archive on first use, checked private to euid."""
    dest = os.path.join(root, f"{config['build_id']}-{tag}")
    if not os.path.lexists(dest):
        import shutil
        import tempfile
        tmp = tempfile.mkdtemp(prefix=".extract-", dir=root)
        try:
            unpack(config, target, archive, tmp)
            try:
                os.rename(tmp, dest)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                shutil.rmtree(tmp)   # another first run got there first; use theirs
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    check_private(dest, euid)
    return dest


def main():
    euid = os.geteuid()
    try:
        tag, target = find_target(CONFIG)
        root = cache_root(os.environ, euid)
        packages, new = use_build(CONFIG, root, tag, target, archive_path(), euid)
    except BootstrapError as e:
        sys.stderr.write(f"jobworker: {e}\n")
        sys.exit(1)
    if new:   # the first run of this build: the ones it replaces may go
        try:
            prune(root, packages)
        except OSError as e:   # a cache to tidy is no reason not to run
            sys.stderr.write(f"jobworker: could not tidy the cache {root}: {e}\n")
    # Nothing can swap the packages between the checks above and the imports below: every
    # directory from / down to the cache was checked writable only by root and us (a sticky
    # one lets others add entries, not rename ours), and `packages` is ours, mode 0700. So the
    # path names what was checked, for as long as this process runs.
    sys.path.insert(0, packages)
    import jobworker
    jobworker.run_main()


if __name__ == "__main__":
    main()
