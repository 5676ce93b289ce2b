"""Evaluation: tasks, scoring on the engine, results bound to the weights, the ledger of
variants, the lm-evaluation-harness adapter, the code sandbox and contamination checks."""
