"""Merge the tasks.json of several 'topθ-export eval --tasks ...' outputs into one list (docs/results/tasks.json) and
print its markdown table (docs/accuracy.md, "Standard tasks").

    python bench/tasks_table.py EVAL_DIR [EVAL_DIR ...] -o docs/results/tasks.json [--merge]

--merge keeps the rows already in the output file whose (model, task) the new runs do not cover, so that each
model's runs can be added on their own.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from topthetaexport._io import write_json
from topthetaexport.eval.evaluation import task_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("evals", nargs="+", type=Path, help="eval output folders holding tasks.json")
    ap.add_argument("-o", "--out", type=Path, required=True, help="merged tasks.json to write")
    ap.add_argument("--merge", action="store_true", help="keep the output file's rows of other (model, task) pairs")
    args = ap.parse_args()
    rows = []
    for d in args.evals:
        report = json.loads((d / "eval.json").read_text())
        for row in json.loads((d / "tasks.json").read_text()):
            rows.append({**row, "command": report.get("command")})
    if args.merge and args.out.is_file():
        covered = {(r["model"], r["task"]) for r in rows}
        kept = [r for r in json.loads(args.out.read_text()) if (r["model"], r["task"]) not in covered]
        rows = kept + rows
    write_json(args.out, rows)
    print(task_table(rows), end="")


if __name__ == "__main__":
    main()
