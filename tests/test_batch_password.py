"""`fila batch --password`, and the forms that keep the password out of `ps` and the shell's history:
$FILA_PASSWORD, and `--password -` reading it from stdin. Real encrypted PDF, real model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fila_cli.errors import ExitCode
from tests.helpers.bad_documents import PASSWORD, _encrypted_pdf


def batch(bundle, pdf, *extra, env=None, stdin=None):
    environment = {k: v for k, v in os.environ.items() if k != "FILA_PASSWORD"} | (env or {})
    completed = subprocess.run([sys.executable, "-m", "fila_cli", "batch", str(pdf), "-q", "What is the total?",
                                "--model", str(bundle), "--max-tokens", "2", *extra], capture_output=True, text=True,
                               input=stdin, env=environment, timeout=600)
    return completed, [json.loads(line) for line in completed.stdout.split("\n") if line]


@pytest.mark.parametrize("how", ["argv", "environment", "stdin"])
def test_an_encrypted_pdf_opens_with_the_password_however_it_is_given(bundle, tmp_path, how):
    pdf = tmp_path / "locked.pdf"
    pdf.write_bytes(_encrypted_pdf())
    given = {"argv": dict(extra=("--password", PASSWORD)), "environment": dict(env={"FILA_PASSWORD": PASSWORD}),
             "stdin": dict(extra=("--password", "-"), stdin=PASSWORD + "\n")}[how]
    completed, records = batch(bundle, pdf, *given.pop("extra", ()), **given)
    assert completed.returncode == ExitCode.OK, completed.stderr
    assert len(records) == 1 and records[0]["error"] is None and records[0]["answer"] is not None


def test_without_or_with_a_wrong_password_the_record_says_so(bundle, tmp_path):
    pdf = tmp_path / "locked.pdf"
    pdf.write_bytes(_encrypted_pdf())
    for extra, words in (((), "pass --password"), (("--password", "wrong"), "wrong password")):
        completed, records = batch(bundle, pdf, *extra)
        assert completed.returncode == ExitCode.FAILURE, completed.stderr
        assert records[0]["error"]["kind"] == "document" and words in records[0]["error"]["message"]
