"""The README's example session, made by running it: a new user's first hour, as they would type it.

    python session_runlog_s3.py                  # print the session (about 15 s)
    python session_runlog_s3.py --write README.md    # replace the README's session block with it

It starts `runlog-s3 serve` (a local S3 server) in a terminal of its own, pastes the environment it
prints into a shell and its run_log_store block into a magnus config, runs two real magnus 0.4.16
pipelines with a parallel step and a map over files (the second on the chunked-s3 layout, with a
file that fails), then `ls`, `show`, `timeline`, `get` and `check` as a user types them, and stops
the server with Ctrl-C. Every line of the session is what those commands printed; test_runlog_s3.py
checks that the README's block is this script's output, up to times, sizes and the server's port.

Needs the test extras (magnus 0.4.16, moto): pip install '.[test]'.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent  # runlog-s3 and magnus, as a user's PATH finds them
BEGIN = "<!-- example session: made by python session_runlog_s3.py --write README.md; do not edit by hand -->"
END = "<!-- end of example session -->"

PIPELINE = """\
dag:
  start_at: extract
  steps:
    extract:
      type: task
      command_type: shell
      command: echo extract
      next: train
    train:
      type: parallel
      next: score
      branches:
        xgboost:
          start_at: fit
          steps:
            fit: {type: task, command_type: shell, command: echo fit xgboost, next: success}
            success: {type: success}
            fail: {type: fail}
        linear:
          start_at: fit
          steps:
            fit: {type: task, command_type: shell, command: echo fit linear, next: success}
            success: {type: success}
            fail: {type: fail}
    score:
      type: map
      iterate_on: files
      iterate_as: file
      next: success
      branch:
        start_at: check
        steps:
          check:
            type: task
            command_type: shell
            command: 'case "$MAGNUS_PRM_MAP_VARIABLE" in *broken*) exit 1;; esac'
            next: success
          success: {type: success}
          fail: {type: fail}
    success:
      type: success
    fail:
      type: fail
