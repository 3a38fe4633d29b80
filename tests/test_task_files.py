"""An lm-eval task file with local data scores exactly what lm-eval scores on it; bad task
files and rows stop with one line naming the file, key or row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tinymodels import TOKENIZER, tiny_model

from fedcollm.data import DataError, Question, get_task, load_questions
from fedcollm.data.tasks import split_questions
from fedcollm.evaluation import choice_loglikelihoods, evaluate_task
from fedcollm.evaluation.generation import generate
from fedcollm.evaluation.metrics import lower_is_better, register_metric, shown
from fedcollm.evaluation.text_metrics import exact_match
from fedcollm.experiments.claims import gain_verdict
from fedcollm.experiments.significance import Comparison
from fedcollm.registry import METRICS

ROWS = [
    {
        "id": f"r{i}",
        "q": f"Which word comes {i} after {'abc'[i % 3]}?",
        "opts": ["alpha", "beta gamma", "delta", "epsilon zeta eta"],
        "ans": i % 4,
        "ward": ["cardiology", "surgery", "dental"][i % 3],
        "instruction": f"Repeat the number {i}.",
        "output": f"{i}",
    }
    for i in range(12)
]

MULTIPLE_CHOICE = """\
task: ward_quiz
dataset_path: json
dataset_kwargs:
  data_files:
    train: {data}
    validation: {data}
output_type: multiple_choice
training_split: train
validation_split: validation
description: "Questions from the {{{{ward}}}} ward.\\n\\n"
doc_to_text: "Q: {{{{q | trim}}}}\\nA:"
doc_to_choice: "{{{{opts}}}}"
doc_to_target: ans
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

GENERATIVE = """\
task: repeat_number
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: generate_until
validation_split: validation
doc_to_text: "{{{{instruction}}}}\\nAnswer:"
doc_to_target: output
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
"""


def write_task(tmp_path: Path, text: str, rows=ROWS, name: str = "task.yaml") -> Path:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / name
    path.write_text(text.format(data=data))
    return path


def our_scores(path: Path, model):
    task = get_task(str(path))
    questions = split_questions(task, "validation", None)
    return task, questions, evaluate_task(model, TOKENIZER, task, questions, batch_size=5)


def lm_eval_samples(path: Path, model) -> tuple[dict, list[dict]]:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    name = path.read_text().split("\n")[0].removeprefix("task: ")
    lm = HFLM(pretrained=model, tokenizer=TOKENIZER, batch_size=4)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[name],
        task_manager=TaskManager(include_path=str(path.parent)),
        log_samples=True,
        verbosity="ERROR",
    )
    return out["results"][name], sorted(out["samples"][name], key=lambda s: s["doc_id"])


def test_the_task_file_reads_rows_as_lm_eval_would(tmp_path):
    task, questions, _ = our_scores(write_task(tmp_path, MULTIPLE_CHOICE), tiny_model(seed=5))
    q = questions[4]
    assert q.context == "Questions from the surgery ward.\n\nQ: Which word comes 4 after b?\nA:"
    assert q.choices == ("alpha", "beta gamma", "delta", "epsilon zeta eta")
    assert (q.gold, q.answer, q.continuation) == (0, "alpha", " alpha")
    assert task.metric_names == ("acc", "acc_norm")


# lm-eval 0.4.13's log-likelihoods on this task and model (question 4's four choices, and
# the sum over all 48 pairs), for machines without lm-eval; the test below checks them live.
LM_EVAL_QUESTION_4 = [-33.114742, -60.975605, -32.989746, -93.723709]
LM_EVAL_SUM = -2650.9758


def test_multiple_choice_log_likelihoods_are_lm_evals_recorded_ones(tmp_path):
    task = get_task(str(write_task(tmp_path, MULTIPLE_CHOICE)))
    questions = split_questions(task, "validation", None)
    lls = choice_loglikelihoods(tiny_model(seed=5).eval(), TOKENIZER, questions, 5)
    assert lls[4] == pytest.approx(LM_EVAL_QUESTION_4, abs=1e-4)
    assert sum(map(sum, lls)) == pytest.approx(LM_EVAL_SUM, abs=1e-3)


