"""The CLI's own behaviour: a reader that leaves the pipe early gets no traceback."""

from __future__ import annotations

import subprocess
import sys


def test_closed_stdout_is_not_a_traceback():
    code = "import sys; from gptforge.cli import main; sys.exit(main(['info', 'gpt2', '--json']))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head` that has left before the first line: every write fails with EPIPE
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode in (0, 141)
