#!/usr/bin/env bash
# A real, single-node SLURM cluster on 127.0.0.1 for tests and local runs of the launcher.
#
#   cluster/slurm_loopback.sh start  [STATE_DIR]   install packages if missing, write configs, start daemons
#   cluster/slurm_loopback.sh stop   [STATE_DIR]   stop exactly the daemons recorded in STATE_DIR/pids
#   cluster/slurm_loopback.sh status [STATE_DIR]   exit 0 when all daemons are up and the node answers
#   cluster/slurm_loopback.sh env    [STATE_DIR]   print the export lines a shell needs (eval "$(... env)")
#
# STATE_DIR defaults to $MDIFF_SLURM_STATE_DIR or /tmp/mdiff-slurm. Everything (configs, munge key,
# MariaDB datadir, slurm state/spool/logs, pid files) lives under it; nothing is written to /etc.
# There is no systemd: daemons run in the foreground under setsid, their PIDs (plus the process
# start time, to detect pid reuse after a crash) are recorded in STATE_DIR/pids/*.pid, and `stop`
# signals exactly those PIDs. Needs root (SlurmUser=root; packages via apt-get).
#
# Overridable through the environment: MDIFF_SLURM_PARTITION (debug), MDIFF_SLURM_CTLD_PORT (6817),
# MDIFF_SLURM_D_PORT (6818), MDIFF_SLURM_DBD_PORT (6819), MDIFF_SLURM_DB_PORT (3306),
# MDIFF_SLURM_START_TIMEOUT (90 s), MDIFF_SLURM_NO_INSTALL=1 (fail instead of running apt-get).
# All settings are read when the configs are first written; `rm -rf STATE_DIR` (after `stop`) resets.
set -euo pipefail

CMD=${1:-}
STATE_DIR=${2:-${MDIFF_SLURM_STATE_DIR:-/tmp/mdiff-slurm}}
PARTITION=${MDIFF_SLURM_PARTITION:-debug}
CTLD_PORT=${MDIFF_SLURM_CTLD_PORT:-6817}
D_PORT=${MDIFF_SLURM_D_PORT:-6818}
DBD_PORT=${MDIFF_SLURM_DBD_PORT:-6819}
DB_PORT=${MDIFF_SLURM_DB_PORT:-3306}
START_TIMEOUT=${MDIFF_SLURM_START_TIMEOUT:-90}
PACKAGES=(slurm-wlm slurmctld slurmd slurm-client slurm-wlm-basic-plugins munge slurmdbd
          slurm-wlm-mysql-plugin mariadb-server-core mariadb-client-core)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; stop goes in reverse

ORIG_PATH=$PATH
export PATH="/usr/sbin:/usr/bin:/sbin:/bin:${PATH}"

# ----------------------------------------------------------------------------------------------
log() { printf '[slurm_loopback %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() {
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

abs_state_dir() {
    mkdir -p "$STATE_DIR"
    STATE_DIR=$(cd "$STATE_DIR" && pwd -P)
    CONF_DIR=$STATE_DIR/etc
    PID_DIR=$STATE_DIR/pids
    LOG_DIR=$STATE_DIR/log
    MUNGE_DIR=$STATE_DIR/munge
    DB_DIR=$STATE_DIR/mysql
    SPOOL_DIR=$STATE_DIR/spool
    SLURM_CONF_FILE=$CONF_DIR/slurm.conf
    MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
    DB_SOCKET=$DB_DIR/mysqld.sock
    NEXT_ID_FILE=$STATE_DIR/next_job_id
    export SLURM_CONF=$SLURM_CONF_FILE
}

# ---------------------------------------------------------------------------- pid bookkeeping
# pid file content: "<pid> <starttime-in-clock-ticks>" (field 22 of /proc/<pid>/stat).
proc_starttime() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }                       # drop "pid (comm) " (comm may contain spaces)
    # shellcheck disable=SC2086
    set -- $stat                            # now $1 is field 3 (state); starttime is field 22
    [[ $1 != Z ]] || return 1               # a zombie is as good as gone
    echo "${20}"
}

record_pid() { echo "$2 $(proc_starttime "$2" || echo 0)" > "$PID_DIR/$1.pid"; }

# Prints the recorded pid if that exact process (same start time) is alive; else returns 1.
live_pid() {
    local f=$PID_DIR/$1.pid pid st now
    [[ -s $f ]] || return 1
    read -r pid st < "$f" || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    now=$(proc_starttime "$pid") || return 1
    [[ $now == "$st" ]] || return 1
    echo "$pid"
}

