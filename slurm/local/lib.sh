# shellcheck shell=bash disable=SC2034
# lib.sh - shared by start.sh, stop.sh and status.sh: a real one-node SLURM on
# this machine (Debian 12, root, no systemd), reached over loopback only.
# Sourced, never run. See slurm/README.md for what the settings are and why.
#
# Environment:
#   SLURM_LOCAL_PARTITION=debug   partition name (the only partition; default for jobs)
#   SLURM_LOCAL_ACCOUNTING=1      mariadb + slurmdbd so `sacct` works (submitit polls
#                                 job state with sacct). 0 = no accounting: lighter, but
#                                 sacct fails and submitit then only sees result files.
#   SLURM_LOCAL_DB_PORT=3307      loopback TCP port of the private mariadb instance
#
# Layout: configs /etc/slurm/{slurm,slurmdbd}.conf (the path the client commands
# read by default), state /var/lib/ibbench-slurm, pids /run/ibbench-slurm, logs
# /var/log/ibbench-slurm. Ports: slurmctld 6817, slurmd 6818, slurmdbd 6819.

set -euo pipefail

BASE=/var/lib/ibbench-slurm
RUN=/run/ibbench-slurm
LOG=/var/log/ibbench-slurm
ETC=/etc/slurm
PART=${SLURM_LOCAL_PARTITION:-debug}
ACCT=${SLURM_LOCAL_ACCOUNTING:-1}
DBPORT=${SLURM_LOCAL_DB_PORT:-3307}
DBPASS=slurmlocal # private, loopback-only test database
HOST=$(hostname -s)
# daemons start with a clean environment, not the caller's (venvs, CI variables, ...)
CLEANENV=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8)
T0=$(date +%s.%N)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

log() { echo "slurm-local: $*" >&2; }
die() {
	log "ERROR: $*"
	exit 1
}
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1fs", b-a}'; }
need_root() { [[ $(id -u) == 0 ]] || die "run as root"; }

# One start/stop at a time (tests may call start.sh from parallel workers).
take_lock() {
	mkdir -p "$RUN"
	exec 9>"$RUN/lock"
	flock -w 900 9 || die "another start.sh/stop.sh holds $RUN/lock"
}

# pid of a daemon that start.sh started, if it is still that process
ours() {
	local f=$RUN/$1.started pid
	[[ -f $f ]] || return 1
	pid=$(<"$f")
	[[ -n $pid && -d /proc/$pid && "$(cat /proc/"$pid"/comm 2>/dev/null)" == "$1" ]] || return 1
	echo "$pid"
}
record() { # name pid
	[[ -n ${2:-} && -d /proc/$2 ]] || return 1
	echo "$2" >"$RUN/$1.started"
}
foreign() { # name: a process of that name that start.sh did not start
	local p me
	me=$(ours "$1" || true)
	for p in $(pgrep -x "$1" || true); do [[ $p != "$me" ]] && return 0; done
	return 1
}
wait_for() { # seconds cmd...
	local n=$(($1 * 5))
	shift
	while ((n-- > 0)); do
		"$@" >/dev/null 2>&1 && return 0
		sleep 0.2
	done
	return 1
}
pidfile_pid() { # file [seconds]
	local i
	for ((i = 0; i < ${2:-10} * 5; i++)); do
		[[ -s $1 ]] && {
			cat "$1"
			return 0
		}
		sleep 0.2
	done
	return 1
}

node_state() { sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n 1; }
node_up() { [[ $1 =~ ^(idle|mixed|allocated|completing)$ ]]; }

# One line; returns 0 when the node takes jobs (and sacct answers, with accounting).
status_line() {
	local st="" cpus="" mem="" acct pids="" n p ok=0
	if command -v sinfo >/dev/null; then
		read -r st cpus mem < <(sinfo -h -n "$HOST" -o '%T %c %m' 2>/dev/null | head -n 1) || true
	fi
	for n in "${DAEMONS[@]}"; do
		p=$(ours "$n" || true)
		[[ -n $p ]] && pids+=" $n=$p"
	done
	if [[ $ACCT == 1 ]]; then
		if command -v sacct >/dev/null && sacct -n -X -S now-1minutes >/dev/null 2>&1; then
			acct="slurmdbd(sacct ok)"
		else
			acct="slurmdbd(sacct FAILING)"
			ok=1
		fi
	else
		acct="none(sacct disabled)"
	fi
	node_up "${st:-}" || ok=1
	echo "slurm-local: $([[ $ok == 0 ]] && echo UP || echo DOWN) node=$HOST state=${st:-unreachable} partition=$PART cpus=${cpus:-?} mem=${mem:-?}M accounting=$acct ours:[${pids# }] $(elapsed)"
	return $ok
}

stop_pid() { # name pid
	local i
	kill -TERM "$2" 2>/dev/null || true
	for ((i = 0; i < 100; i++)); do
		[[ -d /proc/$2 ]] || break
		sleep 0.2
	done
	if [[ -d /proc/$2 ]]; then kill -KILL "$2" 2>/dev/null || true; fi
	rm -f "$RUN/$1.started"
}
