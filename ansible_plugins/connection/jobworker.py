# Ansible connection plugin for jobworker: every task runs as a jobworker job (mutual TLS, an
# audit line, cgroup limits), as Ansible's ssh plugin drives `ssh`, this drives the jobworker
# CLI as a subprocess.
#
#     ANSIBLE_CONNECTION_PLUGINS=path/to/ansible_plugins/connection ansible all -c jobworker -m ping
from __future__ import annotations

DOCUMENTATION = r"""
name: jobworker
short_description: run tasks as jobworker jobs, over mutual TLS, under cgroup limits
description:
  - Runs each command of a task with C(jobworker run) on the host's jobworker server, and moves
    files with jobworker jobs that write or read them byte for byte (streamed, never whole in
    memory).
  - The inventory host name is the jobworker context (C(jobworker context add NAME ...)) unless
    O(context) names another, or O(server), O(ca), O(cert) and O(key) give the connection
    (C(ansible_host) is not used).
  - Job limits (O(cpu), O(memory), O(disk_io), O(pids), O(job_timeout)) apply to every command.
  - Files are moved by jobs removed once they end (C(jobworker run --rm)), so their bytes do
    not stay in the server's output logs.
author: jobworker
options:
  context:
    description: The jobworker context to use; the inventory host name if not set.
    type: str
    vars:
      - name: inventory_hostname
      - name: ansible_jobworker_context
  executable:
    description: The jobworker CLI (C(jobworker.pyz) or C(jobworker) on PATH).
    type: str
    default: jobworker
    vars:
      - name: ansible_jobworker_executable
    env:
      - name: ANSIBLE_JOBWORKER_EXECUTABLE
  server:
    description: HOST[:PORT] of the server, instead of a context.
    type: str
    vars:
      - name: ansible_jobworker_server
  ca:
    description: The CA file the server's certificate must chain to.
    type: path
    vars:
      - name: ansible_jobworker_ca
  cert:
    description: The client certificate.
    type: path
    vars:
      - name: ansible_jobworker_cert
  key:
    description: The client certificate's private key.
    type: path
    vars:
      - name: ansible_jobworker_key
  cpu:
    description: CPU quota of each job, percent of one CPU (C(50%)).
    type: str
    vars:
      - name: ansible_jobworker_cpu
  memory:
    description: Memory limit of each job (C(256M)).
    type: str
    vars:
      - name: ansible_jobworker_memory
  disk_io:
    description: Disk read and write bandwidth of each job (C(10MB/s)).
    type: str
    vars:
      - name: ansible_jobworker_disk_io
  pids:
    description: Most processes of each job.
    type: str
    vars:
      - name: ansible_jobworker_pids
  job_timeout:
    description: Each job is stopped once it has run this long (C(30s), C(15m)); jobworker's
      C(--timeout), not Ansible's connection timeout.
    type: str
    vars:
      - name: ansible_jobworker_timeout
  queue:
    description: On a host whose caps are full, each task waits in the server's queue for a
      slot instead of failing (jobworker's C(--queue)).
    type: bool
    default: false
    vars:
      - name: ansible_jobworker_queue
  queue_timeout:
    description: With O(queue) (implied), a task that has not started after this long fails
      (C(10m)).
    type: str
    vars:
      - name: ansible_jobworker_queue_timeout
"""

import os
import shlex
import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

display = Display()

EXIT_USAGE, EXIT_CONNECT = 2, 3   # jobworker: a usage error; cannot reach the server (or TLS)
LIMITS = {"cpu": "--cpu", "memory": "--memory", "disk_io": "--disk-io", "pids": "--pids",
          "job_timeout": "--timeout", "queue_timeout": "--queue-timeout"}


