#!/usr/bin/env bash
# Every `docs/<page>.md#anchor` cited in the code, the tests and the documents, and every `(#anchor)`
# link inside a docs page, must name a heading of that page (GitHub's anchor rule: lower case,
# punctuation dropped, spaces to '-').
set -euo pipefail
cd "$(dirname "$0")/.."
status=0

# check WHERE PAGE ANCHOR
check() {
  if [ ! -f "$2" ]; then
    echo "$1: $2#$3: no page $2" >&2
    status=1
  elif ! grep -E '^#+ ' "$2" | sed -E 's/^#+ +//; s/[A-Z]/\L&/g; s/[^a-z0-9 _-]//g; s/ /-/g' \
    | grep -qxF "$3"; then
    echo "$1: $2#$3: no heading with that anchor" >&2
    status=1
  fi
}

while IFS=: read -r file line ref; do
  ref=${ref#../}
  check "$file:$line" "${ref%%#*}" "${ref#*#}"
done < <(grep -rnoE --include='*.rs' --include='*.c' --include='*.md' --include='*.sh' \
  --exclude-dir=target --exclude-dir=.git '(\.\./)?docs/[a-z0-9_-]+\.md#[a-z0-9_-]+' . | sed 's#^\./##')

for page in docs/*.md; do
  while IFS=: read -r line link; do
    anchor=${link#(#}
    check "$page:$line" "$page" "${anchor%)}"
  done < <(grep -noE '\(#[a-z0-9_-]+\)' "$page")
done

[ "$status" -eq 0 ] && echo "doc anchors: ok"
exit "$status"
