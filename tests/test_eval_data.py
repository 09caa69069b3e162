"""Reading lmms-eval's parquet layouts and their JSON equivalents; bad rows are counted, not fatal."""

from __future__ import annotations

import base64
import json

import pytest

from fila_cli.errors import UsageError
from fila_cli.eval.datasets import BadRows, count_rows, data_files, read_examples
from fila_cli.eval.tasks import task_spec
from tests.helpers.lmms_data import image, png_bytes, write_parquet


def read(task, data, **kwargs):
    bad = BadRows()
    files = data_files(data)
    return list(read_examples(task_spec(task), files, bad, **kwargs)), bad, count_rows(files)


def test_docvqa_shards_in_name_order_with_bad_rows_counted(tmp_path):
    png = png_bytes()
    folder = tmp_path / "DocVQA"
    write_parquet(folder / "validation-00001-of-00002.parquet", "docvqa", [
        {"questionId": "3", "question": "Who?", "answers": ["Ada"], "image": image(png)},
        {"questionId": "4", "question": "  ", "answers": ["x"], "image": image(png)},  # empty question
        {"questionId": "5", "question": "Where?", "answers": ["Paris"], "image": None},  # no image
    ])
    write_parquet(folder / "validation-00000-of-00002.parquet", "docvqa", [
        {"questionId": "1", "question": "What is the total?", "answers": ["310.00", "310"], "image": image(png)},
        {"questionId": "2", "question": "When?", "answers": [], "image": image(png)},  # test-split style: no gold
        {"questionId": "1", "question": "Again?", "answers": ["x"], "image": image(png)},  # repeated id
    ])
    examples, bad, total = read("docvqa", folder)
    assert [e.question_id for e in examples] == ["1", "3"]
    assert examples[0].answers == ["310.00", "310"] and examples[0].image_bytes == png
    assert examples[0].question == "What is the total?"
    assert bad.counts == {"no gold answer": 1, "repeated question id": 1, "empty question": 1, "missing image": 1}
    assert total == 6


def test_limit_counts_rows_and_images_can_stay_unloaded(tmp_path):
    rows = [{"questionId": str(i), "question": f"q{i}", "answers": ["a"], "image": image(png_bytes(seed=i))} for i in range(5)]
    data = write_parquet(tmp_path / "v.parquet", "docvqa", rows)
    examples, bad, _ = read("docvqa", data, limit=3, load_images=False)
    assert [e.question_id for e in examples] == ["0", "1", "2"] and bad.total == 0
    assert all(e.image_bytes is None for e in examples)


def test_textvqa_ids_are_ints_read_as_strings(tmp_path):
    data = write_parquet(tmp_path / "t.parquet", "textvqa", [
        {"question_id": 34602, "question": "what brand?", "answers": ["nokia"] * 10, "image": image(png_bytes())}])
    (example,), _, _ = read("textvqa", data)
    assert example.question_id == "34602" and len(example.answers) == 10


def test_chartqa_rows_are_named_by_position_and_grouped_by_type(tmp_path):
    png = png_bytes()
    data = write_parquet(tmp_path / "test-00000-of-00001.parquet", "chartqa", [
        {"type": "human_test", "question": "How many?", "answer": "12", "image": image(png)},
        {"type": "augmented_test", "question": "Which?", "answer": "Brazil", "image": image(png)},
    ])
    examples, _, _ = read("chartqa", data)
    assert [(e.question_id, e.answers, e.group) for e in examples] == [("0", ["12"], "human_test"), ("1", ["Brazil"], "augmented_test")]


def test_image_given_by_path_beside_the_data(tmp_path):
    (tmp_path / "documents").mkdir()
    (tmp_path / "documents" / "p1.png").write_bytes(png_bytes())
    data = write_parquet(tmp_path / "v.parquet", "docvqa", [
        {"questionId": "1", "question": "q", "answers": ["a"], "image": image(None, "documents/p1.png")},
        {"questionId": "2", "question": "q", "answers": ["a"], "image": image(None, "documents/gone.png")}])
    examples, bad, _ = read("docvqa", data)
    assert examples[0].image_path == tmp_path / "documents" / "p1.png" and bad.counts == {"missing image": 1}


