#!/usr/bin/env bash
# start.sh [--nodes 1|2] - a real SLURM on this machine (Debian 12, root, no
# systemd), on loopback only, for tests and CI that submit real jobs (sbatch,
# srun, submitit): one node in partition `debug`; with --nodes 2 also nodeA and
# nodeB (127.0.0.2, 127.0.0.3) in partition `two` of the same cluster. Without
# --nodes it keeps what the last start set up.
#
# Installs the Debian packages if missing (apt-get update only when needed),
# writes /etc/slurm/slurm.conf and slurmdbd.conf, starts the daemons that are not
# running (munged, a private mariadbd, slurmdbd, slurmctld, slurmd, and the two
# nodes' slurmds), waits until the nodes are idle and sacct answers, prints one
# status line. Idempotent: when
# everything is up it checks and returns in about a second. Non-interactive
# (CI=true, no stdin). Environment: see lib.sh (SLURM_LOCAL_PARTITION, ...).
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

install_pkgs() {
	local pkgs=(munge slurm-wlm slurmctld slurmd slurm-client) missing=() p prc=/usr/sbin/policy-rc.d added=0 t
	local apt=(apt-get -y -q -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
	[[ $ACCT == 1 ]] && pkgs+=(slurmdbd mariadb-server mariadb-client)
	for p in "${pkgs[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
	done
	((${#missing[@]})) || return 0
	command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get (Debian 12 expected)"
	t=$SECONDS
	log "installing ${missing[*]} (log: $LOG/apt.log)"
	# keep the packages' maintainer scripts from starting services of their own
	if [[ ! -e $prc ]]; then
		printf '#!/bin/sh\nexit 101\n' >"$prc" && chmod +x "$prc" && added=1
	fi
	export DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=a
	local ok=0
	{
		# update first only when the package lists are missing or do not know a package
		if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null ||
			apt-cache policy "${missing[@]}" 2>/dev/null | grep -q 'Candidate: (none)' ||
			[[ $(apt-cache policy "${missing[@]}" 2>/dev/null | grep -c '^[^ ]') -lt ${#missing[@]} ]]; then
			"${apt[@]}" update || true
		fi
		# a failure may be stale lists (404s): update once and retry
		if "${apt[@]}" install --no-install-recommends "${missing[@]}" </dev/null ||
			{ "${apt[@]}" update && "${apt[@]}" install --no-install-recommends "${missing[@]}" </dev/null; }; then
			ok=1
		fi
	} >>"$LOG/apt.log" 2>&1
	((added)) && rm -f "$prc"
	if ((!ok)); then
		tail -n 20 "$LOG/apt.log" >&2
		die "apt-get install failed (log: $LOG/apt.log)"
	fi
	log "installed in $((SECONDS - t))s"
}

write_if_changed() { # dest mode owner:group <content ; returns 0 when it changed
	local tmp
	tmp=$(mktemp)
	cat >"$tmp"
	if [[ -f $1 ]] && cmp -s "$tmp" "$1" && [[ "$(stat -c '%a %U:%G' "$1")" == "$2 $3" ]]; then
		rm -f "$tmp"
		return 1
	fi
	install -m "$2" -o "${3%:*}" -g "${3#*:}" "$tmp" "$1"
	rm -f "$tmp"
}

write_configs() {
	local c cpus boards sockets cores threads mem acct_lines changed=1 two_lines="" gres_lines="" n
	c=$(slurmd -C 2>/dev/null | head -n 1)
	[[ -n $c ]] || die "slurmd -C failed"
	f() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$c"; }
	cpus=$(f CPUs) boards=$(f Boards) sockets=$(f SocketsPerBoard) cores=$(f CoresPerSocket) threads=$(f ThreadsPerCore)
	mem=$(($(f RealMemory) * 90 / 100)) # leave ~10% for the OS and the daemons
	if [[ $ACCT == 1 ]]; then
		acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819"
	else
		acct_lines="AccountingStorageType=accounting_storage/none"
	fi
	if [[ $NODES == 2 ]]; then
		# Each node its own address and slurmd port (one machine: the ports must differ); fake GPUs.
		for n in "${NODES2[@]}"; do
			two_lines+="NodeName=$n NodeHostname=$n NodeAddr=${NODE_ADDR[$n]} Port=${NODE_PORT[$n]} CPUs=$NODE2_CPUS RealMemory=$NODE2_MEM Gres=gpu:$NODE2_GPUS State=UNKNOWN"$'\n'
		done
		two_lines+="PartitionName=$PART2 Nodes=$(
			IFS=,
			echo "${NODES2[*]}"
		) Default=NO MaxTime=INFINITE State=UP LLN=YES DefMemPerCPU=$((NODE2_MEM / NODE2_CPUS))"
		gres_lines="GresTypes=gpu"
	fi
	# CR_CPU_Memory (not CR_Core_*): a 1-CPU job takes one CPU, not a whole core,
	# so hyperthreaded machines still run one job per CPU.
	write_if_changed "$ETC/slurm.conf" 644 root:root <<EOF || changed=0
# Written by ibbench slurm/local/start.sh: one-node test cluster on loopback, no cgroups,
# no systemd. Edit start.sh, not this file. The reasons for each setting: slurm/README.md.
ClusterName=localcluster
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=cred_expire=20
CredType=cred/munge
StateSaveLocation=$BASE/ctld
SlurmdSpoolDir=$BASE/d-%n
SlurmctldPidFile=$RUN/slurm/slurmctld.pid
SlurmdPidFile=$RUN/slurm/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmdParameters=config_overrides
$gres_lines
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,sched_interval=5
JobAcctGatherType=jobacct_gather/none
$acct_lines
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
JobRequeue=1
MinJobAge=600
KillWait=5
OverTimeLimit=0
Waittime=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus Boards=$boards SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem State=UNKNOWN
PartitionName=$PART Nodes=$HOST Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=$((mem / cpus))
$two_lines
EOF
	SLURM_CONF_CHANGED=$changed
	if [[ $NODES == 2 ]]; then
		for n in "${NODES2[@]}"; do
			gres_lines+=$'\n'"NodeName=$n Name=gpu File=$BASE/fakegpu[0-$((NODE2_GPUS - 1))]"
		done
		# gres/gpu without File is reported as 0 GPUs (the node goes INVAL): character devices that are
		# /dev/null stand in for the cards (no cgroups, so nothing is constrained by them)
		for ((n = 0; n < NODE2_GPUS; n++)); do
			[[ -c $BASE/fakegpu$n ]] || mknod -m 666 "$BASE/fakegpu$n" c 1 3
		done
		write_if_changed "$ETC/gres.conf" 644 root:root <<<"# Written by ibbench slurm/local/start.sh: fake GPUs for nodeA and nodeB${gres_lines#GresTypes=gpu}" && SLURM_CONF_CHANGED=1
		# The nodes' private hosts file: this machine's, plus nodeA and nodeB, so their names never reach DNS.
		{
			grep -v -w -e nodeA -e nodeB /etc/hosts
			for n in "${NODES2[@]}"; do echo "${NODE_ADDR[$n]} $n"; done
		} | write_if_changed "$BASE/hosts" 644 root:root || true
	fi
	[[ $ACCT == 1 ]] || return 0
	write_if_changed "$ETC/slurmdbd.conf" 600 slurm:slurm <<EOF || true
# Written by ibbench slurm/local/start.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DBPORT
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
EOF
	write_if_changed "$BASE/my.cnf" 644 root:root <<EOF || true
# Written by ibbench slurm/local/start.sh: private mariadb for slurmdbd, loopback only
[mysqld]
datadir=$BASE/mysql
socket=$RUN/mysql/mysqld.sock
pid-file=$RUN/mysql/mysqld.pid
bind-address=127.0.0.1
port=$DBPORT
user=mysql
innodb_buffer_pool_size=128M
innodb_log_file_size=64M
innodb_lock_wait_timeout=900
log-error=$LOG/mariadb.log
skip-name-resolve
EOF
}

make_dirs() {
	mkdir -p "$ETC" "$BASE/ctld" "$BASE/d" "$RUN/slurm" "$LOG" /run/munge
	# SlurmdSpoolDir is per node (d-%n); the one-node slurmd keeps its old folder, so that steps running
	# through a restart are still found there.
	[[ -e $BASE/d-$HOST ]] || ln -s d "$BASE/d-$HOST"
	for n in "${NODES2[@]}"; do mkdir -p "$BASE/d-$n"; done
	chown slurm:slurm "$BASE/ctld" "$RUN/slurm" "$LOG"
	chown munge:munge /run/munge
	if [[ $ACCT == 1 ]]; then
		mkdir -p "$BASE/mysql" "$RUN/mysql"
		chown mysql:mysql "$BASE/mysql" "$RUN/mysql"
		touch "$LOG/mariadb.log" && chown mysql:mysql "$LOG/mariadb.log"
	fi
}

# Run a daemon (or its launcher) detached from the caller: stdin from /dev/null, output to
# $LOG/<name>.out, and no other inherited descriptors (this script's lock, a test runner's
# pipes), so that nothing waits on a pipe the daemon keeps open.
spawn() { # name cmd...
	local name=$1
	shift
	(
		local fd
		for fd in /proc/"$BASHPID"/fd/*; do
			fd=${fd##*/}
			if ((fd > 2)); then eval "exec $fd>&-" 2>/dev/null || true; fi
		done
		exec "$@" </dev/null >>"$LOG/$name.out" 2>&1
	)
}

start_munge() {
	if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi # ours or someone's, working
	if [[ ! -s /etc/munge/munge.key ]]; then
		mungekey --create --keyfile=/etc/munge/munge.key >/dev/null
		chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
	fi
	mkdir -p /var/log/munge /var/lib/munge && chown munge:munge /var/log/munge /var/lib/munge
	rm -f /run/munge/munged.pid
	spawn munged "${CLEANENV[@]}" runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
	record munged "$(pidfile_pid /run/munge/munged.pid)" || die "munged did not start (see /var/log/munge/munged.log)"
	wait_for 10 sh -c 'munge -n | unmunge' || die "munge does not work"
}

start_db() {
	local sock=$RUN/mysql/mysqld.sock
	if ! ours mariadbd >/dev/null; then
		if [[ ! -d $BASE/mysql/mysql ]]; then
			mariadb-install-db --defaults-file="$BASE/my.cnf" --auth-root-authentication-method=socket \
				--skip-test-db >"$LOG/mariadb-init.log" 2>&1 </dev/null || die "mariadb-install-db failed ($LOG/mariadb-init.log)"
		fi
		rm -f "$RUN/mysql/mysqld.pid"
		spawn mariadb setsid -f "${CLEANENV[@]}" /usr/sbin/mariadbd --defaults-file="$BASE/my.cnf"
		wait_for 60 mariadb-admin --socket="$sock" ping || die "mariadb not answering (see $LOG/mariadb.log)"
		record mariadbd "$(pidfile_pid "$RUN/mysql/mysqld.pid")" || die "no mariadbd pid file"
		mariadb --socket="$sock" -e "
			CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
			CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DBPASS';
			GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
			GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" </dev/null || die "could not create the slurm db user"
	fi
	wait_for 60 mariadb-admin --socket="$sock" ping || die "mariadb not answering (see $LOG/mariadb.log)"
}

start_slurm_daemon() { # name [pidfile [cmd...]]; slurmctld/slurmd/slurmdbd fork and write their PidFile
	local name=$1 pf=${2:-$RUN/slurm/$1.pid} p
	shift $(($# > 1 ? 2 : 1))
	(($#)) || set -- "/usr/sbin/$name"
	if ours "$name" >/dev/null; then return 0; fi
	if p=$(foreign "${name%%-*}"); then die "a ${name%%-*} not started by start.sh is running (pid $p); stop it first"; fi
	rm -f "$pf"
	spawn "$name" "${CLEANENV[@]}" "$@" || die "$name failed to start (see $LOG/$name*.log, $LOG/$name.out)"
	record "$name" "$(pidfile_pid "$pf")" || die "$name did not stay up (see $LOG/$name*.log)"
}

# nodeA/nodeB: a slurmd -N <node> in its own UTS and mount namespaces, so that jobs there see the node's
# hostname, and a private hosts file (bind-mounted over /etc/hosts) that resolves nodeA and nodeB.
start_node_slurmd() { # node
	local n=$1
	start_slurm_daemon "slurmd-$n" "$RUN/slurm/slurmd-$n.pid" unshare --uts --mount --propagation private \
		sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && exec /usr/sbin/slurmd -N "$1"' sh "$n" "$BASE/hosts"
}

# Until every node is up (and, with accounting, sacct answers); a node left down is resumed now and then.
wait_nodes() {
	local n=0 st node all
	while ((n++ < 300)); do
		all=1
		for node in "$HOST" $([[ $NODES == 2 ]] && echo "${NODES2[@]}"); do
			st=$(node_state "$node" || true)
			node_up "$st" && continue
			all=0
			if [[ $st =~ (down|drain|fail) ]] && ((n % 25 == 0)); then
				scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
			fi
		done
		# with accounting, slurmctld registers the cluster with slurmdbd: wait for sacct too
		if ((all)) && { [[ $ACCT != 1 ]] || sacct -n -X -S now-1minutes >/dev/null 2>&1; }; then return 0; fi
		sleep 0.2
	done
	return 1
}

need_root
mkdir -p "$RUN" "$LOG"
take_lock
NODES=${NODES:-$(configured_nodes)}
if [[ $NODES == 1 && $(configured_nodes) == 2 ]] && [[ -n $(squeue -h -p "$PART2" -o %A 2>/dev/null) ]]; then
	die "jobs are queued or running in partition $PART2; cancel them before going back to --nodes 1"
fi
install_pkgs
make_dirs
write_configs
if [[ $SLURM_CONF_CHANGED == 1 ]]; then # the daemons must all read the same slurm.conf
	for n in "${NODES2[@]/#/slurmd-}" slurmd slurmctld; do
		if p=$(ours "$n"); then
			log "slurm.conf changed: restarting $n"
			stop_pid "$n" "$p"
		fi
	done
fi
start_munge
if [[ $ACCT == 1 ]]; then
	start_db
	start_slurm_daemon slurmdbd
	wait_for 60 sacctmgr -n list cluster || die "slurmdbd not answering (see $LOG/slurmdbd.log)"
fi
start_slurm_daemon slurmctld
start_slurm_daemon slurmd "$RUN/slurm/slurmd-$HOST.pid"
if [[ $NODES == 2 ]]; then
	for n in "${NODES2[@]}"; do start_node_slurmd "$n"; done
fi
echo "$NODES" >"$NODES_FILE"
wait_nodes || {
	status_line || true
	die "cluster not ready after 60s; logs in $LOG/"
}
status_line || die "cluster not ready; logs in $LOG/"
