#!/usr/bin/env bash
# Checks that custom_ops/src/**/*.{h,cc,cu,cuh} and examples/cpp/ are formatted as the repository's .clang-format says.
# Exits 1 and lists the files that differ (with clang-format's diagnostics), 0 when all are formatted.
#   custom_ops/format_check.sh            check
#   custom_ops/format_check.sh --fix      format them in place
# CLANG_FORMAT picks the binary (default: clang-format on PATH, e.g. from `pip install clang-format==23.1.5`).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
clang_format="${CLANG_FORMAT:-clang-format}"
if ! command -v "$clang_format" >/dev/null 2>&1; then
  echo "format_check: '$clang_format' not found (pip install clang-format==23.1.5, or set CLANG_FORMAT)" >&2
  exit 2
fi

cd "$root"
mapfile -t files < <(find custom_ops/src examples/cpp -type f \( -name '*.h' -o -name '*.cc' -o -name '*.cu' -o -name '*.cuh' \) | sort)
if [[ ${#files[@]} -eq 0 ]]; then
  echo "format_check: no sources under custom_ops/src" >&2
  exit 2
fi

if [[ "${1:-}" == "--fix" ]]; then
  "$clang_format" -i --style=file "${files[@]}"
  exit 0
fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
bad=()
for f in "${files[@]}"; do
  if ! "$clang_format" --dry-run --Werror --style=file "$f" >/dev/null 2>"$log"; then
    bad+=("$f")
    sed -n '1,20p' "$log" >&2  # the first differences
  fi
done

if [[ ${#bad[@]} -gt 0 ]]; then
  echo "format_check: ${#bad[@]} file(s) not formatted ($("$clang_format" --version)):" >&2
  printf '  %s\n' "${bad[@]}" >&2
  echo "fix with: custom_ops/format_check.sh --fix" >&2
  exit 1
fi
echo "format_check: ${#files[@]} files formatted"
