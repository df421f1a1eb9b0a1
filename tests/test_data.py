"""Data layer: loading rows, templates, examples, label checks, the bundled UCI sentiment splits."""

import json

import pytest

from softprompts.data.datasets import (
    DataError,
    Example,
    build_examples,
    bundled_path,
    label_targets,
    load_records,
)
from softprompts.data.sources import load_task_data
from softprompts.data.templates import Template
from softprompts.errors import SoftpromptsError

SENTIMENT = Template("Review: {text}\nSentiment:", " {label}")


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


# --- load_records -----------------------------------------------------------------------------------------


def test_jsonl_loads_rows_and_skips_blank_lines(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b\\u2028c", "label": "y"}\n')
    assert load_records(path) == [{"text": "a", "label": "x"}, {"text": "b\u2028c", "label": "y"}]


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write(tmp_path, "bad.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: malformed JSON"):
        load_records(path)


def test_non_object_json_line_is_refused(tmp_path):
    path = write(tmp_path, "list.jsonl", '{"text": "a"}\n["text", "b"]\n')
    with pytest.raises(DataError, match=r"list\.jsonl, line 2: expected a JSON object"):
        load_records(path)


@pytest.mark.parametrize(
    "name,text", [("e.jsonl", ""), ("e.jsonl", "\n\n"), ("e.csv", ""), ("e.csv", "text,label\n")]
)
def test_empty_file_has_no_rows(tmp_path, name, text):
    path = write(tmp_path, name, text)
    with pytest.raises(DataError, match="has no rows"):
        load_records(path)


def test_data_error_is_a_softprompts_error():
    assert issubclass(DataError, SoftpromptsError) and issubclass(DataError, ValueError)


def test_csv_with_quotes_commas_and_newlines(tmp_path):
    path = write(tmp_path, "d.csv", 'text,label\n"great, really",positive\n"two\nlines",negative\n')
    assert load_records(path) == [
        {"text": "great, really", "label": "positive"},
        {"text": "two\nlines", "label": "negative"},
    ]


def test_csv_with_bom_and_crlf(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("\ufefftext,label\r\nok,positive\r\n".encode())
    assert load_records(path) == [{"text": "ok", "label": "positive"}]


def test_tsv_keeps_quote_characters_literal(tmp_path):
    path = write(tmp_path, "d.tsv", 'en\tes\n"Go."\t"Ve."\nIt\'s 5" long.\tMide 5".\n')
    assert load_records(path) == [{"en": '"Go."', "es": '"Ve."'}, {"en": "It's 5\" long.", "es": 'Mide 5".'}]


def test_csv_row_with_extra_columns_names_line(tmp_path):
    path = write(tmp_path, "d.csv", "text,label\na,positive\nb,negative,oops\n")
    with pytest.raises(DataError, match=r"d\.csv, line 3: more columns than the header"):
        load_records(path)


def test_csv_row_with_missing_columns_names_line(tmp_path):
    path = write(tmp_path, "d.csv", "text,label\na,positive\nb\n")
    with pytest.raises(DataError, match=r"d\.csv, line 3: fewer columns"):
        load_records(path)


def test_json_array_file(tmp_path):
    path = write(tmp_path, "d.json", '[{"text": "a", "label": "x"}]')
    assert load_records(path) == [{"text": "a", "label": "x"}]


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'.*\.jsonl"):
        load_records(write(tmp_path, "d.txt", "hello"))
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "nope.jsonl")


# --- templates --------------------------------------------------------------------------------------------


def test_template_fields_and_render():
    t = Template("Q: {question} ({topic})\nA:", " {answer}")
    assert t.fields() == {"question", "topic", "answer"}
    assert t.render({"question": "2+2?", "topic": "math", "answer": 4, "extra": 1}) == (
        "Q: 2+2? (math)\nA:",
        " 4",
    )


def test_template_from_cli_turns_backslash_n_into_newline():
    t = Template.from_cli("Review: {text}\\nSentiment:", " {label}")
    assert t.prompt == "Review: {text}\nSentiment:"
    assert t.render({"text": "fine", "label": "positive"}) == ("Review: fine\nSentiment:", " positive")


def test_template_literal_braces():
    t = Template('JSON {{"t": "{text}"}} ->', " {label}")
    assert t.fields() == {"text", "label"}
    assert t.render({"text": "x", "label": "y"})[0] == 'JSON {"t": "x"} ->'


@pytest.mark.parametrize("prompt", ["{0}", "{a.b}", "{a[0]}", "{text!r}", "{text:>5}", "{}", "oops {text"])
def test_template_rejects_non_field_placeholders(prompt):
    with pytest.raises(DataError, match="template"):
        Template(prompt, " {label}")


def test_target_without_field_is_refused():
    with pytest.raises(DataError, match="target template .* has no field"):
        Template("{text}", " positive")


def test_template_dict_round_trip():
    assert Template.from_dict(SENTIMENT.to_dict()) == SENTIMENT


# --- build_examples ---------------------------------------------------------------------------------------


def test_classify_infers_sorted_labels():
    rows = [{"text": "good", "label": "positive"}, {"text": "bad", "label": "negative"}]
    examples, labels = build_examples(rows, SENTIMENT, "classify")
    assert labels == ["negative", "positive"]
    assert examples[0] == Example("Review: good\nSentiment:", " positive", "positive")


def test_classify_with_integer_labels_from_json(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl([{"text": "a", "y": 1}, {"text": "b", "y": 0}]))
    examples, labels = load_task_data(path, Template("{text} ->", " {y}"), "classify")
    assert labels == ["0", "1"] and examples[0].label == "1" and examples[0].target == " 1"


def test_label_outside_labels_names_value_row_and_allowed(tmp_path):
    rows = [{"text": "a", "label": "positive"}, {"text": "b", "label": "neutral"}]
    path = write(tmp_path, "d.jsonl", jsonl(rows))
    with pytest.raises(DataError) as info:
        load_task_data(path, SENTIMENT, "classify", labels=["negative", "positive"])
    message = str(info.value)
    assert "'neutral'" in message and "row 2 (line 2)" in message and "d.jsonl" in message
    assert "'negative', 'positive'" in message


def test_missing_field_names_field_line_and_available_fields(tmp_path):
    path = write(tmp_path, "d.csv", "review,label\ngreat,positive\n")
    with pytest.raises(DataError) as info:
        load_task_data(path, SENTIMENT, "classify")
    message = str(info.value)
    assert "'text' is missing" in message and "row 1 (line 2)" in message and "d.csv" in message
    assert "available fields: label, review" in message


def test_null_field_is_reported():
    with pytest.raises(DataError, match="'text' is null in row 2 of data"):
        build_examples([{"text": "a", "label": "x"}, {"text": None, "label": "y"}], SENTIMENT, "classify")


def test_zero_records_is_refused():
    with pytest.raises(DataError, match="train.jsonl has no rows"):
        build_examples([], SENTIMENT, "generate", source="train.jsonl")


def test_unknown_task_is_refused():
    with pytest.raises(DataError, match="unknown task 'regress'.*classify, generate"):
        build_examples([{"text": "a", "label": "b"}], SENTIMENT, "regress")


def test_classify_needs_exactly_one_target_field():
    t = Template("{text}", " {label} {extra}")
    with pytest.raises(DataError, match="exactly one field"):
        build_examples([{"text": "a", "label": "b", "extra": "c"}], t, "classify")


def test_classify_with_a_single_inferred_label_is_refused():
    with pytest.raises(DataError, match="at least two labels"):
        build_examples([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], SENTIMENT, "classify")


def test_explicit_labels_keep_their_order_and_may_be_absent_from_data():
    rows = [{"text": "a", "label": "positive"}]
    _, labels = build_examples(rows, SENTIMENT, "classify", labels=["positive", "negative", "neutral"])
    assert labels == ["positive", "negative", "neutral"]


def test_generate_has_no_labels():
    t = Template("English: {en}\nSpanish:", " {es}")
    examples, labels = build_examples([{"en": "Go.", "es": "Ve."}], t, "generate", labels=["ignored"])
    assert labels is None and examples == [Example("English: Go.\nSpanish:", " Ve.", None)]


def test_label_targets():
    assert label_targets(SENTIMENT, ["negative", "positive"]) == [" negative", " positive"]
    assert label_targets(Template("{text}", "The answer is {y}."), ["yes", "no"]) == [
        "The answer is yes.",
        "The answer is no.",
    ]


def test_labels_rendering_to_the_same_target_are_refused():
    t = Template("{text}", " {label}")
    with pytest.raises(DataError, match="distinct, non-blank"):
        build_examples([{"text": "a", "label": "x"}], t, "classify", labels=["x", " "])


# --- bundled UCI sentiment --------------------------------------------------------------------------------


def test_bundled_splits_sizes_labels_and_disjoint():
    splits = {s: load_records(bundled_path("uci-sentiment", s)) for s in ("train", "dev", "test")}
    assert {s: len(r) for s, r in splits.items()} == {"train": 2100, "dev": 300, "test": 600}
    ids = {s: {r["id"] for r in rows} for s, rows in splits.items()}
    assert sum(len(v) for v in ids.values()) == 3000  # ids unique within splits
    assert not (ids["train"] & ids["dev"] or ids["train"] & ids["test"] or ids["dev"] & ids["test"])
    for split, rows in splits.items():
        assert {r["label"] for r in rows} == {"negative", "positive"}, split
        assert {r["source"] for r in rows} == {"imdb", "yelp", "amazon"}, split
        assert all(r["text"] == r["text"].strip() and r["text"] for r in rows)
    all_rows = [r for rows in splits.values() for r in rows]
    assert sum(r["label"] == "positive" for r in all_rows) == 1500


def test_bundled_split_builds_classification_examples():
    examples, labels = load_task_data(bundled_path("uci_sentiment", "dev"), SENTIMENT, "classify")
    assert labels == ["negative", "positive"] and len(examples) == 300
    assert examples[0].prompt.startswith("Review: ") and examples[0].target in (" negative", " positive")


def test_bundled_attribution_ships_beside_the_data():
    text = (bundled_path("uci-sentiment", "train").parent / "ATTRIBUTION.md").read_text()
    assert "Kotzias" in text and "CC BY 4.0" in text and "sentiment@5.0.2" in text


def test_bundled_path_errors():
    with pytest.raises(DataError, match="no bundled dataset 'sst2'.*uci_sentiment"):
        bundled_path("sst2", "train")
    with pytest.raises(DataError, match="unknown split 'validation'"):
        bundled_path("uci-sentiment", "validation")
