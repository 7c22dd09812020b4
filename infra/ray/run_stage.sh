#!/usr/bin/env bash
# Run DVC stage(s) as a Ray job, i.e. in a temporary copy of the repo (the job's working_dir,
# without .gitignore'd files such as DVC outputs): pull cached outputs, reproduce what is
# stale, push the results. Pull/push happen only when a default DVC remote is configured
# (see infra/dvc/README.md); without one this is plain `dvc repro`.
#   bash infra/ray/run_stage.sh pretrain     # one stage (and whatever it depends on)
#   bash infra/ray/run_stage.sh              # whole pipeline
# The updated dvc.lock exists only in the temporary copy, so it is printed at the end:
# commit it, and `dvc pull` anywhere fetches the outputs this job pushed.
set -euo pipefail

has_remote() { dvc remote default >/dev/null 2>&1; }

if has_remote; then
  dvc pull --with-deps --allow-missing "$@"
fi
dvc repro "$@"
if has_remote; then
  dvc push --with-deps "$@"
  echo "----- dvc.lock -----"
  cat dvc.lock
fi
