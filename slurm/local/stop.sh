#!/usr/bin/env bash
# stop.sh - cancel all jobs, then stop only the daemons that start.sh started
# (pids recorded in /run/ibbench-slurm/*.started), the two-node partition's
# slurmds included. State, configs and the accounting database are kept, so a
# later start.sh is quick (and sets up as many nodes as before).
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need_root
take_lock

stopped=""
if ours slurmctld >/dev/null && ours slurmd >/dev/null; then
	jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ' || true)
	if [[ -n ${jobs// /} ]]; then
		# shellcheck disable=SC2086
		scancel $jobs 2>/dev/null || true
		for ((i = 0; i < 75; i++)); do
			[[ -z $(squeue -h -t R,CG -o %A 2>/dev/null) ]] && break
			sleep 0.2
		done
	fi
fi
# in three waves, so slurmctld can still flush to slurmdbd, and slurmdbd to mariadb
for wave in "slurmd ${NODES2[*]/#/slurmd-} slurmctld" "slurmdbd" "mariadbd munged"; do
	for n in $wave; do
		if p=$(ours "$n"); then
			stop_pid "$n" "$p" &
			stopped+=" $n=$p"
		else
			rm -f "$RUN/$n.started"
		fi
	done
	wait
done
echo "slurm-local: stopped [${stopped# }] $(elapsed)"