class Connection(ConnectionBase):
    """One host's jobworker server; nothing stays open between commands."""

    transport = "jobworker"
    has_pipelining = True     # a module may come on stdin (run -i)
    has_tty = False

    def _connect(self):
        self._connected = True
        return self

    def _connection_args(self):
        given = {k: self.get_option(k) for k in ("server", "ca", "cert", "key")}
        if given["server"]:
            return [arg for flag, value in given.items() if value
                    for arg in (f"--{flag}", value)]
        return ["--context", self.get_option("context") or self._play_context.remote_addr]

    def _argv(self, subcommand, *args):
        """The CLI's command line for `subcommand` on this host, with the job limits."""
        argv = [self.get_option("executable"), subcommand, *self._connection_args()]
        for name, flag in LIMITS.items():
            value = self.get_option(name)
            if value:
                argv += [flag, str(value)]
        if self.get_option("queue"):
            argv.append("--queue")
        return argv + list(args)

    def _run(self, argv, stdin=None, stdout=subprocess.PIPE, data=None):
        display.vvv(f"JOBWORKER: {shlex.join(argv)}", host=self._play_context.remote_addr)
        p = self._popen(argv, stdin if data is None else subprocess.PIPE, stdout)
        out, err = p.communicate(data)
        said = err.decode(errors="replace").strip().splitlines()
        if p.returncode in (EXIT_USAGE, EXIT_CONNECT) and said and \
                said[-1].startswith("jobworker: "):
            self._check_reachable()   # (or a command's own exit 2 or 3: its result)
        return p.returncode, out or b"", err

    def _popen(self, argv, stdin, stdout):
        try:
            return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)
        except OSError as e:
            raise AnsibleConnectionFailure(f"cannot run the jobworker CLI {argv[0]!r}: "
                                           f"{e.strerror}") from None

    def _check_reachable(self):
        """AnsibleConnectionFailure, with the CLI's words, unless the host's server answers: a
        command may exit 2 or 3 and say 'jobworker: ' itself."""
        argv = [self.get_option("executable"), "health", *self._connection_args()]
        p = self._popen(argv, subprocess.DEVNULL, subprocess.DEVNULL)
        _, err = p.communicate()
        if p.returncode in (EXIT_USAGE, EXIT_CONNECT):
            said = err.decode(errors="replace").strip().splitlines()
            raise AnsibleConnectionFailure(said[-1] if said else f"health exit {p.returncode}")

    def exec_command(self, cmd, in_data=None, sudoable=True):
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        args = ["-i"] if in_data is not None else []
        argv = self._argv("run", *args, "--", "/bin/sh", "-c", cmd)
        return self._run(argv, stdin=subprocess.DEVNULL, data=in_data)

    def put_file(self, in_path, out_path):
        super().put_file(in_path, out_path)
        argv = self._argv("run", "--rm", "-i", "--", "/bin/sh", "-c", 'cat > "$1"', "sh",
                          out_path)
        with open(in_path, "rb") as f:   # streamed: the job reads it as the CLI sends it
            rc, _, err = self._run(argv, stdin=f)
        if rc:
            raise AnsibleError(f"failed to write {out_path} on the host (exit {rc}): "
                               f"{err.decode(errors='replace').strip()}")

    def fetch_file(self, in_path, out_path):
        super().fetch_file(in_path, out_path)
        # the file's size after its bytes, on stderr: a file cut short (the server keeps at most
        # --log-cap of a job's output) is told from a whole one
        argv = self._argv("run", "--rm", "--", "/bin/sh", "-c",
                          'cat -- "$1" && wc -c < "$1" >&2', "sh", in_path)
        with open(out_path, "wb") as f:   # streamed: the CLI writes the job's output as it comes
            rc, _, err = self._run(argv, stdin=subprocess.DEVNULL, stdout=f)
            got = f.tell()
        said = err.decode(errors="replace").strip()
        size = said.splitlines()[-1].strip() if rc == 0 and said else ""
        if rc == 0 and size != str(got):
            rc, said = 1, (f"{got} bytes came of a file of {size or 'unknown size'} (a server "
                           f"keeps at most its --log-cap of a job's output): {said}")
        if rc:
            os.unlink(out_path)
            raise AnsibleError(f"failed to read {in_path} on the host (exit {rc}): {said}")

    def close(self):
        self._connected = False   # nothing is kept open
