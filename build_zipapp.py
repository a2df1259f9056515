#!/usr/bin/env python3
"""Build jobworker.pyz: one file that runs on a bare Linux host with only python3.

    python3 build_zipapp.py [-o jobworker.pyz] [--python 3.10,3.11,3.12,3.13]
                            [--platform x86_64,aarch64]

Steps: generate the gRPC modules from jobworker.proto with the pinned grpc_tools.protoc; fetch
the pinned runtime wheels (requirements.txt) for every target with pip; write a zip holding
jobworker.py, the generated modules at the top level, each wheel's files under
_jobworker_lib/<wheel>/, and a __main__.py bootstrap that knows which wheels serve which
target. Native packages cannot be imported from a zip: the bootstrap extracts a target's wheels
once into a cache dir keyed by the payload's hash. Two builds from the same inputs give
identical bytes (sorted entries, fixed timestamps and modes).
"""

import argparse
import hashlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
LIB = "_jobworker_lib"
EPOCH = (1980, 1, 1, 0, 0, 0)
# pip --platform tags tried for each arch, oldest glibc first
PLATFORM_TAGS = ["manylinux2014_{arch}", "manylinux_2_17_{arch}", "manylinux_2_28_{arch}",
                 "manylinux_2_34_{arch}"]

BOOTSTRAP = r"""# jobworker.pyz bootstrap: put the bundled native packages on sys.path, then run jobworker.
# Native packages cannot be imported from inside a zip; each target's wheels, and jobworker's
# own modules (so their bytecode is cached), are extracted once into a private cache dir named
# after the payload's hash, atomically (temp dir + rename).
import errno
import os
import stat
import sys

CONFIG = None  # filled in by build_zipapp.py


def fail(message):
    sys.stderr.write(f"jobworker: {message}\n")
    sys.exit(1)


def archive_path():
    return os.path.dirname(os.path.abspath(__file__))


def find_target():
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}-{os.uname().machine}"
    target = CONFIG["targets"].get(tag)
    if sys.implementation.name != "cpython" or target is None:
        built = ", ".join(sorted(CONFIG["targets"]))
        fail(f"this jobworker.pyz has no packages for {sys.implementation.name} {version} on "
             f"{os.uname().machine}; it was built for {built} (build_zipapp.py --python/--platform)")
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION").split()[1]
    except (ValueError, OSError, AttributeError, IndexError):
        fail("jobworker.pyz needs a glibc-based Linux (its packages are manylinux wheels)")
    have = tuple(int(x) for x in libc.split(".")[:2])
    if have < tuple(target["glibc"]):
        fail(f"jobworker.pyz needs glibc {'.'.join(map(str, target['glibc']))} or newer "
             f"(this host has {libc})")
    return tag, target


def check_private(path):
    # root loads shared objects from here: it must be ours alone and not a symlink
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        fail(f"cache dir {path} is a symlink or not a directory; remove it")
    if st.st_uid != os.geteuid():
        fail(f"cache dir {path} belongs to uid {st.st_uid}, not {os.geteuid()}; remove it")
    if st.st_mode & 0o077:
        fail(f"cache dir {path} is open to others (mode {st.st_mode & 0o777:o}); chmod 700 it")


def cache_root():
    explicit = os.environ.get("JOBWORKER_CACHE_DIR")
    if explicit:
        candidates = [explicit]
    else:
        candidates = []
        if os.environ.get("XDG_CACHE_HOME"):
            candidates.append(os.path.join(os.environ["XDG_CACHE_HOME"], "jobworker"))
        home = os.path.expanduser("~")
        if home != "~":
            candidates.append(os.path.join(home, ".cache", "jobworker"))
        tmp = os.environ.get("TMPDIR") or "/tmp"
        candidates.append(os.path.join(tmp, f"jobworker-{os.geteuid()}"))
    for path in candidates:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as e:
            if explicit:
                fail(f"cannot create cache dir {path}: {e.strerror}")
            continue
        check_private(path)
        return path
    fail(f"no usable cache dir among {', '.join(candidates)}; set JOBWORKER_CACHE_DIR")


def extract(root, tag, target):
    dest = os.path.join(root, f"{CONFIG['build_id']}-{tag}")
    if os.path.lexists(dest):
        check_private(dest)
        return dest
    import shutil
    import tempfile
    import zipfile
    tmp = tempfile.mkdtemp(prefix=".extract-", dir=root)
    try:
        prefixes = tuple(f"{CONFIG['lib']}/{stem}/" for stem in target["wheels"])
        with zipfile.ZipFile(archive_path()) as zf:
            for info in zf.infolist():
                if info.filename in CONFIG["modules"]:
                    rel = info.filename   # our own modules too: imported from here, .pyc cached
                elif info.filename.startswith(prefixes):
                    rel = info.filename.split("/", 2)[2]
                else:
                    continue
                out = os.path.normpath(os.path.join(tmp, rel))
                if not out.startswith(tmp + os.sep):
                    fail(f"bad path in archive: {info.filename}")
                os.makedirs(os.path.dirname(out), mode=0o700, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        # Bytecode now, once: imports are fast from the first cached run on, even where
        # PYTHONDONTWRITEBYTECODE stops Python from writing it later.
        import compileall
        compileall.compile_dir(tmp, quiet=2, force=True)
        try:
            os.rename(tmp, dest)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(tmp)   # another first run got there first; use theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    check_private(dest)
    return dest


def main():
    tag, target = find_target()
    sys.path.insert(0, extract(cache_root(), tag, target))
    import jobworker
    sys.exit(jobworker.main())


main()
"""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", default="jobworker.pyz")
    p.add_argument("--python", default=f"{sys.version_info[0]}.{sys.version_info[1]}",
                   help="comma-separated CPython versions to bundle (default: this one)")
    p.add_argument("--platform", default=platform.machine(),
                   help="comma-separated architectures: x86_64, aarch64 (default: this one)")
    p.add_argument("--wheel-cache", default=os.path.join(HERE, "build", "wheels"),
                   help="where downloaded wheels are kept between builds")
    return p.parse_args(argv)


