#!/usr/bin/env bash
# Prepares a same-call A/B of the working tree against a git revision, for
# bench/run_generation_ab_on_device.sh: changes of a few percent are within the spread between
# machines of one kind (about 3%), so they are judged by runs that alternate the two builds on one
# machine, in one call.
#
#   bash bench/prepare_ab.sh REV     (repository root; REV e.g. HEAD or main~2)
#
# Writes .device-ab/ (ignored; carry it with the run):
#   old/<path>   each file as it is at REV, for every path that differs from the working tree
#   new/<path>   the same paths as they are now (absent where the working tree deleted the file)
#   added.txt    paths that exist now but not at REV (the old build removes them)
#   deleted.txt  paths that exist at REV but not now (the new build removes them again)
#   rev.txt      REV, its commit, and the list of changed paths
set -euo pipefail
REV=${1:?usage: bash bench/prepare_ab.sh REV}
git rev-parse --verify --quiet "$REV^{commit}" > /dev/null || { echo "not a revision: $REV" >&2; exit 1; }
rm -rf .device-ab
mkdir -p .device-ab/old .device-ab/new
: > .device-ab/added.txt
: > .device-ab/deleted.txt
# Tracked files that differ from REV, and untracked files git does not ignore (added).
{
  git diff --no-renames --name-status "$REV" --
  git ls-files --others --exclude-standard | sed 's/^/A\t/'
} | while IFS=$'\t' read -r status path; do
  case "$status" in
    M | T)
      mkdir -p ".device-ab/old/$(dirname "$path")" ".device-ab/new/$(dirname "$path")"
      git show "$REV:$path" > ".device-ab/old/$path"
      cp "$path" ".device-ab/new/$path"
      ;;
    A)
      mkdir -p ".device-ab/new/$(dirname "$path")"
      cp "$path" ".device-ab/new/$path"
      echo "$path" >> .device-ab/added.txt
      ;;
    D)
      mkdir -p ".device-ab/old/$(dirname "$path")"
      git show "$REV:$path" > ".device-ab/old/$path"
      echo "$path" >> .device-ab/deleted.txt
      ;;
    *)
      echo "unexpected status $status for $path" >&2
      exit 1
      ;;
  esac
done
{
  echo "$REV = $(git rev-parse "$REV")"
  echo "changed:"
  (cd .device-ab/old && find . -type f | sed 's|^\./||') | sort | sed 's/^/  /'
  sed 's/^/  added: /' .device-ab/added.txt
} > .device-ab/rev.txt
cat .device-ab/rev.txt
