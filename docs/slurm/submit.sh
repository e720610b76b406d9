#!/bin/bash
# Submit the capture array and its dependent finalize job (run from the repository root).
set -euo pipefail
mkdir -p logs
jid=$(sbatch --parsable docs/slurm/capture.sbatch)
sbatch --dependency=afterany:"${jid%%;*}" docs/slurm/finalize.sbatch
