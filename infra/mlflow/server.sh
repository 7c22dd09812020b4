#!/usr/bin/env bash
# Start an MLflow tracking server (MLflow 3.17) for adaseg runs.
#
#   infra/mlflow/server.sh                       # 127.0.0.1:5000, SQLite + local artifacts
#   HOST=0.0.0.0 ALLOW_NON_LOOPBACK=1 infra/mlflow/server.sh   # from Ray nodes on a private network
#   BACKEND_STORE_URI=postgresql://user:pass@db:5432/mlflow \
#   ARTIFACTS_DESTINATION=s3://bucket/mlflow infra/mlflow/server.sh
#
# Environment (all optional):
#   HOST, PORT                 bind address (default 127.0.0.1) and port (default 5000); any
#                              non-loopback HOST is refused unless ALLOW_NON_LOOPBACK=1
#   ROOT                       local state dir (default <repo>/.adaseg, Git-ignored)
#   BACKEND_STORE_URI          default sqlite:///$ROOT/mlflow/mlflow.db
#   ARTIFACTS_DESTINATION      proxied artifact store, default $ROOT/mlflow/artifacts;
#                              clients upload through the server and need no storage credentials
#   DEFAULT_ARTIFACT_ROOT      if set, disables proxying: clients write there directly
#   ALLOWED_HOSTS              Host headers to accept besides localhost, e.g.
#                              'mlflow.example.internal:*' (replaces MLflow's default,
#                              which is localhost plus private IPs)
# Extra arguments are passed to `mlflow server` (e.g. --workers 2).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="${ROOT:-$(cd "$SCRIPT_DIR/../.." && pwd)/.adaseg}"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-5000}"
STATE_DIR="$ROOT/mlflow"
BACKEND_STORE_URI="${BACKEND_STORE_URI:-sqlite:///$STATE_DIR/mlflow.db}"
ARTIFACTS_DESTINATION="${ARTIFACTS_DESTINATION:-$STATE_DIR/artifacts}"
DEFAULT_ARTIFACT_ROOT="${DEFAULT_ARTIFACT_ROOT:-}"
ALLOWED_HOSTS="${ALLOWED_HOSTS:-}"

# Loopback unless the user says otherwise: the server has no authentication of its own.
case "$HOST" in
  127.* | localhost | "::1") ;;
  *)
    if [[ "${ALLOW_NON_LOOPBACK:-}" != "1" ]]; then
      echo "refusing to bind the MLflow server to $HOST: it has no authentication;" >&2
      echo "set ALLOW_NON_LOOPBACK=1 to expose it on a trusted private network" >&2
      exit 2
    fi
    ;;
esac

command -v mlflow >/dev/null 2>&1 || {
  echo "mlflow not found: activate the project environment (pip install -e .)" >&2
  exit 1
}

# Local stores need their directories; remote URIs (postgresql://, s3://) are left alone.
if [[ "$BACKEND_STORE_URI" == sqlite:///* ]]; then
  mkdir -p "$(dirname "${BACKEND_STORE_URI#sqlite:///}")"
fi

args=(--backend-store-uri "$BACKEND_STORE_URI" --host "$HOST" --port "$PORT")
if [[ -n "$DEFAULT_ARTIFACT_ROOT" ]]; then
  [[ "$DEFAULT_ARTIFACT_ROOT" == *://* ]] || mkdir -p "$DEFAULT_ARTIFACT_ROOT"
  args+=(--no-serve-artifacts --default-artifact-root "$DEFAULT_ARTIFACT_ROOT")
else
  [[ "$ARTIFACTS_DESTINATION" == *://* ]] || mkdir -p "$ARTIFACTS_DESTINATION"
  args+=(--serve-artifacts --artifacts-destination "$ARTIFACTS_DESTINATION")
fi
if [[ -n "$ALLOWED_HOSTS" ]]; then
  # Replaces MLflow's default list, so keep local access working.
  args+=(--allowed-hosts "localhost,localhost:*,127.0.0.1,127.0.0.1:*,$ALLOWED_HOSTS")
fi

case "$HOST" in
  0.0.0.0 | "::") uri_host="<this-host-ip>" ;;
  *) uri_host="$HOST" ;;
esac
echo "MLflow server: backend $BACKEND_STORE_URI" >&2
echo "Point adaseg runs at it with:" >&2
echo "  export MLFLOW_TRACKING_URI=http://$uri_host:$PORT" >&2

exec mlflow server "${args[@]}" "$@"
