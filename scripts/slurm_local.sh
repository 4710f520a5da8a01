#!/usr/bin/env bash
# A single-node SLURM cluster on localhost, for the live tests in tests/test_slurm.py (and for trying the slurm
# launcher on a workstation). Run as root: it installs Debian's slurm-wlm + munge when missing.
#
#   scripts/slurm_local.sh start    install if needed, write the config, start munged/slurmctld/slurmd, wait for idle
#   scripts/slurm_local.sh stop     stop the daemons this script started
#   scripts/slurm_local.sh status   daemons and sinfo
#
# Idempotent: `start` on a running cluster only checks it is idle. State lives under $SLURM_LOCAL_DIR
# (default /tmp/slurm_local). The config avoids cgroups (proctrack/linuxproc, task/none, no job accounting) so it
# works inside containers; it is not a template for a real cluster.
set -euo pipefail

STATE=${SLURM_LOCAL_DIR:-/tmp/slurm_local}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
NODE=$(hostname -s)
CPUS=${SLURM_LOCAL_CPUS:-8}          # declared, not real: lets 2+ tasks share a 2-core machine (OverSubscribe)
MEM_MB=${SLURM_LOCAL_MEM_MB:-8192}

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons)"; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return
  fi
  echo "installing slurm-wlm and munge (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null; } \
    || die "apt-get install slurm-wlm munge failed"
}

write_conf() {
  mkdir -p "$STATE"/{ctld,d,log} "$CONF_DIR"
  # Only (re)write a config this script owns: never clobber a real cluster's slurm.conf.
  if [ -f "$CONF" ] && ! grep -q '^# written by gqa_uptrain scripts/slurm_local.sh' "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to overwrite it"
  fi
  cat >"$CONF" <<EOF
# written by gqa_uptrain scripts/slurm_local.sh: single-node test cluster on localhost
ClusterName=localcluster
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Requeued jobs wait cred_expire seconds before they may start again (default 120): short for the tests.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Trust the declared CPUs/memory over what slurmd detects (the declared node may be larger than the machine).
SlurmdParameters=config_overrides
# Keep finished jobs visible to squeue/scontrol for 10 minutes (there is no sacct without slurmdbd).
MinJobAge=600
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MpiDefault=none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 20); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.5; done
  die "munged did not come up (see /var/log/munge/munged.log)"
}

start() {
  need_root
  install
  write_conf
  start_munge
  running "$STATE/slurmctld.pid" || slurmctld
  running "$STATE/slurmd.pid" || slurmd
  for _ in $(seq 60); do
    state=$(sinfo -h -N -n "$NODE" -o %t 2>/dev/null || true)
    case "$state" in
      idle|mix|alloc) echo "slurm_local: node $NODE $state"; return 0 ;;
      down*|drain*|fail*|inval*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
  done
  die "node $NODE not idle after 60 s (state '${state:-?}'); see $STATE/log/"
}

stop() {
  for d in slurmd slurmctld; do
    if running "$STATE/$d.pid"; then
      pid=$(cat "$STATE/$d.pid")
      kill "$pid"
      for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
  done
  echo "slurm_local: stopped (munged left running; it is harmless)"
}

status() {
  for d in slurmctld slurmd; do
    if running "$STATE/$d.pid"; then echo "$d: running (pid $(cat "$STATE/$d.pid"))"; else echo "$d: stopped"; fi
  done
  sinfo 2>&1 || true
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
