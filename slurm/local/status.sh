#!/usr/bin/env bash
# status.sh - print the one-node SLURM's status line; exit 0 if it takes jobs, 1 otherwise.
# Starts nothing, needs no root (the pids of daemons are read from /run/ibbench-slurm).
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
status_line
