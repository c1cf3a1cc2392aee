"""Evaluation of selected training sets (surrogate-level quality; LLM-level in later modules)."""
