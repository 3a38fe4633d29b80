"""MMLU's subjects by category, as lm-eval groups them (lm_eval/tasks/mmlu/default), for the
category task files' `process_docs`: each keeps the rows of its category's subjects."""

CATEGORIES = {
    "stem": (
        "abstract_algebra anatomy astronomy college_biology college_chemistry "
        "college_computer_science college_mathematics college_physics computer_security "
        "conceptual_physics electrical_engineering elementary_mathematics high_school_biology "
        "high_school_chemistry high_school_computer_science high_school_mathematics "
        "high_school_physics high_school_statistics machine_learning"
    ),
    "social_sciences": (
        "econometrics high_school_geography high_school_government_and_politics "
        "high_school_macroeconomics high_school_microeconomics high_school_psychology "
        "human_sexuality professional_psychology public_relations security_studies sociology "
        "us_foreign_policy"
    ),
    "humanities": (
        "formal_logic high_school_european_history high_school_us_history "
        "high_school_world_history international_law jurisprudence logical_fallacies "
        "moral_disputes moral_scenarios philosophy prehistory professional_law world_religions"
    ),
}


def _keep(category: str):
    subjects = set(CATEGORIES[category].split())
    return lambda dataset: dataset.filter(lambda doc: doc["subject"] in subjects)


stem = _keep("stem")
social_sciences = _keep("social_sciences")
humanities = _keep("humanities")
