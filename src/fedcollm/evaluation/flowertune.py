"""The scoring of Flower's FlowerTune LLM leaderboard, so that figures compare with it:
greedy generation, parsed by its rules (flower/benchmarks/flowertune-llm/evaluation).

- finance (finance/utils.py `change_target`): an answer holding "positive" is positive,
  else one holding "negative" is negative, else it is neutral. A model that says nothing
  scores the neutral share.
- medical (medical/utils.py `format_answer`): the answer, lower-cased, non-alphanumerics
  made spaces, is read as its first character; only a letter a-e (or yes/no) counts.
"""

from __future__ import annotations

import re


def finance_label(output: str) -> str:
    if "positive" in output or "Positive" in output:
        return "positive"
    if "negative" in output or "Negative" in output:
        return "negative"
    return "neutral"


def medical_letter(output: str) -> str:
    output = output.lower()
    if "\n##" in output:
        output = output.split("\n##")[1].split("\n")[0].strip()
    output = re.sub(" +", " ", re.sub(r"[^a-zA-Z0-9]", " ", output).strip())
    output = output.encode("ascii", "ignore").decode("ascii")[:1]
    return output if output in ("a", "b", "c", "d", "e") else ""


def correct(metric: str, output: str, answer: str) -> float:
    """1.0 if the generated `output` parses to the reference `answer` by the metric's rules."""
    if metric == "flowertune_finance":
        return float(finance_label(output) == answer)
    return float(medical_letter(output) == answer.lower())
