"""Benchmarks: `run_bench` returns a JSON-able document (schema in the README); `report` renders it."""

from .core import SCHEMA, run_bench
from .models import BenchError
from .report import check_output_path, markdown_table, save_json, save_plot, table

__all__ = ["SCHEMA", "BenchError", "check_output_path", "markdown_table", "run_bench", "save_json", "save_plot", "table"]