def test_json_equivalents(tmp_path):
    png = png_bytes()
    (tmp_path / "documents").mkdir()
    (tmp_path / "documents" / "a.png").write_bytes(png)
    # the challenge's own layout: {"data": [...]} with image paths
    (tmp_path / "val.json").write_text(json.dumps({"data": [
        {"questionId": 7, "question": "q?", "answers": ["a"], "image": "documents/a.png"},
        {"questionId": 8, "question": "", "answers": ["a"], "image": "documents/a.png"}]}))
    examples, bad, total = read("docvqa", tmp_path / "val.json")
    assert [e.question_id for e in examples] == ["7"] and bad.counts == {"empty question": 1} and total == 2
    # JSON lines with base64 bytes, and a torn line
    lines = [json.dumps({"type": "human_test", "question": "q", "answer": "1", "image": {"bytes": base64.b64encode(png).decode()}}),
             '{"type": "human_te']
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    examples, bad, _ = read("chartqa", tmp_path / "c.jsonl")
    assert examples[0].image_bytes == png and bad.counts == {"unreadable row": 1}


def test_a_whole_hub_download_is_not_mixed(tmp_path):
    row = [{"questionId": "1", "question": "q", "answers": ["a"], "image": image(png_bytes())}]
    for config in ("DocVQA", "InfographicVQA"):
        for split in ("validation", "test"):
            write_parquet(tmp_path / config / f"{split}-00000-of-00001.parquet", "docvqa", row)
    with pytest.raises(UsageError, match=r"several splits \(DocVQA/test, DocVQA/validation, InfographicVQA/test.*validation-\*\.parquet"):
        data_files(tmp_path)
    with pytest.raises(UsageError, match=r"several splits \(test, validation\)"):
        data_files(tmp_path / "DocVQA")
    assert len(data_files(str(tmp_path / "DocVQA" / "validation-*.parquet"))) == 1


def test_wrong_layout_is_a_usage_error_naming_the_file(tmp_path):
    data = write_parquet(tmp_path / "chart.parquet", "chartqa", [{"type": "h", "question": "q", "answer": "1", "image": None}])
    with pytest.raises(UsageError, match="chart.parquet: no column 'answers'.*docvqa"):
        read("docvqa", data)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(UsageError, match="junk.parquet: not a readable parquet file"):
        read("docvqa", tmp_path / "junk.parquet")
    with pytest.raises(UsageError, match="no such file"):
        read("docvqa", tmp_path / "missing")
    with pytest.raises(UsageError, match="unknown task"):
        task_spec("mmmu")


def test_prompts_carry_the_short_answer_suffix():
    assert task_spec("docvqa").prompt("What is the total?") == "What is the total?\nAnswer the question using a single word or phrase."
    assert task_spec("textvqa").prompt("what brand is the TV?").startswith("What brand is the tv?\n")  # as lmms-eval


def test_the_eval_api_is_importable_from_its_modules_not_the_front_door():
    import importlib

    import fila_cli

    # fila_cli exports what a user asking questions needs; benchmarks have their own modules.
    for module, name in (("anls", "anls"), ("vqa_accuracy", "vqa_accuracy"), ("relaxed_accuracy", "relaxed_accuracy"),
                         ("tasks", "task_spec"), ("datasets", "data_files"), ("datasets", "read_examples"),
                         ("run", "run_eval"), ("scores", "score_predictions"), ("scores", "read_predictions"),
                         ("fragmentation", "make_fragmentation")):
        assert callable(getattr(importlib.import_module(f"fila_cli.eval.{module}"), name))
        assert name not in fila_cli.__all__


def test_a_row_holding_a_line_separator_is_one_row(tmp_path):
    # U+2028 / U+2029 / U+0085 raw in a JSON string are legal JSON: only "\n" ends a JSON Lines row.
    png = png_bytes()
    row = {"type": "human_test", "question": "Which\u2028line\u2029and\x85next?", "answer": "1",
           "image": {"bytes": base64.b64encode(png).decode()}}
    (tmp_path / "c.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    examples, bad, total = read("chartqa", tmp_path / "c.jsonl")
    assert [e.question for e in examples] == ["Which\u2028line\u2029and\x85next?"] and bad.total == 0 and total == 1


@pytest.mark.parametrize("name", ["../outside.png", "/etc/hostname", "documents/../../outside.png"])
def test_an_image_path_outside_the_data_folder_is_a_bad_row(tmp_path, name):
    data_folder = tmp_path / "data"
    (data_folder / "documents").mkdir(parents=True)
    (tmp_path / "outside.png").write_bytes(png_bytes())  # exists: only the rule can refuse it
    (data_folder / "v.json").write_text(json.dumps([{"questionId": 1, "question": "q?", "answers": ["a"], "image": name}]))
    examples, bad, _ = read("docvqa", data_folder / "v.json")
    assert examples == [] and bad.counts == {"image path outside the data folder": 1}
