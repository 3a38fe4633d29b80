"""Task rows become lm-evaluation-harness prompts; bad data files name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcollm.data import TASKS, DataError, get_task, load_questions

# Rows per split, from the data README (the official split sizes).
SIZES = {
    ("arc_easy", "train"): 2251,
    ("arc_easy", "validation"): 570,
    ("arc_challenge", "train"): 1119,
    ("arc_challenge", "validation"): 299,
    ("openbookqa", "train"): 4957,
    ("openbookqa", "validation"): 500,
    ("commonsense_qa", "train"): 9741,
    ("commonsense_qa", "validation"): 1221,
}


def raw_rows(data_dir: Path, task: str, split: str) -> list[dict]:
    with (data_dir / task / f"{split}.jsonl").open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def by_id(questions):
    return {q.id: q for q in questions}


@pytest.mark.parametrize(("task", "split"), sorted(SIZES))
def test_every_row_of_the_real_data_loads(data_dir, task, split):
    questions = load_questions(task, split, data_dir)
    assert len(questions) == SIZES[task, split]
    assert len({q.id for q in questions}) == len(questions)
    for q in questions:
        assert 0 <= q.gold < len(q.choices)
        assert q.answer == q.choices[q.gold]


# --- ARC ----------------------------------------------------------------------------------


def test_arc_prompt_of_a_known_row(data_dir):
    q = by_id(load_questions("arc_easy", "train", data_dir))["Mercury_7220990"]
    assert q.context == (
        "Question: Which factor will most likely cause a person to develop a fever?\nAnswer:"
    )
    assert q.choices == (
        "a leg muscle relaxing after exercise",
        "a bacterial population in the bloodstream",
        "several viral particles on the skin",
        "carbohydrates being digested in the stomach",
    )
    assert q.gold == 1
    assert q.doc["answerKey"] == "B"
    assert q.answer == "a bacterial population in the bloodstream"


@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge"])
def test_arc_prompts_match_lm_eval(data_dir, task):
    rows = raw_rows(data_dir, task, "validation")
    questions = load_questions(task, "validation", data_dir)
    for row, q in zip(rows, questions, strict=True):
        # lm-eval arc: doc_to_text "Question: {{question}}\nAnswer:", doc_to_choice choices.text
        assert q.id == row["id"]
        assert q.context == "Question: " + row["question"] + "\nAnswer:"
        assert q.choices == tuple(row["choices"]["text"])
        assert (
            q.choices[q.gold]
            == row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
        )


def test_arc_numeric_labels(data_dir):
    rows = raw_rows(data_dir, "arc_easy", "train")
    numeric = [r for r in rows if r["choices"]["label"] == ["1", "2", "3", "4"]]
    assert numeric, "expected ARC rows with labels 1..4"
    questions = by_id(load_questions("arc_easy", "train", data_dir))
    for row in numeric:
        q = questions[row["id"]]
        assert q.gold == int(row["answerKey"]) - 1
        assert q.answer == row["choices"]["text"][int(row["answerKey"]) - 1]
    # One concrete row: answerKey "3" is the third choice.
    row = next(r for r in numeric if r["id"] == "NYSEDREGENTS_2006_8_10")
    assert row["answerKey"] == "3"
    assert questions[row["id"]].gold == 2


@pytest.mark.parametrize("n_choices", [3, 5])
def test_arc_rows_with_three_and_five_choices(data_dir, n_choices):
    rows = raw_rows(data_dir, "arc_easy", "train")
    odd = [r for r in rows if len(r["choices"]["text"]) == n_choices]
    assert odd, f"expected ARC rows with {n_choices} choices"
    questions = by_id(load_questions("arc_easy", "train", data_dir))
    for row in odd:
        q = questions[row["id"]]
        assert len(q.choices) == n_choices
        assert q.choices == tuple(row["choices"]["text"])
        assert q.gold == row["choices"]["label"].index(row["answerKey"])


# --- OpenBookQA ---------------------------------------------------------------------------


def test_openbookqa_prompt_is_the_question_stem(data_dir):
    questions = load_questions("openbookqa", "train", data_dir)
    q = by_id(questions)["7-980"]
    assert q.context == "The sun is responsible for"
    assert q.choices == (
        "puppies learning new tricks",
        "children growing up and getting old",
        "flowers wilting in a vase",
        "plants sprouting, blooming and wilting",
    )
    assert q.gold == 3
    rows = raw_rows(data_dir, "openbookqa", "train")
    for row, q in zip(rows, questions, strict=True):
        assert q.context == row["question_stem"]
        assert q.choices == tuple(row["choices"]["text"])
        assert q.gold == row["choices"]["label"].index(row["answerKey"].strip())


# --- CommonsenseQA ------------------------------------------------------------------------


def test_commonsense_qa_prompt_of_a_known_row(data_dir):
    q = by_id(load_questions("commonsense_qa", "train", data_dir))[
        "075e483d21c29a511267ef62bedc0461"
    ]
    assert q.context == (
        "Question: The sanctions against the school were a punishing blow, and they seemed to "
        "what the efforts the school had made to change?\n"
        "A. ignore\nB. enforce\nC. authoritarian\nD. yell at\nE. avoid\nAnswer:"
    )
    assert q.choices == ("A", "B", "C", "D", "E")
    assert q.gold == 0
    assert q.answer == "A"


def test_commonsense_qa_prompts_match_lm_eval(data_dir):
    rows = raw_rows(data_dir, "commonsense_qa", "validation")
    questions = load_questions("commonsense_qa", "validation", data_dir)
    for row, q in zip(rows, questions, strict=True):
        t = row["choices"]["text"]
        assert q.context == (
            f"Question: {row['question'].strip()}\nA. {t[0]}\nB. {t[1]}\nC. {t[2]}\n"
            f"D. {t[3]}\nE. {t[4]}\nAnswer:"
        )
        assert q.choices == ("A", "B", "C", "D", "E")
        assert q.choices[q.gold] == row["answerKey"]


def test_commonsense_qa_question_is_stripped_but_inner_spaces_kept(tmp_path):
    row = {
        "id": "x1",
        "question": "  Where  is it? \n",
        "question_concept": "it",
        "choices": {"label": list("ABCDE"), "text": ["a", "b", "c", "d", "e"]},
        "answerKey": "D",
    }
    write_rows(tmp_path, "commonsense_qa", "train", [json.dumps(row)])
    (q,) = load_questions("commonsense_qa", "train", tmp_path)
    assert q.context == "Question: Where  is it?\nA. a\nB. b\nC. c\nD. d\nE. e\nAnswer:"
    assert q.gold == 3
    assert q.doc["question_concept"] == "it"


# --- bad files ----------------------------------------------------------------------------

GOOD_ARC = {
    "id": "Mercury_1",
    "question": "What is 1 + 1?",
    "choices": {"text": ["1", "2", "3", "4"], "label": ["A", "B", "C", "D"]},
    "answerKey": "B",
}


def write_rows(root: Path, task: str, split: str, lines: list[str]) -> Path:
    (root / task).mkdir(parents=True, exist_ok=True)
    path = root / task / f"{split}.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_tmp_file_in_hub_layout_loads(tmp_path):
    write_rows(tmp_path, "arc_easy", "train", [json.dumps(GOOD_ARC), "", json.dumps(GOOD_ARC)])
    questions = load_questions("arc_easy", "train", tmp_path)
    assert len(questions) == 2  # the blank line is skipped
    assert questions[0].context == "Question: What is 1 + 1?\nAnswer:"
    assert questions[0].answer == "2"


def test_non_json_line_names_file_and_line(tmp_path):
    path = write_rows(tmp_path, "arc_easy", "train", [json.dumps(GOOD_ARC), "{not json"])
    with pytest.raises(DataError) as info:
        load_questions("arc_easy", "train", tmp_path)
    assert f"{path}:2:" in str(info.value)


def test_line_numbers_count_blank_lines(tmp_path):
    path = write_rows(tmp_path, "arc_easy", "train", [json.dumps(GOOD_ARC), "", "oops"])
    with pytest.raises(DataError) as info:
        load_questions("arc_easy", "train", tmp_path)
    assert f"{path}:3:" in str(info.value)


def test_missing_field_names_file_line_and_field(tmp_path):
    broken = {k: v for k, v in GOOD_ARC.items() if k != "question"}
    path = write_rows(tmp_path, "arc_easy", "train", [json.dumps(GOOD_ARC), json.dumps(broken)])
    with pytest.raises(DataError) as info:
        load_questions("arc_easy", "train", tmp_path)
    message = str(info.value)
    assert f"{path}:2:" in message
    assert "'question'" in message


def test_openbookqa_expects_question_stem(tmp_path):
    # An ARC-shaped row in the OpenBookQA folder lacks question_stem.
    path = write_rows(tmp_path, "openbookqa", "validation", [json.dumps(GOOD_ARC)])
    with pytest.raises(DataError, match="question_stem") as info:
        load_questions("openbookqa", "validation", tmp_path)
    assert f"{path}:1:" in str(info.value)


def test_json_that_is_not_an_object(tmp_path):
    path = write_rows(tmp_path, "arc_easy", "train", ["[1, 2]"])
    with pytest.raises(DataError) as info:
        load_questions("arc_easy", "train", tmp_path)
    assert f"{path}:1:" in str(info.value)


def test_answer_key_not_among_labels(tmp_path):
    path = write_rows(tmp_path, "arc_easy", "train", [json.dumps({**GOOD_ARC, "answerKey": "E"})])
    with pytest.raises(DataError) as info:
        load_questions("arc_easy", "train", tmp_path)
    message = str(info.value)
    assert f"{path}:1:" in message
    assert "'E'" in message


def test_file_that_is_not_utf8(tmp_path):
    (tmp_path / "arc_easy").mkdir()
    path = tmp_path / "arc_easy" / "train.jsonl"
    path.write_bytes(json.dumps(GOOD_ARC).encode() + b"\n\xff\xfe garbage\n")
    with pytest.raises(DataError) as info:
        load_questions("arc_easy", "train", tmp_path)
    assert f"{path}:2:" in str(info.value) and "UTF-8" in str(info.value)


def test_missing_split_file_names_the_path(tmp_path):
    write_rows(tmp_path, "arc_easy", "train", [json.dumps(GOOD_ARC)])
    with pytest.raises(DataError) as info:
        load_questions("arc_easy", "validation", tmp_path)
    assert str(tmp_path / "arc_easy" / "validation.jsonl") in str(info.value)


def test_missing_task_folder_names_the_path(tmp_path):
    with pytest.raises(DataError) as info:
        load_questions("commonsense_qa", "train", tmp_path)
    assert str(tmp_path / "commonsense_qa" / "train.jsonl") in str(info.value)


def test_unknown_task():
    with pytest.raises(DataError, match="unknown task 'piqa'"):
        get_task("piqa")
    with pytest.raises(DataError, match="unknown task"):
        load_questions("piqa", "train", "/nonexistent")
    paper = {"arc_easy", "arc_challenge", "openbookqa", "commonsense_qa"}
    domains = {"tfns", "medmcqa", "mmlu", "mmlu_stem", "mmlu_social_sciences", "mmlu_humanities"}
    generation = {"code_alpaca", "self_instruct", "scitldr", "flores_fra_eng"}
    built_in = {"vell_fruits", "arc_easy_demo"}
    assert set(TASKS) == paper | domains | generation | built_in


def test_the_demos_arc_easy_slice_ships_unchanged_rows_with_its_licence(data_dir):
    from fedcollm.data.tasks import TASK_FILES

    for split, size in (("train", 250), ("validation", 100)):
        shipped = load_questions("arc_easy_demo", split, None)  # no data directory
        full = {q.id: q for q in load_questions("arc_easy", split, data_dir)}
        assert len(shipped) == len({q.id for q in shipped}) == size
        assert all(q == full[q.id] for q in shipped)
    licence = (TASK_FILES / "arc_easy_demo" / "LICENSE.md").read_text()
    assert "CC BY-SA 4.0" in licence and "arXiv:1803.05457" in licence


def test_builtin_task_is_deterministic_and_in_arc_format():
    from fedcollm.data import synthetic

    train = load_questions("vell_fruits", "train", None)
    assert len(train) == synthetic.SPLIT_SIZES["train"]
    assert train == load_questions("vell_fruits", "train", None)
    validation = load_questions("vell_fruits", "validation", None)
    assert not {q.context for q in validation} & {q.context for q in train}
    facts = synthetic.world()
    for q in train + validation:
        assert q.context.startswith("Question: ") and q.context.endswith("\nAnswer:")
        assert len(q.choices) == 4 and len(set(q.choices)) == 4
        fruit = next(f for f in facts if f" {f}" in q.context)
        assert q.answer == facts[fruit]
    # Answers are spread over the four positions, so position alone cannot score.
    positions = [q.gold for q in validation]
    assert all(positions.count(i) > len(positions) / 8 for i in range(4))


def test_a_random_evaluation_sample_is_one_fixed_draw_shared_by_every_seed(data_dir):
    """TFNS's validation file opens with bullish tweets: the first 100 are 63% label 1, a
    draw of 100 is near the split's 20%; the draw is the same for any run seed."""
    from fedcollm.config import load_config
    from fedcollm.data import evaluation_questions

    def questions(*sets: str):
        config = load_config(
            Path(__file__).parents[1] / "configs" / "tiny.toml",
            data_dir=str(data_dir),
            overrides=["task=tfns", "eval.limit=100", *sets],
        )
        return evaluation_questions(config)

    every = load_questions("tfns", "validation", data_dir)
    first = questions()
    drawn = questions("eval.sample=random")
    assert [q.id for q in first] == [q.id for q in every[:100]]
    assert [q.id for q in drawn] == [q.id for q in questions("eval.sample=random", "seed=7")]
    assert len({q.id for q in drawn}) == 100 and drawn != every[:100]
    order = {q.id: i for i, q in enumerate(every)}
    assert [order[q.id] for q in drawn] == sorted(order[q.id] for q in drawn)
    bullish = {q.id for q in every if q.doc["label"] == 1}
    assert sum(q.id in bullish for q in first) == 63
    assert 10 <= sum(q.id in bullish for q in drawn) <= 30