"""

EXECUTOR = "executor:\n  type: local\n  config:\n    enable_parallel: true\n"


class Session:
    """Commands run in one folder and environment, each shown as `$ command`, its output and exit code."""

    def __init__(self, folder: Path, environ: Dict[str, str]):
        self.folder = folder
        self.environ = environ
        self.lines: List[str] = []

    def note(self, text: str) -> None:
        self.lines.append(text)

    def run(self, command: str, expect: int = 0) -> str:
        """Run `command` with sh in the session's folder; record it and what it printed (stdout and stderr
        in the order they were written, as a terminal shows them)."""
        result = subprocess.run(["sh", "-c", command], cwd=self.folder, env=self.environ, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=300, check=False)
        output = result.stdout.rstrip("\n")
        if result.returncode != expect:
            raise RuntimeError(f"{command!r} exited with {result.returncode}, not {expect}:\n{output[-3000:]}")
        self.lines.append(f"$ {command}")
        if output:
            self.lines.append(output)
        self.lines.append(f"[exit {result.returncode}]")
        self.lines.append("")
        return output


def example_session(port: int = 9455) -> str:
    """The session's text: everything between the README's markers, code fence included."""
    folder = Path(tempfile.mkdtemp(prefix="runlog-s3-session-"))
    base = {name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "RUNLOG_S3_"))}
    base.update({"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "NO_COLOR": "1", "COLUMNS": "120",
                 "PYTHONUNBUFFERED": "1",  # stdout and stderr in the order written, as on a terminal
                 "AWS_EC2_METADATA_DISABLED": "true", "HOME": str(folder)})
    server = subprocess.Popen([str(BIN / "runlog-s3"), "serve", "--port", str(port)], cwd=folder, env=base,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        printed = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = server.stdout.readline() if server.stdout else ""
            if not line:
                raise RuntimeError(f"runlog-s3 serve ended: {''.join(printed)}{server.stderr.read() if server.stderr else ''}")
            printed.append(line)
            if line.startswith("serving until Ctrl-C"):
                break
        served = "".join(printed).rstrip("\n")
        block = served[served.index("run_log_store:"):].split("\n\n")[0] + "\n"
        exports = [line for line in served.splitlines() if line.startswith("export ")]
        environ = dict(base)
        for line in exports:
            environ.update(word.split("=", 1) for word in line.split()[1:])
        session = Session(folder, environ)
        session.note("$ runlog-s3 serve                 # in a terminal of its own")
        session.note(served)
        session.note("")
        session.note("# In another terminal: the environment serve printed, and its block in a magnus config.")
        for line in exports:
            session.note(f"$ {line}")
        (folder / "pipeline.yaml").write_text(PIPELINE)
        (folder / "config.yaml").write_text(EXECUTOR + block)
        (folder / "params.yaml").write_text("files: [train.csv, test.csv]\n")
        session.note("")
        session.run("cat config.yaml")
        magnus = "magnus execute --file pipeline.yaml --config-file config.yaml --parameters-file params.yaml"
        session.run(f"{magnus} --run-id nightly-1 > magnus.log 2>&1")
        session.note("# A second run on the chunked-s3 layout (an object per log, for wide fan-outs), and a file that fails.")
        session.run("sed -i 's/type: s3/type: chunked-s3/' config.yaml")
        (folder / "params.yaml").write_text("files: [train.csv, test.csv, broken.csv]\n")
        session.run(f"{magnus} --run-id nightly-2 > magnus.log 2>&1", expect=1)
        session.run("runlog-s3 ls")
        session.run("runlog-s3 show nightly-1")
        session.run("runlog-s3 show nightly-2")
        session.run("runlog-s3 timeline nightly-2 --width 40")
        session.run("runlog-s3 get nightly-1 | head -8")
        session.run("runlog-s3 get nightly-3", expect=1)
        session.run("runlog-s3 ls --prefix datastore")
        session.run("runlog-s3 check")
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C in serve's terminal
        _, stopped = server.communicate(timeout=30)
        session.note("# Ctrl-C in serve's terminal:")
        session.note(stopped.rstrip("\n"))
        session.note(f"[exit {server.returncode}]")
        return "```text\n" + "\n".join(session.lines).rstrip("\n") + "\n```\n"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        shutil.rmtree(folder, ignore_errors=True)


# What changes from one run to the next: left out when the README's session is compared with a new one.
VOLATILE = [
    (re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?Z?"), "<time>"),
    (re.compile(r"\d+:\d\d:\d\d(\.\d+)?"), "<duration>"),
    (re.compile(r"\d+\.\d+ s\b"), "<seconds>"),
    (re.compile(r"\d+ bytes( in \d+ objects)?"), "<size>"),
    (re.compile(r"127\.0\.0\.1:\d+"), "127.0.0.1:<port>"),
    (re.compile(r"\|[ █─×]+\|"), "|<bars>|"),
    (re.compile(r"\.runlog-s3-check-[0-9a-f-]+"), ".runlog-s3-check-<scratch>"),
    (re.compile(r"[0-9a-f]{40}"), "<hash>"),
    (re.compile(r"^\*", re.MULTILINE), " "),  # the critical path: the branch that ended last
    (re.compile(r"access key \.\.\.\w+"), "access key ...<key>"),
    (re.compile(r" {2,}"), "  "),  # a column's width follows its longest cell
]


def normalised(session: str) -> str:
    """The session without what changes from run to run."""
    for pattern, replacement in VOLATILE:
        session = pattern.sub(replacement, session)
    return session


def readme_session(readme: str) -> Optional[str]:
    """The session block of a README, markers left out; None when it has none."""
    if BEGIN not in readme:
        return None
    return readme.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", metavar="README", help="replace the session block of this README (between its markers)")
    parser.add_argument("--port", type=int, default=9455, help="serve's port (default 9455, serve's own default)")
    args = parser.parse_args(argv)
    session = example_session(args.port)
    if not args.write:
        sys.stdout.write(session)
        return 0
    path = Path(args.write)
    readme = path.read_text(encoding="utf-8")
    if readme_session(readme) is None:
        print(f"{path} has no session block: put these two lines where it goes, then run this again:\n{BEGIN}\n{END}",
              file=sys.stderr)
        return 2
    before, rest = readme.split(BEGIN, 1)
    path.write_text(before + BEGIN + "\n" + session + END + rest.split(END, 1)[1], encoding="utf-8")
    print(f"wrote the session into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