def test_a_long_evaluation_says_how_far_it_is_and_a_short_one_stays_silent(
    tmp_path, monkeypatch, capsys
):
    from fedcollm.evaluation import progress

    path = write_task(tmp_path, MULTIPLE_CHOICE)
    task = get_task(str(path))
    questions = split_questions(task, "validation", None)
    model = tiny_model(seed=5).eval()
    choice_loglikelihoods(model, TOKENIZER, questions, 2)
    assert capsys.readouterr() == ("", "")  # a quick loop prints nothing
    clock = iter(range(0, 10_000, 15))  # each batch seems to take 15 s
    monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(clock)))
    choice_loglikelihoods(model, TOKENIZER, questions, 2)
    generate(model, TOKENIZER, [q.context for q in questions], ["\n"], 2, 4)
    said = capsys.readouterr()
    assert said.out == ""  # stdout stays what a command answers (`evaluate --json`)
    lines = said.err.splitlines()
    assert lines[0] == "  scoring choices (rows): 4/12 in 30 s, about 60 s left"
    assert any(line.startswith("  generating (prompts): 8/12 in 30 s") for line in lines)


@pytest.mark.slow
def test_multiple_choice_scores_are_lm_evals(tmp_path):
    path = write_task(tmp_path, MULTIPLE_CHOICE)
    model = tiny_model(seed=5).eval()
    _, questions, ours = our_scores(path, model)
    theirs, samples = lm_eval_samples(path, model)
    lls = choice_loglikelihoods(model, TOKENIZER, questions, 5)
    for ours_q, sample in zip(lls, samples, strict=True):
        assert ours_q == pytest.approx([r[0][0] for r in sample["resps"]], abs=1e-4)
    assert ours.mean("acc") == pytest.approx(theirs["acc,none"], abs=1e-12)
    assert ours.mean("acc_norm") == pytest.approx(theirs["acc_norm,none"], abs=1e-12)
    assert ours.stderr("acc") == pytest.approx(theirs["acc_stderr,none"], abs=1e-12)
    # Question by question: the same correct answers.
    assert ours.values["acc"] == [s["acc"] for s in samples]
    assert [s["target"] for s in samples] == [q.gold for q in questions]


@pytest.mark.slow
def test_generations_and_exact_match_are_lm_evals(tmp_path):
    path = write_task(tmp_path, GENERATIVE)
    model = tiny_model(seed=7).eval()
    task, questions, ours = our_scores(path, model)
    theirs, samples = lm_eval_samples(path, model)
    prompts = [q.context for q in questions]
    spec = task.spec
    texts = generate(model, TOKENIZER, prompts, spec.until, spec.max_gen_toks, batch_size=5)
    assert texts == [s["filtered_resps"][0] for s in samples]
    assert ours.mean("exact_match") == pytest.approx(theirs["exact_match,none"], abs=1e-12)


def test_exact_match_normalises_as_lm_eval():
    assert exact_match("Paris", "paris") == 0.0
    assert exact_match("Paris", "paris", ignore_case=True) == 1.0
    assert exact_match("Paris!", "Paris", ignore_punctuation=True) == 1.0
    assert exact_match("Room 12", "Room ", ignore_numbers=True) == 1.0
    assert exact_match("The answer is 4", "4", regexes_to_ignore=["The answer is "]) == 1.0
    assert exact_match(" Paris", "Paris") == 0.0  # no stripping: lm-eval does not strip


def test_batched_generation_equals_one_prompt_at_a_time(tmp_path):
    model = tiny_model(seed=3).eval()
    prompts = [f"Count {'to ' * i}{i}:" for i in range(7)]
    batched = generate(model, TOKENIZER, prompts, ["\n"], 8, batch_size=4)
    alone = [generate(model, TOKENIZER, [p], ["\n"], 8, batch_size=1)[0] for p in prompts]
    assert batched == alone
    assert any(batched)


# --- bad task files and rows ------------------------------------------------------------


