"""`fila batch` names each unit of work by the document as given: two files with equal bytes are
two units across --resume, a file whose bytes changed is answered again, and a file name that is
not UTF-8 is read, recorded without loss and resumed. Real files, real processes, real llama.cpp."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from fila_cli.errors import ExitCode
from tests.helpers.bad_documents import make_good_pdf
from tests.helpers.run_fila import fila

QUESTION = "What is the total due?"


def batch(bundle, folder, out, *extra):
    return fila("batch", folder, "-q", QUESTION, "-o", out, "--model", bundle, "--max-tokens", "4", *extra)


def read_records(path):
    return [json.loads(line) for line in path.read_bytes().decode("utf-8").split("\n") if line]


def test_two_files_with_equal_bytes_are_two_units_across_resume(bundle, tmp_path):
    folder = tmp_path / "inbox"
    folder.mkdir()
    make_good_pdf(folder / "a.pdf", ["The total due is 310.00 EUR"])
    shutil.copy(folder / "a.pdf", folder / "copy.pdf")
    out = tmp_path / "out.jsonl"
    first = batch(bundle, folder, out)
    assert first.returncode == ExitCode.OK, first.stderr
    records = read_records(out)
    assert sorted(os.path.basename(r["file"]) for r in records) == ["a.pdf", "copy.pdf"]

    resumed = batch(bundle, folder, out, "--resume")
    assert resumed.returncode == ExitCode.OK, resumed.stderr
    assert "2 already done" in resumed.stderr
    assert read_records(out) == records, "--resume keeps both records"

    # A kill before copy.pdf was answered: --resume answers it, and only it.
    out.write_text(json.dumps(records[0], ensure_ascii=False) + "\n")
    resumed = batch(bundle, folder, out, "--resume")
    assert resumed.returncode == ExitCode.OK, resumed.stderr
    assert "1 answered" in resumed.stderr and "1 already done" in resumed.stderr
    assert sorted(os.path.basename(r["file"]) for r in read_records(out)) == ["a.pdf", "copy.pdf"]


def test_a_file_whose_bytes_changed_is_answered_again_with_a_warning(bundle, tmp_path):
    folder = tmp_path / "inbox"
    folder.mkdir()
    make_good_pdf(folder / "a.pdf", ["The total due is 310.00 EUR"])
    make_good_pdf(folder / "b.pdf", ["Signed by Ada Lovelace"])
    out = tmp_path / "out.jsonl"
    assert batch(bundle, folder, out).returncode == ExitCode.OK
    before = {os.path.basename(r["file"]): r for r in read_records(out)}
    make_good_pdf(folder / "a.pdf", ["The total due is 999.00 EUR", "A second page"])
    resumed = batch(bundle, folder, out, "--resume")
    assert resumed.returncode == ExitCode.OK, resumed.stderr
    assert "a.pdf: its bytes changed since it was answered" in resumed.stderr
    assert "1 answered" in resumed.stderr and "1 already done" in resumed.stderr
    after = {os.path.basename(r["file"]): r for r in read_records(out)}
    assert len(read_records(out)) == 2, "the old record of a.pdf is dropped, not kept beside the new one"
    assert after["b.pdf"] == before["b.pdf"]
    assert after["a.pdf"]["sha256"] != before["a.pdf"]["sha256"]


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse names that are not UTF-8")
def test_a_file_name_that_is_not_utf8_is_read_recorded_without_loss_and_resumed(bundle, tmp_path):
    folder = tmp_path / "inbox"
    folder.mkdir()
    raw_name = b"r\xe9sum\xe9.pdf"  # Latin-1, as an old zip leaves it
    odd = os.path.join(os.fsencode(folder), raw_name)
    make_good_pdf(folder / "plain.pdf", ["The total due is 310.00 EUR"])
    os.rename(make_good_pdf(folder / "staged.pdf", ["Total due: 42.00 EUR"]), odd)  # MuPDF cannot write the name
    out = tmp_path / "out.jsonl"
    first = batch(bundle, folder, out)
    assert first.returncode == ExitCode.OK, first.stderr
    assert "Traceback" not in first.stderr and "unexpected" not in first.stderr
    records = read_records(out)
    assert len(records) == 2 and all(r["error"] is None for r in records)
    names = {os.path.basename(os.fsencode(r["file"])) for r in records}
    assert names == {raw_name, b"plain.pdf"}, "the record gives the name's bytes back (os.fsencode)"
    assert "\\udce9" in out.read_text(encoding="utf-8"), "written as JSON escapes: the file stays UTF-8"

    resumed = batch(bundle, folder, out, "--resume")
    assert resumed.returncode == ExitCode.OK, resumed.stderr
    assert "2 already done" in resumed.stderr and read_records(out) == records

    asked = fila("ask", os.fsdecode(odd), QUESTION, "--model", bundle, "--max-tokens", "4", "--json")
    assert asked.returncode == ExitCode.OK, asked.stderr
    assert os.fsencode(json.loads(asked.stdout)["file"]) == odd
