"""Airflow operators: thin adapters that run `llama_core` stages inside Airflow tasks.

Each operator imports its stage lazily in `execute`, so parsing a DAG imports neither MindSpore
nor torch. A stage's result object becomes the task's XCom (a JSON-able dict).
"""