def fedcollm(capsys, *args: str) -> tuple[int, str, str]:
    """`fedcollm ARGS` in this process: exit code, stdout, stderr."""
    from fedcollm import cli

    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model is loaded."""
    import fedcollm.models

    def loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(fedcollm.models, "load_model", loading)


@pytest.mark.parametrize(
    ("edit", "rows", "fragment"),
    [
        (("metric_list:", "num_choices: 4\nmetric_list:"), ROWS, "unknown key 'num_choices'"),
        (("{{{{q | trim}}}}", "{{{{question}}}}"), ROWS, "doc_to_text names a missing field"),
        (("doc_to_target: ans", "doc_to_target: '{{{{ans + 4}}}}'"), ROWS, "is not among"),
        (("", ""), [{**ROWS[0], "opts": ["a", ""]}], "choice 2 is empty"),
        (("validation_split: validation", "validation_split: dev"), ROWS, "split 'dev' has no"),
        (("output_type: multiple_choice", "output_type: loglikelihood"), ROWS, "not supported"),
        (("metric_list:", "filter_list: []\nmetric_list:"), ROWS, "filter_list is not supported"),
        (("{{{{q | trim}}}}", "{{{{q | trim}}"), ROWS, "doc_to_text: not a valid Jinja template"),
        (("", ""), [{**ROWS[0], "q": None}], "doc_to_text: field 'q' is null on this row"),
        (
            ("doc_to_target: ans", "doc_to_target: \"{{{{opts.index('zz')}}}}\""),
            ROWS,
            "'zz' is not in list; the template reads opts=['alpha', 'beta gamma',",
        ),
    ],
)
def test_a_bad_task_file_is_one_line_before_any_model_loads(
    tmp_path, capsys, no_model, edit, rows, fragment
):
    text = MULTIPLE_CHOICE.replace(*edit) if edit[0] else MULTIPLE_CHOICE
    path = write_task(tmp_path, text, rows)
    code, _, err = fedcollm(capsys, "evaluate", "--model", "tiny", "--task", str(path))
    assert code == 2, err
    (line,) = err.strip().splitlines()
    assert fragment in line and (str(path) in line or "rows.jsonl" in line), line


@pytest.mark.parametrize(
    ("helper", "key", "fragment"),
    [
        ("def f(:\n", "process_docs", "helper.py line 1 fails to load (SyntaxError"),
        ("raise ImportError('no torch here')\n", "process_docs", "fails to load (ImportError"),
        ("def f(rows):\n    return None\n", "process_docs", "returned NoneType; return the rows"),
        ("def f(rows):\n    return [1]\n", "process_docs", "returned int 1 as row 0"),
    ],
)
def test_a_task_files_helper_that_fails_is_one_line_in_every_command(
    tmp_path, capsys, no_model, helper, key, fragment
):
    (tmp_path / "helper.py").write_text(helper)
    text = MULTIPLE_CHOICE.replace("output_type:", f"{key}: !function helper.f\noutput_type:")
    path = write_task(tmp_path, text)
    commands = [["evaluate", "--model", "tiny", "--task", str(path)]]
    if "load" in fragment:  # read with the task file; its rows only when a command reads them
        commands.append(["tasks", str(path)])
    for command in commands:
        code, _, err = fedcollm(capsys, *command)
        (line,) = err.strip().splitlines()
        assert code == 2 and fragment in line and str(path) in line, line


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ("[1, 2]", "generation_kwargs must be a mapping"),
        ("{temperature: hot}", "temperature must be a number"),
        ("{max_gen_toks: true}", "max_gen_toks must be a positive integer"),
        ("{until: 5}", "until must be a string or list of strings"),
    ],
)
def test_bad_generation_kwargs_are_one_line(tmp_path, capsys, no_model, kwargs, fragment):
    text = GENERATIVE.replace('  until: ["\\n", "."]\n  max_gen_toks: 6', "").replace(
        "generation_kwargs:", "generation_kwargs: " + kwargs.replace("{", "{{").replace("}", "}}")
    )
    path = write_task(tmp_path, text)
    code, _, err = fedcollm(capsys, "tasks", str(path))
    (line,) = err.strip().splitlines()
    assert code == 2 and fragment in line and str(path) in line, line


def test_a_yaml_alias_bomb_is_refused_before_it_grows(tmp_path, capsys):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(levels) + "\ntask: bomb\n")  # 9**9 values in 700 bytes
    code, _, err = fedcollm(capsys, "tasks", str(path))
    (line,) = err.strip().splitlines()
    assert code == 2 and "aliases (*name) expand to more than 100,000 values" in line


def test_an_empty_answer_of_a_generative_row_names_the_row(tmp_path):
    path = write_task(tmp_path, GENERATIVE, [ROWS[0], {**ROWS[1], "output": "  "}])
    with pytest.raises(DataError, match=r"rows\.jsonl:2: doc_to_target gives an empty answer"):
        split_questions(get_task(str(path)), "validation", None)


def test_data_files_that_are_not_utf8_or_not_json_or_csv(tmp_path):
    path = write_task(tmp_path, MULTIPLE_CHOICE)
    (tmp_path / "rows.jsonl").write_bytes(json.dumps(ROWS[0]).encode() + b"\n\xff oops\n")
    with pytest.raises(DataError, match=r"rows\.jsonl:2: not UTF-8"):
        split_questions(get_task(str(path)), "validation", None)
    other = tmp_path / "rows.xlsx"
    other.write_text("x")
    path.write_text(path.read_text().replace(str(tmp_path / "rows.jsonl"), str(other)))
    with pytest.raises(DataError, match=r"rows\.xlsx:1: not a JSON object"):
        split_questions(get_task(str(path)), "validation", None)
    path.write_text(path.read_text().replace("dataset_path: json", "dataset_path: excel"))
    with pytest.raises(DataError, match="rows.xlsx: not a JSON, JSON Lines, CSV or Parquet file"):
        split_questions(get_task(str(path)), "validation", None)


def test_csv_and_parquet_rows_read_as_datasets_reads_them(tmp_path):
    import datasets

    flat = [{k: v for k, v in r.items() if k != "opts"} for r in ROWS]
    table = datasets.Dataset.from_list(flat)
    for suffix, write in ((".csv", table.to_csv), (".parquet", table.to_parquet)):
        write(str(tmp_path / f"rows{suffix}"))
        text = MULTIPLE_CHOICE.replace('"{{{{opts}}}}"', '["alpha", "beta", "gamma", "delta"]')
        path = write_task(tmp_path, text, name=f"task{suffix}.yaml")
        text = path.read_text().replace("rows.jsonl", f"rows{suffix}")
        path.write_text(text.replace("dataset_path: json", f"dataset_path: {suffix[1:]}"))
        questions = split_questions(get_task(str(path)), "validation", None)
        assert [q.gold for q in questions] == [r["ans"] for r in ROWS]  # ints, as datasets reads


# --- built-in tasks, FlowerTune, chat, the tasks command ---------------------------------


def test_flowertune_parsers_follow_its_rules():
    from fedcollm.evaluation.flowertune import correct, finance_label, medical_letter

    assert finance_label("Positive, clearly") == "positive"
    assert finance_label("not negative, rather positive") == "positive"  # positive first
    assert finance_label("Negative.") == "negative"
    assert finance_label("") == finance_label("hmm") == "neutral"
    assert medical_letter(" B. Pancreas") == "b"
    assert medical_letter("(c)") == "c"
    assert medical_letter("The answer is A") == ""  # its first character, "t", is no option
    assert medical_letter("x\n## Answer\nD\n") == "a"  # the line after "##": "answer"
    assert correct("flowertune_medical", "B", "B") == 1.0
    assert correct("flowertune_finance", "", "neutral") == 1.0


def test_tfns_and_medmcqa_carry_flowertunes_prompts(data_dir):
    (tweet,) = split_questions(get_task("tfns"), "validation", data_dir)[:1]
    assert tweet.context.startswith(
        "Instruction: What is the sentiment of this tweet? Please choose an answer from "
        "{negative/neutral/positive}.\nInput: "
    )
    assert tweet.context.endswith("\nAnswer:") and tweet.delimiter == " "
    assert tweet.choices == ("negative", "positive", "neutral")
    assert tweet.answer == ("negative", "positive", "neutral")[tweet.doc["label"]]
    medmcqa = get_task("medmcqa")
    (question,) = split_questions(medmcqa, "validation", data_dir)[:1]
    assert question.choices == ("A", "B", "C", "D") and question.gold == question.doc["cop"]
    (metric,) = [m for m in medmcqa.spec.metrics if m.name == "flowertune_medical"]
    from fedcollm.data.templates import Template

    prompt = Template("prompt", metric.options["prompt"]).render(question.doc)
    assert prompt.startswith("<|im_start|>question\nYou are a medical doctor")
    assert f"\nA. {question.doc['opa']}\nB. " in prompt
    assert prompt.endswith("\nThe answer is:\n<|im_end|>\n<|im_start|>answer\n")


def test_mmlu_categories_split_the_subjects(data_dir):
    sizes = {
        name: len(split_questions(get_task(name), "validation", data_dir))
        for name in ("mmlu", "mmlu_stem", "mmlu_social_sciences", "mmlu_humanities")
    }
    assert sizes["mmlu"] == 1531
    parts = sizes["mmlu_stem"] + sizes["mmlu_social_sciences"] + sizes["mmlu_humanities"]
    assert 0 < parts < sizes["mmlu"]  # the fourth category, "other", is not among them
    stem = split_questions(get_task("mmlu_stem"), "validation", data_dir)
    assert {q.doc["subject"] for q in stem} >= {"anatomy", "machine_learning"}
    assert stem[0].context.startswith("The following are multiple choice questions")


def test_chat_prompt_format_wraps_the_prompt_and_drops_the_delimiter():
    from tinymodels import mc

    from fedcollm.data.encoding import as_prompted

    tokenizer = TOKENIZER.__class__(tokenizer_object=TOKENIZER.backend_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}<user>{{ m.content }}</user>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    question = mc("q", "Question: x?\nAnswer:", ("yes", "no"), 1)
    (chat,) = as_prompted([question], tokenizer, "chat")
    assert chat.context == "<user>Question: x?\nAnswer:</user><assistant>"
    assert chat.continuation == "no"
    assert as_prompted([question], tokenizer, "plain") == [question]
    with pytest.raises(DataError, match="no chat template"):
        as_prompted([question], TOKENIZER, "chat")


def test_the_tasks_command_lists_kind_splits_and_metrics(tmp_path, capsys):
    code, out, err = fedcollm(capsys, "tasks")
    assert code == 0, err
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "generate_until" in lines["code_alpaca"] and "rougeL" in lines["code_alpaca"]
    assert "test=test" in lines["self_instruct"] and "train=" not in lines["self_instruct"]
    assert "flowertune_finance" in lines["tfns"] and "train=train" in lines["tfns"]
    path = write_task(tmp_path, MULTIPLE_CHOICE)
    code, out, _ = fedcollm(capsys, "tasks", str(path))
    assert code == 0 and "ward_quiz" not in out and str(path) in out


def test_a_bad_task_file_on_resume_loses_nothing(tmp_path, capsys):
    from fedcollm import cli
    from fedcollm.algorithm.server import CoTuningServer
    from fedcollm.config import load_config
    from fedcollm.tracking.checkpoint import save_checkpoint

    path = write_task(tmp_path, MULTIPLE_CHOICE)
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
    out = tmp_path / "out"
    run = ["run", str(config), "--out", str(out), "--set", f'task="{path}"']
    # What a run of one round leaves (its checkpoint and its files), made here.
    sets = [f'task="{path}"', "rounds=1", "data.train_limit=0"]
    server = CoTuningServer.from_config(load_config(config, overrides=sets))
    save_checkpoint(out / "checkpoint", 1, server, [{"round": 0}, {"round": 1}])
    server.save_adapters(out)
    (out / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}\n')
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    path.write_text(path.read_text().replace("metric_list:", "shots: 3\nmetric_list:"))
    capsys.readouterr()
    code = cli.main([*run, "--resume", "--set", "rounds=2", "--set", "data.train_limit=0"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "unknown key 'shots'" in line and str(path) in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_an_experiment_runs_on_a_task_file(tmp_path, capsys):
    from fedcollm import cli

    path = write_task(tmp_path, MULTIPLE_CHOICE)
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
    out = tmp_path / "exp"
    argv = ["experiment", str(config), "--tasks", str(path), "--methods", "zero-shot,standalone"]
    assert cli.main([*argv, "--seeds", "1", "--out", str(out), "--set", "data.train_limit=0"]) == 0
    result = json.loads((out / "runs/ward_quiz/standalone/seed0/result.json").read_text())
    assert result["task"] == "ward_quiz" and result["metrics"] == ["acc", "acc_norm"]
    assert len(result["slm_clients"]) == 3 and "acc_stderr" in result["slm_clients"][0]
    report = (out / "report.md").read_text()
    assert "| SLM, clients' own adapters | Standalone |" in report and "ward_quiz" in report
    assert "Majority-class floor" in report


def test_scores_report_lm_evals_stderr_and_the_majority_floor():
    from tinymodels import mc

    from fedcollm.evaluation import Scores, majority_share
    from fedcollm.evaluation.multiple_choice import stderr

    questions = [
        mc(f"q{i}", "Q?", ("yes", "no", "maybe"), g) for i, g in enumerate([0, 0, 0, 1, 2])
    ]
    assert majority_share(questions) == 0.6
    scores = Scores({"acc": [1.0, 0.0, 1.0, 1.0, 0.0], "rougeL": [0.5, 0.2, 0.9, 0.4, 0.1]}, 0.6)
    summary = scores.summary()
    assert summary["acc"] == 0.6 and summary["acc_stderr"] == pytest.approx(stderr(0.6, 5))
    assert summary["rougeL_stderr"] == pytest.approx(0.13928388)  # sample sd 0.311, over sqrt 5
    assert (summary["n"], summary["majority"]) == (5, 0.6)


def test_a_run_checkpointed_before_a_key_existed_still_resumes():
    from fedcollm.config import Config, differences

    saved = Config().to_dict()
    del saved["data"]["prompt_format"], saved["data"]["partition_field"]  # an older run
    assert differences(saved, Config()) == []
    current = Config()
    current.data.prompt_format = "chat"
    assert differences(saved, current) == ["data.prompt_format"]


@pytest.mark.parametrize("name", ["../../../escaped", "/tmp/absolute", "a/b", "..", ""])
def test_a_task_name_is_a_name_never_a_path(tmp_path, name):
    path = write_task(tmp_path, MULTIPLE_CHOICE.replace("task: ward_quiz", f"task: '{name}'"))
    with pytest.raises(DataError, match=r"task: .* is not a task name"):
        get_task(str(path))


def test_two_task_files_of_one_name_are_refused_in_one_experiment(tmp_path, capsys):
    from fedcollm import cli

    first = write_task(tmp_path, MULTIPLE_CHOICE, name="first.yaml")
    second = write_task(tmp_path, MULTIPLE_CHOICE, name="second.yaml")
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
    argv = ["experiment", str(config), "--tasks", f"{first},{second}", "--out", str(tmp_path / "x")]
    assert cli.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "are both named 'ward_quiz'" in line and not (tmp_path / "x").exists()


@pytest.mark.parametrize("spec", ["ABSOLUTE.evil.process", "..evil.process", "sub..evil.process"])
def test_function_helpers_load_only_from_the_task_files_folder(tmp_path, capsys, spec):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    ran = tmp_path / "ran"
    (outside / "evil.py").write_text(
        f"open({str(ran)!r}, 'w').close()\ndef process(rows):\n    return rows\n"
    )
    folder = tmp_path / "tasks"
    folder.mkdir()
    spec = spec.replace("ABSOLUTE", "." + str(outside).strip("/").replace("/", "."))
    text = MULTIPLE_CHOICE.replace("output_type:", f"process_docs: !function {spec}\noutput_type:")
    path = write_task(folder, text)
    code, _, err = fedcollm(capsys, "tasks", str(path))
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "process_docs: !function" in line and str(path) in line
    assert not ran.exists()


@pytest.fixture
def answer_length():
    """A toy metric, registered in one place: the characters generated (lower is better)."""

    @register_metric("answer_length", "generate_until", higher_is_better=False, percent=False)
    def length(answers, entry):
        return [float(len(g)) for g in answers.generations]

    yield length
    METRICS.unregister("answer_length")


def test_a_metric_registered_in_one_place_is_scored_reported_and_read_as_lower_is_better(
    tmp_path, answer_length
):
    text = GENERATIVE.replace(
        "  - metric: exact_match",
        "  - metric: answer_length\n    higher_is_better: false\n  - metric: exact_match",
    )
    path = write_task(tmp_path, text)
    task, questions, scores = our_scores(path, tiny_model())
    assert task.metric_names == ("answer_length", "exact_match", "target_loss")
    assert scores.values["answer_length"] == [float(len(a)) for a in scores.answers]
    refused = text.replace("higher_is_better: false", "higher_is_better: true")
    with pytest.raises(DataError, match="answer_length has higher_is_better: false"):
        get_task(str(write_task(tmp_path, refused, name="refused.yaml")))
    # Downstream reads the direction and the display from the registration.
    assert lower_is_better("answer_length") and shown("answer_length") == (1, 3, "")
    shorter = Comparison(
        "slm_clients", "fedcollm", "standalone", "answer_length", [0], 6, 3.0, 5.0,
        (-3.0, -1.0), (0.4, 0.8), 0.5, True, [-2.0],
    )  # fmt: skip
    assert gain_verdict(shorter).startswith("- **Clients' SLMs gain over Standalone**: confirmed")
    assert "-2.000 answer_length" in gain_verdict(shorter)


# --- several references, corpus-level metrics ----------------------------------------------


def _answers_to(questions, generations):
    from fedcollm.evaluation.metrics import Answers

    answers = Answers(None, None, get_task("scitldr"), questions)
    answers.__dict__["generations"] = generations  # what the model "generated"
    return answers


def test_scitldr_trains_on_the_first_reference_and_rouge_takes_the_best_of_all(data_dir):
    from fedcollm.data.taskfile import Metric as Entry
    from fedcollm.evaluation.metrics import metric_spec

    validation = load_questions("scitldr", "validation", data_dir)
    several = next(q for q in validation if len(q.references) > 2)
    assert several.answer == several.doc["target"][0]  # the author's TLDR trains
    assert several.references == tuple(several.doc["target"])
    # A generation equal to the last reference scores 1 whatever the first one says.
    answers = _answers_to([several], [several.references[-1]])
    for kind in ("rouge1", "rouge2", "rougeL"):
        assert metric_spec(kind).function(answers, Entry(kind)) == [1.0]
    assert all(len(q.references) == 1 for q in load_questions("scitldr", "train", data_dir))


def test_bleu_and_chrf_are_corpus_scores_with_sentence_scores_kept_for_pairing():
    from sacrebleu.metrics import BLEU, CHRF

    from fedcollm.evaluation.metrics import metric_spec
    from fedcollm.evaluation.scores import Scores, corpus_with_stderr

    refs = ["the cat sat on the mat today", "a dog barks at the moon", "rain falls in spain"]
    outs = ["the cat sat on a mat today", "the dog barked", "rain falls mainly in spain"]
    questions = [Question(f"q{i}", "x", (), -1, r) for i, r in enumerate(refs)]
    answers = _answers_to(questions, outs)
    for name, scorer in (("bleu", BLEU()), ("chrf", CHRF(word_order=2))):
        spec = metric_spec(name)
        value, stderr = corpus_with_stderr(spec.corpus, answers)
        assert value == pytest.approx(scorer.corpus_score(outs, [refs]).score)
        sentences = spec.function(answers, None)
        assert sentences == pytest.approx(
            [scorer.sentence_score(o, [r]).score for o, r in zip(outs, refs, strict=True)]
        )
        assert value != pytest.approx(sum(sentences) / 3)  # not a mean of sentence scores
        assert stderr > 0
        summary = Scores({name: sentences}, corpus={name: (value, stderr)}).summary()
        assert (summary[name], summary[f"{name}_stderr"]) == (value, stderr)
