"""Reading a training set's rows: JSON Lines end at "\\n" only, and image names stay in --images."""

from __future__ import annotations

import json

import pytest

from fila_cli.train.data import BadSample, parse_conversation, read_records


def sample(image="page.png", text="What is the total?\u2028Answer briefly."):
    return {"id": "s1", "image": image,
            "conversations": [{"from": "human", "value": f"<image>\n{text}"}, {"from": "gpt", "value": "310"}]}


def test_a_row_holding_a_line_separator_is_one_row(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(sample(), ensure_ascii=False) + "\n", encoding="utf-8")
    records = read_records(data)
    assert len(records) == 1 and not isinstance(records[0], BadSample)
    conversation = parse_conversation(records[0], 0, tmp_path)
    assert conversation.messages[0][1].endswith("What is the total?\u2028Answer briefly.")


@pytest.mark.parametrize("image", ["../secret.png", "/etc/hostname", "scans/../../x.pdf#page=2"])
def test_an_image_outside_the_images_folder_is_a_bad_sample(tmp_path, image):
    with pytest.raises(BadSample, match="outside --images"):
        parse_conversation(sample(image=image), 0, tmp_path / "images")


def test_images_inside_the_folder_and_pages_of_a_pdf_are_fine(tmp_path):
    conversation = parse_conversation(sample(image="scans/a.pdf#page=2"), 0, tmp_path)
    assert (conversation.image.path, conversation.image.page) == (tmp_path / "scans" / "a.pdf", 2)