# Start "$@" detached (own session, stdin from /dev/null), in the foreground from its own point of
# view, so $! is the daemon's pid (setsid execs directly: a background job is no group leader).
spawn() {
    local name=$1; shift
    setsid "$@" < /dev/null >> "$LOG_DIR/$name.out" 2>&1 9>&- &
    local pid=$!
    sleep 0.2
    record_pid "$name" "$pid"
    STARTED_NOW+=("$name")
    if ! live_pid "$name" > /dev/null; then
        # Died at once (bad config, port in use, ...).
        wait "$pid" 2>/dev/null || true
        rm -f "$PID_DIR/$name.pid"
        show_logs "$name"
        die "$name exited right after start (see logs above, under $LOG_DIR)"
    fi
    log "started $name (pid $pid)"
}

wait_for() {   # wait_for SECONDS DESCRIPTION DAEMON -- command...
    local secs=$1 what=$2 daemon=$3; shift 4
    local deadline=$((SECONDS + secs)) out
    until out=$("$@" 2>&1); do
        if [[ -n $daemon ]] && ! live_pid "$daemon" > /dev/null; then
            show_logs "$daemon"
            die "$daemon died while waiting for: $what"
        fi
        if ((SECONDS >= deadline)) || [[ $out == *"fatal:"* ]]; then
            show_logs "$daemon"
            printf '%s\n' "----- last output of: $* -----" "$out" >&2
            die "gave up after $((secs - deadline + SECONDS))s waiting for: $what"
        fi
        sleep 0.25
    done
}

show_logs() {
    local name=${1:-} f
    for f in "$LOG_DIR/$name".*; do
        [[ -f $f ]] || continue
        echo "----- tail of $f -----" >&2
        tail -n 40 "$f" >&2 || true
    done
}

port_busy() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

# ---------------------------------------------------------------------------- installation
install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    [[ ${MDIFF_SLURM_NO_INSTALL:-0} == 1 ]] && die "missing packages: ${missing[*]} (MDIFF_SLURM_NO_INSTALL=1)"
    ((EUID == 0)) || die "missing packages ${missing[*]}; run as root to install them"
    log "installing: ${missing[*]}"
    # Keep maintainer scripts from starting system-wide munge/slurm services through invoke-rc.d.
    local policy=$STATE_DIR/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"
    local apt=(env DEBIAN_FRONTEND=noninteractive POLICYRCD="$policy" apt-get install -y -q
               --no-install-recommends "${missing[@]}")
    if ! "${apt[@]}" > "$STATE_DIR/apt.log" 2>&1; then
        log "apt-get install failed; running apt-get update and retrying"
        apt-get update -q >> "$STATE_DIR/apt.log" 2>&1 || true
        "${apt[@]}" >> "$STATE_DIR/apt.log" 2>&1 || { tail -n 30 "$STATE_DIR/apt.log" >&2; die "apt-get install failed"; }
    fi
    log "packages installed"
}

# ---------------------------------------------------------------------------- configuration
write_configs() {
    mkdir -p "$CONF_DIR" "$PID_DIR" "$LOG_DIR" "$SPOOL_DIR/ctld" "$SPOOL_DIR/d"
    local host
    host=$(hostname -s)

    # munge: key and runtime dir owned by the munge user (munged refuses loose permissions).
    install -d -m 0711 -o munge -g munge "$MUNGE_DIR"
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$MUNGE_DIR/munge.key"; chmod 0400 "$MUNGE_DIR/munge.key"

    if [[ -s $SLURM_CONF_FILE ]]; then   # written once; `rm -rf STATE_DIR` to regenerate
        # Keep job ids growing even if the slurmctld state (spool/ctld) was lost: the counter saved
        # by `stop` becomes FirstJobId (slurmctld recovering its state continues past it anyway).
        if [[ -s $NEXT_ID_FILE ]]; then
            sed -i "s/^FirstJobId=.*/FirstJobId=$(cat "$NEXT_ID_FILE")/" "$SLURM_CONF_FILE"
        fi
        return 0
    fi

    # Hardware line exactly as slurmd detects it, else slurmctld drains the node
    # ("Node reconfigured socket/core boundaries").
    local hw cpus sockets cores threads mem realmem
    hw=$(slurmd -C | head -n 1)
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<< "$hw")
    sockets=$(sed -n 's/.* SocketsPerBoard=\([0-9]*\).*/\1/p' <<< "$hw")
    cores=$(sed -n 's/.* CoresPerSocket=\([0-9]*\).*/\1/p' <<< "$hw")
    threads=$(sed -n 's/.* ThreadsPerCore=\([0-9]*\).*/\1/p' <<< "$hw")
    mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<< "$hw")
    [[ -n $cpus && -n $sockets && -n $cores && -n $threads && -n $mem ]] || die "cannot parse 'slurmd -C': $hw"
    realmem=$((mem * 8 / 10))

    local first_id
    if [[ -s $NEXT_ID_FILE ]]; then
        first_id=$(cat "$NEXT_ID_FILE")
    else
        # No counter yet (fresh STATE_DIR): seed from the clock so that a wiped cluster does not
        # hand out job ids 1, 2, ... again (submitit folders named by %j would collide).
        first_id=$(( ($(date +%s) / 4) % 50000000 + 1000 ))
        echo "$first_id" > "$NEXT_ID_FILE"
    fi

    cat > "$SLURM_CONF_FILE" <<EOF
