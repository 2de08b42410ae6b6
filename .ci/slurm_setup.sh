#!/bin/bash
# Install a single-machine SLURM (slurmctld, slurmd, clients) and munge from the Debian archive, for
# tests/test_slurm_jobs.py. tests/slurm_cluster.py writes its own slurm.conf and munge key in a temp
# folder and starts the daemons itself, so nothing is configured or started here.
#
# Never fails CI: without root/apt/network it says why and exits 0, and the SLURM tests then skip
# with the reason. Idempotent: a machine that already has the binaries is left alone.
set -u

PACKAGES=(slurmctld slurmd slurm-client munge)
have_all() {
    local b
    for b in slurmctld slurmd sbatch srun scontrol squeue sinfo munged mungekey; do
        PATH="$PATH:/usr/sbin:/sbin" command -v "$b" >/dev/null 2>&1 || return 1
    done
}

if have_all; then
    echo "slurm_setup: SLURM and munge already installed ($(PATH="$PATH:/usr/sbin" slurmctld -V 2>/dev/null))"
    exit 0
fi
SUDO=()
if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "slurm_setup: not root and no passwordless sudo; SLURM tests will be skipped"
        exit 0
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "slurm_setup: apt-get not available (not Debian/Ubuntu?); SLURM tests will be skipped"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
LOG="$(mktemp -t slurm_setup.XXXXXX.log)"
echo "slurm_setup: installing ${PACKAGES[*]} (log: $LOG)"
if ! timeout 600 "${SUDO[@]}" apt-get update -qq >"$LOG" 2>&1; then
    echo "slurm_setup: apt-get update failed; SLURM tests will be skipped. Last lines:"
    tail -n 5 "$LOG"
    exit 0
fi
# --no-install-recommends: the daemons and clients only (slurm-wlm would add ~40 plugin/dev packages).
# Package scripts may fail to start services where there is no init system; the binaries are what counts.
timeout 900 "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >>"$LOG" 2>&1
RC=$?
if have_all; then
    echo "slurm_setup: OK ($(PATH="$PATH:/usr/sbin" slurmctld -V 2>/dev/null))"
else
    echo "slurm_setup: apt-get install exited $RC and binaries are missing; SLURM tests will be skipped:"
    tail -n 10 "$LOG"
fi
exit 0
