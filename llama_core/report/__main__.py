from llama_core.cli import exit_code
from llama_core.report.cli import main

raise SystemExit(exit_code(main))