# Generated by cluster/slurm_loopback.sh -- single node on 127.0.0.1.
ClusterName=mdiff-loopback
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${D_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5: a requeued job waits cred_expire + 1 s for the old credential to expire (default 120 s;
# slurm refuses values under 5).
AuthInfo=socket=${MUNGE_SOCKET},cred_expire=5
StateSaveLocation=${SPOOL_DIR}/ctld
SlurmdSpoolDir=${SPOOL_DIR}/d
SlurmctldPidFile=${PID_DIR}/slurmctld.daemon.pid
SlurmdPidFile=${PID_DIR}/slurmd.daemon.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
# submitit ignores SIGTERM: without a short KillWait a cancelled job holds its CPUs for 30 s.
KillWait=10
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
InactiveLimit=0
MinJobAge=300
SlurmctldTimeout=60
SlurmdTimeout=120
FirstJobId=${first_id}
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
# Accounting is what lets sacct (and so submitit) see job states.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=${DBD_PORT}
# Connections to slurmdbd take their munge socket from here, not from AuthInfo.
AccountingStoragePass=${MUNGE_SOCKET}
NodeName=${host} NodeAddr=127.0.0.1 NodeHostname=${host} CPUs=${cpus} Sockets=${sockets} CoresPerSocket=${cores} ThreadsPerCore=${threads} RealMemory=${realmem} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${host} Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=$((realmem / cpus))
EOF

    cat > "$CONF_DIR/slurmdbd.conf" <<EOF
# Generated by cluster/slurm_loopback.sh
AuthType=auth/munge
AuthInfo=socket=${MUNGE_SOCKET}
DbdHost=${host}
DbdAddr=127.0.0.1
DbdPort=${DBD_PORT}
SlurmUser=root
DebugLevel=info
LogFile=${LOG_DIR}/slurmdbd.log
PidFile=${PID_DIR}/slurmdbd.daemon.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=${DB_PORT}
StorageUser=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$CONF_DIR/slurmdbd.conf"

    # Read only by cgroup plugins; proctrack/linuxproc + task/none load none. Kept for completeness.
    cat > "$CONF_DIR/cgroup.conf" <<EOF
# Generated by cluster/slurm_loopback.sh (unused with proctrack/linuxproc and task/none)
ConstrainCores=no
ConstrainRAMSpace=no
EOF
}

# ---------------------------------------------------------------------------- daemons
# shellcheck disable=SC2120  # called with -e via wait_for
db_query() { mariadb --no-defaults --protocol=socket -S "$DB_SOCKET" -u root "$@"; }

start_munged() {
    live_pid munged > /dev/null && return 0
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    spawn munged setpriv --reuid=munge --regid=munge --init-groups \
        munged --foreground --force --key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_SOCKET" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$LOG_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed"
    wait_for 20 "munge socket" munged -- munge -n -S "$MUNGE_SOCKET"
}

start_mariadbd() {
    live_pid mariadbd > /dev/null && return 0
    local fresh=0
    if [[ ! -d $DB_DIR/mysql ]]; then
        fresh=1
        rm -rf "$DB_DIR"; mkdir -p "$DB_DIR"
        log "initialising MariaDB datadir"
        mariadb-install-db --no-defaults --user=root --datadir="$DB_DIR" --auth-root-authentication-method=socket \
            --skip-test-db > "$LOG_DIR/mariadb-install-db.log" 2>&1 \
            || { tail -n 30 "$LOG_DIR/mariadb-install-db.log" >&2; die "mariadb-install-db failed"; }
    fi
    port_busy "$DB_PORT" && die "port $DB_PORT (MariaDB) on 127.0.0.1 is already in use; set MDIFF_SLURM_DB_PORT"
    rm -f "$DB_SOCKET"
    spawn mariadbd mariadbd --no-defaults --user=root --datadir="$DB_DIR" --socket="$DB_SOCKET" \
        --pid-file="$DB_DIR/mariadbd.pid" --port="$DB_PORT" --bind-address=127.0.0.1 \
        --log-error="$LOG_DIR/mariadbd.log" --skip-name-resolve \
        --innodb-buffer-pool-size=256M --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 \
        --max-allowed-packet=16M
    wait_for 60 "MariaDB socket" mariadbd -- db_query -e 'SELECT 1'
    if ((fresh)); then
        # shellcheck disable=SC2119
        db_query <<'EOF'
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1';
CREATE USER IF NOT EXISTS 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
    fi
}

start_slurmdbd() {
    live_pid slurmdbd > /dev/null && return 0
    port_busy "$DBD_PORT" && die "port $DBD_PORT (slurmdbd) is already in use; set MDIFF_SLURM_DBD_PORT"
    SLURM_CONF=$SLURM_CONF_FILE spawn slurmdbd slurmdbd -D
    wait_for 60 "slurmdbd answering (sacctmgr)" slurmdbd -- sacctmgr -n -i show cluster
}

start_slurmctld() {
    live_pid slurmctld > /dev/null && return 0
    port_busy "$CTLD_PORT" && die "port $CTLD_PORT (slurmctld) is already in use; set MDIFF_SLURM_CTLD_PORT"
    spawn slurmctld slurmctld -D -f "$SLURM_CONF_FILE"
    wait_for 60 "slurmctld answering (scontrol ping)" slurmctld -- bash -c 'scontrol ping | grep -q "is UP"'
}

start_slurmd() {
    live_pid slurmd > /dev/null && return 0
    port_busy "$D_PORT" && die "port $D_PORT (slurmd) is already in use; set MDIFF_SLURM_D_PORT"
    spawn slurmd slurmd -D -f "$SLURM_CONF_FILE"
}

node_ready() {
    local st
    st=$(sinfo -h -p "$PARTITION" -o '%T' 2>/dev/null) || return 1
    [[ $st =~ ^(idle|mixed|allocated|completing)$ ]] || return 1
    sacct -n -X -S now-1minute > /dev/null 2>&1
}

wait_ready() {
    local deadline=$((SECONDS + START_TIMEOUT))
    until node_ready; do
        local d
        for d in "${DAEMONS[@]}"; do
            live_pid "$d" > /dev/null || { show_logs "$d"; die "$d is not running"; }
        done
        if ((SECONDS >= deadline)); then
            sinfo -N -l >&2 || true
            show_logs slurmctld; show_logs slurmd
            die "timed out after ${START_TIMEOUT}s waiting for node idle in partition $PARTITION and sacct"
        fi
        # A node left DOWN/DRAIN by an earlier crash: bring it back.
        if sinfo -h -p "$PARTITION" -o '%T' 2>/dev/null | grep -Eq 'down|drain'; then
            scontrol update nodename="$(hostname -s)" state=resume > /dev/null 2>&1 || true
        fi
        sleep 0.25
    done
}

STARTED_NOW=()
rollback() {
    local i d pid
    for ((i = ${#STARTED_NOW[@]} - 1; i >= 0; i--)); do
        d=${STARTED_NOW[$i]}
        pid=$(live_pid "$d") || { rm -f "$PID_DIR/$d.pid"; continue; }
        log "start failed: stopping $d (pid $pid) again"
        stop_daemon "$d" "$pid"
    done
}

stop_daemon() {   # stop_daemon NAME PID: SIGTERM, up to 30 s, then SIGKILL
    local d=$1 pid=$2 deadline=$((SECONDS + 30))
    kill -TERM "$pid" 2>/dev/null || true
    while live_pid "$d" > /dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    if live_pid "$d" > /dev/null; then
        log "$d (pid $pid) ignored SIGTERM for 30 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        while live_pid "$d" > /dev/null; do sleep 0.1; done
    fi
    rm -f "$PID_DIR/$d.pid"
}

save_next_job_id() {
    local next
    next=$(scontrol show config 2>/dev/null | sed -n 's/^NEXT_JOB_ID *= *\([0-9]*\).*/\1/p') || true
    [[ -n ${next:-} ]] && echo "$next" > "$NEXT_ID_FILE"
    return 0
}

# ---------------------------------------------------------------------------- commands
cmd_start() {
    ((EUID == 0)) || die "must run as root (SlurmUser=root, apt-get)"
    abs_state_dir
    exec 9> "$STATE_DIR/.lock"
    flock -w 300 9 || die "another slurm_loopback.sh holds $STATE_DIR/.lock"
    local t0=$SECONDS all_up=1 d
    for d in "${DAEMONS[@]}"; do live_pid "$d" > /dev/null || all_up=0; done
    if ((all_up)) && node_ready; then
        log "already running (state dir $STATE_DIR)"
        return 0
    fi
    # tests/slurm_fixture.py marks a cluster it started; a start from elsewhere clears the mark.
    rm -f "$STATE_DIR/fixture-started"
    install_packages
    mkdir -p "$PID_DIR" "$LOG_DIR"
    write_configs
    for d in "${DAEMONS[@]}"; do
        live_pid "$d" > /dev/null || rm -f "$PID_DIR/$d.pid"   # stale after a crash
    done
    # Fail early on ports held by something else, before starting anything.
    local -A ports=([mariadbd]=$DB_PORT [slurmdbd]=$DBD_PORT [slurmctld]=$CTLD_PORT [slurmd]=$D_PORT)
    for d in "${!ports[@]}"; do
        if ! live_pid "$d" > /dev/null && port_busy "${ports[$d]}"; then
            die "port ${ports[$d]} on 127.0.0.1 (for $d) is already in use by another process; see MDIFF_SLURM_*_PORT in $0"
        fi
    done
    # On failure, stop what this call started (a half-up cluster helps nobody).
    trap 'rc=$?; ((rc == 0)) || rollback; exit $rc' EXIT
    start_munged
    start_mariadbd
    start_slurmdbd
    start_slurmctld
    start_slurmd
    wait_ready
    trap - EXIT
    log "cluster up in $((SECONDS - t0)) s: partition $PARTITION, state dir $STATE_DIR"
    log "use it from a shell with: eval \"\$($0 env $STATE_DIR)\""
}

cmd_stop() {
    abs_state_dir
    exec 9> "$STATE_DIR/.lock"
    flock -w 300 9 || die "another slurm_loopback.sh holds $STATE_DIR/.lock"
    if live_pid slurmctld > /dev/null; then save_next_job_id; fi
    local i d pid
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        d=${DAEMONS[$i]}
        if pid=$(live_pid "$d"); then
            stop_daemon "$d" "$pid"
            log "stopped $d (pid $pid)"
        fi
        rm -f "$PID_DIR/$d.pid"
    done
    rm -f "$STATE_DIR/fixture-started"
    # Job steps (slurmstepd) survive slurmd by design; they end with their jobs (KillWait=10).
    log "stopped (state dir $STATE_DIR kept; rm -rf it to start from scratch)"
}

cmd_status() {
    abs_state_dir
    local d pid rc=0
    for d in "${DAEMONS[@]}"; do
        if pid=$(live_pid "$d"); then echo "$d: running (pid $pid)"; else echo "$d: not running"; rc=1; fi
    done
    if ((rc == 0)); then
        sinfo -p "$PARTITION" || rc=1
        node_ready || { echo "node not ready (sinfo/sacct)"; rc=1; }
    fi
    return "$rc"
}

cmd_env() {
    abs_state_dir
    echo "export SLURM_CONF=$SLURM_CONF_FILE"
    # shellcheck disable=SC2016  # $PATH is for the eval-ing shell to expand
    case ":$ORIG_PATH:" in *:/usr/sbin:*) ;; *) echo 'export PATH="/usr/sbin:$PATH"' ;; esac
    echo "export MDIFF_SLURM_STATE_DIR=$STATE_DIR"
    echo "export MDIFF_SLURM_PARTITION=$PARTITION"
}

case "$CMD" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) usage ;;
esac
