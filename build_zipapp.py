#!/usr/bin/env python3
"""Build jobworker.pyz: one file that runs on a bare Linux host with only python3.

    python3 build_zipapp.py [-o jobworker.pyz] [--python 3.10,3.11,3.12,3.13]
                            [--platform x86_64,aarch64]

Steps: generate the gRPC modules from jobworker.proto with the pinned grpc_tools.protoc; fetch
the pinned runtime wheels (requirements.txt) for every target with pip; write a zip holding
jobworker.py, the generated modules at the top level, each wheel's files under
_jobworker_lib/<wheel>/, and a __main__.py bootstrap (zipapp_main.py with its CONFIG filled in)
that knows which wheels serve which target. Native packages cannot be imported from a zip: the
bootstrap extracts a target's wheels once into a cache dir keyed by the payload's hash. Two
builds from the same inputs give identical bytes (sorted entries, fixed timestamps and modes).
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

# The pyz's __main__.py: this file with its CONFIG line filled in.
BOOTSTRAP = os.path.join(HERE, "zipapp_main.py")
CONFIG_LINE = "CONFIG = None  # filled in by build_zipapp.py\n"
# Our own modules, extracted beside the wheels' so that their bytecode is cached, and the
# completion scripts `jobworker completion` prints from beside jobworker.py.
MODULES = ["jobworker.py", "jobworker_pb2.py", "jobworker_pb2_grpc.py",
           "completions/jobworker.bash", "completions/jobworker.zsh"]


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


def completions():
    """Shell completion scripts for `jobworker completion bash|zsh`, made by shtab (a build-time
    tool) from jobworker's own argparse parser."""
    import shtab
    sys.path.insert(0, HERE)
    import jobworker
    return {f"completions/jobworker.{shell}":
            shtab.complete(jobworker.build_parser(), shell=shell).encode()
            for shell in jobworker.COMPLETION_SHELLS}


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


def main_module(bootstrap, entries, targets):
    """(build id, __main__.py bytes): the bootstrap's text with CONFIG filled in. The build id
    names the cache dir the bootstrap extracts into; it covers the bootstrap's text and every
    entry, so a change to either extracts afresh."""
    if bootstrap.count(CONFIG_LINE) != 1:
        raise ValueError(f"the bootstrap must hold the line {CONFIG_LINE.strip()!r} once")
    digest = hashlib.sha256(bootstrap.encode())
    for name in sorted(entries):
        digest.update(name.encode() + b"\0" + hashlib.sha256(entries[name]).digest())
    build_id = digest.hexdigest()[:16]
    config = json.dumps({"build_id": build_id, "lib": LIB, "targets": targets,
                         "modules": MODULES}, sort_keys=True)
    return build_id, bootstrap.replace(CONFIG_LINE, f"CONFIG = {config}\n").encode()


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
    entries.update(completions())
    with open(os.path.join(HERE, "jobworker.py"), "rb") as f:
        entries["jobworker.py"] = f.read()
    with open(BOOTSTRAP, encoding="utf-8") as f:
        bootstrap = f.read()
    try:
        build_id, entries["__main__.py"] = main_module(bootstrap, entries, targets)
    except ValueError as e:
        sys.exit(f"build_zipapp: {BOOTSTRAP}: {e}")
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