def runtime_pins():
    pins = []
    with open(os.path.join(HERE, "requirements.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                pins.append(line)
    return pins


def generate_stubs(out_dir):
    """jobworker_pb2.py and jobworker_pb2_grpc.py from jobworker.proto, by the pinned protoc."""
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{HERE}", f"--python_out={out_dir}",
                    f"--grpc_python_out={out_dir}", os.path.join(HERE, "jobworker.proto")],
                   check=True)
    return {name: open(os.path.join(out_dir, name), "rb").read()
            for name in ("jobworker_pb2.py", "jobworker_pb2_grpc.py")}


def fetch_wheels(version, arch, cache):
    """Paths of the pinned wheels for one target, downloaded into cache (kept between builds)."""
    dest = os.path.join(cache, f"cp{version.replace('.', '')}-{arch}")
    os.makedirs(dest, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
           "--no-deps", "--only-binary=:all:", "--python-version", version,
           "--implementation", "cp", "--abi", f"cp{version.replace('.', '')}", "--abi", "abi3",
           "--abi", "none", "-d", dest]
    for tag in PLATFORM_TAGS:
        cmd += ["--platform", tag.format(arch=arch)]
    subprocess.run(cmd + runtime_pins(), check=True)
    wanted = {re.split(r"[=<>!~]", pin)[0].lower().replace("-", "_") for pin in runtime_pins()}
    wheels = sorted(os.path.join(dest, w) for w in os.listdir(dest) if w.endswith(".whl"))
    found = {os.path.basename(w).split("-")[0].lower() for w in wheels}
    if found != wanted:
        sys.exit(f"build_zipapp: wheels for {version} {arch}: found {sorted(found)}, "
                 f"want {sorted(wanted)} (stale files in {dest}?)")
    return wheels


def glibc_needed(wheel_name):
    """The glibc version a manylinux wheel needs, as (major, minor)."""
    tags = wheel_name[:-4].split("-")[-1].split(".")
    needed = (0, 0)
    for tag in tags:
        m = re.match(r"manylinux_(\d+)_(\d+)_", tag)
        if m:
            needed = max(needed, (int(m.group(1)), int(m.group(2))))
        elif tag.startswith("manylinux2014"):
            needed = max(needed, (2, 17))
    return needed


def add(zf, name, data, mode=0o644):
    info = zipfile.ZipInfo(name, EPOCH)
    info.external_attr = (0o100000 | mode) << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    zf.writestr(info, data, compresslevel=6)


def build(args):
    versions = [v.strip() for v in args.python.split(",") if v.strip()]
    arches = [a.strip() for a in args.platform.split(",") if a.strip()]
    entries = {}    # zip name -> bytes
    targets = {}    # "cp311-x86_64" -> {"wheels": [...], "glibc": [2, 17]}
    for arch in arches:
        for version in versions:
            tag = f"cp{version.replace('.', '')}-{arch}"
            stems, glibc = [], (0, 0)
            for wheel in fetch_wheels(version, arch, args.wheel_cache):
                stem = os.path.basename(wheel)[:-4]
                stems.append(stem)
                glibc = max(glibc, glibc_needed(os.path.basename(wheel)))
                with zipfile.ZipFile(wheel) as whl:
                    for item in whl.infolist():
                        if not item.is_dir():
                            entries[f"{LIB}/{stem}/{item.filename}"] = whl.read(item)
            targets[tag] = {"wheels": stems, "glibc": list(glibc)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in generate_stubs(tmp).items():
            entries[name] = data
    with open(os.path.join(HERE, "jobworker.py"), "rb") as f:
        entries["jobworker.py"] = f.read()
    bootstrap = BOOTSTRAP.lstrip()
    digest = hashlib.sha256(bootstrap.encode())   # the cache dir's name: payload and bootstrap
    for name in sorted(entries):
        digest.update(name.encode() + b"\0" + hashlib.sha256(entries[name]).digest())
    build_id = digest.hexdigest()[:16]
    modules = ["jobworker.py", "jobworker_pb2.py", "jobworker_pb2_grpc.py"]
    config = json.dumps({"build_id": build_id, "lib": LIB, "targets": targets,
                         "modules": modules}, sort_keys=True)
    entries["__main__.py"] = bootstrap.replace("CONFIG = None  # filled in by build_zipapp.py",
                                               f"CONFIG = {config}").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in sorted(entries):
            add(zf, name, entries[name])
    tmp_out = f"{args.output}.tmp"
    with open(tmp_out, "wb") as f:
        f.write(b"#!/usr/bin/env python3\n")
        f.write(buf.getvalue())
    os.chmod(tmp_out, 0o755)
    os.replace(tmp_out, args.output)
    size = os.path.getsize(args.output)
    print(f"wrote {args.output}: {size / 1e6:.1f} MB, build {build_id}, targets "
          f"{', '.join(sorted(targets))}", file=sys.stderr)


if __name__ == "__main__":
    build(parse_args(sys.argv[1:]))
