"""Evaluation: an LLM as a judge today; benchmarks, the harness and pairwise preference evaluation to come."""
