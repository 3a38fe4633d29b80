"""For the instruction task files' `process_docs`: Code Alpaca has a row without an answer in
each split (nothing to learn or score), left out here rather than in the data."""


def with_answer(dataset):
    return dataset.filter(lambda doc: bool(doc["output"].strip()))
