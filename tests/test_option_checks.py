"""Options are checked before anything slow, and the CLI's defaults are the library's."""

from __future__ import annotations

import pytest

from fila_cli.errors import ExitCode
from tests.helpers.bad_documents import make_good_pdf
from tests.helpers.run_fila import invoke


@pytest.mark.parametrize("command", ["ask", "batch"])
def test_a_bad_page_selection_is_a_usage_error_before_the_model_loads(tmp_path, command):
    pdf = make_good_pdf(tmp_path / "a.pdf", ["First page", "Second page"])
    question = ["What?"] if command == "ask" else ["-q", "What?"]
    # The model does not exist: had it been looked for first, the exit would be 4.
    completed = invoke(command, pdf, *question, "--pages", "1,,2", "--model", tmp_path / "no-such-bundle")
    assert completed.returncode == ExitCode.USAGE, completed.stderr
    assert "bad page selection '1,,2'" in completed.stderr and "Traceback" not in completed.stderr


@pytest.mark.parametrize("command", ["ask", "batch"])
def test_the_cli_sampling_defaults_are_the_librarys(command):
    import typer

    from fila_cli.cli.app import app
    from fila_cli.llm.sampling import SamplingParams

    click_command = typer.main.get_command(app).commands[command]
    defaults = {param.name: param.default for param in click_command.params}
    library = SamplingParams()
    assert (defaults["top_p"], defaults["temperature"], defaults["seed"], defaults["max_tokens"]) == \
        (library.top_p, library.temperature, library.seed, library.max_tokens)
