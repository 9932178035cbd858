#!/bin/bash
# Submit one segment.sbatch job for each mosaic in INBOX whose output is missing, incomplete or
# damaged (`semdask verify` exit status not 0). Run by deploy/slurm/scrontab; safe to run by hand.
#   deploy/slurm/nightly.sh INBOX [SBATCH_SCRIPT]
# - never overlaps itself: the scrontab line holds `flock -n` on a lock file;
# - never two jobs for one mosaic: each job is named after its mosaic and submitted with
#   --dependency=singleton, and a mosaic whose job is still pending or running is skipped;
# - an interrupted or partial output is resumed, not skipped (segment.sbatch passes --resume).
set -euo pipefail

INBOX=${1:?usage: nightly.sh INBOX [SBATCH_SCRIPT]}
SCRIPT=${2:-deploy/slurm/segment.sbatch}
shopt -s nullglob

for mosaic in "${INBOX%/}"/*.ome.zarr; do
    case "${mosaic}" in *.segmented.ome.zarr) continue ;; esac   # our own outputs
    output="${mosaic%.ome.zarr}.segmented.ome.zarr"
    base=$(basename "${mosaic}" .ome.zarr)
    name="semdask-${base}"
    queued=$(squeue --me --noheader --name="${name}" --format=%i)
    if [[ -n "${queued}" ]]; then
        echo "nightly: ${mosaic}: job ${name} is pending or running, skipped"
        continue
    fi
    if [[ -e "${output}" ]] && semdask verify "${output}" >/dev/null 2>&1; then
        echo "nightly: ${mosaic}: ${output} is complete, skipped"
        continue
    fi
    echo "nightly: ${mosaic}: submitting ${name}"
    sbatch --job-name="${name}" --dependency=singleton --parsable "${SCRIPT}" "${mosaic}" "${output}"
done
