#!/usr/bin/env python3
"""Boot a pure cgroup v2 Linux guest under QEMU and check jobworker's limits there for real.

    python3 v2_guest.py --pyz jobworker.pyz [--cache DIR] [--timeout 400] [--json FILE]
                        [--program FILE] [--memory MIB] [--env KEY=VALUE ...]

The guest is Debian's cloud kernel plus an initramfs made of Debian packages (busybox-static,
glibc, CPython 3.11, the virtio modules), all fetched with `apt-get download` and cached in
--cache (default $JOBWORKER_GUEST_CACHE, else ~/.cache/jobworker-v2-guest). It boots with
`cgroup_no_v1=all`, mounts cgroup2 with cpu, memory, io and pids enabled, starts
`jobworker.pyz serve` inside a non-root cgroup (as systemd would) with certificates from
`certs`, and drives it with the real CLI over mutual TLS on the guest's loopback
(v2_guest_checks.py, copied into the initramfs at every run). A scratch virtio disk takes the
I/O tests. Results come back over the serial console; the exit status is 0 when every check
passed. `jobworker.pyz` must bundle cp311 x86_64 wheels (the guest's Python).
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

PACKAGES = ["busybox-static", "libc6", "zlib1g", "libexpat1", "libffi8", "python3.11-minimal",
            "libpython3.11-minimal", "libpython3.11-stdlib", "libstdc++6", "libgcc-s1"]
# The cloud kernel builds these as modules; insmod order matters.
MODULES = ["drivers/virtio/virtio_ring.ko", "drivers/virtio/virtio.ko",
           "drivers/virtio/virtio_pci_modern_dev.ko", "drivers/virtio/virtio_pci_legacy_dev.ko",
           "drivers/virtio/virtio_pci.ko", "drivers/block/virtio_blk.ko"]
BEGIN, END = "JWGUEST-RESULT-BEGIN", "JWGUEST-RESULT-END"

# The guest's /init (busybox sh; {modules} is filled in), read at every run.
INIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "v2_guest_init.sh")

# Runs inside the guest as /checks.py (CPython 3.11, busybox); read at every run.
CHECKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "v2_guest_checks.py")


def log(msg):
    print(f"v2_guest: {msg}", file=sys.stderr, flush=True)


def default_cache():
    return os.environ.get("JOBWORKER_GUEST_CACHE") or os.path.expanduser(
        "~/.cache/jobworker-v2-guest")


def kernel_package():
    """The versioned kernel package linux-image-cloud-amd64 depends on (it changes with security
    updates, so it is looked up every time)."""
    def lookup():
        r = subprocess.run(["apt-cache", "depends", "linux-image-cloud-amd64"],
                           capture_output=True, text=True)
        m = re.search(r"Depends: (linux-image-\S+-cloud-amd64)", r.stdout)
        return m.group(1) if m else None
    name = lookup()
    if name is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        name = lookup()
    if name is None:
        sys.exit("v2_guest: cannot find Debian's linux-image-cloud-amd64 (apt sources?)")
    return name


def fetch_debs(cache, names):
    """{package: .deb path}, downloading what the cache lacks."""
    debs = os.path.join(cache, "debs")
    os.makedirs(debs, exist_ok=True)

    def have(name):
        found = [f for f in os.listdir(debs) if f.startswith(name + "_") and f.endswith(".deb")]
        return os.path.join(debs, sorted(found)[-1]) if found else None

    missing = [n for n in names if not have(n)]
    if missing:
        log(f"downloading {' '.join(missing)}")
        r = subprocess.run(["apt-get", "download", "-q", *missing], cwd=debs,
                           capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            subprocess.run(["apt-get", "download", "-q", *missing], cwd=debs, check=True)
    return {n: have(n) for n in names}


def cpio_newc(entries):
    """A cpio 'newc' archive of (path, mode, data) entries; data of a symlink is its target."""
    out = bytearray()
    for ino, (path, mode, data) in enumerate(entries, 1):
        name = path.encode() + b"\0"
        fields = [0x070701, ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name), 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields[1:])
        out += name + b"\0" * (-(110 + len(name)) % 4)
        out += data + b"\0" * (-len(data) % 4)
    trailer = b"TRAILER!!!\0"
    out += b"070701" + b"%08X" * 13 % (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(trailer), 0)
    out += trailer + b"\0" * (-(110 + len(trailer)) % 4)
    return bytes(out)


def tree_entries(root, prefix=""):
    """(path, mode, data) for everything under root, directories first, sorted."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(dirnames) + sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(prefix, rel_dir, name)).lstrip("/")
            st = os.lstat(full)
            if os.path.islink(full):
                entries.append((rel, 0o120777, os.readlink(full).encode()))
            elif os.path.isdir(full):
                entries.append((rel, 0o040755, b""))
            else:
                with open(full, "rb") as f:
                    entries.append((rel, 0o100000 | (st.st_mode & 0o777), f.read()))
    return entries


def init_script():
    """The guest's /init, with the modules to load filled in."""
    with open(INIT) as f:
        return f.read().replace("{modules}", " ".join(os.path.basename(m) for m in MODULES))


