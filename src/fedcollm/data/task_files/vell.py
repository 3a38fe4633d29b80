"""The rows of the built-in vell_fruits task, for its task file's `custom_dataset`."""

from fedcollm.data import synthetic


def splits(**_) -> dict[str, list[dict]]:
    return {split: synthetic.generate(split) for split in synthetic.SPLIT_SIZES}
