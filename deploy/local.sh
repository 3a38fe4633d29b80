#!/usr/bin/env bash
# fedcollm on Flower's deployment engine, all on 127.0.0.1: one SuperLink with TLS and
# SuperNode authentication, two SuperNodes (partitions 0 and 1), a 2-round run with tiny
# models; then every process this script started is stopped by its process id.
# See docs/DEPLOYMENT.md for each step and what changes on real machines.
#
#   deploy/local.sh               # the run
#   NEGATIVE=1 deploy/local.sh    # then show that an unregistered node and a node trusting
#                                 # the wrong CA are refused
#
# Env: WORK (default runs/deploy: certs, logs, Flower home, output), VENV (default .venv),
# DATA (default ../shared/data), PORT (SuperLink; default a free port), RUN_TIMEOUT (s),
# SET (more config overrides, ';'-separated: SET="federation.secure_aggregation=true").
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
VENV=${VENV:-$ROOT/.venv}
export PATH="$VENV/bin:$PATH" FLWR_TELEMETRY_ENABLED=0
WORK=$(mkdir -p "${WORK:-runs/deploy}" && cd "${WORK:-runs/deploy}" && pwd)
DATA=$(cd "${DATA:-../shared/data}" && pwd)
CERTS=$WORK/certs LOGS=$WORK/logs OUT=$WORK/out
NODES=2
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=${PORT:-$(free_port)}
RUN_TIMEOUT=${RUN_TIMEOUT:-900}
# The CLI's connection settings and installed app bundles live in our own Flower home.
export FLWR_HOME=$WORK/flwr-home
# The apps import fedcollm from this checkout (the bundle's src layout is not on their path).
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$LOGS" "$FLWR_HOME"
rm -rf "$OUT"

PIDS=()
descendants() { local c; for c in $(pgrep -P "$1" || true); do descendants "$c"; echo "$c"; done; }
cleanup() {
    local rc=$? all=() alive=() p
    for p in "${PIDS[@]}"; do all+=($(descendants "$p") "$p"); done
    printf '%s\n' "${all[@]}" > "$WORK/pids"
    if ((${#all[@]})); then
        kill -TERM "${all[@]}" 2>/dev/null || true
        for _ in $(seq 1 50); do
            alive=(); for p in "${all[@]}"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
            ((${#alive[@]})) || break
            sleep 0.2
        done
        ((${#alive[@]} == 0)) || kill -KILL "${alive[@]}" 2>/dev/null || true
        echo "stopped processes: ${all[*]}"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for() {  # wait_for FILE PATTERN SECONDS PID
    for _ in $(seq 1 $(($3 * 5))); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        kill -0 "$4" 2>/dev/null || { echo "process $4 ended; $1:"; tail -20 "$1"; return 1; }
        sleep 0.2
    done
    echo "no '$2' in $1 after $3 s"; return 1
}

# 1. Test credentials: a CA, the SuperLink's certificate, one key pair per SuperNode.
fedcollm certs "$CERTS" --supernodes 3 > /dev/null

# 2. How the flwr CLI reaches the SuperLink (and a connection trusting the wrong CA).
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "local"

[superlink.local]
address = "127.0.0.1:$PORT"
root-certificates = "$CERTS/ca.crt"

[superlink.wrong-ca]
address = "127.0.0.1:$PORT"
root-certificates = "$CERTS/other-ca.crt"
EOF

# 3. The SuperLink: TLS, only registered SuperNodes, and no dependency installs at run time
# (the environment already holds torch; the bundle must not pull it again).
flower-superlink --ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem" \
    --ssl-keyfile "$CERTS/server.key" --enable-supernode-auth \
    --disable-runtime-dependency-installation --host 127.0.0.1 --port "$PORT" \
    > "$LOGS/superlink.log" 2>&1 &
PIDS+=($!)
wait_for "$LOGS/superlink.log" "running on https://127.0.0.1:$PORT" 60 "${PIDS[0]}"
echo "SuperLink on 127.0.0.1:$PORT (pid ${PIDS[0]})"

# 4. Register the SuperNodes' public keys before they start (unknown keys are refused).
for k in $(seq 0 $((NODES - 1))); do
    flwr supernode register "$CERTS/supernode-$k.pub" local > "$LOGS/register-$k.log" 2>&1
done

# 5. The SuperNodes: each its own key, its partition and where its data is.
supernode() {  # supernode K ROOT_CA KEY LOG
    flower-supernode --superlink "127.0.0.1:$PORT" --root-certificates "$2" \
        --auth-supernode-private-key "$3" --node-config "partition-id=$1 data-dir=\"$DATA\"" \
        --host 127.0.0.1 --port "$(free_port)" > "$4" 2>&1
}
for k in $(seq 0 $((NODES - 1))); do
    supernode "$k" "$CERTS/ca.crt" "$CERTS/supernode-$k" "$LOGS/supernode-$k.log" &
    PIDS+=($!)
done
for _ in $(seq 1 120); do
    online=$(flwr supernode ls local --format json 2>/dev/null | python -c 'import json, sys
print(sum(n["status"] == "online" for n in json.load(sys.stdin)["nodes"]))' 2>/dev/null || echo 0)
    ((online >= NODES)) && break
    sleep 1
done
((online >= NODES)) || { echo "only $online SuperNodes online"; tail "$LOGS"/supernode-*.log; exit 1; }
echo "$NODES SuperNodes online"

# 6. The run: the app bundle is this directory; the run config picks the experiment.
overrides="num_clients=$NODES;eval.limit=4;federation.min_clients=$NODES${SET:+;$SET}"
timeout "$RUN_TIMEOUT" flwr run "$ROOT" local --stream --run-config \
    "config=\"$ROOT/configs/tiny.toml\" out-dir=\"$OUT\" data-dir=\"$DATA\" set=\"$overrides\"" \
    > "$LOGS/run.log" 2>&1 || { echo "flwr run failed"; tail -30 "$LOGS/run.log"; exit 1; }
run_id=$(sed -n 's/.*Successfully started run \([0-9]*\).*/\1/p' "$LOGS/run.log" | head -1)
status=""
for _ in $(seq 1 60); do
    status=$(flwr ls local --run-id "$run_id" --format json | python -c 'import json, sys
print(json.load(sys.stdin)["runs"][0]["status"])')
    [[ $status == finished:* ]] && break
    sleep 2
done
echo "run $run_id: $status; metrics in $OUT/metrics.jsonl"
[[ $status == finished:completed ]] || { tail -30 "$LOGS/run.log"; exit 1; }

# 7. Refusals: each of these SuperNodes must give up by itself with an error.
if [[ ${NEGATIVE:-0} == 1 ]]; then
    refused() {  # refused NAME ROOT_CA EXPECTED
        local rc=0
        timeout 60 bash -c "$(declare -f supernode); PORT=$PORT DATA='$DATA'; $(declare -f free_port);
            supernode 0 '$2' '$CERTS/supernode-2' '$LOGS/refused-$1.log'" || rc=$?
        if ((rc == 0 || rc == 124)) || ! grep -q "$3" "$LOGS/refused-$1.log"; then
            echo "$1: NOT refused as expected (exit $rc)"; tail "$LOGS/refused-$1.log"; exit 1
        fi
        echo "$1: refused (exit $rc): $(grep -m1 "$3" "$LOGS/refused-$1.log" | cut -c1-120)"
    }
    refused unregistered-key "$CERTS/ca.crt" "Failed to activate SuperNode"
    refused wrong-ca "$CERTS/other-ca.crt" "CERTIFICATE_VERIFY_FAILED"
fi