def build_base(cache):
    """(vmlinuz path, base initramfs path): kernel, busybox, glibc, Python 3.11, virtio modules."""
    kernel = kernel_package()
    init_text = init_script()
    debs = fetch_debs(cache, [kernel] + PACKAGES)
    key = hashlib.sha256("\n".join(sorted(os.path.basename(p) for p in debs.values()))
                         .encode() + init_text.encode()).hexdigest()[:16]
    vmlinuz = os.path.join(cache, f"vmlinuz-{key}")
    base = os.path.join(cache, f"base-{key}.cpio")
    if os.path.exists(vmlinuz) and os.path.exists(base):
        return vmlinuz, base
    log(f"building the guest's base image from {kernel} and {len(PACKAGES)} packages")
    with tempfile.TemporaryDirectory() as tmp:
        root, kdir = os.path.join(tmp, "root"), os.path.join(tmp, "kernel")
        for name in PACKAGES:
            subprocess.run(["dpkg", "-x", debs[name], root], check=True)
        subprocess.run(["dpkg", "-x", debs[kernel], kdir], check=True)
        for sub in ("usr/share", "usr/lib/python3.11/test", "usr/lib/python3.11/idlelib",
                    "usr/lib/python3.11/tkinter", "usr/lib/python3.11/ensurepip"):
            shutil.rmtree(os.path.join(root, sub), ignore_errors=True)
        modules_dir = os.path.join(root, "modules")
        os.makedirs(modules_dir)
        kver = os.listdir(os.path.join(kdir, "lib", "modules"))[0]
        for m in MODULES:
            shutil.copy(os.path.join(kdir, "lib", "modules", kver, "kernel", m), modules_dir)
        init = os.path.join(root, "init")
        with open(init, "w") as f:
            f.write(init_text)
        os.chmod(init, 0o755)
        with open(base + ".tmp", "wb") as f:
            f.write(cpio_newc(tree_entries(root)))
        shutil.copy(os.path.join(kdir, "boot", f"vmlinuz-{kver}"), vmlinuz + ".tmp")
    os.replace(base + ".tmp", base)
    os.replace(vmlinuz + ".tmp", vmlinuz)
    return vmlinuz, base


def run_files(pyz_data, program=CHECKS):
    """(path, mode, data) of what each run adds to the base image: the pyz, the program the
    guest runs as /checks.py, and the checks module beside it (another program may import its
    helpers)."""
    files = [("jobworker.pyz", 0o100755, pyz_data)]
    for name, path in (("checks.py", program), ("v2_guest_checks.py", CHECKS)):
        with open(path, "rb") as f:
            files.append((name, 0o100644, f.read()))
    return files


def run_guest(pyz, cache, timeout, program=CHECKS, memory_mb=1024, env=()):
    """(console text, seconds): the guest booted with `pyz` and `program` as /checks.py.
    `env`: KEY=VALUE words for the kernel command line, which passes them on to init (and so
    to the program) as environment variables."""
    for word in env:
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=[^\s]*", word):
            raise ValueError(f"not KEY=VALUE for the guest's environment: {word!r}")
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        sys.exit("v2_guest: qemu-system-x86_64 is missing "
                 "(apt-get install --no-install-recommends qemu-system-x86)")
    vmlinuz, base = build_base(cache)
    with tempfile.TemporaryDirectory() as tmp:
        initrd = os.path.join(tmp, "initrd")
        with open(pyz, "rb") as f:
            pyz_data = f.read()
        with open(initrd, "wb") as out, open(base, "rb") as b:
            shutil.copyfileobj(b, out)   # concatenated cpio archives merge
            out.write(cpio_newc(run_files(pyz_data, program)))
        disk = os.path.join(tmp, "scratch.img")
        with open(disk, "wb") as f:
            f.truncate(64 << 20)
        cmd = [qemu, "-accel", "tcg", "-m", str(memory_mb), "-smp", "2", "-kernel", vmlinuz,
               "-initrd", initrd, "-append",
               " ".join(["console=ttyS0 cgroup_no_v1=all panic=-1 quiet loglevel=3", *env]),
               "-nographic", "-no-reboot", "-nic", "none",
               "-drive", f"file={disk},if=virtio,format=raw,cache=unsafe"]
        log("booting the guest (TCG)")
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=timeout)
            console = proc.stdout.decode("utf-8", "replace")
        except subprocess.TimeoutExpired as e:
            console = (e.stdout or b"").decode("utf-8", "replace")
            console += f"\nv2_guest: guest timed out after {timeout}s\n"
    console = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", console)
    return console, time.monotonic() - t0


def parse(console):
    if BEGIN not in console or END not in console:
        return None
    return json.loads(console.split(BEGIN, 1)[1].split(END, 1)[0].strip())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pyz", required=True, help="jobworker.pyz with cp311 x86_64 wheels")
    p.add_argument("--cache", default=default_cache(), help="downloads and built images")
    p.add_argument("--timeout", type=float, default=400, help="seconds for the whole guest run")
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--program", default=CHECKS,
                   help="what the guest runs (default: the checks; bench/tenk_guest.py)")
    p.add_argument("--memory", type=int, default=1024, help="the guest's memory (MiB)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for the program (repeatable)")
    args = p.parse_args(argv)
    console, seconds = run_guest(args.pyz, args.cache, args.timeout, args.program, args.memory,
                                 args.env)
    result = parse(console)
    if result is None:
        print(console[-6000:])
        print("v2_guest: no results from the guest", file=sys.stderr)
        return 2
    result["wall_seconds"] = round(seconds, 1)
    for name, c in result["checks"].items():
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {name}: {c['detail']}")
    print(f"guest run: {seconds:.0f} s wall, {result['seconds']} s of checks")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["checks"] and all(c["ok"] for c in result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
