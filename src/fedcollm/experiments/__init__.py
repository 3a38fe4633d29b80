"""The paper's comparison: every method with the same models, split, seeds and budget, and
the tables and plots built from their results."""
