# shellcheck shell=bash disable=SC2034
# lib.sh - shared by start.sh, stop.sh and status.sh: a real SLURM on this
# machine (Debian 12, root, no systemd), reached over loopback only: one node
# (partition `debug`), and with `--nodes 2` two more, nodeA and nodeB (partition
# `two`), each a second slurmd in its own UTS + mount namespace.
# Sourced, never run. See slurm/README.md for what the settings are and why.
#
# Arguments (start.sh, status.sh): --nodes 1|2 (default: what start.sh last set up)
#
# Environment:
#   SLURM_LOCAL_PARTITION=debug   name of the one-node partition (default for jobs)
#   SLURM_LOCAL_ACCOUNTING=1      mariadb + slurmdbd so `sacct` works (submitit polls
#                                 job state with sacct). 0 = no accounting: lighter, but
#                                 sacct fails and submitit then only sees result files.
#   SLURM_LOCAL_DB_PORT=3307      loopback TCP port of the private mariadb instance
#
# Layout: configs /etc/slurm/{slurm,slurmdbd}.conf (the path the client commands
# read by default), state /var/lib/ibbench-slurm, pids /run/ibbench-slurm, logs
# /var/log/ibbench-slurm. Ports: slurmctld 6817, slurmd 6818, slurmdbd 6819,
# nodeA's slurmd 127.0.0.2:6821, nodeB's 127.0.0.3:6822.

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
# The two-node partition: name, loopback address and slurmd port of each node (never in /etc/hosts:
# each of their slurmds sees a private hosts file, $BASE/hosts, bind-mounted in its own mount namespace).
PART2=two
NODES2=(nodeA nodeB)
declare -A NODE_ADDR=([nodeA]=127.0.0.2 [nodeB]=127.0.0.3)
declare -A NODE_PORT=([nodeA]=6821 [nodeB]=6822)
NODE2_CPUS=4      # declared, may exceed the real cores (SlurmdParameters=config_overrides): room to pack trials
NODE2_MEM=4096    # MB declared per node (memory is not enforced without cgroups)
NODE2_GPUS=2      # fake GPUs (GRES on /dev/null-like devices): jobs ask for GPUs, and Ray declares them, on a CPU box
NODES_FILE=$BASE/nodes # what start.sh last set up: 1 or 2

# --nodes N from the arguments; else what start.sh last set up; else 1.
NODES=""
while (($#)); do
	case $1 in
	--nodes)
		NODES=${2:-}
		shift $(($# > 1 ? 2 : 1))
		;;
	--nodes=*) NODES=${1#--nodes=}; shift ;;
	*) echo "slurm-local: unknown argument $1 (allowed: --nodes 1|2)" >&2; exit 2 ;;
	esac
done
[[ -z $NODES || $NODES =~ ^[12]$ ]] || { echo "slurm-local: --nodes: $NODES; allowed: 1, 2" >&2; exit 2; }
configured_nodes() { if [[ -s $NODES_FILE ]]; then cat "$NODES_FILE"; else echo 1; fi; }
# daemons start.sh may have started, under the name their .started file has
all_daemons() { echo "${DAEMONS[@]}" "${NODES2[@]/#/slurmd-}"; }

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

# pid of a daemon that start.sh started, if it is still that process (slurmd-nodeA is a slurmd)
ours() {
	local f=$RUN/$1.started pid
	[[ -f $f ]] || return 1
	pid=$(<"$f")
	[[ -n $pid && -d /proc/$pid && "$(cat /proc/"$pid"/comm 2>/dev/null)" == "${1%%-*}" ]] || return 1
	echo "$pid"
}
record() { # name pid
	[[ -n ${2:-} && -d /proc/$2 ]] || return 1
	echo "$2" >"$RUN/$1.started"
}
foreign_now() { # name: a process of that name that start.sh did not start (under any of its names)
	local p n mine=" "
	for n in $(all_daemons); do
		[[ ${n%%-*} == "$1" ]] && mine+="$(ours "$n" || true) "
	done
	for p in $(pgrep -x "$1" || true); do [[ $mine == *" $p "* ]] || {
		echo "$p"
		return 0
	}; done
	return 1
}
# ... for 5 s on end (prints its pid): a daemon that start.sh just started or stopped takes a moment to fork
# or to exit
foreign() {
	local i
	for ((i = 0; i < 25; i++)); do
		foreign_now "$1" >/dev/null || return 1
		sleep 0.2
	done
	foreign_now "$1"
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

node_state() { sinfo -h -n "${1:-$HOST}" -o %T 2>/dev/null | head -n 1; }
node_up() { [[ $1 =~ ^(idle|mixed|allocated|completing)$ ]]; }

# One line; returns 0 when the node takes jobs (and sacct answers, with accounting), and with
# --nodes 2 (asked, or set up by start.sh) nodeA and nodeB take jobs too.
status_line() {
	local st="" cpus="" mem="" acct pids="" n p ok=0 two="" want=${NODES:-$(configured_nodes)}
	if command -v sinfo >/dev/null; then
		read -r st cpus mem < <(sinfo -h -n "$HOST" -o '%T %c %m' 2>/dev/null | head -n 1) || true
	fi
	for n in $(all_daemons); do
		p=$(ours "$n" || true)
		[[ -n $p ]] && pids+=" $n=$p"
	done
	if [[ $want == 2 ]]; then
		for n in "${NODES2[@]}"; do
			p=$(node_state "$n" || true)
			node_up "${p:-}" || ok=1
			two+=" $n=${p:-unreachable}"
		done
		two=" partition2=$PART2[${two# }]"
	fi
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
	echo "slurm-local: $([[ $ok == 0 ]] && echo UP || echo DOWN) node=$HOST state=${st:-unreachable} partition=$PART cpus=${cpus:-?} mem=${mem:-?}M$two accounting=$acct ours:[${pids# }] $(elapsed)"
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
